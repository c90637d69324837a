"""Training throughput of the paper's 1.3B configs on one GPU: tokens/s and MFU of the full train step.

The step is `train.loop`'s (AdamW, clip, float32 master weights, bf16 compute, scan over layers, remat), on
synthetic tokens so no data pipeline (and no grain) is needed: one document per row, or with `--doc-len N` (or
a run written `model:TxB@N`) packed documents of mean length N tokens (exponential lengths, at least 16) passed
as `segment_ids`, the path real training takes: the recurrent layers reset at each document start and the
attention layers mask across documents (`--attention-impl xla` or `pallas`; cuDNN's kernel takes no segment ids).
Shapes: the paper's 2K x 8, 4K x 4 and 16K x 1 sequences per step; the paper's hybrid figures on one H100 are
38.0 Kt/s (2K x 8) and 36.1 Kt/s (16K x 1). MFU counts model FLOPs (no recomputation) against 989 TFLOP/s (H100
dense bf16).

GPU: `PYTHONPATH=. python3 benchmarks/bench_train.py --budget-s 200` (results appended to $OUT/bench_train.jsonl;
every step's loss is recorded). `--debug-nans` stops at the first operation that produces a NaN.
CPU smoke test: `python benchmarks/bench_train.py --tiny`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.getcwd())
from gdn2_jax.models import ModelConfig  # noqa: E402
from train import loop, metrics, optim, sharding  # noqa: E402
from train.config import MeshConfig, OptimConfig  # noqa: E402

PAPER_KTPS = {("hybrid", 2048, 8): 38.0, ("hybrid", 16384, 1): 36.1}
DEFAULT_RUNS = ("hybrid:2048x8", "hybrid:16384x1", "recurrent:2048x8", "recurrent:16384x1", "hybrid:4096x4",
                "recurrent:4096x4")


def model_config(name: str, T: int, args) -> ModelConfig:
  kw = dict(backend=args.backend, remat=args.remat, max_seq_len=max(4096, T), dtype="bfloat16",
            param_dtype="float32", scan_layers=True, attention_impl=args.attention_impl)
  if args.tiny:
    base = dict(vocab_size=512, d_model=128, n_layers=2, mlp_hidden=256, num_heads=2, head_k_dim=64, head_v_dim=64,
                swa_heads=2, window=64, dtype="float32", max_seq_len=max(T, 128), scan_layers=True,
                backend=args.backend, remat=args.remat)
    return ModelConfig.tiny(pattern=("gdn2",) if name == "recurrent" else ("gdn2", "swa"), **base)
  if name == "recurrent":
    return ModelConfig.paper_1p3b_recurrent(**kw)
  return ModelConfig.paper_1p3b_hybrid(**kw)


def segment_ids(B: int, T: int, mean_len: int, seed: int = 0) -> np.ndarray:
  """`[B, T]` int32 document ids of rows packed with documents of exponential length (mean `mean_len`, >= 16)."""
  rng = np.random.default_rng(seed)
  out = np.zeros((B, T), np.int32)
  for row in range(B):
    pos, doc = 0, 0
    while pos < T:
      n = max(16, int(rng.exponential(mean_len)))
      out[row, pos:pos + n] = doc
      pos, doc = pos + n, doc + 1
  return out


def bench_one(name: str, T: int, B: int, args, doc_len: int = 0) -> dict:
  mc = model_config(name, T, args)
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  tx, schedule = optim.make_optimizer(OptimConfig(lr=4e-4, warmup_steps=10), 1000)
  t0 = time.time()
  setup = loop.init_state(mc, tx, mesh, seed=0)
  b_sh = sharding.batch_sharding(mesh)
  step = loop.make_train_step(setup.graphdef, tx, schedule, grad_accum=1, shardings=setup.shardings,
                              batch_sharding=b_sh, mesh=mesh)
  rng = np.random.default_rng(0)
  host = {"tokens": rng.integers(0, mc.vocab_size, (B, T), dtype=np.int32),
          "targets": rng.integers(0, mc.vocab_size, (B, T), dtype=np.int32),
          "loss_mask": np.ones((B, T), np.float32)}
  if doc_len:
    host["segment_ids"] = segment_ids(B, T, doc_len)
  batch = loop.to_global(host, b_sh)
  state = setup.state
  t1 = time.time()
  state, m = step(state, batch)
  loss0 = float(m["loss"])
  t2 = time.time()
  times, losses = [], [loss0]
  for _ in range(args.steps):
    a = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - a)
    losses.append(float(m["loss"]))
  med = float(np.median(times))
  tps = B * T / med
  fpt = metrics.flops_per_token(mc, T, setup.matmul_params)
  peak = metrics.device_peak_flops(jax.devices()[0].device_kind) or float("nan")
  stats = jax.devices()[0].memory_stats() or {}
  del state
  return {"model": name, "T": T, "B": B, "params": setup.num_params, "backend_auto_picks": _auto_backend(),
          "remat": args.remat, "attention_impl": args.attention_impl, "mean_doc_len": doc_len or None,
          "documents": int(host["segment_ids"].max(axis=1).sum() + B) if doc_len else B,
          "init_s": round(t1 - t0, 1), "compile_first_step_s": round(t2 - t1, 1),
          "step_ms_median": round(med * 1e3, 1), "step_ms_all": [round(t * 1e3, 1) for t in times],
          "tokens_per_s": round(tps), "ktok_per_s": round(tps / 1e3, 2), "mfu": round(fpt * tps / peak, 4),
          "model_tflops_per_step": round(fpt * B * T / 1e12, 1), "loss_first": loss0, "loss_last": float(m["loss"]),
          "losses": losses, "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 1),
          "paper_ktok_per_s": PAPER_KTPS.get((name, T, B)), "device": jax.devices()[0].device_kind}


def _auto_backend() -> str:
  """The first backend 'auto' tries that runs natively here (what it picks when the layer's shapes allow)."""
  from gdn2_jax.ops import api
  return api.available_backends()[0]


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="model:TxB,... (model: recurrent|hybrid)")
  p.add_argument("--steps", type=int, default=3, help="timed steps after the first (compiling) one")
  p.add_argument("--remat", default="full")
  p.add_argument("--backend", default="auto")
  p.add_argument("--attention-impl", default="cudnn")
  p.add_argument("--doc-len", type=int, default=0, help="packed documents of this mean length (segment ids); 0: "
                 "one document per row. A run written model:TxB@N sets it for that run")
  p.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
  p.add_argument("--tiny", action="store_true", help="CPU smoke test with a small model")
  p.add_argument("--debug-nans", action="store_true", help="jax_debug_nans: stop at the first primitive that makes a "
                 "NaN (re-run op by op) and print where; for diagnosing a non-finite loss")
  args = p.parse_args(argv)
  if args.debug_nans:
    jax.config.update("jax_debug_nans", True)
  if args.tiny:
    args.attention_impl = None
  out = os.path.join(os.environ.get("OUT", "/tmp"), "bench_train.jsonl")
  start = time.time()
  rows = []
  for run in args.runs.split(","):
    name, shape = run.split(":")
    shape, _, docs = shape.partition("@")
    T, B = (int(x) for x in shape.split("x"))
    doc_len = int(docs) if docs else args.doc_len
    if time.time() - start > args.budget_s:
      row = {"model": name, "T": T, "B": B, "skipped": "time budget"}
    else:
      try:
        row = bench_one(name, T, B, args, doc_len)
      except Exception as e:  # noqa: BLE001 - record and go on to the next shape
        row = {"model": name, "T": T, "B": B, "mean_doc_len": doc_len or None,
               "error": f"{type(e).__name__}: {str(e)[:400]}"}
      jax.clear_caches()
    rows.append(row)
    with open(out, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
  print(f"\n{'model':10s} {'T x B':>9s} {'docs':>6s} {'step ms':>9s} {'Kt/s':>7s} {'MFU':>6s} {'paper':>6s} "
        f"{'GiB':>5s}")
  for r in rows:
    docs = f"{r.get('mean_doc_len') or '-'}"
    if "step_ms_median" in r:
      print(f"{r['model']:10s} {r['T']:>5d}x{r['B']:<3d} {docs:>6s} {r['step_ms_median']:9.1f} "
            f"{r['ktok_per_s']:7.2f} {r['mfu']:6.3f} {r['paper_ktok_per_s'] or '':>6} {r['peak_gib']:5.1f}")
    else:
      print(f"{r['model']:10s} {r['T']:>5d}x{r['B']:<3d} {docs:>6s} {r.get('error') or r.get('skipped')}")


if __name__ == "__main__":
  main()
