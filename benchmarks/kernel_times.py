"""Where the time of the Pallas chunk kernels goes: each kernel alone, and the op end to end under `ChunkConfig`
variants, at B8 T2048 H16 K=V=128 bf16 (timing only: correctness is `bench_ops.py`'s job). Times per call are
`bench_ops.bench_jax`'s: 10 calls back to back, one sync, as fla's do_bench measures device time; the op end to
end also with one sync per call (`sync_ms`, the method up to 2026-12-07).

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


def kernel_args(cfg, B, T, H, K, V, interpret: bool = False, data_cfg=None):
  """`{name: (fn, args)}` for every forward and backward kernel under `cfg`. The operands are computed once by
  running the kernels under `data_cfg` (default `cfg`; tuning settings do not change them, the residual dtype does)."""
  import jax
  import jax.numpy as jnp
  from benchmarks.bench_ops import jax_inputs
  from pallas_kernels.gdn2 import backward as bwd
  from pallas_kernels.gdn2 import forward as fwd
  from pallas_kernels.gdn2.common import ChunkShape
  q, k, v, g, b, w, do = jax_inputs(B, T, H, K, V)
  h0 = jnp.zeros((B, H, K, V), jnp.float32)
  sc = K ** -0.5
  rdt = cfg.residual_dtype(v.dtype)
  shape = ChunkShape.of(q, v)

  def make(c):
    kw = dict(cfg=c, interpret=interpret)
    return {
        "diag_fwd": lambda *a: fwd.diag_fwd(shape, *a, **kw),
        "chunk_fwd": lambda *a: fwd.chunk_fwd(shape, *a, scale=sc, rdt=rdt, **kw),
        "state_fwd": lambda *x: fwd.state_fwd(shape, *x, None, rdt=rdt, **kw),
        "out_fwd": lambda *x: fwd.out_fwd(shape, *x, o_dtype=v.dtype, **kw),
        "state_bwd": lambda *x: bwd.state_bwd(shape, *x, None, **kw),
        "contract": lambda *x: bwd.contract(shape, *x, **kw),
        "wy_bwd": lambda *x: bwd.wy_bwd(shape, *x, **kw),
        "diag_bwd": lambda *x: bwd.diag_bwd(shape, *x, scale=sc, **kw),
        "pairs_bwd": lambda *x: bwd.pairs_bwd(shape, *x, scale=sc, **kw)}

  # Each kernel's operands as the op passes them (named tuples of the earlier stages' outputs); at H = HV the
  # contractions' cotangents need no sum over value heads.
  f = make(data_cfg or cfg)
  run = lambda name, *a: jax.jit(f[name])(*a)
  diag = run("diag_fwd", q, k, g, b)
  terms = run("chunk_fwd", q, k, b, v, w, diag)
  state = run("state_fwd", terms, h0)
  state_ct = run("state_bwd", terms, do, state.final)
  contract_ct = run("contract", terms, state, state_ct, do, v, w)
  wy_ct = run("wy_bwd", k, diag.sums, b, terms, contract_ct)
  diag_ct = run("diag_bwd", q, k, g, b, wy_ct, contract_ct.dp_full)
  args = {"diag_fwd": (q, k, g, b), "chunk_fwd": (q, k, b, v, w, diag),
          "state_fwd": (terms, h0), "out_fwd": (terms, state),
          "state_bwd": (terms, do, state.final), "contract": (terms, state, state_ct, do, v, w),
          "wy_bwd": (k, diag.sums, b, terms, contract_ct), "diag_bwd": (q, k, g, b, wy_ct, contract_ct.dp_full),
          "pairs_bwd": (q, k, diag.sums, b, wy_ct, contract_ct, diag_ct)}
  fns = make(cfg)
  return {name: (fns[name], args[name]) for name in fns}


def bytes_moved(fn, argv) -> int:
  """Bytes of every operand read once and every result written once: the kernel's traffic floor."""
  import jax
  out = jax.eval_shape(fn, *argv)
  size = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  return int(size(argv) + size(out))


