"""The extra work of splitting one long sequence over P devices (context parallelism), measured on one GPU.

Unsplit: the Pallas op on the whole sequence, forward+backward. Split: what each of the P devices does for its T/P
tokens (`gdn2_jax.ops.context`, Pallas path): one kernel call on the widened columns `[v | 0]` from `[0 | I]`
(`context.pallas_span`: the run from a zero state, the transition `(M, c)` and the output correction basis) and
the correction `o + q_eff S_in`, forward+backward. The exchange itself (P x H x K x (K + V) numbers) is not timed:
one GPU. Reported: `P x t(shard) / t(unsplit)`, the factor by which the split multiplies the work (1.0 = free).

  PYTHONPATH=. python3 benchmarks/bench_context.py [--lengths 32768,65536,131072] [--shards 2,4,8] [--cpu-smoke]

Writes bench_context.json under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

OUT = os.environ.get("OUT", "/tmp")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lengths", default="32768,65536,131072")
  ap.add_argument("--shards", default="2,4,8")
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--budget-s", type=float, default=400)
  ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in interpret mode: checks the script runs")
  args = ap.parse_args()
  sys.path.insert(0, os.getcwd())
  import jax
  import jax.numpy as jnp
  from jax import lax
  from benchmarks.bench_ops import bench_jax, jax_inputs
  from gdn2_jax.ops import context, pallas_backend

  t0 = time.time()
  H, K, V = (args.heads, 128, 128) if not args.cpu_smoke else (2, 32, 32)
  lengths = [int(x) for x in args.lengths.split(",")] if not args.cpu_smoke else [256]
  shards = [int(x) for x in args.shards.split(",")] if not args.cpu_smoke else [2]
  reps = 1 if args.cpu_smoke else args.reps
  kw = dict(interpret=args.cpu_smoke)
  res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": jax.devices()[0].device_kind,
         "command": " ".join(sys.argv), "H": H, "K": K, "V": V, "unsplit_ms": {}, "shard_ms": {}, "overhead": {}}
  path = os.path.join(OUT, "bench_context.json")

  def fwdbwd(fn, n_in):
    def f(*a):
      out, vjp = jax.vjp(lambda *x: fn(*x), *a[:n_in])
      return vjp(jax.tree.map(jnp.ones_like, out))
    return f

  for T in lengths:
    if time.time() - t0 > args.budget_s:
      break
    q, k, v, g, b, w, _ = jax_inputs(1, T, H, K, V)
    op = lambda q, k, v, g, b, w, s0: pallas_backend.pallas_fwd(q, k, v, g, b, w, scale=K ** -0.5,
                                                                 initial_state=s0, **kw)[0]
    s0 = jnp.zeros((1, H, K, V), jnp.float32)
    ms, _ = bench_jax(fwdbwd(op, 7), (q, k, v, g, b, w, s0), reps)
    res["unsplit_ms"][str(T)] = ms
    print(f"T={T:6d} unsplit fwd+bwd {ms:8.3f} ms", flush=True)
    for P in shards:
      if time.time() - t0 > args.budget_s:
        break
      Ts = T // P
      xs = [x[:, :Ts] for x in (q, k, v, g, b, w)]

      def shard(q, k, v, g, b, w, s_in):
        r = context.pallas_span(q, k, v, g, b, w, scale=K ** -0.5, kernel_options=kw)
        o = r.o.astype(jnp.float32) + jnp.einsum("btnk,bnkv->btnv", r.q_eff.astype(jnp.float32), s_in[0],
                                                 precision=lax.Precision.HIGHEST)
        return o, r.M, r.c

      ms_s, _ = bench_jax(fwdbwd(shard, 7), (*xs, s0[None]), reps)
      key = f"T{T}_P{P}"
      res["shard_ms"][key] = ms_s
      res["overhead"][key] = P * ms_s / ms
      print(f"T={T:6d} P={P}: shard {ms_s:8.3f} ms, P x shard / unsplit = {P * ms_s / ms:5.2f}", flush=True)
      json.dump(res, open(path, "w"), indent=1)
  json.dump(res, open(path, "w"), indent=1)


if __name__ == "__main__":
  main()
