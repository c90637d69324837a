"""In-kernel tile math of the GDN-2 chunk kernels: one chunk of C = 64 tokens, values in registers.

Every function here works on plain arrays (`[C, K]`, `[C, V]`, `[C, C]`) plus, where rows must be gathered, the
kernel's block refs; only operations that the Pallas Triton lowering supports are used (iota, where, exp, reductions,
2-D dots, reshape, gather loads from refs), so the same code runs compiled on a GPU and in interpret mode on a CPU.

Chunk maths (DESIGN.md section 4), rows i, j of one chunk, `G_i = sum_{m <= i} g_m` per channel:

    T   = strict_lower([sum_k b_ik k_ik k_jk exp(G_ik - G_jk)]_ij)      A = (I + T)^-1
    P   = scale * lower_incl([sum_k q_ik k_jk exp(G_ik - G_jk)]_ij)
    U   = A (w * v),   Y = A (exp(G) * b * k),   qg = scale * exp(G) * q,   ks = k * exp(G_C - G)

Numerics (DESIGN.md section 6). No factor `exp(-G)` is ever formed: every exponent is a sum of log-decays over a
token range in the past of the row, taken directly over that range, so every factor is <= 1 and keeps its relative
accuracy whatever `g` is (down to -1e30 at packed-sequence resets).
- Segment sums over the chunk are 0/1-masked matrix products. On tensor cores a float32 operand is cut to TF32, so
  `g` is split into `terms` TF32-exact parts first (`_tf32_split`); the products with a 0/1 mask are then exact and
  only the float32 accumulation rounds (relative error ~1e-7 for 3 parts, ~5e-7 for 2).
- Pairs in different 16-token sub-blocks I > J factor at the start of sub-block I:
  `exp(G_i - G_j) = exp(sum_{s_I <= m <= i} g) * exp(sum_{j < m < s_I} g)`, two factors <= 1, one matrix product.
- Pairs inside a diagonal 16x16 sub-block get their exponent `sum_{j < m <= i} g_m` by adding rows of g one at a
  time (a loop over the 16 columns, all four sub-blocks at once), never as a difference of cumulative sums.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

SUB = 16  # sub-block length
F32 = jnp.float32


def iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def dot(a, b, precision):
  """`a @ b` with float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=F32)


def dot_tn(a, b, precision):
  """`a^T @ b`."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=F32)


def dot_nt(a, b, precision):
  """`a @ b^T`."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=F32)


def _tf32_split(x, terms: int):
  """`x = sum(parts)` exactly, each part but the last with at most 10 mantissa bits (exact in TF32)."""
  parts = []
  rest = x
  for _ in range(terms - 1):
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(rest, jnp.int32) & jnp.int32(-8192), F32)
    parts.append(hi)
    rest = rest - hi  # exact: hi holds the leading bits of rest
  parts.append(rest)
  return parts


def masked_sum(mask, x, terms: int):
  """`mask @ x` for a 0/1 float32 `mask [C, C]`, accurate to float32 rounding even where dots use TF32."""
  out = None
  for part in _tf32_split(x, terms):
    y = dot(mask, part, lax.Precision.DEFAULT)
    out = y if out is None else out + y
  return out


def _row(x, i):
  """Row `i` (static) of `x [C, K]` as `[K]` (a masked reduction: values cannot be sliced)."""
  return jnp.sum(jnp.where(iota(x.shape, 0) == i, x, 0.0), axis=0)