# Each variant: ChunkConfig fields and/or {"tiling": {kernel: {Tiling fields}}}; a tiling-only variant times the
# kernels it names, any other field every kernel (or those listed in "_kernels"). "_e2e": also time the op end to
# end.
DEFAULT_VARIANTS = [
    {"native_tf32x3": True, "_kernels": ["chunk_fwd"]},
    {"tiling": {"chunk_fwd": {"block_k": 32, "num_stages": 2}, "contract": {"block_k": 32, "num_stages": 2},
                "wy_bwd": {"block_k": 32, "num_stages": 2}, "pairs_bwd": {"block_k": 32, "num_stages": 2},
                "diag_bwd": {"num_stages": 2}, "diag_fwd": {"block_k": 32, "unroll": True, "num_stages": 2},
                "state_bwd": {"num_warps": 8}, "out_fwd": {"num_warps": 8}}},
    {"tiling": {"chunk_fwd": {"block_k": 64}, "contract": {"block_k": 64}, "wy_bwd": {"block_k": 64},
                "pairs_bwd": {"num_stages": 3}, "diag_bwd": {"block_k": 32},
                "diag_fwd": {"block_k": 32, "unroll": True, "num_warps": 4}, "state_fwd": {"num_stages": 2,
                                                                                         "num_warps": 8}}},
    {"tiling": {"chunk_fwd": {"block_k": 32, "num_warps": 8}, "contract": {"block_k": 32, "num_warps": 8},
                "pairs_bwd": {"num_stages": 2, "num_warps": 8}, "diag_bwd": {"num_warps": 4},
                "wy_bwd": {"block_k": 32, "num_warps": 8}}},
]


