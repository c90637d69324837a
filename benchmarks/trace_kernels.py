"""Per-kernel GPU time inside one forward+backward of the op, ours and fla's, from profiler traces (no hardware
counters needed): JAX's profiler (CUPTI) for the Pallas kernels, torch's for fla's Triton kernels.

Unlike `kernel_times.py` (each kernel in a call of its own, 0.1-0.4 ms of launch and call overhead included), each
kernel is timed where it runs in the op, so the rows add up to the op's GPU time.

  PYTHONPATH=/tmp/site:. python3 benchmarks/trace_kernels.py [--shapes 8,2048 2,8192] [--config JSON] [--no-fla]
  python3 benchmarks/trace_kernels.py --cpu-smoke        # the parsing, on the CPU (XLA's CPU ops stand in)

Writes trace_kernels.json under $OUT and prints one table per shape: kernel, calls per step, ms per step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

OUT = os.environ.get("OUT", "/tmp")
STEPS = 5


def perfetto_kernel_times(trace_dir: str, steps: int, gpu_only: bool = True) -> dict:
  """`{name: (calls per step, ms per step)}` of the complete events in the Perfetto trace under `trace_dir`: those
  of the GPU's streams (processes named `/device:GPU:...`) unless `gpu_only` is off."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
  with gzip.open(path, "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs = {e.get("pid"): str(e.get("args", {}).get("name", "")) for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  keep = lambda pid: not gpu_only or "GPU" in procs.get(pid, "").upper()
  total, calls = collections.defaultdict(float), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and keep(e.get("pid")):
      total[e["name"]] += float(e.get("dur", 0.0)) / 1e3  # us -> ms
      calls[e["name"]] += 1
  return {n: (calls[n] / steps, total[n] / steps) for n in sorted(total, key=lambda n: -total[n])}


def trace_ours(shape, cfg_json: str, smoke: bool) -> dict:
  import jax
  import jax.numpy as jnp
  from benchmarks.bench_ops import jax_inputs
  from pallas_kernels import ChunkConfig, chunk_gdn2
  B, T, H, K, V = shape
  q, k, v, g, b, w, do = jax_inputs(B, T, H, K, V)
  h0 = jnp.zeros((B, H, K, V), jnp.float32)
  cfg = ChunkConfig(**json.loads(cfg_json))

  def fb(q, k, v, g, b, w, do):
    f = lambda *a: chunk_gdn2(*a, h0, scale=K ** -0.5, config=cfg, interpret=smoke)[0]
    o, vjp = jax.vjp(f, q, k, v, g, b, w)
    return o, vjp(do)

  step = jax.jit(fb)
  for _ in range(2):
    jax.block_until_ready(step(q, k, v, g, b, w, do))
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    for _ in range(STEPS):
      jax.block_until_ready(step(q, k, v, g, b, w, do))
    jax.profiler.stop_trace()
    # The GPU's kernels: the Pallas calls (named gdn2_<kernel>) and XLA's own (fusions, the segment scan, layout
    # transposes), each under its name.
    times = perfetto_kernel_times(d, STEPS, gpu_only=not smoke)
    if not times:  # keep the processes' names for a look at what the trace held
      print("no GPU events; processes:", perfetto_kernel_times(d, STEPS, gpu_only=False).keys())
  return dict(list(times.items())[:10]) if smoke else times


def trace_fla(shape) -> dict:
  import torch
  from benchmarks.bench_ops import fla_inputs
  from fla.ops.gdn2 import chunk_gdn2 as fla_chunk
  B, T, H, K, V = shape
  xs = fla_inputs(B, T, H, K, V)
  for x in xs:
    x.requires_grad_(True)
  do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)

  def step():  # as bench_ops times it
    o, _ = fla_chunk(*xs, use_qk_l2norm_in_kernel=True)
    o.backward(do)

  for _ in range(3):
    step()
  torch.cuda.synchronize()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(STEPS):
      step()
    torch.cuda.synchronize()
  out = collections.defaultdict(lambda: [0, 0.0])
  for e in prof.key_averages():
    us = getattr(e, "device_time_total", None)
    if us is None:
      us = e.cuda_time_total
    if us > 0:
      out[e.key][0] += e.count / STEPS
      out[e.key][1] += us / 1e3 / STEPS
  return {n: tuple(v) for n, v in sorted(out.items(), key=lambda kv: -kv[1][1])}


def table(title: str, times: dict) -> str:
  lines = [title, f"{'kernel':60s} {'calls':>6s} {'ms':>8s}"]
  for n, (c, ms) in times.items():
    lines.append(f"{n[:60]:60s} {c:6.1f} {ms:8.3f}")
  lines.append(f"{'total':60s} {'':6s} {sum(ms for _, ms in times.values()):8.3f}")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", nargs="*", default=["8,2048", "2,8192", "1,32768"], help="B,T pairs (H16 K=V=128)")
  ap.add_argument("--config", default="{}")
  ap.add_argument("--no-fla", action="store_true")
  ap.add_argument("--cpu-smoke", action="store_true")
  args = ap.parse_args()
  sys.path.insert(0, os.getcwd())
  res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "config": args.config, "shapes": {}}
  shapes = [(1, 64, 1, 32, 32)] if args.cpu_smoke else [
      tuple(int(x) for x in s.split(",")) + (16, 128, 128) for s in args.shapes]
  # Ours at every shape first, then fla's: CUPTI takes one subscriber per process, and torch's profiler cannot
  # subscribe once JAX's has.
  for shape in shapes:
    label = "B{} T{}".format(*shape)
    res["shapes"][label] = {"ours": trace_ours(shape, args.config, args.cpu_smoke)}
    print(table(f"ours, {label}, fwd+bwd", res["shapes"][label]["ours"]), flush=True)
  for shape in ([] if args.no_fla or args.cpu_smoke else shapes):
    label = "B{} T{}".format(*shape)
    try:
      res["shapes"][label]["fla"] = trace_fla(shape)
      print(table(f"fla chunk_gdn2, {label}, fwd+bwd", res["shapes"][label]["fla"]), flush=True)
    except Exception as e:  # noqa: BLE001 -- fla missing or failing must not lose our figures
      print(f"fla: {type(e).__name__}: {e}", flush=True)
  json.dump(res, open(os.path.join(OUT, "trace_kernels.json"), "w"), indent=1)


if __name__ == "__main__":
  main()
