"""Where the time goes inside one kernel: time it with one stage replaced by a cheap stand-in, and take differences.

The stand-ins give wrong numbers: this is timing only (no counters inside a kernel on these machines). Each variant
patches one in-kernel function of `pallas_kernels.gdn2.tiles` for the duration of its compile.

  PYTHONPATH=. python3 benchmarks/ablate_kernels.py [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from benchmarks.shapes import HEADLINE_SHAPE, SMOKE_SHAPE

OUT = os.environ.get("OUT", "/tmp")


def _variants():
  import jax.numpy as jnp
  from jax import lax
  from pallas_kernels.gdn2 import tiles

  def cheap_inverse(N, t_ref, terms, precision, precision3=None):  # no substitution, no products
    return tiles.eye(tiles.CH) - N

  def products_only_inverse(N, t_ref, terms, precision, precision3=None):  # the four 3xTF32 products, no D^-1
    p3 = precision if precision3 is None else precision3
    M = N
    X = tiles.eye(tiles.CH) - M
    X = X + tiles.dot3(X, tiles.dot3(M, M, p3), p3)
    return tiles.dot3_nt(X, M, p3)

  def one_pass_inverse(N, t_ref, terms, precision, precision3=None):  # the same four products in plain TF32
    p = lax.Precision.DEFAULT
    DinvT = tiles.expand_compact(tiles.diag_inverse_t(t_ref), terms, precision)
    M = tiles.dot_tn(DinvT, N, p)
    X = tiles.eye(tiles.CH) - M
    X = X + tiles.dot(X, tiles.dot(M, M, p), p)
    return tiles.dot_nt(X, DinvT, p)

  def no_diag_pairs(q_ref, k_ref, g_ref, b_ref, cols, *, with_q, unroll=False):
    z = jnp.zeros((tiles.SUB, tiles.SUB), tiles.F32) + jnp.sum(k_ref[:, cols].astype(tiles.F32))
    return z, (z if with_q else None)

  def no_product_nt(a, b, precision):  # keeps the operands' loads and elementwise work, drops the product
    return jnp.sum(a, axis=1, keepdims=True) + jnp.sum(b, axis=1)[None, :]

  def no_product(a, b, precision):
    return jnp.sum(a, axis=1, keepdims=True) + jnp.sum(b, axis=0)[None, :]

  def bf16_product_nt(a, b, precision):  # the pairs' products with bf16 operands (float32 accumulation)
    return tiles._dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), ((1,), (1,)), precision)

  def exp_of_sums_pairs(q_ref, k_ref, g_ref, b_ref, cols, *, with_q, unroll=False):
    """The in-sub-block pairs as before 2026-12-07: the exp of a running sum of g at every step (16x the exps)."""
    from jax.experimental import pallas as pl
    F32 = tiles.F32
    q = q_ref[:, cols].astype(F32) if with_q else None
    k = k_ref[:, cols].astype(F32)
    bk = b_ref[:, cols].astype(F32) * k
    row_idx, col_idx = tiles.iota((tiles.SUB, 1), 0), tiles.iota((tiles.SUB, tiles.SUB), 1)

    def step(t, carry):
      D, Tc, Pc = carry
      jl = tiles.SUB - 2 - t
      D = D + jnp.where(row_idx >= jl + 1, g_ref[pl.ds(jl + 1, 1), cols].astype(F32), 0.0)
      kE = k_ref[pl.ds(jl, 1), cols].astype(F32) * jnp.where(row_idx > jl, jnp.exp(D), 0.0)
      sel = col_idx == jl
      Tc = jnp.where(sel, Tc + jnp.sum(bk * kE, axis=1, keepdims=True), Tc)
      if with_q:
        Pc = jnp.where(sel, Pc + jnp.sum(q * kE, axis=1, keepdims=True), Pc)
      return D, Tc, Pc

    zero = jnp.zeros((tiles.SUB, tiles.SUB), F32)
    _, Tc, Pc = tiles._row_loop(tiles.SUB - 1, step, (jnp.zeros(k.shape, F32), zero, zero), unroll)
    return Tc, (Pc if with_q else None)

  return {
      "default": {},
      "diag_pairs=exp_of_sums": {"diag_pairs": exp_of_sums_pairs},
      "diag_sums=none": {"masked_sum": lambda mask, x, terms, precision=None: x},  # loads and stores kept
      "pairs_products=none": {"dot_nt": no_product_nt},
      "pairs_products=bf16": {"dot_nt": bf16_product_nt},
      "wy_products=none": {"dot": no_product},
      "inverse=I-N": {"wy_inverse": cheap_inverse},
      "inverse=products_only": {"wy_inverse": products_only_inverse},
      "inverse=tf32": {"wy_inverse": one_pass_inverse},
      "diag_pairs=none": {"diag_pairs": no_diag_pairs},
  }


@contextlib.contextmanager
def patched(mod, fields):
  old = {n: getattr(mod, n) for n in fields}
  for n, f in fields.items():
    setattr(mod, n, f)
  try:
    yield
  finally:
    for n, f in old.items():
      setattr(mod, n, f)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--cpu-smoke", action="store_true")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--config", default="{}")
  args = ap.parse_args()
  sys.path.insert(0, os.getcwd())
  import jax
  from benchmarks.bench_ops import bench_jax
  from benchmarks.kernel_times import kernel_args
  from pallas_kernels import ChunkConfig
  from pallas_kernels.gdn2 import tiles
  shape = SMOKE_SHAPE if args.cpu_smoke else HEADLINE_SHAPE
  cfg = ChunkConfig(**json.loads(args.config))
  fns = kernel_args(cfg, *shape, interpret=args.cpu_smoke)
  res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": jax.devices()[0].device_kind,
         "shape": shape, "config": args.config, "ms": {}}
  touched = {"wy_inverse": ("chunk_fwd",), "diag_pairs": ("diag_fwd",), "dot_nt": ("chunk_fwd",),
             "dot": ("chunk_fwd",), "masked_sum": ("diag_fwd",)}
  for label, fields in _variants().items():
    names = sorted({k for f in fields for k in touched[f]}) or ["diag_fwd", "chunk_fwd"]
    with patched(tiles, fields):
      for name in names:
        fn, argv = fns[name]
        ms, _ = bench_jax(lambda *a, fn=fn: fn(*a), argv, 1 if args.cpu_smoke else args.reps)
        res["ms"][f"{name}[{label}]"] = ms
        print(f"{name:10s} {label:24s} {ms:8.3f} ms", flush=True)
  json.dump(res, open(os.path.join(OUT, "ablate_kernels.json"), "w"), indent=1)


if __name__ == "__main__":
  main()