def check_accuracy(res: dict, configs, smoke: bool = False) -> None:
  """Relative error against the float64 oracle of `chunk_gdn2` under each config: bf16 inputs (B2 T512 H4),
  float32 with keys correlated 0.9, float32 with g log-uniform in [-1e3, -1e-4]; output, final state, gradients."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks.bench_ops import rel
  from pallas_kernels import ChunkConfig, chunk_gdn2
  from tests import oracle
  for label, ckw in configs:
    cfg = ChunkConfig(**ckw)
    for case, (B, T, H, K, V), dtype, regime, corr in [
        ("bf16", (2, 512, 4, 128, 128), jnp.bfloat16, "mild", 0.0),
        ("f32_corr0.9", (2, 512, 2, 128, 128), jnp.float32, "mild", 0.9),
        ("f32_strong", (2, 256, 2, 64, 128), jnp.float32, "loguniform", 0.0)]:
      if smoke:
        B, T, H, K, V = 1, 64, 1, 32, 32
      rng = np.random.default_rng(0)
      unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
      keys = lambda: unit(corr * rng.standard_normal(K) + np.sqrt(1 - corr ** 2) * rng.standard_normal((B, T, H, K)))
      q, k = keys(), keys()
      v = rng.standard_normal((B, T, H, V))
      g = (np.log(1 / (1 + np.exp(-(rng.standard_normal((B, T, H, K)) + 3.0)))) if regime == "mild"
           else -np.exp(rng.uniform(np.log(1e-4), np.log(1e3), (B, T, H, K))))
      b, w = rng.uniform(0, 1, (B, T, H, K)), rng.uniform(0, 1, (B, T, H, V))
      h0 = rng.standard_normal((B, H, K, V)) * 0.5
      do, dS = rng.standard_normal((B, T, H, V)), rng.standard_normal((B, H, K, V))
      cast = lambda x: jnp.asarray(x.astype(np.float32)).astype(dtype)
      args = [cast(q), cast(k), cast(v), jnp.asarray(g, jnp.float32), cast(b), cast(w), jnp.asarray(h0, jnp.float32)]

      def loss(*a):
        o, s = chunk_gdn2(*a, scale=K ** -0.5, config=cfg, interpret=smoke)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s * dS), (o, s)

      (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))(*args)
      with jax.enable_x64(True):
        a64 = [np.asarray(np.asarray(x, np.float32), np.float64) for x in args]

        def loss64(*a):
          o, s = oracle.gdn2_oracle(*a[:6], initial_state=a[6], scale=K ** -0.5)
          return jnp.sum(o * do) + jnp.sum(s * dS), (o, s)

        (_, (o2, s2)), g2 = jax.jit(jax.value_and_grad(loss64, argnums=tuple(range(7)), has_aux=True))(*a64)
        errs = {"o": rel(o, o2), "final_state": rel(s, s2)}
        for n, x, y in zip(("dq", "dk", "dv", "dg", "db", "dw", "dh0"), grads, g2):
          errs[n] = rel(x, y)
      res.setdefault("accuracy", {})[f"{label}/{case}"] = errs
      print(f"accuracy {label:18s} {case:12s} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--budget-s", type=float, default=300)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--configs", default=None, help="JSON list of ChunkConfig overrides (key `_e2e`: also time the op "
                  "end to end); each times the kernels its settings touch")
  ap.add_argument("--base", default="{}", help="ChunkConfig overrides every variant starts from (JSON)")
  ap.add_argument("--check", action="store_true", help="accuracy against float64 for the base config and with "
                  "float32 residuals")
  ap.add_argument("--check-configs", default=None, help="with --check: JSON list of ChunkConfig overrides to check "
                  "(default: the base config and float32 residuals)")
  ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape in interpret mode: checks this script runs")
  ap.add_argument("--no-kernels", action="store_true", help="only the end-to-end variants")
  ap.add_argument("--e2e-shapes", action="store_true", help="also the op end to end at B2 T8192 and B1 T32768")
  args = ap.parse_args()
  global SHAPE
  if args.cpu_smoke:
    SHAPE, args.reps = SMOKE_SHAPE, 1
  t0 = time.time()
  sys.path.insert(0, os.getcwd())
  import jax
  import jax.numpy as jnp
  from benchmarks.bench_ops import bench_jax, copy_tbps, jax_inputs
  from pallas_kernels import ChunkConfig, chunk_gdn2
  device = jax.devices()[0].device_kind
  res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device, "shape": SHAPE,
         "command": " ".join(sys.argv), "kernels": {}, "e2e": {}, "bytes": {}}
  path = os.path.join(OUT, "kernel_times.json")
  B, T, H, K, V = SHAPE
  q, k, v, g, b, w, do = jax_inputs(B, T, H, K, V)
  h0 = jnp.zeros((B, H, K, V), jnp.float32)
  base = json.loads(args.base)

  def timed(table, name, fn, argv, sync=False):
    if time.time() - t0 > args.budget_s:
      print(f"{name:48s} skipped (budget)", flush=True)
      return
    try:
      tc = time.time()
      ms, mem, *sync_ms = bench_jax(fn, argv, args.reps, with_sync=sync)
      table[name] = {"ms": ms, "bytes": mem}
      extra = ""
      if sync_ms:
        table[name]["sync_ms"] = sync_ms[0]
        extra = f"  (one call with a sync: {sync_ms[0]:.3f} ms)"
      print(f"{name:48s} {ms:8.3f} ms{extra}   (compile + run {time.time() - tc:.0f} s)", flush=True)
    except Exception as e:  # record and go on
      table[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      print(f"{name:48s} FAILED {table[name]['error']}", flush=True)
    json.dump(res, open(path, "w"), indent=1)

  def e2e(label, cfg):
    def fwd(q, k, v, g, b, w, cfg=cfg):
      return chunk_gdn2(q, k, v, g, b, w, h0, scale=K ** -0.5, config=cfg, interpret=args.cpu_smoke)[0]

    def fb(q, k, v, g, b, w, do, fwd=fwd):
      return jax.vjp(fwd, q, k, v, g, b, w)[1](do)

    timed(res["e2e"], f"fwd[{label}]", fwd, (q, k, v, g, b, w), sync=True)
    timed(res["e2e"], f"fwdbwd[{label}]", fb, (q, k, v, g, b, w, do), sync=True)

  if args.check:
    checks = [("base", base), ("residuals=float32", {**base, "residuals": "float32", "wy_residuals": "float32"})]
    if args.check_configs:
      checks = [(",".join(f"{a}={x}" for a, x in c.items()) or "base", {**base, **c})
                for c in json.loads(args.check_configs)]
    check_accuracy(res, checks, args.cpu_smoke)
  e2e("default", ChunkConfig(**base))
  fns = kernel_args(ChunkConfig(**base), B, T, H, K, V, interpret=args.cpu_smoke)
  if not args.no_kernels:
    for name, (fn, argv) in fns.items():
      res["bytes"][name] = bytes_moved(fn, argv)
      timed(res["kernels"], f"{name}[default]", fn, argv)
  variants = json.loads(args.configs) if args.configs is not None else DEFAULT_VARIANTS
  e2e_cfgs = [("default", ChunkConfig(**base))]
  if args.cpu_smoke:
    variants = variants[:2]
  for ckw in variants:
    ckw = dict(ckw)
    want_e2e = ckw.pop("_e2e", False)
    only = ckw.pop("_kernels", None)
    tiling = ckw.pop("tiling", {})
    cfg = ChunkConfig(**{**base, **ckw})
    for kname, fields in tiling.items():
      cfg = cfg.with_tiling(kname, **fields)
    label = ",".join(f"{a}={x}" for a, x in ckw.items()) or "tiling"
    if want_e2e:
      e2e(label, cfg)
      e2e_cfgs.append((label, cfg))
    if args.no_kernels:
      continue
    same_data = cfg.residual_dtype(v.dtype) == ChunkConfig(**base).residual_dtype(v.dtype)
    vfns = kernel_args(cfg, B, T, H, K, V, interpret=args.cpu_smoke,
                       data_cfg=ChunkConfig(**base) if same_data else None)
    for name in (only or (vfns if ckw else tiling)):
      tl = ",".join(f"{a}={x}" for a, x in tiling.get(name, {}).items())
      kl = ",".join(x for x in (label if ckw else "", tl) if x)
      timed(res["kernels"], f"{name}[{kl}]", *vfns[name])
  if args.e2e_shapes:  # the base config and every `_e2e` variant at the two long shapes
    for shape in [(2, 8192, 16, 128, 128), (1, 32768, 16, 128, 128)]:
      Bs, Ts, Hs, Ks, Vs = shape
      xs = jax_inputs(Bs, Ts, Hs, Ks, Vs)
      hs = jnp.zeros((Bs, Hs, Ks, Vs), jnp.float32)
      for label, cfg in e2e_cfgs:
        def fwd(q, k, v, g, b, w, cfg=cfg, hs=hs, Ks=Ks):
          return chunk_gdn2(q, k, v, g, b, w, hs, scale=Ks ** -0.5, config=cfg)[0]

        def fb(q, k, v, g, b, w, do, fwd=fwd):
          return jax.vjp(fwd, q, k, v, g, b, w)[1](do)

        timed(res["e2e"], f"fwd[{label},B{Bs}_T{Ts}]", fwd, xs[:6], sync=True)
        timed(res["e2e"], f"fwdbwd[{label},B{Bs}_T{Ts}]", fb, xs, sync=True)
  tbps = copy_tbps(device)
  print(f"\n{device}, B{B} T{T} H{H} K{K} V{V}; copy ceiling {tbps} TB/s")
  print(f"{'kernel':12s} {'ms':>7s} {'MB':>7s} {'GB/s':>7s} {'of copy':>7s}   best variant")
  for name in fns:
    r = res["kernels"].get(f"{name}[default]", {})
    ms = r.get("ms", float("nan"))
    mb = res["bytes"].get(name, 0) / 1e6
    alts = [(x["ms"], key) for key, x in res["kernels"].items() if key.startswith(name + "[") and "ms" in x]
    best = min(alts) if alts else (float("nan"), "-")
    print(f"{name:12s} {ms:7.3f} {mb:7.0f} {mb / ms:7.0f} {mb / ms / (tbps * 1e3):7.2f}   {best[1]} {best[0]:.3f}")
  for key, x in res["e2e"].items():
    print(f"{key:60s} {x.get('ms', float('nan')):8.3f} ms")
  json.dump(res, open(path, "w"), indent=1)


if __name__ == "__main__":
  main()
