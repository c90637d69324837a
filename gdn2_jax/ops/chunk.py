"""Chunkwise WY form of the GDN-2 recurrence in pure JAX (`backend="chunk"`): runs on CPU, GPU and TPU.

The sequence is cut into chunks of C tokens (64 by default). Inside a chunk, with `S` the state entering it and
`G_r = sum_{m <= r} g_m` the per-channel cumulative log-decay:

    T   = strictly_lower( [sum_k b_ik k_ik k_jk exp(G_ik - G_jk)]_ij )     (C x C)
    (I + T) [U | Y] = [w * v | exp(G) * b * k]                            (unit lower triangular solve)
    R   = U - Y S
    O   = scale * [ (exp(G) * q) S + lower_incl( [sum_k q_ik k_jk exp(G_ik - G_jk)]_ij ) R ]
    S'  = Diag(exp(G_C)) S + (k * exp(G_C - G))^T R

Numerics (docs/algorithm.md section 6). `K / exp(G)` is never formed: every decay factor is `exp` of a sum of log-decays
over a token range that lies in the past of the row, so each factor is <= 1 and nothing overflows, whatever `g`.
The chunk is split into sub-blocks of 16. Between sub-blocks I > J the factor `exp(G_i - G_j)` splits at the start of
sub-block I into two factors <= 1, so those blocks are plain matrix products. Inside a diagonal sub-block the
factor is formed pairwise. Every exponent is a sum of same-signed terms taken directly over its token range (forward
or reverse cumulative sums, never a difference of two long cumulative sums), so its relative error stays at a few
ulps even with g = -1e3 next to g = -1e-4. These gate sums use no matrix unit (no TF32 on GPU).

`precision` is the precision of the matrix products (`jax.lax.Precision`; default HIGHEST: IEEE float32 on GPU,
about 1e-7 relative error; DEFAULT uses TF32 on Ampere/Hopper, about 2e-4). Gradients come from autodiff.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gdn2_jax.ops import common, recurrent, varlen

Array = jax.Array

DEFAULT_CHUNK_SIZE = 64
SUB_BLOCK = 16


def _shift_left(x: Array, axis: int) -> Array:
  """x[..., i+1, ...] along `axis`, with a zero at the end (turns an inclusive reverse cumsum into an exclusive one)."""
  x = jnp.moveaxis(x, axis, -1)
  x = jnp.concatenate([x[..., 1:], jnp.zeros_like(x[..., :1])], axis=-1)
  return jnp.moveaxis(x, -1, axis)


def _decay_weighted_products(left: Array, keys: Array, g: Array, *, sub: int, precision):
  """`M_pij = sum_k left_pik keys_jk exp(G_ik - G_jk)` for j <= i, 0 above the diagonal.

  Args:
    left: `[P, ..., C, K]`, P stacked left operands sharing the keys (the erase factor and the queries).
    keys, g: `[..., C, K]` (g the per-token log-decay, <= 0).
  Returns:
    `[P, ..., C, C]`, lower triangular including the diagonal.
  """
  *lead, C, K = g.shape
  n = C // sub
  blk = lambda x: x.reshape(*x.shape[:-2], n, sub, K)
  gb, lb, kb = blk(g), blk(left), blk(keys)
  # Off-diagonal sub-blocks I > J: exp(G_i - G_j) = exp(sum_{start_I <= m <= i} g_m) * exp(sum_{j < m < start_I} g_m).
  fwd = jax.lax.cumsum(gb, axis=gb.ndim - 2)  # inclusive, from the sub-block start
  rev = _shift_left(jax.lax.cumsum(gb, axis=gb.ndim - 2, reverse=True), gb.ndim - 2)  # exclusive, to its end
  tot = jnp.sum(gb, axis=-2)  # [..., n, K]
  I, J, L = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
  between = jnp.asarray(((J < L) & (L < I)).astype(np.float32), g.dtype)  # [I, J, L]
  mid = jnp.sum(between[..., None] * tot[..., None, None, :, :], axis=-2)  # [..., I, J, K], exact masked sum
  below = jnp.asarray(np.tril(np.ones((n, n)), -1), g.dtype)  # I > J
  left_f = lb * jnp.exp(fwd)  # [..., I, i, K]
  right_f = kb[..., None, :, :, :] * jnp.exp(rev[..., None, :, :, :] + mid[..., :, :, None, :])  # [..., I, J, j, K]
  off = jnp.einsum("...Iik,...IJjk->...IJij", left_f, right_f, precision=precision)
  off = off * below[:, :, None, None]
  # Diagonal sub-blocks: D_ij = sum_{j < m <= i} g_m, a reverse cumsum over m of g masked to m <= i.
  tri_incl = jnp.asarray(np.tril(np.ones((sub, sub))), g.dtype)  # [i, m]: m <= i
  h = gb[..., None, :, :] * tri_incl[:, :, None]  # [..., I, i, m, K]
  D = _shift_left(jax.lax.cumsum(h, axis=h.ndim - 2, reverse=True), h.ndim - 2)  # [..., I, i, j, K]
  mask = np.tril(np.ones((sub, sub)))
  D = jnp.where(jnp.asarray(mask, bool)[:, :, None], D, 0.0)
  diag = jnp.einsum("...ik,...jk,...ijk->...ij", lb, kb, jnp.exp(D), precision=precision)
  diag = diag * jnp.asarray(mask, g.dtype)
  full = off + jnp.eye(n, dtype=g.dtype)[:, :, None, None] * diag[..., :, None, :, :]  # [..., I, J, i, j]
  full = jnp.swapaxes(full, -3, -2)  # [..., I, i, J, j]
  return full.reshape(*full.shape[:-4], C, C)


def _qk_terms(q, k, g, b, *, scale: float, sub: int, precision):
  """What a chunk computes from q, k, g, b alone. Inputs `[..., C, K]`. Returns `T [..., C, C]` (strictly lower),
  `P [..., C, C]` (scaled, lower with the diagonal), `E = exp(G) * b * k`, `qg = scale * exp(G) * q`,
  `k_state = k * exp(G_C - G)` (`[..., C, K]`) and the chunk decay `exp(G_C) [..., K]`."""
  G = jax.lax.cumsum(g, axis=g.ndim - 2)  # inclusive cumulative log-decay, same-signed sum
  gamma = jnp.exp(G)
  erase = b * k
  # One pass for both products that share the keys: T (strictly lower) and the attention P (diagonal included).
  TP = _decay_weighted_products(jnp.stack([erase, q]), k, g, sub=sub, precision=precision)
  T = TP[0] * jnp.asarray(np.tri(g.shape[-2], k=-1), g.dtype)
  P = scale * TP[1]
  to_end = _shift_left(jax.lax.cumsum(g, axis=g.ndim - 2, reverse=True), g.ndim - 2)  # sum_{m > j} g_m
  k_state = k * jnp.exp(to_end)
  decay_chunk = jnp.exp(jnp.sum(g, axis=-2))  # [..., K]
  return T, P, gamma * erase, scale * gamma * q, k_state, decay_chunk


def _chunk_intra(q, k, v, g, b, w, *, scale: float, sub: int, precision):
  """Everything inside a chunk that does not depend on the state entering it. Inputs `[..., C, D]`."""
  T, P, E, qg, k_state, decay_chunk = _qk_terms(q, k, g, b, scale=scale, sub=sub, precision=precision)
  V = v.shape[-1]
  rhs = jnp.concatenate([w * v, E], axis=-1)
  sol = jax.lax.linalg.triangular_solve(T, rhs, left_side=True, lower=True, unit_diagonal=True)
  U, Y = sol[..., :V], sol[..., V:]
  return qg, P, U, Y, k_state, decay_chunk


class ChunkIntermediates(NamedTuple):
  """Every intermediate of the chunk path, per chunk: `[NC, B, HV, C, D]` (`decay [NC, B, HV, K]`,
  `states [NC, B, HV, K, V]`: the state entering each chunk), value heads with their qk head's q, k, g, b."""
  T: Array
  P: Array
  E: Array
  qg: Array
  U: Array
  Y: Array
  k_state: Array
  decay: Array
  R: Array
  states: Array
  o: Array
  final: Array


