"""Causal depthwise short convolution (kernel 4 in GDN-2) with document resets and a decoding tail."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.layers import context
from gdn2_jax.layers.init import partitioned

Array = jax.Array


def causal_depthwise_conv(x: Array, weight: Array, *, tail: Optional[Array] = None,
                          segment_ids: Optional[Array] = None,
                          tail_segment_ids: Optional[Array] = None) -> tuple[Array, Array]:
  """`y_t = sum_j weight[:, j] * x_{t - (W-1) + j}` per channel (tap W-1 is the current token).

  Args:
    x: `[B, T, D]`.
    weight: `[D, W]` (PyTorch's depthwise `Conv1d` weight `[D, 1, W]` without its middle axis).
    tail: `[B, W-1, D]` the last W-1 inputs before `x` (decoding), zeros when None.
    segment_ids: `[B, T]` int; a tap never reads a token of another document (resets at document starts).
    tail_segment_ids: `[B, W-1]` the document ids of `tail` (None: the tail is of no document of `x`).
  Returns:
    `(y [B, T, D]` in float32, `new_tail [B, W-1, D])`.
  """
  B, T, D = x.shape
  W = weight.shape[1]
  if tail is None:
    tail = jnp.zeros((B, W - 1, D), x.dtype)
  xp = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # [B, T + W - 1, D]
  wf = weight.astype(jnp.float32)
  y = jnp.zeros((B, T, D), jnp.float32)
  for j in range(W):
    shift = W - 1 - j  # how many tokens back this tap reads
    xs = xp[:, j:j + T].astype(jnp.float32)
    if segment_ids is not None and shift > 0:
      if tail_segment_ids is None:
        prev = jnp.pad(segment_ids, ((0, 0), (shift, 0)), constant_values=-1)[:, :T]
      else:
        prev = jnp.concatenate([tail_segment_ids.astype(segment_ids.dtype), segment_ids], axis=1)[:, j:j + T]
      xs = jnp.where((prev == segment_ids)[..., None], xs, 0.0)
    y = y + xs * wf[:, j]
  return y, xp[:, T:]


class ShortConv(nnx.Module):
  """Depthwise causal conv + SiLU on `[B, T, D]`; weight `[D, W]` with names ("heads", "conv"), no bias."""

  def __init__(self, dim: int, kernel_size: int = 4, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    # PyTorch's Conv1d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = kernel_size for a depthwise conv.
    bound = kernel_size ** -0.5
    init = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)
    self.weight = nnx.Param(partitioned(init, ("heads", "conv"))(rngs.params(), (dim, kernel_size), param_dtype))
    self.kernel_size = kernel_size
    self.dtype = dtype

  def __call__(self, x: Array, *, tail: Optional[Array] = None,
               segment_ids: Optional[Array] = None) -> tuple[Array, Array]:
    """`[B, T, D]` -> `(silu(conv(x)) [B, T, D]`, new tail `[B, W-1, D])`."""
    split = context.active_split() if tail is None else None
    if split is not None:  # a mixer mesh splits the sequence: the previous shard's tail comes by one ppermute
      y = context.split_causal_conv(causal_depthwise_conv, x, self.weight[...], segment_ids, split)
      new_tail = x[:, x.shape[1] - (self.kernel_size - 1):]
      return jax.nn.silu(y).astype(self.dtype), new_tail
    y, new_tail = causal_depthwise_conv(x, self.weight[...], tail=tail, segment_ids=segment_ids)
    return jax.nn.silu(y).astype(self.dtype), new_tail
