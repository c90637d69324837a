"""In-kernel tile math of the GDN-2 chunk kernels: chunks of 64 rows in four sub-blocks of 16, key tiles of BK.

The chunk-level kernels work on `[64, BK]` tiles and `[64, 64]` matrices (products the size of a Hopper warpgroup's
instruction); the in-sub-block pairs (`diag_pairs`) on `[16, BK]` tiles in kernels of their own. Only operations the
Pallas Triton lowering supports are used (iota, where, exp, reductions, 2-D dots, slices and row gathers of refs),
so the same code runs compiled on a GPU and in interpret mode on a CPU.

Chunk maths (docs/algorithm.md section 4), rows i, j of one chunk, `G_i = sum_{m <= i} g_m` per channel:

    T   = strict_lower([sum_k b_ik k_ik k_jk exp(G_ik - G_jk)]_ij)      A = (I + T)^-1
    P   = scale * lower_incl([sum_k q_ik k_jk exp(G_ik - G_jk)]_ij)
    U   = A (w * v),   Y = A (exp(G) * b * k),   qg = scale * exp(G) * q,   k_state = k * exp(G_C - G)

Numerics (docs/algorithm.md section 6): no factor `exp(-G)` is ever formed. Every exponent is a sum of log-decays over a
token range in the past of the row, taken directly over that range, so every factor is <= 1 and keeps its relative
accuracy whatever `g` is (down to -1e30 at packed-sequence resets):
- per sub-block, `loc` (start of the sub-block to the row) and `rev` (after the row to the sub-block end) are
  0/1-masked products; on tensor cores a float32 operand is cut to TF32, so `g` is first split into parts that are
  exact in TF32 (`_tf32_split`): the masked products are then exact and only the float32 accumulation rounds;
- pairs in sub-blocks I > J factor as `exp(loc_i) * exp(rev_j) * exp(sum of the sub-blocks strictly between)`,
  three factors <= 1 (`DenseGates.right`), so those blocks are plain matrix products;
- pairs inside a diagonal sub-block get their factor `exp(sum_{j < m <= i} g_m) = prod_{j < m <= i} exp(g_m)` by
  multiplying in one row's `exp(g_m)` at a time (`diag_pairs`): every factor <= 1, never a difference of
  cumulative sums.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

SUB = 16  # sub-block rows
NSUB = 4  # sub-blocks per chunk
F32 = jnp.float32


def iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


# `precision` of the products: a `lax.Precision`, or EMULATE_TF32 (interpret-mode tests): every operand is cut to
# TF32 (10 mantissa bits, truncated) before an exact product, as the GPU's tensor cores do, so that a CPU test sees
# the rounding of the GPU kernels.
EMULATE_TF32 = "emulate_tf32"


def tf32_truncate(x):
  """`x` with the 13 low mantissa bits cleared: its TF32 value (float32 storage)."""
  return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(-8192), F32)


def _dot(a, b, dims, precision):
  if a.dtype != b.dtype:  # a float32 operand meets a narrow residual: the product runs in the narrow dtype
    narrow = a.dtype if a.dtype != F32 else b.dtype
    a, b = a.astype(narrow), b.astype(narrow)
  if isinstance(precision, str):  # EMULATE_TF32 (narrow operands are exact in TF32)
    a, b, precision = tf32_truncate(a.astype(F32)), tf32_truncate(b.astype(F32)), lax.Precision.HIGHEST
  elif a.dtype != F32 and precision != lax.Precision.HIGHEST:
    precision = lax.DotAlgorithmPreset.BF16_BF16_F32 if a.dtype == jnp.bfloat16 else lax.DotAlgorithmPreset.F16_F16_F32
  return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=F32)


def dot(a, b, precision):
  """`a @ b` with float32 accumulation."""
  return _dot(a, b, ((1,), (0,)), precision)


def dot_tn(a, b, precision):
  """`a^T @ b`."""
  return _dot(a, b, ((0,), (0,)), precision)


def dot_nt(a, b, precision):
  """`a @ b^T`."""
  return _dot(a, b, ((1,), (1,)), precision)


def _tf32_split(x, terms: int):
  """`x = sum(parts)` exactly, each part but the last with at most 10 mantissa bits (exact in TF32)."""
  parts = []
  rest = x
  for _ in range(terms - 1):
    hi = tf32_truncate(rest)
    parts.append(hi)
    rest = rest - hi  # exact: hi holds the leading bits of rest
  parts.append(rest)
  return parts


def _tensor_core(precision):
  """The precision of a product whose operands were made exact in TF32: the tensor cores' (or its emulation)."""
  return precision if isinstance(precision, str) else lax.Precision.DEFAULT