def chunk_intermediates(q, k, v, g, b, w, initial_state, *, scale: float, precision=jax.lax.Precision.HIGHEST):
  """The chunk path's intermediates (64-token chunks, no padding or packing) for stage tests of other backends.

  Args: `q, k, g, b [B, T, H, K]`, `v, w [B, T, HV, V]`, `initial_state [B, HV, K, V]`, T a multiple of 64. Computes
  in the inputs' dtype. Returns `ChunkIntermediates` (`final [B, HV, K, V]`).
  """
  B, T, H, K = q.shape
  HV, V = v.shape[2:]
  C = DEFAULT_CHUNK_SIZE
  if T % C:
    raise ValueError(f"`q` has shape {q.shape}; T must be a multiple of {C}.")
  q, k, g, b = (common.repeat_heads(x, HV // H) for x in (q, k, g, b))
  to_chunks = lambda x: x.reshape(B, T // C, C, HV, x.shape[-1]).transpose(1, 0, 3, 2, 4)
  q, k, v, g, b, w = (to_chunks(x) for x in (q, k, v, g, b, w))
  T_, P, E, qg, k_state, decay = _qk_terms(q, k, g, b, scale=scale, sub=SUB_BLOCK, precision=precision)
  _, _, U, Y, _, _ = _chunk_intra(q, k, v, g, b, w, scale=scale, sub=SUB_BLOCK, precision=precision)

  def step(S, xs):
    qg_c, P_c, U_c, Y_c, k_c, decay_c = xs
    R = U_c - jnp.einsum("...ck,...kv->...cv", Y_c, S, precision=precision)
    o = (jnp.einsum("...ck,...kv->...cv", qg_c, S, precision=precision)
         + jnp.einsum("...cd,...dv->...cv", P_c, R, precision=precision))
    return decay_c[..., :, None] * S + jnp.einsum("...ck,...cv->...kv", k_c, R, precision=precision), (R, S, o)

  final, (R, states, o) = jax.lax.scan(step, initial_state, (qg, P, U, Y, k_state, decay))
  return ChunkIntermediates(T_, P, E, qg, U, Y, k_state, decay, R, states, o, final)


def chunk_fwd(q, k, v, g, b, w, *, scale: float, initial_state: Optional[Array] = None,
              cu_seqlens: Optional[Array] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
              precision=jax.lax.Precision.HIGHEST):
  """Canonical-input backend: `q, k, g, b [B, T, H, K]`, `v, w [B, T, HV, V]` -> `(o [B, T, HV, V], S [N, HV, K, V])`.

  `o` is returned in the compute dtype (float32, or float64 for float64 inputs); the caller casts it.
  """
  B, T, H, K = q.shape
  HV, V = v.shape[2:]
  dt = recurrent.compute_dtype(q, k, v, g, b, w)
  if chunk_size % SUB_BLOCK and chunk_size > SUB_BLOCK:
    raise ValueError(f"`chunk_size` is {chunk_size}; expected a multiple of {SUB_BLOCK}.")
  # Short inputs need no 64-token chunk: round T up to the sub-block instead.
  C = min(chunk_size, -(-T // SUB_BLOCK) * SUB_BLOCK) if cu_seqlens is None else chunk_size
  sub = min(SUB_BLOCK, C)
  q, k, g, b = (common.repeat_heads(x, HV // H) for x in (q, k, g, b))
  q, k, v, g, b, w = (x.astype(dt) for x in (q, k, v, g, b, w))
  layout = None
  if cu_seqlens is not None:
    layout = varlen.chunk_layout(cu_seqlens, T, C)
    q, k, v, g, b, w = (varlen.pack(x, layout) for x in (q, k, v, g, b, w))
  else:
    pad = -T % C
    if pad:  # identity tokens: zero keys, values, gates and log-decay
      q, k, v, g, b, w = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v, g, b, w))
  Bp, Tp = q.shape[:2]
  NC = Tp // C

  def to_chunks(x):  # [B, Tp, H, D] -> [NC, B, H, C, D]
    return x.reshape(Bp, NC, C, HV, x.shape[-1]).transpose(1, 0, 3, 2, 4)

  intra = _chunk_intra(*(to_chunks(x) for x in (q, k, v, g, b, w)), scale=scale, sub=sub, precision=precision)

  def step(S, xs):
    qg, P, U, Y, k_state, decay = xs
    R = U - jnp.einsum("...ck,...kv->...cv", Y, S, precision=precision)
    o = (jnp.einsum("...ck,...kv->...cv", qg, S, precision=precision)
         + jnp.einsum("...cd,...dv->...cv", P, R, precision=precision))
    S = decay[..., :, None] * S + jnp.einsum("...ck,...cv->...kv", k_state, R, precision=precision)
    return S, o

  N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
  if initial_state is None:
    initial_state = jnp.zeros((N, HV, K, V), dt)
  state0 = initial_state.astype(dt) if layout is None else jnp.zeros((1, HV, K, V), dt)
  final, o = varlen.scan_with_resets(step, state0, intra, layout, initial_state.astype(dt))
  o = o.transpose(1, 0, 3, 2, 4).reshape(Bp, Tp, HV, V)  # [NC, B, H, C, V] -> [B, Tp, H, V]
  o = varlen.unpack(o, layout) if layout is not None else o[:, :T]
  return o, final
