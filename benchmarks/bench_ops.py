"""GDN-2 op benchmark on a CUDA GPU: correctness against float64 and timing of every implementation, in one run.

Implementations: our Pallas kernels (`gdn2(..., backend="pallas")`), our pure-JAX chunk path (`backend="chunk"`,
TF32 products), fla's `chunk_gdn2` and `chunk_kda` (PyTorch/Triton, in a subprocess so that JAX and PyTorch do not
share the GPU memory), and cuDNN causal attention (`jax.nn.dot_product_attention(implementation="cudnn")`).
Shapes (B, T, H, K, V): `benchmarks/shapes.py: OP_SHAPES` (B8 T2048, B2 T8192, B1 T32768, H16 K=V=128), bf16; inputs as
docs/algorithm.md section 10 (q, k L2-normalised in the op, g = logsigmoid(randn + 3), b, w uniform in [0, 1]).

Run on the GPU machine from the repository root (fla wheels carried in .whl, see docs/algorithm.md section 10):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/fla*.whl .whl/flash_linear*.whl
  export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=/tmp/tcache; mkdir -p /tmp/tcache
  cp -r benchmarks/fla_autotune/* /tmp/tcache/   # fla's autotuning results (H200, triton 3.6): skips ~8 minutes
  PYTHONPATH=/tmp/site:. python3 benchmarks/bench_ops.py [--quick] [--skip-fla]
Writes results_ops.json, results_ops.md and ops_time_vs_T.png under $OUT (or /tmp).
`--quick`: correctness (small shapes, every gradient, against the float64 oracle) and one timing shape, no fla.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.shapes import OP_SHAPES  # run from the repository root with PYTHONPATH=.

SHAPES = list(OP_SHAPES)
# Device-copy ceilings measured on the lent machines (read + write): H100 docs/algorithm.md section 10, H200 the device
# tool's KINDS.md (2026-11-04, Firecracker). The floor fraction uses the one of the device the run is on.
COPY_TBPS_BY_DEVICE = {"H100": 3.0, "H200": 4.3}


def copy_tbps(device_kind: str) -> float:
  for name, tbps in COPY_TBPS_BY_DEVICE.items():
    if name in device_kind:
      return tbps
  return 3.0
OUT = os.environ.get("OUT", "/tmp")


def floor_bytes(B, T, H, K, V, backward: bool) -> int:
  """Fewest bytes through device memory: q, k, b, v, w (bf16) and g (f32) read, o written; with the backward,
  the inputs read again, do read and the six input gradients written (in their dtypes)."""
  n = B * T * H
  inputs = n * (3 * K * 2 + K * 4 + 2 * V * 2)
  fwd = inputs + n * V * 2
  if not backward:
    return fwd
  return fwd + inputs + n * V * 2 + inputs


# ------------------------------------------------------------------------------------------------------------ fla

def fla_inputs(B, T, H, K, V):
  """fla's benchmark inputs on the GPU, seed 0: `q, k, v, g, b, w` (bf16; g float32, log-sigmoid of N(3, 1))."""
  import torch
  import torch.nn.functional as F
  dev = "cuda"
  torch.manual_seed(0)
  q = torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16)
  k = torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16)
  v = torch.randn(B, T, H, V, device=dev, dtype=torch.bfloat16)
  g = F.logsigmoid(torch.randn(B, T, H, K, device=dev, dtype=torch.float32) + 3.0)
  b = torch.rand(B, T, H, K, device=dev, dtype=torch.bfloat16)
  w = torch.rand(B, T, H, V, device=dev, dtype=torch.bfloat16)
  return q, k, v, g, b, w


