"""One forward+backward of the Pallas op (or of fla's `chunk_gdn2`) inside a profiler range, for Nsight Compute.

Ours: `ncu -k regex:gdn2_ --launch-skip (WARMUP x kernels per step)` profiles the last step's kernels; fla's step
is inside an NVTX range (`ncu --nvtx --nvtx-include profile/`), so compilation, autotuning and warm-up stay out. Each kernel is timed where it runs in the op (the
isolated timings of `kernel_times.py` inflate each by 0.1-0.4 ms).

  ncu --profile-from-start off --clock-control none --csv --page raw --metrics ... \
      python3 benchmarks/profile_kernels.py --impl pallas [--config JSON] [--shape B,T,H,K,V]
  python3 benchmarks/profile_kernels.py --summarize ncu.csv   # a per-kernel table from ncu's CSV (no GPU)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from benchmarks.shapes import HEADLINE_SHAPE  # run from the repository root with PYTHONPATH=.

# The metrics read per kernel (one pass each where ncu can group them).
METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "launch__registers_per_thread",
           "launch__grid_size", "launch__block_size", "launch__shared_mem_per_block_static",
           "launch__occupancy_limit_registers", "sm__warps_active.avg.pct_of_peak_sustained_active",
           "sm__throughput.avg.pct_of_peak_sustained_elapsed", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
           "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
           "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
           "smsp__inst_executed.sum", "smsp__sass_inst_executed_op_local_ld.sum")


WARMUP = 3  # steps before the profiled one (profile_ncu.sh skips the kernels they launch)


def _profiler(on: bool) -> None:
  """An NVTX range named `profile` around the profiled step (fla; `ncu --nvtx --nvtx-include profile/`)."""
  import torch
  torch.cuda.nvtx.range_push("profile") if on else torch.cuda.nvtx.range_pop()


def run_pallas(shape, cfg_json: str) -> None:
  import jax
  from benchmarks.bench_ops import jax_inputs
  from pallas_kernels import ChunkConfig, chunk_gdn2
  import jax.numpy as jnp
  B, T, H, K, V = shape
  q, k, v, g, b, w, do = jax_inputs(B, T, H, K, V)
  h0 = jnp.zeros((B, H, K, V), jnp.float32)
  cfg = ChunkConfig(**json.loads(cfg_json))

  def fb(q, k, v, g, b, w, do):
    f = lambda *a: chunk_gdn2(*a, h0, scale=K ** -0.5, config=cfg)[0]
    o, vjp = jax.vjp(f, q, k, v, g, b, w)
    return o, vjp(do)

  step = jax.jit(fb)
  for _ in range(WARMUP):  # ncu skips these steps' kernels by count (`--launch-skip`, see profile_ncu.sh)
    jax.block_until_ready(step(q, k, v, g, b, w, do))
  jax.block_until_ready(step(q, k, v, g, b, w, do))


def count_kernels(shape, cfg_json: str) -> int:
  """Triton kernels in one forward+backward (lowered for sm90 on any machine)."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels import ChunkConfig, chunk_gdn2
  from pallas_kernels.tools.sm90 import lowering_for_sm90
  B, T, H, K, V = shape
  S = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  args = [S((B, T, H, K), bf)] * 2 + [S((B, T, H, V), bf), S((B, T, H, K), jnp.float32), S((B, T, H, K), bf),
                                      S((B, T, H, V), bf), S((B, H, K, V), jnp.float32)]
  cfg = ChunkConfig(**json.loads(cfg_json))
  loss = lambda *a: jnp.sum(chunk_gdn2(*a, scale=K ** -0.5, config=cfg)[0].astype(jnp.float32))
  with lowering_for_sm90():
    lowered = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*args).lower(lowering_platforms=("cuda",))
  return lowered.as_text().count("__gpu$xla.gpu.triton")


def run_fla(shape) -> None:
  import torch
  from fla.ops.gdn2 import chunk_gdn2
  from benchmarks.bench_ops import fla_inputs
  B, T, H, K, V = shape
  q, k, v, g, b, w = fla_inputs(B, T, H, K, V)
  do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
  xs = (q, k, v, g, b, w)
  for x in xs:
    x.requires_grad_(True)

  def step():
    o = chunk_gdn2(q, k, v, g, b, w, use_qk_l2norm_in_kernel=True)[0]
    o.backward(do)

  for _ in range(WARMUP):
    step()
  torch.cuda.synchronize()
  _profiler(True)
  step()
  torch.cuda.synchronize()
  _profiler(False)


def summarize(path: str) -> str:
  """A markdown table from `ncu --csv --page raw` output: one row per kernel launch, in launch order."""
  rows = list(csv.reader(open(path, newline="", errors="replace")))
  start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
  if start is None:
    head = "\n".join(",".join(r)[:160] for r in rows[:8])
    raise SystemExit(f"{path}: no ncu header row ('Kernel Name') in {len(rows)} rows; they begin:\n{head}")
  head, units, body = rows[start], rows[start + 1], rows[start + 2:]
  col = {n: i for i, n in enumerate(head)}

  def get(r, name, default=float("nan")):
    try:
      return float(r[col[name]].replace(",", ""))
    except (KeyError, ValueError, IndexError):
      return default

  t_unit = units[col["gpu__time_duration.sum"]] if "gpu__time_duration.sum" in col else "ns"
  scale_ms = {"ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0}.get(t_unit, 1e-6)
  out = ["| kernel | ms | GB moved | TB/s | regs | grid | occupancy % | SM % | DRAM % | tensor % |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  total = 0.0
  for r in body:
    if len(r) < len(head):
      continue
    name = r[col["Kernel Name"]][:48]
    ms = get(r, "gpu__time_duration.sum") * scale_ms
    gb = (get(r, "dram__bytes_read.sum", 0) + get(r, "dram__bytes_write.sum", 0)) / 1e9
    total += ms
    out.append(f"| {name} | {ms:.3f} | {gb:.3f} | {gb / ms:.2f} | {get(r, 'launch__registers_per_thread'):.0f} | "
               f"{get(r, 'launch__grid_size'):.0f} | "
               f"{get(r, 'sm__warps_active.avg.pct_of_peak_sustained_active'):.0f} | "
               f"{get(r, 'sm__throughput.avg.pct_of_peak_sustained_elapsed'):.0f} | "
               f"{get(r, 'dram__throughput.avg.pct_of_peak_sustained_elapsed'):.0f} | "
               f"{get(r, 'sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active'):.0f} |")
  out.append(f"| total | {total:.3f} | | | | | | | | |")
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--impl", choices=("pallas", "fla"), default="pallas")
  ap.add_argument("--config", default="{}", help="ChunkConfig fields (JSON)")
  ap.add_argument("--shape", default=",".join(map(str, HEADLINE_SHAPE)))
  ap.add_argument("--summarize", metavar="CSV")
  ap.add_argument("--metrics", action="store_true", help="print the comma-separated metric list for ncu")
  ap.add_argument("--count-kernels", action="store_true", help="print the Pallas kernels one step launches (CPU)")
  args = ap.parse_args()
  if args.metrics:
    print(",".join(METRICS))
    return
  if args.count_kernels:
    print(count_kernels(tuple(int(x) for x in args.shape.split(",")), args.config))
    return
  if args.summarize:
    print(summarize(args.summarize))
    return
  sys.path.insert(0, os.getcwd())
  shape = tuple(int(x) for x in args.shape.split(","))
  run_pallas(shape, args.config) if args.impl == "pallas" else run_fla(shape)


if __name__ == "__main__":
  main()