def _exact_sum(x, terms: int, precision, product):
  """`sum of product(part)` over the TF32-exact parts of `x`: a product of `x` with a 0/1 matrix that stays exact
  to float32 rounding on tensor cores."""
  out = None
  for part in _tf32_split(x, terms):
    y = product(part, _tensor_core(precision))
    out = y if out is None else out + y
  return out


def masked_sum(mask, x, terms: int, precision=lax.Precision.DEFAULT):
  """`mask @ x` for a 0/1 float32 `mask`, accurate to float32 rounding even where dots use TF32."""
  return _exact_sum(x, terms, precision, lambda part, p: dot(mask, part, p))


# `precision` of the 3xTF32 products where the GPU does the split itself (Triton's tf32x3 input precision): the same
# three products as `_dot3`'s split, without the split's elementwise work in the kernel. XLA's CPU has no such
# algorithm, so interpret mode uses the split (`ChunkConfig.native_tf32x3` is ignored there).
NATIVE_TF32X3 = lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _dot3(a, b, dims, precision):
  if precision == lax.Precision.HIGHEST or precision == NATIVE_TF32X3:
    return _dot(a, b, dims, precision)
  a_hi, a_lo = _tf32_split(a, 2)
  b_hi, b_lo = _tf32_split(b, 2)
  p = _tensor_core(precision)
  return _dot(a_hi, b_hi, dims, p) + (_dot(a_hi, b_lo, dims, p) + _dot(a_lo, b_hi, dims, p))


def dot3(a, b, precision):
  """`a @ b` to about float32 accuracy on tensor cores: `hi hi + hi lo + lo hi` of the TF32 splits (3xTF32)."""
  return _dot3(a, b, ((1,), (0,)), precision)


def dot3_tn(a, b, precision):
  return _dot3(a, b, ((0,), (0,)), precision)


def dot3_nt(a, b, precision):
  return _dot3(a, b, ((1,), (1,)), precision)


def mask(cond):
  """A 0/1 float32 matrix."""
  return jnp.where(cond, 1.0, 0.0).astype(F32)



def eye(n: int):
  return mask(iota((n, n), 0) == iota((n, n), 1))


CH = SUB * NSUB  # chunk rows


def row_block():
  """`[64, 1]`: the sub-block of each row of a chunk."""
  return iota((CH, 1), 0) // SUB