def run_fla(shapes, reps_ms: int, repeats: int = 3) -> dict:
  """Times fla chunk_gdn2 / chunk_kda (bf16; the median of `repeats` do_bench medians), peak memory, error of
  chunk_gdn2 against a float64 recurrence."""
  import torch
  import torch.nn.functional as F
  import triton
  from fla.ops.gdn2 import chunk_gdn2
  from fla.ops.kda import chunk_kda

  res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
  dev = "cuda"
  for (B, T, H, K, V) in shapes:
    tag = f"B{B}_T{T}"
    q, k, v, g, b, w = fla_inputs(B, T, H, K, V)
    beta = torch.rand(B, T, H, device=dev, dtype=torch.bfloat16)
    for x in (q, k, v, g, b, w, beta):
      x.requires_grad_(True)
    fns = {
        "fla_gdn2": lambda: chunk_gdn2(q, k, v, g, b, w, use_qk_l2norm_in_kernel=True)[0],
        "fla_kda": lambda: chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0],
    }
    for name, f in fns.items():
      do = torch.randn(B, T, H, V, device=dev, dtype=torch.bfloat16)
      for mode in ("fwd", "fwdbwd"):
        def run(f=f, do=do, mode=mode):
          if mode == "fwd":
            with torch.no_grad():
              return f()
          o = f()
          o.backward(do)
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        # Several timings, each a median of do_bench: fla's own forward moves between runs of one session.
        runs = [triton.testing.do_bench(run, warmup=25, rep=reps_ms, return_mode="median") for _ in range(repeats)]
        ms = sorted(runs)[len(runs) // 2]
        peak = torch.cuda.max_memory_allocated() - base
        res[f"{name}_{mode}_{tag}"] = {"ms": ms, "runs_ms": runs, "peak_bytes": int(peak)}
        print(f"{name:10s} {mode:7s} {tag:12s} {ms:8.3f} ms (runs {', '.join(f'{x:.3f}' for x in runs)})  "
              f"peak {peak / 2**30:.2f} GiB", flush=True)
      for x in (q, k, v, g, b, w, beta):
        x.grad = None
    del q, k, v, g, b, w, beta
    torch.cuda.empty_cache()
  # error of fla's chunk_gdn2 against a float64 recurrence (B=2, T=512, H=4, bf16 inputs), for the record
  torch.manual_seed(1)
  B, T, H, K, V = 2, 512, 4, 128, 128
  q = F.normalize(torch.randn(B, T, H, K, device=dev), dim=-1).bfloat16()
  k = F.normalize(torch.randn(B, T, H, K, device=dev), dim=-1).bfloat16()
  v = torch.randn(B, T, H, V, device=dev).bfloat16()
  g = F.logsigmoid(torch.randn(B, T, H, K, device=dev) + 3.0)
  b = torch.rand(B, T, H, K, device=dev).bfloat16()
  w = torch.rand(B, T, H, V, device=dev).bfloat16()
  o = chunk_gdn2(q, k, v, g, b, w)[0].double()
  S = torch.zeros(B, H, K, V, device=dev, dtype=torch.float64)
  ref = torch.empty(B, T, H, V, device=dev, dtype=torch.float64)
  qd, kd, vd, gd, bd, wd = (x.double() for x in (q, k, v, g, b, w))
  for t in range(T):
    S = S * gd[:, t].exp()[..., None]
    r = torch.einsum("bhkv,bhk->bhv", S, bd[:, t] * kd[:, t])
    S = S + kd[:, t][..., None] * (wd[:, t] * vd[:, t] - r)[..., None, :]
    ref[:, t] = K ** -0.5 * torch.einsum("bhkv,bhk->bhv", S, qd[:, t])
  res["fla_gdn2_rel_err_bf16_B2_T512_H4"] = float((o - ref).norm() / ref.norm())
  print("fla chunk_gdn2 rel err vs float64 (bf16 inputs):", res["fla_gdn2_rel_err_bf16_B2_T512_H4"], flush=True)
  return res


# ------------------------------------------------------------------------------------------------------------ jax

def jax_inputs(B, T, H, K, V, seed=0, dtype="bfloat16"):
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.PRNGKey(seed), 7)
  dt = jnp.dtype(dtype)
  q = jax.random.normal(keys[0], (B, T, H, K), dt)
  k = jax.random.normal(keys[1], (B, T, H, K), dt)
  v = jax.random.normal(keys[2], (B, T, H, V), dt)
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, K), jnp.float32) + 3.0)
  b = jax.random.uniform(keys[4], (B, T, H, K), dt)
  w = jax.random.uniform(keys[5], (B, T, H, V), dt)
  do = jax.random.normal(keys[6], (B, T, H, V), dt)
  return q, k, v, g, b, w, do


