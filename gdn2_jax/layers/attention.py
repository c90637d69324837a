"""Softmax attention with RoPE: sliding-window (the hybrid's SWA layers) or full (the Transformer baseline).

Window semantics as NVIDIA's flash-attn call `window_size=(window - 1, 0)`: token i sees j with
`i - window < j <= i` (the window counts the token itself). RoPE rotates the two halves of each head (GPT-NeoX /
lit_gpt layout, `theta_i = base^(-2i / D)`), computed in float32.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.layers import context
from gdn2_jax.layers.init import linear, torch_linear_default
from gdn2_jax.ops import attention as attention_ops

Array = jax.Array


def rope(x: Array, positions: Array, base: float) -> Array:
  """Rotary embedding. `x [B, T, N, D]` (D even), `positions [T]` or `[B, T]` int -> `[B, T, N, D]` in x's dtype."""
  D = x.shape[-1]
  half = D // 2
  inv = base ** (-jnp.arange(0, half, dtype=jnp.float32) * 2.0 / D)  # [D/2]
  pos = positions.astype(jnp.float32)
  if pos.ndim == 1:
    pos = pos[None]
  ang = pos[..., None] * inv  # [B|1, T, D/2]
  cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head attention with RoPE: `[B, T, D] -> [B, T, D]`.

  Args:
    hidden_size: D. num_heads: N query heads. num_kv_heads: key/value heads (divides N; default N). head_dim: per head.
    window: sliding window (tokens, counting the current one) or None for full attention.
    rope_base: RoPE base (10000). implementation: None/"xla" or "cudnn" for `jax.nn.dot_product_attention`;
      with `segment_ids`, None/"xla" runs `ops.attention`'s blockwise XLA form (no `[T, T]` mask for windows).
      "pallas": `ops.attention`'s Triton flash kernel (segment ids, window; interpret mode on the CPU), not yet
      timed on a GPU, so not the default.
    n_layers: the model depth (NVIDIA's init scales the output projection by `1 / sqrt(2 n_layers)`).
  """

  def __init__(self, hidden_size: int, *, num_heads: int, head_dim: int, num_kv_heads: Optional[int] = None,
               window: Optional[int] = None, rope_base: float = 10000.0, implementation: Optional[str] = None,
               n_layers: int = 1, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
      raise ValueError(f"`num_kv_heads` is {num_kv_heads}; it must divide `num_heads` {num_heads}.")
    if head_dim % 2:
      raise ValueError(f"`head_dim` is {head_dim}; RoPE needs an even head dimension.")
    if window is not None and window < 1:
      raise ValueError(f"`window` is {window}; expected a positive number of tokens or None (full attention).")
    if implementation not in (None, "xla", "cudnn", "pallas"):
      raise ValueError(f"`implementation` is {implementation!r}; expected None, 'xla', 'cudnn' or 'pallas'.")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.window, self.rope_base, self.implementation = window, float(rope_base), implementation
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, init=torch_linear_default())
    self.q_proj = linear(hidden_size, num_heads * head_dim, ("embed", "heads"), **kw)
    self.k_proj = linear(hidden_size, num_kv_heads * head_dim, ("embed", "heads"), **kw)
    self.v_proj = linear(hidden_size, num_kv_heads * head_dim, ("embed", "heads"), **kw)
    kw["init"] = torch_linear_default((2.0 * n_layers) ** -0.5)
    self.o_proj = linear(num_heads * head_dim, hidden_size, ("heads", "embed"), **kw)

  def _qkv(self, x: Array, positions: Array):
    B, T, _ = x.shape
    q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    return rope(q, positions, self.rope_base), rope(k, positions, self.rope_base), v

  @property
  def _dpa_implementation(self) -> Optional[str]:
    """The `jax.nn.dot_product_attention` implementation (decode and context-parallel paths): XLA for 'pallas'."""
    return None if self.implementation == "pallas" else self.implementation

  def _out(self, o: Array) -> Array:
    B, T = o.shape[:2]
    return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim).astype(self.dtype))

  def _attend(self, q, k, v, mask=None, **kw):
    return self._out(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self._dpa_implementation, **kw))

  def __call__(self, x: Array, *, segment_ids: Optional[Array] = None) -> Array:
    """`x [B, T, D]`; `segment_ids [B, T]` int restricts attention to the token's own document."""
    B, T = x.shape[:2]
    q, k, v = self._qkv(x, jnp.arange(T))
    split = context.active_split()
    if split is not None:  # a mixer mesh splits the sequence: the previous shard's last keys come by one ppermute
      if self.window is None:
        raise ValueError(f"full attention cannot split the sequence over mesh axis {split.context_axis!r}; use a "
                         "sliding window (`window`) or a mesh without that axis.")
      return self._out(context.split_window_attention(q, k, v, segment_ids, self.window, split,
                                                       self._dpa_implementation))
    if self.implementation == "pallas":
      return self._out(attention_ops.attention(q, k, v, segment_ids=segment_ids, window=self.window,
                                               implementation="pallas", interpret=jax.default_backend() == "cpu"))
    if segment_ids is None:
      lw = None if self.window is None else (self.window - 1, 0)
      return self._attend(q, k, v, is_causal=True, local_window_size=lw)
    # Packed documents: cuDNN's call takes no segment ids; the blockwise form stays linear in T for windows
    return self._out(attention_ops.attention(q, k, v, segment_ids=segment_ids, window=self.window,
                                             implementation="xla"))

  def init_cache(self, batch: int, max_len: int) -> dict:
    """A ring buffer of `window` keys/values (SWA: independent of `max_len`) or `max_len` (full attention).

    `slot_pos [L]` holds the position stored in each slot (-1: empty).
    """
    L = max_len if self.window is None else min(self.window, max_len)
    shape = (batch, L, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
            "slot_pos": jnp.full((L,), -1, jnp.int32)}

  def apply_cached(self, x: Array, cache: dict, pos: Array, *, fresh: bool = False) -> tuple[Array, dict]:
    """Continues at position `pos` (int scalar, tokens already seen): `x [B, T, D]` -> (`[B, T, D]`, new cache).

    `fresh=True` (an empty cache, prefill) runs the plain causal path and then fills the cache.
    """
    T = x.shape[1]
    L = cache["k"].shape[1]
    qpos = pos + jnp.arange(T, dtype=jnp.int32)
    q, k, v = self._qkv(x, qpos)
    if fresh:
      lw = None if self.window is None else (self.window - 1, 0)
      y = self._attend(q, k, v, is_causal=True, local_window_size=lw)
    elif T == 1:
      # One token: write it into its slot first, then attend over the buffer alone (no copy of the whole cache;
      # with a donated cache the write is in place). The slot's old entry is out of the window by construction.
      slot = qpos[0] % L
      new = {"k": jax.lax.dynamic_update_index_in_dim(cache["k"], k[:, 0].astype(cache["k"].dtype), slot, 1),
             "v": jax.lax.dynamic_update_index_in_dim(cache["v"], v[:, 0].astype(cache["v"].dtype), slot, 1),
             "slot_pos": jax.lax.dynamic_update_index_in_dim(cache["slot_pos"], qpos[0], slot, 0)}
      kpos = new["slot_pos"]
      mask = (kpos >= 0) & (kpos <= qpos[0])
      if self.window is not None:
        mask = mask & (qpos[0] - kpos < self.window)
      y = self._attend(q, new["k"].astype(q.dtype), new["v"].astype(q.dtype), mask=mask[None, None, None, :])
      return y, new
    else:
      keys = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)
      vals = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)
      kpos = jnp.concatenate([cache["slot_pos"], qpos])
      mask = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
      if self.window is not None:
        mask = mask & (qpos[:, None] - kpos[None, :] < self.window)
      y = self._attend(q, keys.astype(q.dtype), vals.astype(q.dtype), mask=mask[None, None])
    n = min(T, L)  # only the last L new tokens can stay in the buffer
    slots = qpos[T - n:] % L
    new = {"k": cache["k"].at[:, slots].set(k[:, T - n:].astype(cache["k"].dtype)),
           "v": cache["v"].at[:, slots].set(v[:, T - n:].astype(cache["v"].dtype)),
           "slot_pos": cache["slot_pos"].at[slots].set(qpos[T - n:])}
    return y, new
