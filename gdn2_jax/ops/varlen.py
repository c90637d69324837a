"""Packed variable-length sequences (`cu_seqlens`) as a chunk-aligned layout, and the scan that carries states.

Sequences packed along T are re-laid so that every sequence starts on a chunk boundary: sequence n takes
`ceil(len_n / C)` chunks, its tail padded with identity tokens (k = v = q = b = w = 0, g = 0 leave the state and
every other output unchanged). Every chunk then belongs to one sequence, and the pass over chunks only has to
reset its state at the chunk that starts a sequence and record it at the chunk that ends one. The padded length
`(ceil(T / C) + N) * C` is static, so this works under `jax.jit` with `cu_seqlens` a traced array (trailing
repeats of the last offset are empty sequences: their final state is their initial state).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

# exp(-1e30) is exactly 0 in float32, and sums of up to 1e8 of them stay finite: a total forget without inf - inf.
RESET_LOG_DECAY = -1e30


def segment_ids_from_cu_seqlens(cu_seqlens: Array, T: int) -> Array:
  """`[T]` int32: the packed sequence each token belongs to (empty sequences own no token; past `cu[-1]`: N)."""
  cu = jnp.asarray(cu_seqlens).astype(jnp.int32)
  return jnp.searchsorted(cu[1:], jnp.arange(T, dtype=jnp.int32), side="right").astype(jnp.int32)


def sequence_starts(segment_ids: Array) -> Array:
  """`[..., T]` bool, True where a token starts a sequence: the first token, and where the id differs from the
  previous token's. The one definition of a sequence start for the op (`cu_seqlens`, via
  `segment_ids_from_cu_seqlens`) and the model (`segment_ids`)."""
  prev = jnp.concatenate([jnp.full(segment_ids.shape[:-1] + (1,), -1, segment_ids.dtype), segment_ids[..., :-1]], -1)
  return (segment_ids != prev) | (jnp.arange(segment_ids.shape[-1]) == 0)


def forget_at_starts(g: Array, starts: Array) -> Array:
  """`g [B, T, H, K]` with every channel of a sequence's first token set to a total forget (`starts [B or 1, T]`):
  nothing crosses a sequence boundary, in any backend, without changing the layout."""
  return jnp.where(starts[:, :, None, None], RESET_LOG_DECAY, g)


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
  """Where each packed token goes and which sequence each chunk belongs to.

  Attributes:
    positions: `[T]` int32 index of each token in the padded stream (out of range for tokens past cu[-1]).
    num_chunks: static number of chunks in the padded stream.
    chunk_size: static chunk length C.
    seq: `[num_chunks]` int32 sequence of each chunk (N for unused trailing chunks).
    reset: `[num_chunks]` bool, the chunk starts its sequence.
    last: `[num_chunks]` bool, the chunk ends its sequence.
  """

  positions: Array
  num_chunks: int
  chunk_size: int
  seq: Array
  reset: Array
  last: Array


jax.tree_util.register_dataclass(
    ChunkLayout, data_fields=["positions", "seq", "reset", "last"], meta_fields=["num_chunks", "chunk_size"])


def chunk_layout(cu_seqlens: Array, T: int, chunk_size: int) -> ChunkLayout:
  """Builds the chunk-aligned layout for `cu_seqlens` (`[N + 1]` offsets into a stream of `T` tokens)."""
  cu = jnp.asarray(cu_seqlens).astype(jnp.int32)
  N = cu.shape[0] - 1
  C = chunk_size
  lens = jnp.maximum(cu[1:] - cu[:-1], 0)
  n_chunks = (lens + C - 1) // C
  cstart = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(n_chunks).astype(jnp.int32)])
  num_chunks = -(-T // C) + N
  t = jnp.arange(T, dtype=jnp.int32)
  tok_seq = jnp.clip(jnp.searchsorted(cu, t, side="right").astype(jnp.int32) - 1, 0, N - 1)
  inside = (t >= cu[0]) & (t < cu[N])
  positions = jnp.where(inside, cstart[tok_seq] * C + (t - cu[tok_seq]), num_chunks * C)
  c = jnp.arange(num_chunks, dtype=jnp.int32)
  ch_seq = jnp.clip(jnp.searchsorted(cstart[:N], c, side="right").astype(jnp.int32) - 1, 0, N - 1)
  used = c < cstart[ch_seq] + n_chunks[ch_seq]
  return ChunkLayout(
      positions=positions,
      num_chunks=num_chunks,
      chunk_size=C,
      seq=jnp.where(used, ch_seq, N),
      reset=(c == cstart[ch_seq]) | ~used,
      last=used & (c == cstart[ch_seq] + n_chunks[ch_seq] - 1),
  )


def pack(x: Array, layout: ChunkLayout) -> Array:
  """`[1, T, ...]` packed stream -> `[1, num_chunks * C, ...]` chunk-aligned stream, zeros in the padding."""
  out = jnp.zeros((1, layout.num_chunks * layout.chunk_size) + x.shape[2:], x.dtype)
  return out.at[0, layout.positions].set(x[0], mode="drop")


def unpack(y: Array, layout: ChunkLayout) -> Array:
  """Inverse of `pack`: `[1, num_chunks * C, ...]` -> `[1, T, ...]` (tokens past cu[-1] read as zero)."""
  return jnp.take(y[0], layout.positions, axis=0, mode="fill", fill_value=0)[None]


def scan_with_resets(step: Callable, state0: Array, xs, layout: Optional[ChunkLayout] = None,
                     initial_states: Optional[Array] = None):
  """Runs `step(state, x) -> (state, y)` over the leading axis of `xs`, resetting states at sequence starts.

  Without a layout this is `lax.scan(step, state0, xs)` and the final states are the last carry, `[B, ...]`.
  With one (B = 1, the chunk-aligned stream of `chunk_layout`), the state is replaced by `initial_states[n]`
  (zeros when None) at the first chunk of sequence n and recorded at its last chunk.

  Returns:
    `(final_states, ys)` with `final_states` `[B, ...]`, or `[N, ...]` with a layout.
  """
  if layout is None:
    return jax.lax.scan(step, state0, xs)
  if initial_states is None:
    raise ValueError("scan_with_resets needs `initial_states` [N, ...] with a layout")
  last_seq = initial_states.shape[0] - 1

  def body(carry, inp):
    state, finals = carry
    x, seq, reset, last = inp
    idx = jnp.minimum(seq, last_seq)  # unused trailing chunks (seq == N) are never recorded
    # A chunk that starts a sequence starts from that sequence's initial state.
    h0 = jax.lax.dynamic_index_in_dim(initial_states, idx, keepdims=False)
    state = jnp.where(reset, h0[None].astype(state.dtype), state)
    state, y = step(state, x)
    old = jax.lax.dynamic_index_in_dim(finals, idx, keepdims=False)
    finals = jax.lax.dynamic_update_index_in_dim(finals, jnp.where(last, state[0], old), idx, axis=0)
    return (state, finals), y

  (_, finals), ys = jax.lax.scan(body, (state0, initial_states.astype(state0.dtype)), (xs, layout.seq, layout.reset, layout.last))
  return finals, ys
