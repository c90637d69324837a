"""Training metrics: model FLOPs (for MFU), a JSONL log, a loss plot and optional TensorBoard scalars."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

log = logging.getLogger("train")

ATTENTION_KINDS = ("swa", "attention")
# Dense bf16 tensor-core peaks (datasheet, SXM). MFU is reported against these whatever the compute dtype.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}


def device_peak_flops(device_kind: str) -> Optional[float]:
  """Per-device peak FLOP/s for `device_kind` (e.g. "NVIDIA H100 80GB HBM3"), or None when unknown (CPUs)."""
  for name, peak in PEAK_FLOPS.items():
    if name in device_kind:
      return peak
  return None


def mean_causal_context(seq_len: int, window: Optional[int]) -> float:
  """Average number of keys a query attends to under a causal mask of `window` (None: full)."""
  T = seq_len
  if window is None or window >= T:
    return (T + 1) / 2
  w = window
  # positions t < w see t + 1 keys, the rest see w.
  return (w * (w + 1) / 2 + (T - w) * w) / T


def flops_per_token(model_cfg, seq_len: int, matmul_params: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), PaLM-style.

  `6 * matmul_params` for the dense products (projections, MLPs, LM head), plus the mixers' sequence work:
  attention `3 * 4 * heads * head_dim * mean_context`; GDN-2 (chunk form, chunk C, per value head)
  `3 * 2 * (3 C K + 2 C V + 3 K V)` (the T, Y, QK^T products over K, U and the intra-chunk output over V, and the
  three state products `Y S`, `Q S`, `K^T R`). Rematerialised recomputation is not counted (model FLOPs).
  """
  total = 6.0 * matmul_params
  C = model_cfg.chunk_size
  K, V, HV = model_cfg.head_k_dim, model_cfg.head_v_dim, model_cfg.v_heads
  for kind in model_cfg.layer_kinds():
    if kind in ATTENTION_KINDS:
      window = model_cfg.window if kind == "swa" else None
      ctx = mean_causal_context(seq_len, window)
      total += 3 * 4 * model_cfg.swa_heads * model_cfg.attn_head_dim * ctx
    else:
      total += 3 * 2 * HV * (3 * C * K + 2 * C * V + 3 * K * V)
  return total


def matmul_param_count(model_cfg, abstract_params) -> int:
  """Parameters that enter a matrix product per token: everything but the embedding table, plus the LM head."""
  import jax
  n = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    top = str(getattr(path[0], "key", path[0]))
    if top == "embed":
      continue
    n += math.prod(leaf.shape)
  if model_cfg.tie_embeddings:
    n += model_cfg.d_model * model_cfg.vocab_size
  return n


class MetricsLog:
  """Appends JSON records to `<run_dir>/metrics.jsonl` and (optionally) TensorBoard; plots at the end.

  `resume_from=N` keeps the records of steps <= N and drops the later ones (the steps a resume replays), so the log
  reads as one run; None starts an empty log.
  """

  def __init__(self, run_dir: str, *, tensorboard: bool = False, resume_from: Optional[int] = None,
               enabled: bool = True):
    self.run_dir = run_dir
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.enabled = enabled
    self.tb = None
    if not enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    # From step 0 nothing is kept: the step-0 evaluation is written again.
    kept = [r for r in self.records() if r.get("step", 0) <= resume_from] if resume_from else []
    if os.path.exists(self.path) or kept:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(tmp, self.path)  # atomic: a kill here leaves the old log or the new one, never half of it
    if tensorboard:
      self.tb = _tensorboard_writer(os.path.join(run_dir, "tensorboard"))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None and "step" in record:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k, v, record["step"])

  def records(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      out = []
      for line in f:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: the step is replayed and written again
          continue
      return out

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _tensorboard_writer(path: str):
  for module in ("tensorboardX", "torch.utils.tensorboard"):
    try:
      mod = __import__(module, fromlist=["SummaryWriter"])
      return mod.SummaryWriter(path)
    except Exception:  # noqa: BLE001 - any import/runtime failure means: no TensorBoard
      continue
  log.warning("tensorboard=true but neither tensorboardX nor torch.utils.tensorboard is installed; skipping it.")
  return None


def plot_losses(records: list[dict], path: str, title: str = "GDN-2 training") -> Optional[str]:
  """Writes a PNG of train loss (raw and smoothed), held-out loss and the learning rate; returns its path."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    log.warning("matplotlib is not installed; no loss plot.")
    return None
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
  if not train:
    return None
  fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
  steps, losses = zip(*train)
  ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="train loss")
  k = max(1, len(losses) // 30)
  smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
  ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"train loss ({k}-record mean)")
  if evals:
    es, el = zip(*evals)
    ax.plot(es, el, "o-", color="tab:red", label="held-out loss")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  if lrs:
    ls, lv = zip(*lrs)
    ax_lr.plot(ls, lv, color="tab:green")
  ax_lr.set_ylabel("lr")
  ax_lr.set_xlabel("step")
  ax_lr.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