# Calls per timed batch (`bench_jax`): back to back, one sync at the end, so the time per call is the device's, as
# fla's `triton.testing.do_bench` measures it with CUDA events. 1 times each call alone with a sync, which adds the
# host's dispatch and synchronisation (about 0.25 ms on the lent H100, 2026-12-08) to every call; that was the
# method up to 2026-12-07. `GDN2_BENCH_BATCH` overrides it.
BATCH = int(os.environ.get("GDN2_BENCH_BATCH", "10"))


def bench_jax(fn, args, reps: int = 20, batch: int | None = None, with_sync: bool = False):
  """Median time per call (ms) of a jitted call, after compile and warm-up, over `reps` batches of `batch` calls
  issued back to back (one sync per batch); and XLA's memory analysis (bytes). With `with_sync`, also the median
  of `reps` single calls each followed by a sync (host dispatch and sync included): `(ms, peak, sync_ms)`."""
  import jax
  import numpy as np
  batch = BATCH if batch is None else batch
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = int(mem.temp_size_in_bytes + mem.output_size_in_bytes + mem.argument_size_in_bytes
               - mem.alias_size_in_bytes)
  for _ in range(3):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(batch):
      out = compiled(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) * 1e3 / batch)
  if not with_sync:
    return float(np.median(times)), peak
  sync = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    sync.append((time.perf_counter() - t) * 1e3)
  return float(np.median(times)), peak, float(np.median(sync))


def rel(x, ref) -> float:
  import numpy as np
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(x)):
    return float("inf")
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def check_small(res: dict, only=None) -> None:
  """Every gradient at small shapes, float32 and bf16 inputs, strong and mild gates, vs the float64 oracle."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import gdn2_jax
  from tests import oracle
  rng = np.random.default_rng(0)
  # Keys with correlation `corr` (a shared direction): SiLU makes keys mostly positive once activations are
  # large, and correlated keys are where an unstable triangular inverse fails (random keys hide it).
  for name, (B, T, H, HV, K, V), dtype, regime, corr in [
      ("f32_mild", (2, 300, 2, 4, 128, 64), jnp.float32, "mild", 0.0),
      ("f32_strong_varied", (2, 256, 2, 2, 64, 128), jnp.float32, "loguniform", 0.0),
      ("bf16_mild", (2, 512, 4, 4, 128, 128), jnp.bfloat16, "mild", 0.0),
      ("f32_correlated_keys", (2, 512, 2, 2, 128, 128), jnp.float32, "mild", 0.9),
      ("bf16_correlated_keys", (2, 512, 4, 4, 128, 128), jnp.bfloat16, "mild", 0.9),
  ]:
    if only is not None and name not in only:
      continue
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    keys = lambda: unit(corr * rng.standard_normal(K) + np.sqrt(1 - corr ** 2) * rng.standard_normal((B, T, H, K)))
    q = keys()
    k = keys()
    v = rng.standard_normal((B, T, HV, V))
    if regime == "mild":
      g = np.log(1 / (1 + np.exp(-(rng.standard_normal((B, T, H, K)) + 3.0))))
    else:
      g = -np.exp(rng.uniform(np.log(1e-4), np.log(1e3), (B, T, H, K)))
    b = rng.uniform(0, 1, (B, T, H, K))
    w = rng.uniform(0, 1, (B, T, HV, V))
    h0 = rng.standard_normal((B, HV, K, V)) * 0.5
    do = rng.standard_normal((B, T, HV, V))
    dS = rng.standard_normal((B, HV, K, V))
    cast = lambda x: jnp.asarray(x.astype(np.float32)).astype(dtype)
    args = [cast(q), cast(k), cast(v), jnp.asarray(g, jnp.float32), cast(b), cast(w), jnp.asarray(h0, jnp.float32)]

    def loss(*a):
      o, s = gdn2_jax.gdn2(*a[:6], initial_state=a[6], output_final_state=True, backend="pallas")
      return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s * dS), (o, s)

    (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))(*args)
    with jax.enable_x64(True):
      a64 = [np.asarray(np.asarray(x, np.float32), np.float64) for x in args]

      def loss64(*a):
        o, s = oracle.gdn2_oracle(*a[:6], initial_state=a[6])
        return jnp.sum(o * do) + jnp.sum(s * dS), (o, s)

      (_, (o2, s2)), g2 = jax.jit(jax.value_and_grad(loss64, argnums=tuple(range(7)), has_aux=True))(*a64)
      errs = {"o": rel(o, o2), "final_state": rel(s, s2)}
      for n, x, y in zip(("dq", "dk", "dv", "dg", "db", "dw", "dh0"), grads, g2):
        errs[n] = rel(x, y)
    res[f"check_{name}"] = errs
    print(f"check {name:20s} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)


def check_full(res: dict, shape) -> None:
  """Full-size forward (o and final state) of the Pallas kernels against a float64 recurrence."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import gdn2_jax
  B, T, H, K, V = shape
  q, k, v, g, b, w, _ = jax_inputs(B, T, H, K, V, seed=1)
  o, s = jax.jit(lambda *a: gdn2_jax.gdn2(*a, use_qk_l2norm=True, output_final_state=True, backend="pallas"))(
      q, k, v, g, b, w)
  with jax.enable_x64(True):
    a64 = [jnp.asarray(np.asarray(x, np.float32), jnp.float64) for x in (q, k, v, g, b, w)]
    o2, s2 = jax.jit(lambda *a: gdn2_jax.gdn2(*a, use_qk_l2norm=True, output_final_state=True,
                                               backend="recurrent"))(*a64)
    e = {"o": rel(o, o2), "final_state": rel(s, s2)}
  res[f"check_full_B{B}_T{T}"] = e
  print(f"check full B{B} T{T}: o {e['o']:.2e}  final {e['final_state']:.2e} (bf16 inputs, float64 reference)",
        flush=True)


