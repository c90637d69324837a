"""The affine map of a whole span of tokens: `S -> M S + c`, from the chunk path's own quantities.

Every chunk of the chunkwise WY form (`gdn2_jax/ops/chunk.py`) maps the state entering it affinely:

    S' = Diag(exp(G_C)) S + (k * exp(G_C - G))^T (U - Y S) = M_chunk S + c_chunk,
    M_chunk = Diag(exp(G_C)) - (k * exp(G_C - G))^T Y,     c_chunk = (k * exp(G_C - G))^T U,

and its outputs are affine in it too: `O = O_0 + Q_eff S` with `Q_eff = (scale exp(G) * q) - P Y` (`[C, K]`).
Composing the chunks of a span gives `S_end = M S_in + c`. Rather than a second code path, the span is run through
the chunk pass itself on an augmented state `[S | X]` (`[K, V + K]`) that starts at `[0 | I]`: the extra K value
columns carry no writes (zero `w * v`, so zero `U`), so they evolve exactly as `M` does (`X' = M_chunk X`) while the
first V columns give the zero-state run (`c`). The same pass returns `[O_0 | Q_eff M_prefix]` per token, the
outputs from a zero state and the matrix that corrects them for any entering state. Every number is the chunk
path's, with its numerics (docs/algorithm.md section 6): nothing overflows with strong decay or gates at 0 and 1.

Document boundaries inside a span reset the state: a log-decay of `RESET_LOG_DECAY` at a sequence's first token
is a total forget (`exp(g) = 0` exactly), so `M` is 0 from that token on and `c` restarts there.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from gdn2_jax.ops import chunk, common, recurrent

Array = jax.Array

# exp(-1e30) is exactly 0 in float32 and sums of many stay finite (the value `gdn2` uses for packed sequences).
RESET_LOG_DECAY = -1e30


class SpanResult(NamedTuple):
  """One span run from a zero state, with what corrects it for any entering state `S_in [.., HV, K, V]`.

  Attributes:
    o: `[B, T, HV, V]` outputs from a zero entering state.
    q_eff: `[B, T, HV, K]`; the outputs from `S_in` are `o + einsum('btnk,bnkv->btnv', q_eff, S_in)`.
    M: `[B, HV, K, K]` transition of the whole span.
    c: `[B, HV, K, V]` state at the end of the span from a zero state; the state from `S_in` is `M S_in + c`.
  """

  o: Array
  q_eff: Array
  M: Array
  c: Array


def mark_resets(g: Array, resets: Optional[Array]) -> Array:
  """`g [B, T, H, K]` with a total forget at the tokens where `resets [B, T]` (bool) is True (None: unchanged)."""
  if resets is None:
    return g
  return jnp.where(resets[:, :, None, None], jnp.asarray(RESET_LOG_DECAY, g.dtype), g)


def segment_starts(segment_ids: Array) -> Array:
  """`[B, T]` bool, True where a new document starts: the first token and wherever `segment_ids [B, T]` changes."""
  first = jnp.ones(segment_ids.shape[:1] + (1,), bool)
  return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def augmented(v: Array, w: Array, K: int, state_dtype) -> tuple[Array, Array, Array]:
  """The span's augmented inputs: `[v | 0]` and `[w | 0]` (`[B, T, HV, V + K]`, K zero columns in their dtypes) and
  the starting state `[0 | I]` (`[B, HV, K, V + K]` in `state_dtype`)."""
  B, T, HV, V = v.shape
  v_aug = jnp.concatenate([v, jnp.zeros((B, T, HV, K), v.dtype)], axis=-1)
  w_aug = jnp.concatenate([w, jnp.zeros((B, T, HV, K), w.dtype)], axis=-1)
  eye = jnp.broadcast_to(jnp.eye(K, dtype=state_dtype), (B, HV, K, K))
  return v_aug, w_aug, jnp.concatenate([jnp.zeros((B, HV, K, V), state_dtype), eye], axis=-1)


def span_forward(q: Array, k: Array, v: Array, g: Array, b: Array, w: Array, *, scale: float,
                 resets: Optional[Array] = None, chunk_size: int = chunk.DEFAULT_CHUNK_SIZE,
                 precision=jax.lax.Precision.HIGHEST, state_vma: Optional[tuple] = None) -> SpanResult:
  """Runs a span of tokens from a zero state and forms its transition, in one chunk pass.

  Args:
    q, k, g, b: `[B, T, H, K]` canonical inputs (normalised, activated log-decay); v, w: `[B, T, HV, V]`.
    scale: output scale.
    resets: optional `[B, T]` bool, True at the first token of a document inside the span.
    chunk_size, precision: as `chunk.chunk_fwd`.
    state_vma: mesh axes the augmented starting state varies over (inside `shard_map` with `check_vma`).
  Returns:
    `SpanResult` in the compute dtype (float32, or float64 for float64 inputs).
  """
  K, V = q.shape[-1], v.shape[-1]
  dt = recurrent.compute_dtype(q, k, v, g, b, w)
  g = mark_resets(g.astype(dt), resets)
  v_aug, w_aug, start = augmented(v.astype(dt), w.astype(dt), K, dt)
  if state_vma:
    start = jax.lax.pcast(start, tuple(state_vma), to="varying")
  o_aug, end = chunk.chunk_fwd(q, k, v_aug, g, b, w_aug, scale=scale, initial_state=start, chunk_size=chunk_size,
                               precision=precision)
  return SpanResult(o=o_aug[..., :V], q_eff=o_aug[..., V:], M=end[..., V:], c=end[..., :V])


def segment_transition(k: Array, v: Array, g: Array, b: Array, w: Array, *, resets: Optional[Array] = None,
                       chunk_size: int = chunk.DEFAULT_CHUNK_SIZE, precision=jax.lax.Precision.HIGHEST,
                       state_vma: Optional[tuple] = None) -> tuple[Array, Array]:
  """The affine map `S -> M S + c` of a span of tokens (a shard, or any range of chunks).

  Args:
    k, g, b: `[B, T, H, K]` keys, log-decay (<= 0, activated), erase gate; v, w: `[B, T, HV, V]` (H divides HV).
    resets: optional `[B, T]` bool, True at the first token of a document: the map forgets everything before it.
    chunk_size, precision: as `chunk.chunk_fwd`.
    state_vma: as `span_forward`.
  Returns:
    `(M [B, HV, K, K], c [B, HV, K, V])` in the compute dtype: running the span from `S_in [B, HV, K, V]` ends at
    `M @ S_in + c`.
  """
  for name, x in (("k", k), ("g", g), ("b", b)):
    common.check_rank(name, x, 4, "[B, T, H, K]")
  r = span_forward(jnp.zeros_like(k), k, v, g, b, w, scale=1.0, resets=resets, chunk_size=chunk_size,
                   precision=precision, state_vma=state_vma)
  return r.M, r.c


def apply_transition(M: Array, c: Array, state: Array, precision=jax.lax.Precision.HIGHEST) -> Array:
  """`M @ state + c` per (batch, value head): `M [..., K, K]`, `c, state [..., K, V]`."""
  return jnp.einsum("...ij,...jv->...iv", M, state.astype(M.dtype), precision=precision) + c


def compose(first: tuple[Array, Array], second: tuple[Array, Array],
            precision=jax.lax.Precision.HIGHEST) -> tuple[Array, Array]:
  """The map of `first` then `second`, each `(M, c)`: `(M2 M1, M2 c1 + c2)`."""
  M1, c1 = first
  M2, c2 = second
  return (jnp.einsum("...ij,...jk->...ik", M2, M1, precision=precision), apply_transition(M2, c2, c1, precision))
