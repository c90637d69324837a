"""AdamW with warm-up + cosine decay, global-norm clipping and a weight-decay mask (docs/algorithm.md section 7)."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from train.config import OptimConfig

# Parameter path components that never take weight decay: the decay parameters of the GDN-2 gate, every norm
# scale and every bias. Decay on A_log/dt_bias would drag the forget rates towards exp(0) = 1 / a fixed dt.
_NO_DECAY = re.compile(r"(^|[._/\[\]'])(A_log|dt_bias|bias|biases|scale|norm\w*|\w*_norm|ln\w*)($|[._/\[\]'])")


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
  if cfg.warmup_steps is not None:
    return max(0, int(cfg.warmup_steps))
  return max(1, int(round(cfg.warmup_fraction * total_steps)))


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `cfg.lr`, then cosine down to `cfg.lr * cfg.min_lr_ratio` at `total_steps`."""
  warm = min(warmup_steps(cfg, total_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warm, decay_steps=max(total_steps, warm + 1),
      end_value=cfg.lr * cfg.min_lr_ratio)


def path_name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return ".".join(p for p in parts if p != "value")


def decays(name: str, ndim: int) -> bool:
  """Whether the parameter at dotted path `name` (rank `ndim`) takes weight decay."""
  if _NO_DECAY.search(name):
    return False
  return ndim >= 2  # vectors (biases, norm scales under any name) never decay


def decay_mask(params) -> Any:
  """Tree of bools (structure of `params`): True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda p, x: decays(path_name(p), x.ndim), params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (b1, b2, eps, masked decoupled weight decay) after global-norm clipping; returns (tx, schedule)."""
  schedule = lr_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule
