"""Pure-JAX chunk path on the GPU: time and peak memory at B=8, T=2048, H=16, K=V=128, bf16 (the core-ops issue).

Run on the GPU machine: `PYTHONPATH=. python3 benchmarks/bench_chunk.py` (writes chunk.json under $OUT or /tmp).
Times are medians after compile and warm-up; memory is XLA's analysis of the compiled program (arguments, outputs,
temporaries) and the device's peak_bytes_in_use.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.getcwd())
from benchmarks.bench_ops import bench_jax, jax_inputs  # noqa: E402
from benchmarks.shapes import HEADLINE_SHAPE  # noqa: E402
import gdn2_jax  # noqa: E402


def main():
  B, T, H, K, V = HEADLINE_SHAPE
  q, k, v, g, b, w, do = jax_inputs(B, T, H, K, V)
  res = {"device": jax.devices()[0].device_kind, "shape": [B, T, H, K, V]}
  for precision in ("default", "highest"):
    def fwd(q, k, v, g, b, w):
      return gdn2_jax.gdn2(q, k, v, g, b, w, use_qk_l2norm=True, backend="chunk", precision=precision)[0]

    def fwd_bwd(q, k, v, g, b, w, do):
      o, vjp = jax.vjp(fwd, q, k, v, g, b, w)
      return vjp(do)

    for mode, fn, args in (("fwd", fwd, (q, k, v, g, b, w)), ("fwd+bwd", fwd_bwd, (q, k, v, g, b, w, do))):
      ms, mem = bench_jax(fn, args, reps=10)
      stats = jax.devices()[0].memory_stats() or {}
      key = f"chunk_{precision}_{mode}"
      res[key] = {"ms": ms, "xla_bytes": mem, "device_peak_bytes": stats.get("peak_bytes_in_use")}
      print(f"{key:28s} {ms:8.2f} ms  xla {mem / 2**30:.2f} GiB  device peak "
            f"{stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB", flush=True)
  json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "chunk.json"), "w"), indent=1)


if __name__ == "__main__":
  main()