def run_jax(shapes, res: dict, impls, reps: int) -> None:
  import jax
  import jax.numpy as jnp
  import gdn2_jax
  res["jax"] = jax.__version__
  res["jax_device"] = str(jax.devices()[0].device_kind)
  for (B, T, H, K, V) in shapes:
    tag = f"B{B}_T{T}"
    q, k, v, g, b, w, do = jax_inputs(B, T, H, K, V)
    for impl in impls:
      if impl == "cudnn_attention":
        def f(q, k, v, g, b, w):
          return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      else:
        kw = {"backend": impl} if impl == "pallas" else {"backend": "chunk", "precision": "default"}

        def f(q, k, v, g, b, w, kw=kw):
          return gdn2_jax.gdn2(q, k, v, g, b, w, use_qk_l2norm=True, **kw)[0]

      def fb(q, k, v, g, b, w, do, f=f):
        o, vjp = jax.vjp(f, q, k, v, g, b, w)
        return vjp(do)

      for mode, fn, args in (("fwd", f, (q, k, v, g, b, w)), ("fwdbwd", fb, (q, k, v, g, b, w, do))):
        key = f"{impl}_{mode}_{tag}"
        try:
          ms, peak = bench_jax(fn, args, reps)
          res[key] = {"ms": ms, "peak_bytes": peak}
          print(f"{impl:16s} {mode:7s} {tag:12s} {ms:8.3f} ms  mem {peak / 2**30 if peak else -1:.2f} GiB",
                flush=True)
        except Exception as e:  # out of memory or a missing implementation: record and go on
          res[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
          print(f"{impl:16s} {mode:7s} {tag:12s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        json.dump(res, open(os.path.join(OUT, "results_ops.json"), "w"), indent=1)


def kernel_breakdown(res: dict, shape) -> None:
  """Times each Pallas kernel alone at one shape (where the time goes; `kernel_times.py` has config variants)."""
  from benchmarks.kernel_times import kernel_args
  from pallas_kernels import ChunkConfig
  times = {}
  for name, (fn, argv) in kernel_args(ChunkConfig(), *shape).items():
    try:
      times[name] = bench_jax(fn, argv, 10)[0]
    except Exception as e:  # record and go on
      times[name] = f"{type(e).__name__}: {str(e)[:200]}"
  res["kernels"] = times
  print("kernels " + "  ".join(f"{n} {t:.3f}" if isinstance(t, float) else f"{n} FAILED" for n, t in times.items()),
        flush=True)


def report(res: dict, shapes) -> str:
  lines = [f"Device: {res.get('jax_device', '?')} (fla run: {res.get('fla', {}).get('device', 'not run')}); "
           f"jax {res.get('jax')}, torch {res.get('fla', {}).get('torch', '-')}, "
           f"triton {res.get('fla', {}).get('triton', '-')}. Median times, bf16, H=16, K=V=128.", "",
           "| impl | shape | fwd ms | fwd+bwd ms | fwd vs fla | fwd+bwd vs fla | fwd floor frac | fwd+bwd floor frac "
           "| mem fwd+bwd GiB |", "|---|---|---|---|---|---|---|---|---|"]
  fla = res.get("fla", {})
  tbps = copy_tbps(res.get("jax_device", ""))
  for (B, T, H, K, V) in shapes:
    tag = f"B{B}_T{T}"
    f_fwd = fla.get(f"fla_gdn2_fwd_{tag}", {}).get("ms")
    f_fb = fla.get(f"fla_gdn2_fwdbwd_{tag}", {}).get("ms")
    floor_f = floor_bytes(B, T, H, K, V, False) / (tbps * 1e9)
    floor_b = floor_bytes(B, T, H, K, V, True) / (tbps * 1e9)
    rows = [("pallas", res), ("chunk", res), ("cudnn_attention", res), ("fla_gdn2", fla), ("fla_kda", fla)]
    for name, src in rows:
      a = src.get(f"{name}_fwd_{tag}", {})
      c = src.get(f"{name}_fwdbwd_{tag}", {})
      fm, bm = a.get("ms"), c.get("ms")
      fmt = lambda x: "-" if x is None else f"{x:.2f}"
      ratio = lambda x, y: "-" if (x is None or y is None) else f"{y / x:.2f}x"
      frac = lambda fl, x: "-" if x is None else f"{fl / x:.2f}"
      mem = c.get("peak_bytes")
      lines.append(f"| {name} | {tag} | {fmt(fm)} | {fmt(bm)} | {ratio(fm, f_fwd)} | {ratio(bm, f_fb)} | "
                   f"{frac(floor_f, fm)} | {frac(floor_b, bm)} | {'-' if not mem else f'{mem / 2**30:.2f}'} |")
  lines += ["", "Ratios are fla time / our time (above 1: faster than fla). Floor fraction: memory-traffic floor "
            f"(inputs once, outputs once, at {tbps} TB/s) / time. JAX memory: XLA's memory analysis of the "
            "compiled call (arguments + outputs + temporaries); fla: torch.cuda.max_memory_allocated above the "
            "inputs.", ""]
  for key, val in res.items():
    if key.startswith("check"):
      lines.append(f"- {key}: " + ", ".join(f"{n} {e:.1e}" for n, e in val.items()))
  if "fla_gdn2_rel_err_bf16_B2_T512_H4" in fla:
    lines.append(f"- fla chunk_gdn2 vs float64 (bf16, B2 T512 H4): {fla['fla_gdn2_rel_err_bf16_B2_T512_H4']:.1e}")
  return "\n".join(lines)


def plot(res: dict, shapes) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib missing: no plot")
    return
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  fla = res.get("fla", {})
  Ts = [s[1] for s in shapes]
  for ax, mode in zip(axes, ("fwd", "fwdbwd")):
    # Every implementation the results hold (keys `<impl>_<mode>_B<b>_T<t>`), ours first, then fla's.
    for src in (res, fla):
      names = sorted({key.split(f"_{mode}_B")[0] for key in src if f"_{mode}_B" in key})
      for name in names:
        ys = [src.get(f"{name}_{mode}_B{B}_T{T}", {}).get("ms") for (B, T, *_) in shapes]
        pts = [(t, y) for t, y in zip(Ts, ys) if y is not None]
        if pts:
          ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (B * T = 16384 to 32768 tokens, H=16, K=V=128, bf16)")
    ax.set_ylabel("ms (median)")
    ax.set_title("forward" if mode == "fwd" else "forward + backward")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(OUT, "ops_time_vs_T.png"), dpi=110)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--skip-fla", action="store_true")
  ap.add_argument("--fla-only", action="store_true")
  ap.add_argument("--probe", action="store_true", help="B8 T2048 Pallas timing, one small gradient check, "
                  "full-size forward check, per-kernel times; stops adding steps after --budget-s seconds")
  ap.add_argument("--budget-s", type=float, default=150)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--report-from", metavar="JSON", help="no GPU work: rebuild results_ops.md and the plot from a "
                  "saved results_ops.json (with --fla-json: fla's figures from a separate call of the same session)")
  ap.add_argument("--fla-json", metavar="JSON")
  ap.add_argument("--fla-repeats", type=int, default=3, help="fla timings per case (the median is reported)")
  ap.add_argument("--fla-shapes", type=int, default=3, help="fla at the first N shapes only")
  ap.add_argument("--impls", default="pallas,chunk,cudnn_attention", help="comma-separated JAX implementations")
  args = ap.parse_args()
  if args.report_from:
    res = json.load(open(args.report_from))
    if args.fla_json:
      res["fla"] = json.load(open(args.fla_json))
    md = report(res, SHAPES)
    json.dump(res, open(os.path.join(OUT, "results_ops.json"), "w"), indent=1)
    open(os.path.join(OUT, "results_ops.md"), "w").write(md + "\n")
    plot(res, SHAPES)
    print(md)
    return
  shapes = SHAPES[:1] if args.quick else SHAPES
  if args.fla_only:
    json.dump(run_fla(shapes[:args.fla_shapes], 300, args.fla_repeats), open(os.path.join(OUT, "fla.json"), "w"),
              indent=1)
    return
  res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
  if not (args.quick or args.skip_fla):
    t = time.time()
    subprocess.run([sys.executable, __file__, "--fla-only", "--fla-repeats", str(args.fla_repeats)], check=False)
    try:
      res["fla"] = json.load(open(os.path.join(OUT, "fla.json")))
    except (OSError, ValueError):
      res["fla"] = {}
    print(f"fla done in {time.time() - t:.0f} s", flush=True)
  sys.path.insert(0, os.getcwd())
  if args.probe:
    t0 = time.time()
    steps = [lambda: run_jax(SHAPES[:1], res, ["pallas"], args.reps),
             lambda: check_small(res, only=("f32_strong_varied", "bf16_mild", "f32_correlated_keys")),
             lambda: check_full(res, SHAPES[0]),
             lambda: kernel_breakdown(res, SHAPES[0])]
    for step in steps:
      if time.time() - t0 > args.budget_s:
        print("probe: time budget reached, skipping the rest", flush=True)
        break
      step()
    json.dump(res, open(os.path.join(OUT, "results_ops.json"), "w"), indent=1)
    return
  if args.quick:
    kernel_breakdown(res, shapes[0])
  check_small(res)
  check_full(res, shapes[0])
  impls = ["pallas"] if args.quick else args.impls.split(",")
  run_jax(shapes, res, impls, args.reps)
  md = report(res, shapes)
  json.dump(res, open(os.path.join(OUT, "results_ops.json"), "w"), indent=1)
  open(os.path.join(OUT, "results_ops.md"), "w").write(md + "\n")
  plot(res, shapes)
  print(md)


if __name__ == "__main__":
  main()
