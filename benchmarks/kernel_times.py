"""Where the time of the Pallas chunk kernels goes: each kernel alone, and the op end to end under `ChunkConfig`
variants, at B8 T2048 H16 K=V=128 bf16 (timing only: correctness is `bench_ops.py`'s job).

  PYTHONPATH=. python3 benchmarks/kernel_times.py [--budget-s 300] [--configs '[{"block_k": 32}, ...]']

Writes kernel_times.json under $OUT and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

OUT = os.environ.get("OUT", "/tmp")
from benchmarks.shapes import HEADLINE_SHAPE, SMOKE_SHAPE  # run from the repository root with PYTHONPATH=.

SHAPE = HEADLINE_SHAPE
DEFAULT_VARIANTS = [{}, {"block_k": 32}, {"block_k_bwd": 32}, {"block_v_state": 32}, {"block_v_state": 64},
                    {"num_warps_chunk": 8}, {"num_warps_pairs_bwd": 8}, {"num_warps_diag": 4},
                    {"num_warps_diag": 1}, {"num_stages": 2}]


def kernel_args(cfg, B, T, H, K, V, interpret: bool = False):
  """Runs the forward and backward kernels once (eagerly, jitted each) and returns `{name: (fn, args)}`."""
  import jax
  import jax.numpy as jnp
  from benchmarks.bench_ops import jax_inputs
  from pallas_kernels.gdn2 import pallas_triton as kern
  q, k, v, g, b, w, do = jax_inputs(B, T, H, K, V)
  h0 = jnp.zeros((B, H, K, V), jnp.float32)
  sc = K ** -0.5
  kw = dict(cfg=cfg, interpret=interpret)
  fns = {
      "diag_fwd": (lambda *a: kern.diag_fwd(*a, **kw), (q, k, g, b)),
  }
  tc, pc = jax.jit(fns["diag_fwd"][0])(q, k, g, b)
  fns["chunk_fwd"] = (lambda *a: kern.chunk_fwd(*a, scale=sc, **kw), (q, k, g, b, v, w, tc, pc))
  p, a, y, qg, ks, dec, u = jax.jit(fns["chunk_fwd"][0])(*fns["chunk_fwd"][1])
  fns["state_fwd"] = (lambda *x: kern.state_fwd(*x, None, **kw), (u, y, ks, dec, h0))
  r, fin, states = jax.jit(fns["state_fwd"][0])(*fns["state_fwd"][1])
  fns["out_fwd"] = (lambda *x: kern.out_fwd(*x, o_dtype=v.dtype, **kw), (qg, p, states, r))
  fns["state_bwd"] = (lambda *x: kern.state_bwd(*x, None, **kw), (y, qg, ks, p, dec, do, fin))
  dr, dsn, _ = jax.jit(fns["state_bwd"][0])(*fns["state_bwd"][1])
  fns["contract"] = (lambda *x: kern.contract(*x, **kw), (states, dsn, do, dr, r, a, v, w))
  dqg, dks, dy, ddec, dpf, daz, dv, dw = jax.jit(fns["contract"][0])(*fns["contract"][1])
  fns["wy_bwd"] = (lambda *x: kern.wy_bwd(*x, **kw), (q, k, g, b, a, daz, dy))
  dt = jax.jit(fns["wy_bwd"][0])(*fns["wy_bwd"][1])
  fns["diag_bwd"] = (lambda *x: kern.diag_bwd(*x, scale=sc, **kw), (q, k, g, b, dt, dpf))
  dbkd, dqd, dkd = jax.jit(fns["diag_bwd"][0])(*fns["diag_bwd"][1])
  fns["pairs_bwd"] = (lambda *x: kern.pairs_bwd(*x, scale=sc, **kw),
                      (q, k, g, b, a, dt, dpf, dy, dqg, dks, ddec, dbkd, dqd, dkd))
  return fns


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--budget-s", type=float, default=300)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--configs", default=None, help="JSON list of ChunkConfig overrides for the end-to-end variants")
  ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape in interpret mode: checks this script runs")
  ap.add_argument("--no-kernels", action="store_true", help="only the end-to-end variants")
  args = ap.parse_args()
  global SHAPE
  if args.cpu_smoke:
    SHAPE, args.reps = SMOKE_SHAPE, 1
  t0 = time.time()
  sys.path.insert(0, os.getcwd())
  import jax
  import jax.numpy as jnp
  from benchmarks.bench_ops import bench_jax, jax_inputs
  from pallas_kernels import ChunkConfig, chunk_gdn2
  res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": jax.devices()[0].device_kind,
         "shape": SHAPE, "kernels": {}, "e2e": {}}
  path = os.path.join(OUT, "kernel_times.json")
  B, T, H, K, V = SHAPE
  q, k, v, g, b, w, do = jax_inputs(B, T, H, K, V)
  h0 = jnp.zeros((B, H, K, V), jnp.float32)

  def timed(table, name, fn, argv):
    if time.time() - t0 > args.budget_s:
      print(f"{name:48s} skipped (budget)", flush=True)
      return
    try:
      tc = time.time()
      ms, mem = bench_jax(fn, argv, args.reps)
      table[name] = {"ms": ms, "bytes": mem}
      print(f"{name:48s} {ms:8.3f} ms   (compile + run {time.time() - tc:.0f} s)", flush=True)
    except Exception as e:  # record and go on
      table[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      print(f"{name:48s} FAILED {table[name]['error']}", flush=True)
    json.dump(res, open(path, "w"), indent=1)

  if not args.no_kernels:
    for name, (fn, argv) in kernel_args(ChunkConfig(), B, T, H, K, V, interpret=args.cpu_smoke).items():
      timed(res["kernels"], name, fn, argv)
  variants = json.loads(args.configs) if args.configs else DEFAULT_VARIANTS
  if args.cpu_smoke:
    variants = variants[:2]
  for ckw in variants:
    cfg = ChunkConfig(**ckw)
    label = ",".join(f"{a}={x}" for a, x in ckw.items()) or "default"

    def fwd(q, k, v, g, b, w, cfg=cfg):
      return chunk_gdn2(q, k, v, g, b, w, h0, scale=K ** -0.5, config=cfg, interpret=args.cpu_smoke)[0]

    def fb(q, k, v, g, b, w, do, fwd=fwd):
      return jax.vjp(fwd, q, k, v, g, b, w)[1](do)

    timed(res["e2e"], f"fwd[{label}]", fwd, (q, k, v, g, b, w))
    timed(res["e2e"], f"fwdbwd[{label}]", fb, (q, k, v, g, b, w, do))
  print("\nkernel        ms")
  for n, r in res["kernels"].items():
    print(f"{n:12s} {r.get('ms', float('nan')):7.3f}")


if __name__ == "__main__":
  main()