def expand_compact(xc, terms: int, precision):
  """Compact diagonal sub-blocks `[64, 16]` (row i, column jl = column `i // 16 * 16 + jl`) -> `[64, 64]`.

  A product with a 0/1 selection (made exact on tensor cores by splitting `xc` into TF32-exact parts).
  """
  sel = mask(iota((SUB, CH), 1) % SUB == iota((SUB, CH), 0))
  out = _exact_sum(xc, terms, precision, lambda part, p: dot(part, sel, p))
  same = (iota((CH, CH), 0) // SUB) == (iota((CH, CH), 1) // SUB)
  return jnp.where(same, out, 0.0)


class DenseGates:
  """Segment sums of the log-decay over one `[64, BK]` key tile of a chunk (all same-signed sums), read from the
  sums `diag_fwd` computed once per sub-block (`segments.SubBlockSums`).

  `loc`, `rev` `[64, BK]`: from the row's sub-block start to the row (inclusive), and from after the row to its
  sub-block end; `tot[L]` `[1, BK]`: the total of sub-block L.
  """

  def __init__(self, loc, rev, tot):
    self.blk = row_block()
    self.loc, self.rev, self.tot = loc, rev, list(tot)

  @classmethod
  def load(cls, loc_ref, rev_ref, tot_ref, cols):
    """From refs `loc, rev [64, K]` and `tot [4, K]` of one chunk, over the key columns `cols` (`rev_ref=None`:
    `rev` is not read, for `G` and `total` only)."""
    return cls(loc_ref[:, cols].astype(F32), None if rev_ref is None else rev_ref[:, cols].astype(F32),
               [tot_ref[pl.ds(L, 1), cols].astype(F32) for L in range(NSUB)])

  def _where_sum(self, pred, base):
    out = base
    for L in range(NSUB):
      out = out + jnp.where(pred(L), self.tot[L], 0.0)
    return out

  def G(self):
    """Chunk start to the row, inclusive."""
    return self._where_sum(lambda L: self.blk > L, self.loc)

  def to_end(self):
    """After the row to the chunk end."""
    return self._where_sum(lambda L: self.blk < L, self.rev)

  def total(self):
    """`[1, BK]`: the whole chunk."""
    return self.tot[0] + self.tot[1] + self.tot[2] + self.tot[3]

  def between(self, I: int):
    """`[64, BK]`: for rows j in sub-blocks J < I, `exp` of the sub-blocks strictly between J and I (<= 1)."""
    zero = jnp.zeros(self.loc.shape, F32)
    return jnp.exp(self._where_sum(lambda L: (self.blk < L) & (L < I), zero))

  def right(self, kr, I: int):
    """Right factor of the pairs (rows of sub-block I, columns before it): `k_j exp(sum_{j < m < s_I} g_m)` for
    rows j of sub-blocks J < I, from `kr = k exp(rev)`; 0 elsewhere."""
    return jnp.where(self.blk < I, kr * self.between(I), 0.0)


def diag_inverse_t(t_ref):
  """`[64, 16]`: the transposed inverses of the four diagonal blocks, `out[16 I + i, r] = (I + T_II)^-1 [r, i]`,
  from the compact strictly-lower diagonal blocks `t_ref [64, 16]`.

  Row-by-row forward substitution in float32 on CUDA cores (all four blocks at once): row r of `A_I` is
  `e_r - sum_{c < r} T_I[r, c] A_I[c]`, built as column r of the transpose so that each step reads one row of T per
  block (a gather) and reduces along it. Products by doubling, `(I - T)(I + T^2)...`, would have intermediate
  powers that grow like binomial coefficients when keys are correlated; in TF32 they lose every digit.
  """
  rows = iota((CH, 1), 0)
  loc = rows % SUB
  start = rows - loc
  cols = iota((CH, SUB), 1)

  def step(r, At):
    t_row = t_ref[(start + r)[:, 0], :].astype(F32)  # [64, 16]: row r of each row's block of T
    col = jnp.where(loc == r, 1.0, 0.0) - jnp.sum(At * t_row, axis=1, keepdims=True)
    return jnp.where(cols == r, col, At)

  return lax.fori_loop(1, SUB, step, jnp.where(cols == loc, 1.0, 0.0).astype(F32))


def wy_inverse(N, t_ref, terms: int, precision, precision3=None):
  """`A = (I + T)^-1 [64, 64]` for `T = N + diag blocks`: `N` the strictly block-lower part `[64, 64]`, the diagonal
  blocks compact in `t_ref [64, 16]`.

  With D the block diagonal of `I + T` and `M = D^-1 N` (nilpotent: M^4 = 0), `A = (I - M)(I + M^2) D^-1`. D^-1 by
  forward substitution (`diag_inverse_t`); the four products in 3xTF32 (`dot3`): measured in an emulation, the
  relative error of A stays under 5e-6 for key correlations up to 0.99 and b up to 2 (plain TF32: up to 7e-3).
  """
  p3 = precision if precision3 is None else precision3
  DinvT = expand_compact(diag_inverse_t(t_ref), terms, precision)  # (D^-1)^T
  M = dot3_tn(DinvT, N, p3)
  X = eye(CH) - M
  X = X + dot3(X, dot3(M, M, p3), p3)
  return dot3_nt(X, DinvT, p3)


def _row_loop(n, body, carry, unroll: bool):
  """`for t in range(n): carry = body(t, carry)`, unrolled with static `t` or as a loop."""
  if not unroll:
    return lax.fori_loop(0, n, body, carry)
  for t in range(n):
    carry = body(t, carry)
  return carry


def _decay_row(g_ref, r, cols, row_idx):
  """`[16, BK]`: `exp(g_r)` on the rows from r on, 1 above (one row of the sub-block's log-decay, one exp per
  channel). Multiplied in row by row, it builds `exp(G_i - G_j) = prod_{j < m <= i} exp(g_m)` for every row i at
  once: factors <= 1, a relative error of at most ~16 float32 roundings, and 16x fewer exps than taking `exp` of
  the running sum at every step."""
  return jnp.where(row_idx >= r, jnp.exp(g_ref[pl.ds(r, 1), cols].astype(F32)), 1.0)


def diag_pairs(q_ref, k_ref, g_ref, b_ref, cols, *, with_q: bool, unroll: bool = False):
  """Strict-lower pair products inside one sub-block, compact: `M[i, jl] = sum_k x_ik k_jk exp(G_ik - G_jk)` for
  the row i and the column j = jl of the sub-block (j < i), over the key columns `cols`.

  `q_ref, k_ref, g_ref, b_ref` are `[16, K]` refs of one sub-block. Returns `(T [16, 16], P [16, 16] or None)` for
  `x = b * k` and, with `with_q`, `x = q`.
  """
  q = q_ref[:, cols].astype(F32) if with_q else None
  k = k_ref[:, cols].astype(F32)
  bk = b_ref[:, cols].astype(F32) * k
  row_idx = iota((SUB, 1), 0)
  col_idx = iota((SUB, SUB), 1)

  def step(t, carry):
    D, Tc, Pc = carry
    jl = SUB - 2 - t
    D = D * _decay_row(g_ref, jl + 1, cols, row_idx)  # exp of (j, i] as a product over the rows, row by row
    kE = k_ref[pl.ds(jl, 1), cols].astype(F32) * jnp.where(row_idx > jl, D, 0.0)
    sel = col_idx == jl
    Tc = jnp.where(sel, Tc + jnp.sum(bk * kE, axis=1, keepdims=True), Tc)
    if with_q:
      Pc = jnp.where(sel, Pc + jnp.sum(q * kE, axis=1, keepdims=True), Pc)
    return D, Tc, Pc

  zero = jnp.zeros((SUB, SUB), F32)
  _, Tc, Pc = _row_loop(SUB - 1, step, (jnp.ones(k.shape, F32), zero, zero), unroll)
  return Tc, (Pc if with_q else None)


def _level_masks(s):
  """Masks of one level of `diag_pairs_levels` (halves of s rows in blocks of 2s; s a power of two, static or
  traced): `sums [16, 16]` (row r, token m: m in r's segment: `[mid, r]` for rows of the upper half, `(r, mid)` for
  rows of the lower half, `mid` the upper half's first row) and `pairs [16, 16]` (row i in an upper half, column j
  in the lower half of the same block)."""
  r, m = iota((SUB, SUB), 0), iota((SUB, SUB), 1)
  upper = (r & (2 * s - 1)) >= s
  mid = (r & ~(2 * s - 1)) + s
  sums = (upper & (m >= mid) & (m <= r)) | (~upper & (m > r) & (m < mid))
  pairs = ((r ^ m) < 2 * s) & upper & ((m & (2 * s - 1)) < s)
  return mask(sums), pairs


def _level_operands(q_ref, k_ref, g_ref, b_ref, cols):
  """`q, k, g, b * k` `[16, BK]` (float32) of one sub-block over the key columns `cols`."""
  k = k_ref[:, cols].astype(F32)
  return q_ref[:, cols].astype(F32), k, g_ref[:, cols].astype(F32), b_ref[:, cols].astype(F32) * k


def _level_factors(g, k, l, terms: int, precision):
  """Level `l` (halves of `s = 8 >> l` rows) of `diag_pairs_levels`: `(pairs [16, 16], e_up, e_low, right)`, with
  `e_up` the left factor `exp(sum_{mid <= m <= i} g_m)` on the upper halves' rows, `e_low` the right factor
  `exp(sum_{j < m < mid} g_m)` on the lower halves' rows (each 0 on the other rows) and `right = k e_low`, all
  `[16, BK]`."""
  s = SUB // 2 >> l
  sums, pairs = _level_masks(s)
  e = jnp.exp(masked_sum(sums, g, terms, precision))
  upper = (iota((SUB, 1), 0) & (2 * s - 1)) >= s
  e_low = jnp.where(upper, 0.0, e)
  return pairs, jnp.where(upper, e, 0.0), e_low, k * e_low


def diag_pairs_levels(q_ref, k_ref, g_ref, b_ref, cols, *, terms: int, precision, unroll: bool = False):
  """`diag_pairs`' strict-lower pair products of one sub-block (`(T [16, 16], P [16, 16])` for `x = b * k` and `q`)
  as matrix products, level by level: at level s (8, 4, 2, 1) the pairs (i, j) with i in the upper and j in the lower
  half of a block of 2s rows get their factor as `exp(sum_{mid <= m <= i} g_m) * exp(sum_{j < m < mid} g_m)`
  (`mid` the upper half's first row), two factors <= 1 taken directly over their ranges (exact 0/1 products,
  `masked_sum`): so `T_s = (x exp(left)) (k exp(right))^T` on the tensor cores. Every pair of the sub-block falls
  in exactly one level. The factors enter the products in `precision` (TF32 by default), as the pairs between
  sub-blocks do. `unroll`: the four levels as straight-line code (static masks) instead of a loop."""
  q, k, g, bk = _level_operands(q_ref, k_ref, g_ref, b_ref, cols)

  def level(l, carry):
    Tc, Pc = carry
    pairs, e_up, _, right = _level_factors(g, k, l, terms, precision)
    Tc = Tc + jnp.where(pairs, dot_nt(bk * e_up, right, precision), 0.0)
    Pc = Pc + jnp.where(pairs, dot_nt(q * e_up, right, precision), 0.0)
    return Tc, Pc

  zero = jnp.zeros((SUB, SUB), F32)
  return _row_loop(4, level, (zero, zero), unroll)


def diag_pairs_levels_bwd(q_ref, k_ref, g_ref, b_ref, cols, dTc, dPc, *, terms: int, precision,
                          unroll: bool = False):
  """Cotangents of `diag_pairs_levels`, as `diag_pairs_bwd` returns them (`(d(b*k), dq, dk)` `[16, BK]`, the decay
  factors not differentiated): per level, `T_s = L R^T` on the level's pairs gives `dL = dT_s R` and
  `dR = dT_s^T L`, with `L = x exp(left)` (upper halves) and `R = k exp(right)` (lower halves)."""
  q, k, g, bk = _level_operands(q_ref, k_ref, g_ref, b_ref, cols)

  def level(l, carry):
    dbk, dq, dk = carry
    pairs, e_up, e_low, right = _level_factors(g, k, l, terms, precision)
    dT, dP = jnp.where(pairs, dTc, 0.0), jnp.where(pairs, dPc, 0.0)
    dbk = dbk + e_up * dot(dT, right, precision)
    dq = dq + e_up * dot(dP, right, precision)
    d_right = dot_tn(dT, bk * e_up, precision) + dot_tn(dP, q * e_up, precision)
    dk = dk + e_low * d_right
    return dbk, dq, dk

  zero = jnp.zeros(k.shape, F32)
  return _row_loop(4, level, (zero, zero, zero), unroll)


def diag_pairs_bwd(q_ref, k_ref, g_ref, b_ref, cols, dTc, dPc, *, unroll: bool = False):
  """Cotangents of `diag_pairs` for compact strict-lower cotangents `dTc, dPc [16, 16]` (column jl = key row jl).

  Returns `(d(b*k), dq, dk)` `[16, BK]` over the key columns `cols` (the decay factors are not differentiated here:
  their gate gradient is `b*k * d(b*k) + q * dq - k * dk`, see `pairs_bwd`).
  """
  q = q_ref[:, cols].astype(F32)
  k = k_ref[:, cols].astype(F32)
  bk = b_ref[:, cols].astype(F32) * k
  row_idx = iota((SUB, 1), 0)
  col_idx = iota((SUB, SUB), 1)

  def step(t, carry):
    D, dbk, dq, dk = carry
    jl = SUB - 2 - t
    D = D * _decay_row(g_ref, jl + 1, cols, row_idx)
    E = jnp.where(row_idx > jl, D, 0.0)
    kE = k_ref[pl.ds(jl, 1), cols].astype(F32) * E
    sel = col_idx == jl
    dTj = jnp.sum(jnp.where(sel, dTc, 0.0), axis=1, keepdims=True)  # [16, 1]
    dPj = jnp.sum(jnp.where(sel, dPc, 0.0), axis=1, keepdims=True)
    dbk = dbk + dTj * kE
    dq = dq + dPj * kE
    red = jnp.sum((dTj * bk + dPj * q) * E, axis=0, keepdims=True)  # [1, BK]: belongs to key row jl
    dk = jnp.where(row_idx == jl, dk + red, dk)
    return D, dbk, dq, dk

  zero = jnp.zeros(k.shape, F32)
  _, dbk, dq, dk = _row_loop(SUB - 1, step, (jnp.ones(k.shape, F32), zero, zero, zero), unroll)
  return dbk, dq, dk
