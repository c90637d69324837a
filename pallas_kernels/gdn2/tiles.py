"""In-kernel tile math of the GDN-2 chunk kernels: sub-blocks of 16 rows, key tiles of BK channels.

A chunk has C = 64 rows in four sub-blocks of 16. The kernels read `[16, BK]` tiles and `[16, 16]` blocks of the
C x C matrices from refs at static offsets and keep only those small tiles in registers, so that many programs
share a multiprocessor. Only operations the Pallas Triton lowering supports are used (iota, where, exp, reductions,
2-D dots, slices of refs), so the same code runs compiled on a GPU and in interpret mode on a CPU.

Chunk maths (DESIGN.md section 4), rows i, j of one chunk, `G_i = sum_{m <= i} g_m` per channel:

    T   = strict_lower([sum_k b_ik k_ik k_jk exp(G_ik - G_jk)]_ij)      A = (I + T)^-1
    P   = scale * lower_incl([sum_k q_ik k_jk exp(G_ik - G_jk)]_ij)
    U   = A (w * v),   Y = A (exp(G) * b * k),   qg = scale * exp(G) * q,   ks = k * exp(G_C - G)

Numerics (DESIGN.md section 6): no factor `exp(-G)` is ever formed. Every exponent is a sum of log-decays over a
token range in the past of the row, taken directly over that range, so every factor is <= 1 and keeps its relative
accuracy whatever `g` is (down to -1e30 at packed-sequence resets):
- per sub-block, `loc` (start of the sub-block to the row) and `rev` (after the row to the sub-block end) are
  0/1-masked products; on tensor cores a float32 operand is cut to TF32, so `g` is first split into parts that are
  exact in TF32 (`_tf32_split`): the masked products are then exact and only the float32 accumulation rounds;
- pairs in sub-blocks I > J factor as `exp(loc_i) * exp(rev_j) * exp(sum of the sub-blocks strictly between)`,
  three factors <= 1 (`ChunkGates.right`), so those blocks are plain matrix products;
- pairs inside a diagonal sub-block get their exponent `sum_{j < m <= i} g_m` by adding one row of g at a time
  (`diag_pairs`), never as a difference of cumulative sums.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

SUB = 16  # sub-block rows
NSUB = 4  # sub-blocks per chunk
F32 = jnp.float32
LOWER_PAIRS = tuple((I, J) for I in range(1, NSUB) for J in range(I))  # off-diagonal blocks I > J
LOWER_BLOCKS = tuple((I, J) for I in range(NSUB) for J in range(I + 1))  # I >= J


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
  if isinstance(precision, str):  # EMULATE_TF32
    a, b, precision = tf32_truncate(a.astype(F32)), tf32_truncate(b.astype(F32)), lax.Precision.HIGHEST
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


def masked_sum(mask, x, terms: int, precision=lax.Precision.DEFAULT):
  """`mask @ x` for a 0/1 float32 `mask`, accurate to float32 rounding even where dots use TF32."""
  out = None
  for part in _tf32_split(x, terms):
    y = dot(mask, part, _tensor_core(precision))
    out = y if out is None else out + y
  return out


def dot3(a, b, precision):
  """`a @ b` to about float32 accuracy on tensor cores: `hi hi + hi lo + lo hi` of the TF32 splits (3xTF32)."""
  if precision == lax.Precision.HIGHEST:
    return dot(a, b, precision)
  a_hi, a_lo = _tf32_split(a, 2)
  b_hi, b_lo = _tf32_split(b, 2)
  p = _tensor_core(precision)
  return dot(a_hi, b_hi, p) + (dot(a_hi, b_lo, p) + dot(a_lo, b_hi, p))


def _mask(cond):
  return jnp.where(cond, 1.0, 0.0).astype(F32)


def eye(n: int):
  return _mask(iota((n, n), 0) == iota((n, n), 1))


def tile(ref, I: int, k0, BK: int):
  """Rows of sub-block I (static), columns `[k0, k0 + BK)` of a `[64, D]` block ref, as float32."""
  return ref[pl.ds(SUB * I, SUB), pl.ds(k0, BK)].astype(F32)


def block(ref, I: int, J: int):
  """Block (I, J) (static) of a `[64, 64]` block ref, as float32."""
  return ref[pl.ds(SUB * I, SUB), pl.ds(SUB * J, SUB)].astype(F32)


def store_block(ref, I: int, J: int, x):
  ref[pl.ds(SUB * I, SUB), pl.ds(SUB * J, SUB)] = x.astype(ref.dtype)


def store_lower(ref, blocks: dict):
  """Writes a block lower-triangular `[64, 64]` matrix (blocks (I, J), I >= J) to `ref`, zeros above."""
  zero = jnp.zeros((SUB, SUB), F32)
  for I in range(NSUB):
    for J in range(NSUB):
      store_block(ref, I, J, blocks[I, J] if J <= I else zero)


class ChunkGates:
  """Segment sums of the log-decay over the four sub-blocks of one key tile (all same-signed sums).

  `loc[I]`, `rev[I]` `[16, BK]`: from the sub-block start to the row (inclusive) and from after the row to the
  sub-block end; `tot[I]` `[1, BK]`: the sub-block total.
  """

  def __init__(self, g_ref, k0, BK: int, terms: int, precision=lax.Precision.DEFAULT):
    r, m = iota((SUB, SUB), 0), iota((SUB, SUB), 1)
    incl, after = _mask(m <= r), _mask(m > r)
    self.loc, self.rev, self.tot = [], [], []
    for I in range(NSUB):
      g = tile(g_ref, I, k0, BK)
      self.loc.append(masked_sum(incl, g, terms, precision))
      self.rev.append(masked_sum(after, g, terms, precision))
      self.tot.append(jnp.sum(g, axis=0, keepdims=True))

  def _sum(self, blocks):
    out = None
    for L in blocks:
      out = self.tot[L] if out is None else out + self.tot[L]
    return out

  def G(self, I: int):
    """`[16, BK]`: chunk start to the row, inclusive."""
    pre = self._sum(range(I))
    return self.loc[I] if pre is None else self.loc[I] + pre

  def to_end(self, I: int):
    """`[16, BK]`: after the row to the chunk end."""
    post = self._sum(range(I + 1, NSUB))
    return self.rev[I] if post is None else self.rev[I] + post

  def total(self):
    """`[1, BK]`: the whole chunk."""
    return self._sum(range(NSUB))

  def between(self, J: int, I: int):
    """`exp` of the sub-blocks strictly between J and I (`[1, BK]`, <= 1), or None when they are adjacent."""
    s = self._sum(range(J + 1, I))
    return None if s is None else jnp.exp(s)

  def right(self, kr, J: int, I: int):
    """Right factor of the pairs (I, J), I > J: `k_j exp(sum_{j < m < s_I} g_m)` from `kr = k exp(rev)`."""
    e = self.between(J, I)
    return kr if e is None else kr * e


def diag_pairs(x_ref, k_ref, g_ref, b_ref, cols, *, with_q: bool):
  """Strict-lower pair products inside one sub-block, compact: `M[i, jl] = sum_k x_ik k_jk exp(G_ik - G_jk)` for
  the row i and the column j = jl of the sub-block (j < i), over the key columns `cols`.

  `x_ref, k_ref, g_ref, b_ref` are `[16, K]` refs of one sub-block. Returns `(T [16, 16], P [16, 16] or None)` for
  `x = b * k` and, with `with_q`, `x = q`.
  """
  q = x_ref[:, cols].astype(F32) if with_q else None
  k = k_ref[:, cols].astype(F32)
  bk = b_ref[:, cols].astype(F32) * k
  r = iota((SUB, 1), 0)
  c = iota((SUB, SUB), 1)

  def step(t, carry):
    D, Tc, Pc = carry
    jl = SUB - 2 - t
    D = D + jnp.where(r >= jl + 1, g_ref[pl.ds(jl + 1, 1), cols].astype(F32), 0.0)  # (j, i] summed row by row
    kE = k_ref[pl.ds(jl, 1), cols].astype(F32) * jnp.where(r > jl, jnp.exp(D), 0.0)
    sel = c == jl
    Tc = jnp.where(sel, Tc + jnp.sum(bk * kE, axis=1, keepdims=True), Tc)
    if with_q:
      Pc = jnp.where(sel, Pc + jnp.sum(q * kE, axis=1, keepdims=True), Pc)
    return D, Tc, Pc

  zero = jnp.zeros((SUB, SUB), F32)
  D0 = jnp.zeros(k.shape, F32)
  _, Tc, Pc = lax.fori_loop(0, SUB - 1, step, (D0, zero, zero))
  return Tc, (Pc if with_q else None)


def diag_pairs_bwd(q_ref, k_ref, g_ref, b_ref, cols, dTc, dPc):
  """Cotangents of `diag_pairs` for compact strict-lower cotangents `dTc, dPc [16, 16]` (column jl = key row jl).

  Returns `(d(b*k), dq, dk)` `[16, BK]` over the key columns `cols` (the decay factors are not differentiated here:
  their gate gradient is `b*k * d(b*k) + q * dq - k * dk`, see `pairs_bwd`).
  """
  q = q_ref[:, cols].astype(F32)
  k = k_ref[:, cols].astype(F32)
  bk = b_ref[:, cols].astype(F32) * k
  r = iota((SUB, 1), 0)
  c = iota((SUB, SUB), 1)

  def step(t, carry):
    D, dbk, dq, dk = carry
    jl = SUB - 2 - t
    D = D + jnp.where(r >= jl + 1, g_ref[pl.ds(jl + 1, 1), cols].astype(F32), 0.0)
    E = jnp.where(r > jl, jnp.exp(D), 0.0)
    kE = k_ref[pl.ds(jl, 1), cols].astype(F32) * E
    sel = c == jl
    dTj = jnp.sum(jnp.where(sel, dTc, 0.0), axis=1, keepdims=True)  # [16, 1]
    dPj = jnp.sum(jnp.where(sel, dPc, 0.0), axis=1, keepdims=True)
    dbk = dbk + dTj * kE
    dq = dq + dPj * kE
    red = jnp.sum((dTj * bk + dPj * q) * E, axis=0, keepdims=True)  # [1, BK]: belongs to key row jl
    dk = jnp.where(r == jl, dk + red, dk)
    return D, dbk, dq, dk

  zero = jnp.zeros(k.shape, F32)
  _, dbk, dq, dk = lax.fori_loop(0, SUB - 1, step, (zero, zero, zero, zero))
  return dbk, dq, dk


def diag_block_inverse(t_ref, I: int):
  """`(I + T_II)^-1` `[16, 16]` for the strictly lower diagonal block in rows `16 I ..` of the compact `t_ref [64, 16]`.

  Row-by-row forward substitution in float32 on CUDA cores: row r of A is `e_r - sum_{c < r} T_rc A_c`. (Products
  by doubling, `(I - T)(I + T^2)...`, have intermediate powers that grow like binomial coefficients when the keys are
  correlated; in TF32 they lose every digit (measured in an emulation: relative error 1e6 at key correlation 0.7).)
  The transpose is built, column by column, so that every step reads one row of T and reduces along it.
  """
  rows, cols = iota((SUB, 1), 0), iota((SUB, SUB), 1)

  def step(r, At):  # At = A^T: column r of At is row r of A
    t_row = t_ref[pl.ds(SUB * I + r, 1), :].astype(F32)  # [1, 16]: T[r, c]
    col = jnp.where(rows == r, 1.0, 0.0) - jnp.sum(At * t_row, axis=1, keepdims=True)
    return jnp.where(cols == r, col, At)

  return lax.fori_loop(1, SUB, step, eye(SUB)).T


def block_inverse(t_ref, Tb: dict, precision) -> dict:
  """`A = (I + T)^-1` for block strictly-lower `T`: the off-diagonal blocks `Tb[I, J]` (I > J), the diagonal ones
  compact in `t_ref [64, 16]`.

  Diagonal blocks by forward substitution (`diag_block_inverse`); below them `A_IJ = -A_II sum_{J <= L < I} T_IL A_LJ`
  (block forward substitution) with 3xTF32 products (`dot3`), so that A keeps float32 accuracy. Returns the blocks
  `A[I, J]`, I >= J.
  """
  A = {(I, I): diag_block_inverse(t_ref, I) for I in range(NSUB)}
  Tfull = dict(Tb)
  for I in range(NSUB):
    Tfull[I, I] = t_ref[pl.ds(SUB * I, SUB), :].astype(F32)
  for d in range(1, NSUB):
    for I in range(d, NSUB):
      J = I - d
      acc = None
      for L in range(J, I):
        t = dot3(Tfull[I, L], A[L, J], precision)
        acc = t if acc is None else acc + t
      A[I, J] = -dot3(A[I, I], acc, precision)
  return A


def lower_apply(A: dict, xs: list, precision) -> list:
  """`[sum_{J <= I} A[I, J] @ xs[J] for I]`: a block lower-triangular `[64, 64]` times `[64, D]` given by sub-block."""
  out = []
  for I in range(NSUB):
    acc = None
    for J in range(I + 1):
      t = dot(A[I, J], xs[J], precision)
      acc = t if acc is None else acc + t
    out.append(acc)
  return out


def lower_apply_t(A: dict, xs: list, precision) -> list:
  """`[sum_{L >= J} A[L, J]^T @ xs[L] for J]`: the transpose of `lower_apply`."""
  out = []
  for J in range(NSUB):
    acc = None
    for L in range(J, NSUB):
      t = dot_tn(A[L, J], xs[L], precision)
      acc = t if acc is None else acc + t
    out.append(acc)
  return out