def gate_sums(g, terms: int):
  """Direct segment sums of the log-decay `g [C, K]` (all same-signed, so each keeps its relative accuracy).

  Returns dict with `[C, K]` arrays `loc` (sum from the row's sub-block start to the row, inclusive), `rev`
  (sum from after the row to its sub-block end), `G` (chunk start to the row), `to_end` (after the row to the
  chunk end), `tot` (list of `[K]` sub-block totals) and `total [K]`.
  """
  C = g.shape[0]
  r, m = iota((C, C), 0), iota((C, C), 1)
  same = (r // SUB) == (m // SUB)
  loc = masked_sum(jnp.where(same & (m <= r), 1.0, 0.0).astype(F32), g, terms)
  rev = masked_sum(jnp.where(same & (m > r), 1.0, 0.0).astype(F32), g, terms)
  nb = C // SUB
  tot = [_row(loc, SUB * L + SUB - 1) for L in range(nb)]
  blk = iota(g.shape, 0) // SUB
  pre = jnp.zeros_like(g)
  post = jnp.zeros_like(g)
  for L in range(nb):
    pre = pre + jnp.where(blk > L, tot[L][None, :], 0.0)
    post = post + jnp.where(blk < L, tot[L][None, :], 0.0)
  total = tot[0]
  for L in range(1, nb):
    total = total + tot[L]
  return dict(loc=loc, rev=rev, G=loc + pre, to_end=rev + post, tot=tot, total=total)


def _between(tot, blk, I):
  """`[C, K]`: for rows in sub-block J < I, `sum_{J < L < I} tot_L` (exponent between a row's block and I)."""
  out = jnp.zeros(blk.shape, F32)
  for L in range(1, I):
    out = out + jnp.where(blk < L, tot[L][None, :], 0.0)
  return out


def _diag_loop(g_ref, k_ref, k0, BK: int, body, init, C: int):
  """Runs `body(jl, E, kj, carry)` for jl = 14 .. 0 over the four diagonal sub-blocks at once.

  `E [C, BK]` holds `exp(sum_{s + jl < m <= i} g_m)` for rows i of a sub-block (start s) with local index > jl, else
  0; `kj [C, BK]` is the key of column s + jl for each row. Results are kept compact, `[C, 16]` indexed by jl.
  """
  rows = iota((C, 1), 0)
  loc = rows % SUB
  start = rows - loc

  def step(t, carry):
    D, inner = carry
    jl = SUB - 2 - t
    gnext = g_ref[(start + jl + 1)[:, 0], pl.ds(k0, BK)].astype(F32)
    D = D + jnp.where(loc >= jl + 1, gnext, 0.0)  # sequential same-signed sum over (s + jl, i]
    E = jnp.where(loc > jl, jnp.exp(D), 0.0)
    kj = k_ref[(start + jl)[:, 0], pl.ds(k0, BK)].astype(F32)
    return D, body(jl, E, kj, inner)

  D0 = jnp.zeros((C, BK), F32)
  return lax.fori_loop(0, SUB - 1, step, (D0, init))[1]


def _spread_sel(C: int):
  """`[16, C]` 0/1: `sel[jl, j] = (j % 16 == jl)`; `compact @ sel` puts column jl of every sub-block in place."""
  return jnp.where(iota((SUB, C), 1) % SUB == iota((SUB, C), 0), 1.0, 0.0).astype(F32)


def diag_expand(compact, terms: int):
  """`[C, 16]` compact diagonal sub-blocks (column jl = column s + jl of the row's sub-block) -> `[C, C]`."""
  C = compact.shape[0]
  out = None
  for part in _tf32_split(compact, terms):  # a copy: keep it exact on tensor cores
    y = dot(part, _spread_sel(C), lax.Precision.DEFAULT)
    out = y if out is None else out + y
  same = (iota((C, C), 0) // SUB) == (iota((C, C), 1) // SUB)
  return jnp.where(same, out, 0.0)


def pair_matrices(g_ref, k_ref, k0, bk, q, k, sums, precision, terms: int):
  """Strict-lower decay-weighted pair products `M[i, j] = sum_k x_ik k_jk exp(G_ik - G_jk)`, j < i.

  Returns `(T_raw, P_raw)` `[C, C]` for `x = b * k` and `x = q` (no scale, no diagonal); `P_raw` is None when `q` is.
  """
  C, BK = bk.shape
  xs = (bk,) if q is None else (bk, q)
  col = iota((C, SUB), 1)

  def body(jl, E, kj, carry):
    kE = kj * E
    return tuple(jnp.where(col == jl, jnp.sum(x * kE, axis=1, keepdims=True), M) for x, M in zip(xs, carry))

  zero = jnp.zeros((C, SUB), F32)
  Ms = tuple(diag_expand(M, terms) for M in _diag_loop(g_ref, k_ref, k0, BK, body, tuple(zero for _ in xs), C))
  blk = iota(bk.shape, 0) // SUB
  rblk = iota((C, 1), 0) // SUB
  left = jnp.exp(sums["loc"])
  lefts = tuple(x * left for x in xs)
  for I in range(1, C // SUB):
    right = jnp.where(blk < I, k * jnp.exp(sums["rev"] + _between(sums["tot"], blk, I)), 0.0)
    Ms = tuple(M + jnp.where(rblk == I, dot_nt(lx, right, precision), 0.0) for M, lx in zip(Ms, lefts))
  return (Ms[0], None) if q is None else Ms


def pair_matrices_bwd(g_ref, k_ref, k0, bk, q, k, sums, dT, dP, precision):
  """Cotangents of `pair_matrices` for strict-lower cotangents `dT, dP [C, C]`: `(d bk, d q, d k)` `[C, K]`.

  (Columns are read from dT, dP with masked `[C, C]` reductions: compact `[C, 16]` copies, as in the forward, cost
  4 KB more shared memory, which measured with ptxas takes intra_bwd past two blocks per SM.)

  The decay factors are not differentiated here: their gate gradient is `x * dx - k * dk` summed in reverse
  (`chunk_bwd`), since every factor is `exp(G_i - G_j)`.
  """
  C, K = bk.shape
  nb = C // SUB

  rows = iota((C, 1), 0)
  cols = iota((C, C), 1)

  def body(jl, E, kj, carry):
    dxT, dxP, dy = carry
    sel = cols == rows - rows % SUB + jl  # column s + jl of each row's sub-block (dT, dP are strict: rows > jl)
    dTj = jnp.sum(jnp.where(sel, dT, 0.0), axis=1, keepdims=True)
    dPj = jnp.sum(jnp.where(sel, dP, 0.0), axis=1, keepdims=True)
    kE = kj * E
    dxT = dxT + dTj * kE
    dxP = dxP + dPj * kE
    contrib = (dTj * bk + dPj * q) * E  # rows i; belongs to key row s + jl of the same sub-block
    per_block = jnp.sum(contrib.reshape(nb, SUB, K), axis=1)  # [nb, K]
    spread = jnp.broadcast_to(per_block[:, None, :], (nb, SUB, K)).reshape(C, K)
    dy = dy + jnp.where(iota((C, 1), 0) % SUB == jl, spread, 0.0)
    return dxT, dxP, dy

  zero = jnp.zeros((C, K), F32)
  dxT, dxP, dy = _diag_loop(g_ref, k_ref, k0, K, body, (zero, zero, zero), C)
  blk = iota(bk.shape, 0) // SUB
  rblk = iota((C, 1), 0) // SUB
  left = jnp.exp(sums["loc"])
  lT, lP = bk * left, q * left
  dlT = jnp.zeros_like(bk)
  dlP = jnp.zeros_like(bk)
  for I in range(1, nb):
    # Row masks go on the per-tile operands, never on dT / dP: masked copies of those loop invariants would each
    # take a [C, C] buffer of shared memory for the whole key loop.
    eR = jnp.where(blk < I, jnp.exp(sums["rev"] + _between(sums["tot"], blk, I)), 0.0)
    right = k * eR
    rows = blk == I
    dlT = dlT + jnp.where(rows, dot(dT, right, precision), 0.0)
    dlP = dlP + jnp.where(rows, dot(dP, right, precision), 0.0)
    dy = dy + eR * (dot_tn(dT, jnp.where(rows, lT, 0.0), precision) + dot_tn(dP, jnp.where(rows, lP, 0.0), precision))
  return dxT + left * dlT, dxP + left * dlP, dy


def unit_lower_inverse(Tm, precision):
  """`(I + T)^-1` for strictly lower `T [C, C]` (C a power of 2): `(I - T)(I + T^2)(I + T^4)...`, exact as T^C = 0."""
  C = Tm.shape[0]
  eye = jnp.where(iota((C, C), 0) == iota((C, C), 1), 1.0, 0.0).astype(F32)
  X = eye - Tm
  Pw = dot(Tm, Tm, precision)
  p = 2
  while p < C:
    X = X + dot(X, Pw, precision)
    if 2 * p < C:
      Pw = dot(Pw, Pw, precision)
    p *= 2
  return X


def _kblock(ref, k0, BK: int):
  """Columns `[k0, k0 + BK)` of a `[C, K]` block ref, as float32."""
  return ref[:, pl.ds(k0, BK)].astype(F32)


def _pair_pass(q_ref, k_ref, g_ref, b_ref, s_ref, *, BK: int, terms: int, precision):
  """Loop over key-dimension blocks of BK channels (register pressure stays at `[C, BK]` tiles).

  Returns `T_raw, P_raw [C, C]` (strict-lower pair products, see `pair_matrices`), `qk [C, 1]` (= sum q * k, the
  diagonal of P) and, when `s_ref` (`[K, V]` state entering the chunk) is given, `ES = (exp(G) * b * k) S [C, V]`.
  """
  C, K = q_ref.shape

  def body(kb, carry):
    k0 = pl.multiple_of(kb * BK, BK)
    q, k, g, b = (_kblock(r, k0, BK) for r in (q_ref, k_ref, g_ref, b_ref))
    sums = gate_sums(g, terms)
    bk = b * k
    Tm, Pm = pair_matrices(g_ref, k_ref, k0, bk, q, k, sums, precision, terms)
    out = (carry[0] + Tm, carry[1] + Pm, carry[2] + jnp.sum(q * k, axis=1, keepdims=True))
    if s_ref is not None:
      E = jnp.exp(sums["G"]) * bk
      out = out + (carry[3] + dot(E, s_ref[pl.ds(k0, BK), :], precision),)
    return out

  zero = jnp.zeros((C, C), F32)
  init = (zero, zero, jnp.zeros((C, 1), F32))
  if s_ref is not None:
    init = init + (jnp.zeros((C, s_ref.shape[-1]), F32),)
  return lax.fori_loop(0, K // BK, body, init)


def intra_fwd(q_ref, k_ref, g_ref, b_ref, v_ref, w_ref, u_ref, y_ref, qg_ref, ks_ref, p_ref, dec_ref, *,
              scale: float, BK: int, terms: int, precision):
  """One chunk's state-independent WY quantities, written to the output refs:

  `U = A (w*v) [C, V]`, `Y = A (exp(G)*b*k)`, `qg = scale*exp(G)*q`, `ks = k*exp(G_C - G)` `[C, K]`,
  `P [C, C]` (scaled, diagonal included), `dec = exp(G_C) [K]`.
  """
  C = q_ref.shape[0]
  K = q_ref.shape[1]
  Tm, Pm, qk = _pair_pass(q_ref, k_ref, g_ref, b_ref, None, BK=BK, terms=terms, precision=precision)
  eye = iota((C, C), 0) == iota((C, C), 1)
  p_ref[...] = scale * (Pm + jnp.where(eye, qk, 0.0))
  A = unit_lower_inverse(Tm, precision)
  u_ref[...] = dot(A, v_ref[...].astype(F32) * w_ref[...].astype(F32), precision)

  def body(kb, carry):
    k0 = pl.multiple_of(kb * BK, BK)
    q, k, g, b = (_kblock(r, k0, BK) for r in (q_ref, k_ref, g_ref, b_ref))
    sums = gate_sums(g, terms)
    gamma = jnp.exp(sums["G"])
    cols = pl.ds(k0, BK)
    y_ref[:, cols] = dot(A, gamma * b * k, precision)
    qg_ref[:, cols] = scale * gamma * q
    ks_ref[:, cols] = k * jnp.exp(sums["to_end"])
    dec_ref[cols] = jnp.exp(sums["total"])
    return carry

  lax.fori_loop(0, K // BK, body, 0)


def bwd_contract(u_ref, y_ref, s_ref, dsn_ref, do_ref, dr_ref, dqg_ref, dks_ref, dy_ref, ddec_ref, dpf_ref, *,
                 BK: int, precision):
  """The backward's contractions over the value axis for one chunk, written to the output refs (float32).

  Given `U [C, V]`, `Y [C, K]` (from `intra_fwd`), the state `S [K, V]` entering the chunk, the cotangent
  `dSn [K, V]` of the state leaving it, `dO` and `dR` `[C, V]` (`dR` is the cotangent of `R = U - Y S`):
  `dqg = dO S^T`, `dks = R dSn^T`, `dY = -dR S^T` `[C, K]`, `ddec = rowsum(S * dSn) [K]`,
  `dPf = lower_incl(dO R^T) [C, C]`. Keeping these out of `intra_bwd` keeps `[C, V]` tiles out of its registers.
  """
  C, V = u_ref.shape
  K = y_ref.shape[1]

  def ys(kb, acc):
    k0 = pl.multiple_of(kb * BK, BK)
    return acc + dot(y_ref[:, pl.ds(k0, BK)], s_ref[pl.ds(k0, BK), :], precision)

  R = u_ref[...] - lax.fori_loop(0, K // BK, ys, jnp.zeros((C, V), F32))
  dO = do_ref[...].astype(F32)
  r, c = iota((C, C), 0), iota((C, C), 1)
  dpf_ref[...] = jnp.where(c <= r, dot_nt(dO, R, precision), 0.0)

  def body(kb, carry):
    k0 = pl.multiple_of(kb * BK, BK)
    cols = pl.ds(k0, BK)
    S = s_ref[cols, :]
    dSn = dsn_ref[cols, :]
    dqg_ref[:, cols] = dot_nt(dO, S, precision)
    dks_ref[:, cols] = dot_nt(R, dSn, precision)
    dy_ref[:, cols] = -dot_nt(dr_ref[...], S, precision)
    ddec_ref[cols] = jnp.sum(S * dSn, axis=1)
    return carry

  lax.fori_loop(0, K // BK, body, 0)


def intra_bwd(q_ref, k_ref, g_ref, b_ref, v_ref, w_ref, dqg_ref, dks_ref, dy_ref, ddec_ref, dpf_ref, dr_ref,
              dq_ref, dk_ref, dg_ref, db_ref, dv_ref, dw_ref, *, scale: float, BK: int, terms: int, precision):
  """Gradients of one chunk's inputs, written to the output refs (float32).

  Takes the cotangents of the chunk's WY quantities from `bwd_contract`: `dqg, dY [C, K]` (of `qg`, `Y`),
  `dks [C, K]`, `ddec [K]`, `dPf [C, C]` (of P), and `dR [C, V]` (of `R = U - Y S`, so `dU = dR`).
  Gate-aware (DESIGN.md section 5): `dA = dU (w*v)^T + dY (exp(G)*b*k)^T`, `dT = -strict_lower(A^T dA A^T)`; the
  erase gate b and the write gate w sit inside these products. The gate gradient collects `d G_i` from every factor
  (`exp(G)` in qg and E, `exp(G_i - G_j)` in the pairs, `exp(G_C - G)` in ks, `exp(G_C)`) and sums it over the
  tokens each exponent covers.
  """
  C, K = q_ref.shape
  nk = K // BK

  def pass1(kb, carry):  # T (for A) and dY E^T, over key tiles
    Tm, dA = carry
    k0 = pl.multiple_of(kb * BK, BK)
    q, k, g, b = (_kblock(ref, k0, BK) for ref in (q_ref, k_ref, g_ref, b_ref))
    sums = gate_sums(g, terms)
    bk = b * k
    Tb, _ = pair_matrices(g_ref, k_ref, k0, bk, None, k, sums, precision, terms)
    E = jnp.exp(sums["G"]) * bk
    return Tm + Tb, dA + dot_nt(dy_ref[:, pl.ds(k0, BK)], E, precision)

  zero = jnp.zeros((C, C), F32)
  Tm, dA = lax.fori_loop(0, nk, pass1, (zero, zero))
  A = unit_lower_inverse(Tm, precision)
  r, c = iota((C, C), 0), iota((C, C), 1)
  v, w = v_ref[...].astype(F32), w_ref[...].astype(F32)
  dR = dr_ref[...]
  dA = dA + dot_nt(dR, v * w, precision)
  dZ = dot_tn(A, dR, precision)  # U = A (w*v)
  dv_ref[...] = w * dZ
  dw_ref[...] = v * dZ
  dT = -jnp.where(c < r, dot_nt(dot_tn(A, dA, precision), A, precision), 0.0)
  dPf = dpf_ref[...]
  dPs = scale * jnp.where(c < r, dPf, 0.0)
  dPd = scale * jnp.sum(jnp.where(c == r, dPf, 0.0), axis=1, keepdims=True)  # [C, 1]

  def pass2(kb, carry):
    k0 = pl.multiple_of(kb * BK, BK)
    cols = pl.ds(k0, BK)
    q, k, g, b = (_kblock(ref, k0, BK) for ref in (q_ref, k_ref, g_ref, b_ref))
    sums = gate_sums(g, terms)
    gamma = jnp.exp(sums["G"])
    toend = jnp.exp(sums["to_end"])
    bk = b * k
    dqg = dqg_ref[:, cols]
    dks = dks_ref[:, cols]
    dE = dot_tn(A, dy_ref[:, cols], precision)  # Y = A E
    dxT, dxP, dy = pair_matrices_bwd(g_ref, k_ref, k0, bk, q, k, sums, dT, dPs, precision)
    dbk = dxT + gamma * dE
    a = gamma * (scale * q * dqg + bk * dE) + bk * dxT + q * dxP - k * dy
    rr, cc = iota((C, C), 0), iota((C, C), 1)
    dg = (masked_sum(jnp.where(cc >= rr, 1.0, 0.0).astype(F32), a, terms)  # sum over i >= m
          + masked_sum(jnp.where(cc < rr, 1.0, 0.0).astype(F32), k * toend * dks, terms)  # over j < m
          + (jnp.exp(sums["total"]) * ddec_ref[cols])[None, :])
    dq_ref[:, cols] = scale * gamma * dqg + dxP + dPd * k
    dk_ref[:, cols] = b * dbk + dy + toend * dks + dPd * q
    dg_ref[:, cols] = dg
    db_ref[:, cols] = k * dbk
    return carry

  lax.fori_loop(0, nk, pass2, 0)
