"""Scoring counts the masked positions and nothing else; loss against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np

from evaluation import metrics


def _random_case(seed, B=3, T=17, V=11):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  mask = rng.random((B, T)) < 0.3
  mask[0, 0] = True
  return logits, targets, mask


def test_loss_matches_float64_reference():
  logits, targets, mask = _random_case(0)
  s = jax.jit(metrics.masked_metrics)(logits, targets, mask)
  x = logits.astype(np.float64)
  logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(s["loss_sum"]), nll[mask].sum(), rtol=1e-5)
  assert float(s["count"]) == mask.sum()
  acc = (x.argmax(-1) == targets)[mask].sum()
  assert float(s["correct"]) == acc
  np.testing.assert_allclose(float(metrics.masked_loss(logits, targets, mask)), nll[mask].mean(), rtol=1e-5)


def test_unmasked_positions_do_not_count():
  logits, targets, mask = _random_case(1)
  rng = np.random.default_rng(2)
  # Perfect predictions on the scored positions, noise elsewhere.
  perfect = np.where(mask[..., None], -10.0, logits).astype(np.float32)
  b, t = np.nonzero(mask)
  perfect[b, t, targets[b, t]] = 10.0
  s1 = metrics.masked_metrics(perfect, targets, mask)
  noise = np.where(mask[..., None], perfect, rng.normal(size=logits.shape) * 100).astype(np.float32)
  s2 = metrics.masked_metrics(noise, targets, mask)
  for k in s1:
    np.testing.assert_allclose(float(s1[k]), float(s2[k]), rtol=1e-6)
  score = metrics.summarize(s1)
  assert score.accuracy == 1.0 and score.exact_match == 1.0
  # One wrong scored position breaks that row's exact match but only one token of accuracy.
  wrong = perfect.copy()
  wrong[b[0], t[0]] = 0.0
  wrong[b[0], t[0], (targets[b[0], t[0]] + 1) % logits.shape[-1]] = 10.0
  s3 = metrics.summarize(metrics.masked_metrics(wrong, targets, mask))
  assert s3.count == mask.sum() and s3.accuracy == 1 - 1 / mask.sum()
  rows = mask.any(1).sum()
  assert s3.exact_match == (rows - 1) / rows


def test_empty_mask_and_accumulation():
  logits, targets, mask = _random_case(3)
  none = metrics.masked_metrics(logits, targets, np.zeros_like(mask))
  assert float(none["count"]) == 0 and float(metrics.masked_loss(logits, targets, np.zeros_like(mask))) == 0.0
  full = metrics.masked_metrics(logits, targets, mask)
  half = metrics.add(metrics.masked_metrics(logits[:1], targets[:1], mask[:1]),
                     metrics.masked_metrics(logits[1:], targets[1:], mask[1:]))
  for k in full:
    np.testing.assert_allclose(half[k], float(full[k]), rtol=1e-6)


def test_shape_errors_name_the_arguments():
  logits, targets, mask = _random_case(4)
  try:
    metrics.masked_metrics(jnp.asarray(logits[:, :-1]), targets, mask)
  except ValueError as e:
    assert "logits" in str(e)
  else:
    raise AssertionError("expected a ValueError")
