"""Scoring next-token predictions only where a task says so.

Loss and accuracy count the positions where `mask` is True and nothing else: for MQAR the query keys (whose next
token is the value to recall), for the needle tasks the answer tokens. A sequence is an exact match when every scored
position is right; under teacher forcing that is the same as greedy decoding reproducing the whole answer.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def masked_metrics(logits: Array, targets: Array, mask: Array) -> dict[str, Array]:
  """Sums over the scored positions of a batch.

  Args:
    logits: `[B, T, V]` (any float dtype; the loss is computed in float32).
    targets: `[B, T]` int, the next token at each position.
    mask: `[B, T]` bool, True where the position is scored.
  Returns:
    dict of scalars: `loss_sum` (summed cross-entropy in nats), `correct` (argmax == target), `count` (scored
    positions), `exact` (rows whose scored positions are all right, among rows with at least one), `rows`.
  """
  if logits.ndim != 3 or logits.shape[:2] != targets.shape or targets.shape != mask.shape:
    raise ValueError(f"`logits` {logits.shape}, `targets` {targets.shape}, `mask` {mask.shape}: expected "
                     f"[B, T, V], [B, T], [B, T].")
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  hit = (jnp.argmax(logits, axis=-1) == targets) | ~mask
  has = jnp.any(mask, axis=-1)
  return {
      "loss_sum": jnp.sum((logz - picked) * m),
      "correct": jnp.sum(jnp.where(mask, hit, False).astype(jnp.float32)),
      "count": jnp.sum(m),
      "exact": jnp.sum((jnp.all(hit, axis=-1) & has).astype(jnp.float32)),
      "rows": jnp.sum(has.astype(jnp.float32)),
  }


def masked_loss(logits: Array, targets: Array, mask: Array) -> Array:
  """Mean cross-entropy over the scored positions (the training loss); 0 when nothing is scored."""
  s = masked_metrics(logits, targets, mask)
  return s["loss_sum"] / jnp.maximum(s["count"], 1.0)


@dataclasses.dataclass(frozen=True)
class Score:
  """Accumulated scores of one task setting: token accuracy, exact-match rate, mean loss and perplexity."""

  accuracy: float
  exact_match: float
  loss: float
  count: int
  rows: int

  @property
  def perplexity(self) -> float:
    return float(np.exp(min(self.loss, 80.0)))

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["perplexity"] = self.perplexity
    return d


def summarize(sums: Mapping[str, float]) -> Score:
  """`masked_metrics` sums (possibly added over batches) -> a `Score` of means."""
  count = float(sums["count"])
  rows = float(sums["rows"])
  return Score(accuracy=float(sums["correct"]) / max(count, 1.0), exact_match=float(sums["exact"]) / max(rows, 1.0),
               loss=float(sums["loss_sum"]) / max(count, 1.0), count=int(count), rows=int(rows))


def add(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
  return {k: float(a.get(k, 0.0)) + float(b[k]) for k in b}
