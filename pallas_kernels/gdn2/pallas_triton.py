"""Pallas (Triton lowering) kernels of the chunkwise GDN-2 forward and backward.

Layout (already padded by the caller): `q, k, g, b [B, T, H, K]`, `v, w [B, T, HV, V]`, T a multiple of 64, K and V
powers of two >= 16, HV a multiple of H. Everything that depends only on q, k, g, b (the pair products, the WY
inverse) is computed once per qk head; value heads read it through index maps (`h // groups`).

Forward (four kernels):
- `diag_fwd`   grid (B, H, T/16): the pair products inside each 16-token sub-block (a 15-step loop, one row of g
               at a time), compact `[16, 16]` per sub-block.
- `chunk_fwd`  grid (B, H, T/64): the pairs between sub-blocks (matrix products), `A = (I + T)^-1`
               (`tiles.wy_inverse`), `P`, `A`, `Y = A E`, `qg`, `ks`, `exp(G_C)` and `U = A (w*v)` for each value
               head of the group.
- `state_fwd`  grid (B, HV, V/bv): the pass over chunks, state tile `[K, bv]` in registers (bv:
               `ChunkConfig.state_block_v`):
               `R = U - Y S` (written), `S' = exp(G_C) S + ks^T R`; writes every chunk's entering state.
- `out_fwd`    grid (B, HV, T/64, V/block_v): `o = qg S + P R`, in parallel over chunks.
Backward (five kernels), from the forward's residuals (no recomputation of the pairs or the inverse):
- `state_bwd`  the reverse pass: `dR = P^T dO + ks dS'`, `dS = exp(G_C) dS' + qg^T dO - Y^T dR`.
- `contract`   grid (B, HV, T/64): the contractions over V: `dqg, dks, dY, d exp(G_C), dP, dA (from U), dv, dw`.
- `wy_bwd`     grid (B, H, T/64): `dA += dY E^T`, `dT = -strict_lower(A^T dA A^T)`.
- `diag_bwd`   grid (B, H, T/16): cotangents of the in-sub-block pairs.
- `pairs_bwd`  grid (B, H, T/64): cotangents of the pairs between sub-blocks, of E, qg, ks, exp(G_C), and every
               input gradient, the log-decay's by reverse segment sums.

Packed sequences with per-sequence states (`layout` = per-chunk `seq, reset, last` int32 arrays, B = 1): the state
passes reset the state at a sequence's first chunk and record it at its last.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gdn2 import segments, tiles
from pallas_kernels.gdn2.config import CHUNK, ChunkConfig
from pallas_kernels.gdn2.tiles import F32, NSUB, SUB

C = CHUNK


def _call(kernel, *, grid, in_specs, out_specs, out_shape, cfg, interpret, name):
  """`pl.pallas_call` named `gdn2_<name>`, launched with kernel `name`'s warps and pipelining depth."""
  t = cfg.tiling(name)
  params = plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        compiler_params=params, interpret=interpret, name="gdn2_" + name)


def _f32(shape):
  return jax.ShapeDtypeStruct(shape, F32)


def _arr(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def _tot_spec(K):
  """The four sub-block totals `[4, K]` of a chunk, from `tot [B, T / 16, H, K]`."""
  return pl.BlockSpec((None, NSUB, None, K), lambda b, h, c, *_: (b, c, h, 0))


# Block specs. `qk_*`: the `[B, T, H, D]` inputs; `hm_*`: head-major `[B, H, T, D]` kernel intermediates.

def _qk_rows(rows, K, groups=1):
  """Rows of the `[B, T, H, K]` inputs, grid (b, h, chunk-or-sub-block, ...); value head h reads qk head h // groups."""
  return pl.BlockSpec((None, rows, None, K), lambda b, h, c, *_: (b, c, h // groups, 0))


def _hm_rows(rows, D, groups=1):
  return pl.BlockSpec((None, None, rows, D), lambda b, h, c, *_: (b, h // groups, c, 0))


def _per_chunk_vec(K, groups=1):
  return pl.BlockSpec((None, None, None, K), lambda b, h, c, *_: (b, h // groups, c, 0))


# ------------------------------------------------------------------------------------------------------ forward

def _diag_fwd_kernel(q_ref, k_ref, g_ref, b_ref, tc_ref, pc_ref, loc_ref, rev_ref, tot_ref, *, BK, unroll, terms,
                     precision):
  K = q_ref.shape[-1]
  r, m = tiles.iota((SUB, SUB), 0), tiles.iota((SUB, SUB), 1)
  upto, after = tiles.mask(m <= r), tiles.mask(m > r)

  def body(kb, carry):
    Tc, Pc, qk = carry
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    t, p = tiles.diag_pairs(q_ref, k_ref, g_ref, b_ref, cols, with_q=True, unroll=unroll)
    qk = qk + jnp.sum(q_ref[:, cols].astype(F32) * k_ref[:, cols].astype(F32), axis=1, keepdims=True)
    # The sub-block's segment sums of g for the chunk-level kernels: exact 0/1 products (`tiles.masked_sum`).
    g = g_ref[:, cols].astype(F32)
    loc_ref[:, cols] = tiles.masked_sum(upto, g, terms, precision)
    rev_ref[:, cols] = tiles.masked_sum(after, g, terms, precision)
    tot_ref[cols] = jnp.sum(g, axis=0)
    return Tc + t, Pc + p, qk

  zero = jnp.zeros((SUB, SUB), F32)
  Tc, Pc, qk = lax.fori_loop(0, K // BK, body, (zero, zero, jnp.zeros((SUB, 1), F32)))
  tc_ref[...] = Tc
  pc_ref[...] = jnp.where(r == m, qk, Pc)


def diag_fwd(q, k, g, b, *, cfg: ChunkConfig, interpret: bool):
  """-> `Tc, Pc [B, H, T, 16]` (f32): the diagonal sub-blocks of the pair products T (strict) and P (unscaled,
  diagonal `q_i . k_i` included), row i and column `i // 16 * 16 + jl` at `[..., i, jl]`; and the segment sums of
  g per sub-block, `segments.SubBlockSums` (`loc, rev [B, T, H, K]`, `tot [B, T / 16, H, K]`, f32)."""
  B, T, H, K = q.shape
  spec = _qk_rows(SUB, K)
  out = _hm_rows(SUB, SUB)
  kern = functools.partial(_diag_fwd_kernel, BK=cfg.key_tile("diag_fwd", K), unroll=cfg.tiling("diag_fwd").unroll,
                           terms=cfg.gate_sum_terms, precision=cfg.dot_precision())
  tc, pc, loc, rev, tot = _call(
      kern, grid=(B, H, T // SUB), in_specs=[spec] * 4,
      out_specs=[out, out, spec, spec, pl.BlockSpec((None, None, None, K), lambda b, h, s: (b, s, h, 0))],
      out_shape=[_f32((B, H, T, SUB))] * 2 + [_f32((B, T, H, K))] * 2 + [_f32((B, T // SUB, H, K))], cfg=cfg,
      interpret=interpret, name="diag_fwd")(q, k, g, b)
  return tc, pc, segments.SubBlockSums(loc, rev, tot)


def _chunk_fwd_kernel(q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, v_ref, w_ref, tc_ref, pc_ref,
                      p_ref, a_ref, y_ref, qg_ref, ks_ref, dec_ref, u_ref, *, scale, BK, BV, terms, precision,
                      precision3):
  K = q_ref.shape[-1]
  groups, V = v_ref.shape[1], v_ref.shape[2]
  blk = tiles.row_block()
  kt = lambda ref, cols: ref[:, cols].astype(F32)

  def pairs(kb, acc):  # the pairs between sub-blocks: rows of sub-block I against columns of the ones before it
    Tm, Pm = acc
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    k = kt(k_ref, cols)
    gates = tiles.DenseGates.load(loc_ref, rev_ref, tot_ref, cols)
    e = jnp.exp(gates.loc)
    lb, lq = kt(b_ref, cols) * k * e, kt(q_ref, cols) * e
    kr = k * jnp.exp(gates.rev)
    for I in range(1, NSUB):
      right = gates.right(kr, I)
      rows = blk == I
      Tm = Tm + jnp.where(rows, tiles.dot_nt(lb, right, precision), 0.0)
      Pm = Pm + jnp.where(rows, tiles.dot_nt(lq, right, precision), 0.0)
    return Tm, Pm

  zero = jnp.zeros((C, C), F32)
  Tm, Pm = lax.fori_loop(0, K // BK, pairs, (zero, zero))
  p_ref[...] = (scale * (Pm + tiles.expand_compact(pc_ref[...], terms, precision))).astype(p_ref.dtype)
  A = tiles.wy_inverse(Tm, tc_ref, terms, precision, precision3)
  a_ref[...] = A

  def wy(kb, carry):
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    k = kt(k_ref, cols)
    gates = tiles.DenseGates.load(loc_ref, rev_ref, tot_ref, cols)
    gamma = jnp.exp(gates.G())
    y_ref[:, cols] = tiles.dot(A, gamma * kt(b_ref, cols) * k, precision).astype(y_ref.dtype)
    qg_ref[:, cols] = (scale * gamma * kt(q_ref, cols)).astype(qg_ref.dtype)
    ks_ref[:, cols] = (k * jnp.exp(gates.to_end())).astype(ks_ref.dtype)
    dec_ref[cols] = jnp.exp(gates.total())[0]
    return carry

  lax.fori_loop(0, K // BK, wy, 0)

  for gi in range(groups):
    def wu(vb, carry, gi=gi):
      vcols = pl.ds(pl.multiple_of(vb * BV, BV), BV)
      Z = v_ref[:, gi, vcols].astype(F32) * w_ref[:, gi, vcols].astype(F32)
      u_ref[gi, :, vcols] = tiles.dot(A, Z, precision).astype(u_ref.dtype)
      return carry

    lax.fori_loop(0, V // BV, wu, 0)


def _blk(I: int):
  """The rows of sub-block I of a chunk."""
  return pl.ds(I * SUB, SUB)


def _chunk_fwd_blocked_kernel(q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, v_ref, w_ref, tc_ref, pc_ref,
                              p_ref, a_ref, y_ref, qg_ref, ks_ref, dec_ref, u_ref, *, scale, BK, BV, precision,
                              precision3):
  """`chunk_fwd` on `[16, BK]` and `[16, 16]` tiles, one per pair of sub-blocks (`_chunk_fwd_kernel` holds dense
  `[64, 64]` matrices and masks them; this one computes only the blocks that are not zero)."""
  K = q_ref.shape[-1]
  groups, V = v_ref.shape[1], v_ref.shape[2]
  pairs_ij = [(I, J) for I in range(1, NSUB) for J in range(I)]
  rt = lambda ref, I, cols: ref[_blk(I), cols].astype(F32)

  def totals(cols):
    return [tot_ref[pl.ds(L, 1), cols].astype(F32) for L in range(NSUB)]

  def pairs(kb, acc):  # rows of sub-block I against the columns of sub-block J < I, per key tile
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    tot = totals(cols)
    kr = [rt(k_ref, J, cols) * jnp.exp(rt(rev_ref, J, cols)) for J in range(NSUB - 1)]
    out = list(acc)
    for I in range(1, NSUB):
      e = jnp.exp(rt(loc_ref, I, cols))
      lb, lq = rt(b_ref, I, cols) * rt(k_ref, I, cols) * e, rt(q_ref, I, cols) * e
      for J in range(I):
        between = sum((tot[L] for L in range(J + 1, I)), jnp.zeros_like(tot[0]))  # sub-blocks strictly between
        right = kr[J] if J + 1 == I else kr[J] * jnp.exp(between)
        n = pairs_ij.index((I, J))
        out[2 * n] = out[2 * n] + tiles.dot_nt(lb, right, precision)
        out[2 * n + 1] = out[2 * n + 1] + tiles.dot_nt(lq, right, precision)
    return tuple(out)

  zero = jnp.zeros((SUB, SUB), F32)
  acc = lax.fori_loop(0, K // BK, pairs, (zero,) * (2 * len(pairs_ij)))
  Tb = {ij: acc[2 * n] for n, ij in enumerate(pairs_ij)}
  Pb = {ij: acc[2 * n + 1] for n, ij in enumerate(pairs_ij)}

  # The inverses of the diagonal blocks, (I + T_II)^-1, by forward substitution (`tiles.block_inverse_t`).
  Ainv = [x.T for x in tiles.block_inverse_t(tc_ref)]
  # Block forward substitution: A_IJ = -A_II sum_{J <= L < I} T_IL A_LJ, in 3xTF32 as the dense form's products.
  A = {(I, I): Ainv[I] for I in range(NSUB)}
  for I in range(1, NSUB):
    for J in range(I - 1, -1, -1):
      inner = sum((tiles.dot3(Tb[(I, L)], A[(L, J)], precision3) for L in range(J + 1, I)),
                  tiles.dot3(Tb[(I, J)], A[(J, J)], precision3))
      A[(I, J)] = -tiles.dot3(Ainv[I], inner, precision3)
  for I in range(NSUB):
    for J in range(NSUB):
      blk = A[(I, J)] if J <= I else zero
      a_ref[_blk(I), _blk(J)] = blk
      if J == I:
        pblk = pc_ref[_blk(I), :].astype(F32)
      else:
        pblk = Pb[(I, J)] if J < I else zero
      p_ref[_blk(I), _blk(J)] = (scale * pblk).astype(p_ref.dtype)

  def wy(kb, carry):
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    tot = totals(cols)
    E = []
    for I in range(NSUB):
      before = sum((tot[L] for L in range(I)), jnp.zeros_like(tot[0]))
      after = sum((tot[L] for L in range(I + 1, NSUB)), jnp.zeros_like(tot[0]))
      k = rt(k_ref, I, cols)
      gamma = jnp.exp(rt(loc_ref, I, cols) + before)
      E.append(gamma * rt(b_ref, I, cols) * k)
      qg_ref[_blk(I), cols] = (scale * gamma * rt(q_ref, I, cols)).astype(qg_ref.dtype)
      ks_ref[_blk(I), cols] = (k * jnp.exp(rt(rev_ref, I, cols) + after)).astype(ks_ref.dtype)
      y = tiles.dot(A[(I, 0)], E[0], precision)
      for J in range(1, I + 1):
        y = y + tiles.dot(A[(I, J)], E[J], precision)
      y_ref[_blk(I), cols] = y.astype(y_ref.dtype)
    dec_ref[cols] = jnp.exp(tot[0] + tot[1] + tot[2] + tot[3])[0]
    return carry

  lax.fori_loop(0, K // BK, wy, 0)

  for gi in range(groups):
    def wu(vb, carry, gi=gi):
      vcols = pl.ds(pl.multiple_of(vb * BV, BV), BV)
      Z = [v_ref[_blk(J), gi, vcols].astype(F32) * w_ref[_blk(J), gi, vcols].astype(F32) for J in range(NSUB)]
      for I in range(NSUB):
        u = tiles.dot(A[(I, 0)], Z[0], precision)
        for J in range(1, I + 1):
          u = u + tiles.dot(A[(I, J)], Z[J], precision)
        u_ref[gi, _blk(I), vcols] = u.astype(u_ref.dtype)
      return carry

    lax.fori_loop(0, V // BV, wu, 0)


def chunk_fwd(q, k, sums, b, v, w, tc, pc, *, scale: float, rdt, cfg: ChunkConfig, interpret: bool):
  """-> `P [B, H, T, 64]` (rdt), `A [B, H, T, 64]` (f32), `Y [B, H, T, K]` (wdt), `qg [B, H, T, K]` (rdt),
  `ks [B, H, T, K]` (wdt), `dec [B, H, NC, K]` (f32), `U [B, HV, T, V]` (wdt). `sums`: `segments.SubBlockSums` of g.

  What feeds the pass over chunks (`Y`, `U`, `ks`) is stored in `wdt = cfg.wy_residual_dtype(v.dtype)` (float32
  unless `ChunkConfig.wy_residuals` says otherwise). What only feeds the output and the backward's products (`P`,
  `qg`) is stored in `rdt`.

  `P` is scaled and block lower triangular (zeros above the diagonal); `A = (I + T)^-1` likewise.
  """
  B, T, H, K = q.shape
  HV, V = v.shape[2:]
  groups = HV // H
  NC = T // C
  wdt = cfg.wy_residual_dtype(v.dtype)
  qk = _qk_rows(C, K)
  vw = pl.BlockSpec((None, C, groups, V), lambda b, h, c: (b, c, h, 0))
  kw = dict(scale=scale, BK=cfg.key_tile("chunk_fwd", K), BV=min(cfg.block_v, V), precision=cfg.dot_precision(),
            precision3=cfg.dot3_precision(interpret))
  kern = (functools.partial(_chunk_fwd_blocked_kernel, **kw) if cfg.blocked_chunk_fwd
          else functools.partial(_chunk_fwd_kernel, terms=cfg.gate_sum_terms, **kw))
  return _call(
      kern, grid=(B, H, NC),
      in_specs=[qk, qk, qk, qk, _tot_spec(K), qk, vw, vw, _hm_rows(C, SUB), _hm_rows(C, SUB)],
      out_specs=[_hm_rows(C, C), _hm_rows(C, C), _hm_rows(C, K), _hm_rows(C, K), _hm_rows(C, K), _per_chunk_vec(K),
                 pl.BlockSpec((None, groups, C, V), lambda b, h, c: (b, h, c, 0))],
      out_shape=[_arr((B, H, T, C), rdt), _f32((B, H, T, C)), _arr((B, H, T, K), wdt), _arr((B, H, T, K), rdt),
                 _arr((B, H, T, K), wdt), _f32((B, H, NC, K)), _arr((B, HV, T, V), wdt)],
      cfg=cfg, interpret=interpret, name="chunk_fwd")(
          q, k, sums.loc, sums.rev, sums.tot, b, v, w, tc, pc)


def _state_fwd_kernel(*refs, NC, varlen, precision):
  """One segment of the pass over chunks (`NC` chunks; the whole sequence unless `state_fwd` splits it)."""
  if varlen:
    seq_ref, reset_ref, last_ref, u_ref, y_ref, ks_ref, dec_ref, h0_ref, sin_ref, r_ref, final_ref, states_ref = refs
  else:
    u_ref, y_ref, ks_ref, dec_ref, sin_ref, r_ref, final_ref, states_ref = refs
  n_last = h0_ref.shape[0] - 1 if varlen else 0

  def body(c, S):
    if varlen:
      seq = jnp.minimum(seq_ref[c], n_last)  # unused trailing chunks (seq = N) hold zeros: any state will do
      S = jnp.where(reset_ref[c] != 0, h0_ref[seq], S)
    rows = pl.ds(pl.multiple_of(c * C, C), C)
    states_ref[c] = S.astype(states_ref.dtype)
    # The carried state and R stay float32 in these products (TF32): rounding them to the residual dtype every
    # chunk would compound along the sequence; only what is stored for later kernels is rounded.
    R = u_ref[rows, :].astype(F32) - tiles.dot(y_ref[rows, :].astype(F32), S, precision)
    r_ref[rows, :] = R.astype(r_ref.dtype)
    S = dec_ref[c, :][:, None] * S + tiles.dot_tn(ks_ref[rows, :].astype(F32), R, precision)
    if varlen:
      @pl.when(last_ref[c] != 0)
      def _():
        final_ref[seq] = S
    return S

  S = lax.fori_loop(0, NC, body, sin_ref[...])
  if not varlen:
    final_ref[...] = S


def _state_map_kernel(*refs, NC, nvb, varlen, precision):
  """The affine map `S -> M S + c` of one segment of chunks, on the columns `[c | M]` (`[K, V + K]`): the pass over
  chunks from the state `[0 | I]`, with U = 0 on the M columns (M is the pass's linear part). A sequence that starts
  inside the segment resets the columns to `[h0 | 0]`. Program column block j < nvb is c's, the rest M's."""
  if varlen:
    seq_ref, reset_ref, u_ref, y_ref, ks_ref, dec_ref, h0_ref, map_ref = refs
  else:
    u_ref, y_ref, ks_ref, dec_ref, map_ref = refs
  K, bv = map_ref.shape
  # 1.0 on M's columns, else 0.0 (integer arithmetic: the lowering has no scalar select)
  m_cols = jnp.clip(pl.program_id(2) - nvb + 1, 0, 1).astype(F32)
  u_scale = 1.0 - m_cols
  n_last = h0_ref.shape[0] - 1 if varlen else 0

  def body(c, S):
    if varlen:
      seq = jnp.minimum(seq_ref[c], n_last)
      S = jnp.where(reset_ref[c] != 0, u_scale * h0_ref[seq], S)
    rows = pl.ds(pl.multiple_of(c * C, C), C)
    R = u_scale * u_ref[rows, :].astype(F32) - tiles.dot(y_ref[rows, :].astype(F32), S, precision)
    return dec_ref[c, :][:, None] * S + tiles.dot_tn(ks_ref[rows, :].astype(F32), R, precision)

  col = tiles.iota((K, bv), 1) + (pl.program_id(2) - nvb) * bv
  S0 = m_cols * tiles.mask(tiles.iota((K, bv), 0) == col)
  map_ref[...] = lax.fori_loop(0, NC, body, S0)


def state_fwd(u, y, ks, dec, h0, layout, *, rdt, cfg: ChunkConfig, interpret: bool):
  """Pass over chunks. -> `R [B, HV, T, V]`, `final [N, HV, K, V]` (f32), `states [B, HV, NC, K, V]`: R and the
  entering states stored in `rdt` (the residual dtype), the carried state float32.

  With `ChunkConfig.state_segments` S > 1 (long sequences, few heads: too few programs to fill the GPU), the chunks
  are cut into S segments run in parallel twice: first each segment's affine map `S -> M S + c` (`segment_maps`),
  then, after a short scan over the segments for their entering states, the pass itself from those states.
  """
  B, HV, T, V = u.shape
  H, K = y.shape[1], y.shape[-1]
  NC = T // C
  N = h0.shape[0]
  bv = cfg.state_block_v(B, HV, V)
  varlen = layout is not None
  nseg = cfg.segments(B, HV, V, NC)
  L = NC // nseg
  groups = HV // H
  if nseg == 1:
    sin = h0[:, None] if not varlen else jnp.zeros((1, 1, HV, K, V), F32)
  else:
    maps = segment_maps(u, y, ks, dec, h0, layout, nseg=nseg, bv=min(bv, K), cfg=cfg, interpret=interpret)
    sin = _segment_scan(maps, jnp.zeros((B, HV, K, V), F32) if varlen else h0, V)
  seg_v = pl.BlockSpec((None, None, L * C, bv), lambda b, h, j, s: (b, h, s, j))
  seg_k = pl.BlockSpec((None, None, L * C, K), lambda b, h, j, s: (b, h // groups, s, 0))
  seg_dec = pl.BlockSpec((None, None, L, K), lambda b, h, j, s: (b, h // groups, s, 0))
  per_seg = pl.BlockSpec((None, None, None, K, bv), lambda b, h, j, s: (b, s, h, 0, j))
  states = pl.BlockSpec((None, None, L, K, bv), lambda b, h, j, s: (b, h, s, 0, j))
  in_specs = [seg_v, seg_k, seg_k, seg_dec]
  args = [u, y, ks, dec]
  if varlen:
    table = pl.BlockSpec((N, None, K, bv), lambda b, h, j, s: (0, h, 0, j))
    in_specs = [pl.BlockSpec((L,), lambda b, h, j, s: (s,))] * 3 + in_specs + [table]
    args = list(layout) + args + [h0]
    final_spec, final_shape = table, _f32((N, HV, K, V))
  else:
    final_spec, final_shape = per_seg, _f32((B, nseg, HV, K, V))
  r, final, st = _call(
      functools.partial(_state_fwd_kernel, NC=L, varlen=varlen, precision=cfg.dot_precision()),
      grid=(B, HV, V // bv, nseg), in_specs=in_specs + [per_seg],
      out_specs=[seg_v, final_spec, states],
      out_shape=[_arr((B, HV, T, V), rdt), final_shape, _arr((B, HV, NC, K, V), rdt)],
      cfg=cfg, interpret=interpret, name="state_fwd")(*args, sin)
  return r, (final if varlen else final[:, -1]), st


def segment_maps(u, y, ks, dec, h0, layout, *, nseg: int, bv: int, cfg: ChunkConfig, interpret: bool):
  """The affine map of each of `nseg` equal segments of chunks: `[B, nseg, HV, K, V + K]` (f32), columns `[c | M]`:
  a segment entered with state S leaves with `M S + c` (c: its exit state when entered with zeros; with `layout`,
  sequences starting inside it start from their `h0`). `bv` divides K and V."""
  B, HV, T, V = u.shape
  H, K = y.shape[1], y.shape[-1]
  NC = T // C
  L = NC // nseg
  nvb = V // bv
  groups = HV // H
  varlen = layout is not None
  in_specs = [pl.BlockSpec((None, None, L * C, bv), lambda b, h, j, s: (b, h, s, jnp.minimum(j, nvb - 1))),
              pl.BlockSpec((None, None, L * C, K), lambda b, h, j, s: (b, h // groups, s, 0)),
              pl.BlockSpec((None, None, L * C, K), lambda b, h, j, s: (b, h // groups, s, 0)),
              pl.BlockSpec((None, None, L, K), lambda b, h, j, s: (b, h // groups, s, 0))]
  args = [u, y, ks, dec]
  if varlen:
    in_specs = [pl.BlockSpec((L,), lambda b, h, j, s: (s,))] * 2 + in_specs + [
        pl.BlockSpec((h0.shape[0], None, K, bv), lambda b, h, j, s: (0, h, 0, jnp.minimum(j, nvb - 1)))]
    args = list(layout[:2]) + args + [h0]
  return _call(
      functools.partial(_state_map_kernel, NC=L, nvb=nvb, varlen=varlen, precision=cfg.dot_precision()),
      grid=(B, HV, nvb + K // bv, nseg), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, None, K, bv), lambda b, h, j, s: (b, s, h, 0, j)),
      out_shape=_f32((B, nseg, HV, K, V + K)), cfg=cfg, interpret=interpret, name="state_fwd")(*args)


def _segment_scan(maps, s0, V):
  """The state entering each segment, `[B, nseg, HV, K, V]`, from the maps `[B, nseg, HV, K, V + K]` and the state
  entering the first, `s0 [B, HV, K, V]`: a scan over segments in float32 (XLA; nseg is small)."""
  c, M = maps[..., :V], maps[..., V:]

  def step(S, cm):  # S enters segment s; M_s S + c_s enters segment s + 1
    c_s, M_s = cm
    nxt = jnp.einsum("bhkj,bhjv->bhkv", M_s, S, precision=lax.Precision.HIGHEST) + c_s
    return nxt, nxt

  _, after = lax.scan(step, s0, (jnp.moveaxis(c, 1, 0)[:-1], jnp.moveaxis(M, 1, 0)[:-1]))
  return jnp.concatenate([s0[:, None], jnp.moveaxis(after, 0, 1)], axis=1)


def _out_kernel(qg_ref, p_ref, s_ref, r_ref, o_ref, *, BK, precision):
  K = qg_ref.shape[-1]

  def body(kb, acc):
    ks = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    return acc + tiles.dot(qg_ref[:, ks], s_ref[ks, :], precision)

  acc = tiles.dot(p_ref[...], r_ref[...], precision)
  o_ref[...] = lax.fori_loop(0, K // BK, body, acc).astype(o_ref.dtype)


def out_fwd(qg, p, states, r, *, o_dtype, cfg: ChunkConfig, interpret: bool):
  """`o = qg S + P R` per chunk. -> `o [B, T, HV, V]` in `o_dtype`."""
  B, HV, T, V = r.shape
  H, K = qg.shape[1], qg.shape[-1]
  groups = HV // H
  NC = T // C
  bv = min(cfg.block_v, V)
  return _call(
      functools.partial(_out_kernel, BK=cfg.key_tile("out_fwd", K), precision=cfg.dot_precision()),
      grid=(B, HV, NC, V // bv),
      in_specs=[_hm_rows(C, K, groups), _hm_rows(C, C, groups),
                pl.BlockSpec((None, None, None, K, bv), lambda b, h, c, j: (b, h, c, 0, j)),
                pl.BlockSpec((None, None, C, bv), lambda b, h, c, j: (b, h, c, j))],
      out_specs=pl.BlockSpec((None, C, None, bv), lambda b, h, c, j: (b, c, h, j)),
      out_shape=jax.ShapeDtypeStruct((B, T, HV, V), o_dtype),
      cfg=cfg, interpret=interpret, name="out_fwd")(qg, p, states, r)


# ----------------------------------------------------------------------------------------------------- backward

def _state_bwd_kernel(*refs, NC, varlen, precision):
  """One segment of the reverse pass over chunks (`NC` chunks; the whole sequence unless `state_bwd` splits it)."""
  if varlen:
    (seq_ref, reset_ref, last_ref, y_ref, qg_ref, ks_ref, p_ref, dec_ref, do_ref, dfinal_ref, sin_ref,
     dr_ref, dsn_ref, dh0_ref) = refs
  else:
    y_ref, qg_ref, ks_ref, p_ref, dec_ref, do_ref, sin_ref, dr_ref, dsn_ref, dh0_ref = refs
  n_last = dfinal_ref.shape[0] - 1 if varlen else 0

  def body(t, dS):
    c = NC - 1 - t
    if varlen:
      seq = jnp.minimum(seq_ref[c], n_last)
      dS = jnp.where(last_ref[c] != 0, dfinal_ref[seq], dS)
    rows = pl.ds(pl.multiple_of(c * C, C), C)
    dsn_ref[c] = dS.astype(dsn_ref.dtype)
    dO = do_ref[rows, :]
    if p_ref.dtype == F32:
      dO = dO.astype(F32)
    dR = tiles.dot_tn(p_ref[rows, :], dO, precision) + tiles.dot(ks_ref[rows, :].astype(F32), dS, precision)
    dr_ref[rows, :] = dR.astype(dr_ref.dtype)
    dS = (dec_ref[c, :][:, None] * dS + tiles.dot_tn(qg_ref[rows, :], dO, precision)
          - tiles.dot_tn(y_ref[rows, :].astype(F32), dR, precision))
    if varlen:
      @pl.when((reset_ref[c] != 0) & (seq_ref[c] <= n_last))
      def _():
        dh0_ref[seq] = dS
    return dS

  dS = lax.fori_loop(0, NC, body, sin_ref[...])
  if not varlen:
    dh0_ref[...] = dS


def _state_bwd_map_kernel(*refs, NC, nvb, varlen, precision):
  """The reverse pass's affine map of one segment, `dS_end -> M dS_end + c` (dS_end: the cotangent of the state
  leaving the segment; the result: that of the state entering it), on the columns `[c | M]` from `[0 | I]`, dO = 0
  on the M columns. A sequence that ends inside the segment resets the columns to `[dfinal | 0]`."""
  if varlen:
    seq_ref, last_ref, y_ref, qg_ref, ks_ref, p_ref, dec_ref, do_ref, dfinal_ref, map_ref = refs
  else:
    y_ref, qg_ref, ks_ref, p_ref, dec_ref, do_ref, map_ref = refs
  K, bv = map_ref.shape
  m_cols = jnp.clip(pl.program_id(2) - nvb + 1, 0, 1).astype(F32)  # as in `_state_map_kernel`
  do_scale = 1.0 - m_cols
  n_last = dfinal_ref.shape[0] - 1 if varlen else 0

  def body(t, dS):
    c = NC - 1 - t
    if varlen:
      seq = jnp.minimum(seq_ref[c], n_last)
      dS = jnp.where(last_ref[c] != 0, do_scale * dfinal_ref[seq], dS)
    rows = pl.ds(pl.multiple_of(c * C, C), C)
    dO = do_ref[rows, :]
    if p_ref.dtype == F32:
      dO = dO.astype(F32)
    dR = (do_scale * tiles.dot_tn(p_ref[rows, :], dO, precision)
          + tiles.dot(ks_ref[rows, :].astype(F32), dS, precision))
    return (dec_ref[c, :][:, None] * dS + do_scale * tiles.dot_tn(qg_ref[rows, :], dO, precision)
            - tiles.dot_tn(y_ref[rows, :].astype(F32), dR, precision))

  col = tiles.iota((K, bv), 1) + (pl.program_id(2) - nvb) * bv
  S0 = m_cols * tiles.mask(tiles.iota((K, bv), 0) == col)
  map_ref[...] = lax.fori_loop(0, NC, body, S0)


def state_bwd(y, qg, ks, p, dec, do, dfinal, layout, *, cfg: ChunkConfig, interpret: bool):
  """Reverse pass. -> `dR [B, HV, T, V]`, `dS_next [B, HV, NC, K, V]` (both stored in P's dtype, the residual
  dtype; the carried cotangent stays float32), `dh0 [N, HV, K, V]` (f32).

  Split into `ChunkConfig.segments` parallel segments as `state_fwd`: each segment's reverse map, a scan over the
  segments from the last, then the pass from the cotangents entering each segment from its right."""
  B, H, T, K = y.shape
  HV, V = do.shape[2:]
  NC = T // C
  N = dfinal.shape[0]
  bv = cfg.state_block_v(B, HV, V)
  varlen = layout is not None
  nseg = cfg.segments(B, HV, V, NC)
  L = NC // nseg
  groups = HV // H
  seg_k = pl.BlockSpec((None, None, L * C, K), lambda b, h, j, s: (b, h // groups, s, 0))
  seg_p = pl.BlockSpec((None, None, L * C, C), lambda b, h, j, s: (b, h // groups, s, 0))
  seg_dec = pl.BlockSpec((None, None, L, K), lambda b, h, j, s: (b, h // groups, s, 0))
  per_seg = pl.BlockSpec((None, None, None, K, bv), lambda b, h, j, s: (b, s, h, 0, j))
  if nseg == 1:
    sin = dfinal[:, None] if not varlen else jnp.zeros((1, 1, HV, K, V), F32)
  else:
    mb = min(bv, K)
    nvb = V // mb
    clamp = lambda j: jnp.minimum(j, nvb - 1)
    in_specs = [seg_k, seg_k, seg_k, seg_p, seg_dec,
                pl.BlockSpec((None, L * C, None, mb), lambda b, h, j, s: (b, s, h, clamp(j)))]
    args = [y, qg, ks, p, dec, do]
    if varlen:
      in_specs = [pl.BlockSpec((L,), lambda b, h, j, s: (s,))] * 2 + in_specs + [
          pl.BlockSpec((N, None, K, mb), lambda b, h, j, s: (0, h, 0, clamp(j)))]
      args = [layout[0], layout[2]] + args + [dfinal]
    maps = _call(
        functools.partial(_state_bwd_map_kernel, NC=L, nvb=nvb, varlen=varlen, precision=cfg.dot_precision()),
        grid=(B, HV, nvb + K // mb, nseg), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, None, K, mb), lambda b, h, j, s: (b, s, h, 0, j)),
        out_shape=_f32((B, nseg, HV, K, V + K)), cfg=cfg, interpret=interpret, name="state_bwd")(*args)
    # The scan runs from the last segment: reverse the segment axis, scan, reverse back.
    sin = _segment_scan(maps[:, ::-1], jnp.zeros((B, HV, K, V), F32) if varlen else dfinal, V)[:, ::-1]
  in_specs = [seg_k, seg_k, seg_k, seg_p, seg_dec,
              pl.BlockSpec((None, L * C, None, bv), lambda b, h, j, s: (b, s, h, j))]
  args = [y, qg, ks, p, dec, do]
  if varlen:
    table = pl.BlockSpec((N, None, K, bv), lambda b, h, j, s: (0, h, 0, j))
    in_specs = [pl.BlockSpec((L,), lambda b, h, j, s: (s,))] * 3 + in_specs + [table]
    args = list(layout) + args + [dfinal]
    dh0_spec, dh0_shape = table, _f32((N, HV, K, V))
  else:
    dh0_spec, dh0_shape = per_seg, _f32((B, nseg, HV, K, V))
  dr, dsn, dh0 = _call(
      functools.partial(_state_bwd_kernel, NC=L, varlen=varlen, precision=cfg.dot_precision()),
      grid=(B, HV, V // bv, nseg), in_specs=in_specs + [per_seg],
      out_specs=[pl.BlockSpec((None, None, L * C, bv), lambda b, h, j, s: (b, h, s, j)),
                 pl.BlockSpec((None, None, L, K, bv), lambda b, h, j, s: (b, h, s, 0, j)), dh0_spec],
      out_shape=[_arr((B, HV, T, V), p.dtype), _arr((B, HV, NC, K, V), p.dtype), dh0_shape],
      cfg=cfg, interpret=interpret, name="state_bwd")(*args, sin)
  return dr, dsn, (dh0 if varlen else dh0[:, 0])


def _contract_kernel(s_ref, dsn_ref, do_ref, dr_ref, r_ref, a_ref, v_ref, w_ref,
                     dqg_ref, dks_ref, dy_ref, ddec_ref, dpf_ref, daz_ref, dv_ref, dw_ref, *, BK, BV, precision):
  K, V = s_ref.shape
  narrow = s_ref.dtype  # the residual dtype: the products of residuals run in it (float32 accumulation)
  vcols = lambda vb: pl.ds(pl.multiple_of(vb * BV, BV), BV)
  vt = lambda ref, vb: ref[:, vcols(vb)].astype(narrow)
  vt32 = lambda ref, vb: ref[:, vcols(vb)].astype(F32)

  def cc(vb, acc):  # the C x C contractions over V
    dPf, dAz = acc
    Z = (vt32(v_ref, vb) * vt32(w_ref, vb)).astype(narrow)
    return (dPf + tiles.dot_nt(vt(do_ref, vb), vt(r_ref, vb), precision),
            dAz + tiles.dot_nt(vt(dr_ref, vb), Z, precision))

  zero = jnp.zeros((C, C), F32)
  dPf, dAz = lax.fori_loop(0, V // BV, cc, (zero, zero))
  r, c = tiles.iota((C, C), 0), tiles.iota((C, C), 1)
  dpf_ref[...] = jnp.where(c <= r, dPf, 0.0)
  daz_ref[...] = dAz
  A = a_ref[...]

  def dz(vb, carry):  # U = A (w*v); A stays float32
    dZ = tiles.dot_tn(A, vt32(dr_ref, vb), precision)
    dv_ref[:, vcols(vb)] = vt32(w_ref, vb) * dZ
    dw_ref[:, vcols(vb)] = vt32(v_ref, vb) * dZ
    return carry

  lax.fori_loop(0, V // BV, dz, 0)

  def ck(kb, carry):  # the C x K contractions over V
    ks = pl.ds(pl.multiple_of(kb * BK, BK), BK)

    def inner(vb, acc):
      dqg, dks, dy, ddec = acc
      S, dSn = s_ref[ks, vcols(vb)], dsn_ref[ks, vcols(vb)]
      dO, R, dR = vt(do_ref, vb), vt(r_ref, vb), vt(dr_ref, vb)
      return (dqg + tiles.dot_nt(dO, S, precision), dks + tiles.dot_nt(R, dSn, precision),
              dy - tiles.dot_nt(dR, S, precision), ddec + jnp.sum(S.astype(F32) * dSn.astype(F32), axis=1))

    z = jnp.zeros((C, BK), F32)
    dqg, dks, dy, ddec = lax.fori_loop(0, V // BV, inner, (z, z, z, jnp.zeros((BK,), F32)))
    dqg_ref[:, ks] = dqg
    dks_ref[:, ks] = dks
    dy_ref[:, ks] = dy
    ddec_ref[ks] = ddec
    return carry

  lax.fori_loop(0, K // BK, ck, 0)


def contract(states, dsn, do, dr, r, a, v, w, *, cfg: ChunkConfig, interpret: bool):
  """Per value head and chunk. -> `dqg, dks, dY [B, HV, T, K]`, `ddec [B, HV, NC, K]`, `dPf, dAz [B, HV, T, 64]`,
  `dv, dw [B, T, HV, V]` (f32). `dPf` is the cotangent of the (scaled) P, lower triangular with the diagonal; `dAz`
  that of A through `U = A (w*v)`."""
  B, HV, NC, K, V = states.shape
  T = NC * C
  H = a.shape[1]
  groups = HV // H
  st = pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, c, 0, 0))
  vrow = pl.BlockSpec((None, C, None, V), lambda b, h, c: (b, c, h, 0))
  kern = functools.partial(_contract_kernel, BK=cfg.key_tile("contract", K), BV=min(cfg.block_v, V),
                           precision=cfg.dot_precision())
  return _call(
      kern, grid=(B, HV, NC),
      in_specs=[st, st, vrow, _hm_rows(C, V), _hm_rows(C, V), _hm_rows(C, C, groups), vrow, vrow],
      out_specs=[_hm_rows(C, K)] * 3 + [_per_chunk_vec(K), _hm_rows(C, C), _hm_rows(C, C), vrow, vrow],
      out_shape=[_f32((B, HV, T, K))] * 3 + [_f32((B, HV, NC, K))] + [_f32((B, HV, T, C))] * 2
      + [_f32((B, T, HV, V))] * 2,
      cfg=cfg, interpret=interpret,
      name="contract")(states, dsn, do, dr, r, a, v, w)


def _wy_bwd_kernel(k_ref, loc_ref, rev_ref, tot_ref, b_ref, a_ref, daz_ref, dy_ref, dt_ref, de_ref, *, BK,
                   precision):
  K = k_ref.shape[-1]
  r, c = tiles.iota((C, C), 0), tiles.iota((C, C), 1)
  A = a_ref[...]

  def body(kb, dA):  # Y = A E, E = exp(G) * b * k: dE = A^T dY and dA += dY E^T
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    gates = tiles.DenseGates.load(loc_ref, rev_ref, tot_ref, cols)
    E = jnp.exp(gates.G()) * b_ref[:, cols].astype(F32) * k_ref[:, cols].astype(F32)
    dY = dy_ref[:, cols]
    de_ref[:, cols] = tiles.dot_tn(A, dY, precision)
    return dA + tiles.dot_nt(dY, E, precision)

  dA = lax.fori_loop(0, K // BK, body, daz_ref[...])
  # A is lower triangular, so only the strictly lower part of dA reaches the strictly lower part of A^T dA A^T.
  dt_ref[...] = -jnp.where(c < r, tiles.dot_nt(tiles.dot_tn(A, dA, precision), A, precision), 0.0)


def wy_bwd(k, sums, b, a, daz, dy, *, cfg: ChunkConfig, interpret: bool):
  """-> `dT [B, H, T, 64]` (f32, strictly lower): the cotangent of T through `A = (I + T)^-1`; and
  `dE = A^T dY [B, H, T, K]` (f32), the cotangent of `E = exp(G) b k`."""
  B, T, H, K = k.shape
  NC = T // C
  qk = _qk_rows(C, K)
  kern = functools.partial(_wy_bwd_kernel, BK=cfg.key_tile("wy_bwd", K), precision=cfg.dot_precision())
  return _call(kern, grid=(B, H, NC), in_specs=[qk] * 3 + [_tot_spec(K), qk] + [_hm_rows(C, C)] * 2 + [_hm_rows(C, K)],
               out_specs=[_hm_rows(C, C), _hm_rows(C, K)], out_shape=[_f32((B, H, T, C)), _f32((B, H, T, K))],
               cfg=cfg, interpret=interpret, name="wy_bwd")(
                   k, sums.loc, sums.rev, sums.tot, b, a, daz, dy)


def _diag_bwd_kernel(q_ref, k_ref, g_ref, b_ref, dt_ref, dpf_ref, dbk_ref, dq_ref, dk_ref, *, scale, BK, unroll):
  K = q_ref.shape[-1]
  col0 = pl.multiple_of((pl.program_id(2) % NSUB) * SUB, SUB)  # the sub-block's own columns in its chunk
  strict = tiles.iota((SUB, SUB), 1) < tiles.iota((SUB, SUB), 0)
  dTc = dt_ref[:, pl.ds(col0, SUB)]
  dPc = scale * jnp.where(strict, dpf_ref[:, pl.ds(col0, SUB)], 0.0)

  def body(kb, carry):
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    dbk, dq, dk = tiles.diag_pairs_bwd(q_ref, k_ref, g_ref, b_ref, cols, dTc, dPc, unroll=unroll)
    dbk_ref[:, cols] = dbk
    dq_ref[:, cols] = dq
    dk_ref[:, cols] = dk
    return carry

  lax.fori_loop(0, K // BK, body, 0)


def diag_bwd(q, k, g, b, dt, dpf, *, scale: float, cfg: ChunkConfig, interpret: bool):
  """-> the in-sub-block pairs' parts of `d(b*k), dq, dk` `[B, H, T, K]` (f32)."""
  B, T, H, K = q.shape
  spec = _qk_rows(SUB, K)
  out = _hm_rows(SUB, K)
  kern = functools.partial(_diag_bwd_kernel, scale=scale, BK=cfg.key_tile("diag_bwd", K),
                           unroll=cfg.tiling("diag_bwd").unroll)
  return _call(kern, grid=(B, H, T // SUB), in_specs=[spec] * 4 + [_hm_rows(SUB, C)] * 2, out_specs=[out] * 3,
               out_shape=[_f32((B, H, T, K))] * 3, cfg=cfg, interpret=interpret, name="diag_bwd")(
                   q, k, g, b, dt, dpf)


def _pairs_bwd_kernel(q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, dt_ref, dpf_ref, de_ref, dqg_ref, dks_ref,
                      ddec_ref, dbkd_ref, dqd_ref, dkd_ref, dq_ref, dk_ref, db_ref, dg_ref, *, scale, BK, terms,
                      precision):
  K = q_ref.shape[-1]
  r, c = tiles.iota((C, C), 0), tiles.iota((C, C), 1)
  blk = tiles.row_block()
  off = (r // SUB) > (c // SUB)  # pairs between sub-blocks (the ones inside are diag_bwd's)
  dT = jnp.where(off, dt_ref[...], 0.0)
  dPf = dpf_ref[...]
  dPs = scale * jnp.where(off, dPf, 0.0)
  dPd = scale * jnp.sum(jnp.where(c == r, dPf, 0.0), axis=1, keepdims=True)  # P's diagonal q_i . k_i (no decay)
  kt = lambda ref, cols: ref[:, cols].astype(F32)

  def body(kb, carry):
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    q, k, b = kt(q_ref, cols), kt(k_ref, cols), kt(b_ref, cols)
    gates = tiles.DenseGates.load(loc_ref, rev_ref, tot_ref, cols)
    bk = b * k
    eloc, erev = jnp.exp(gates.loc), jnp.exp(gates.rev)
    lb, lq, kr = bk * eloc, q * eloc, k * erev
    # Pairs between sub-blocks: rows of I against right factors of the blocks before it (`DenseGates.right`).
    zero = jnp.zeros(q.shape, F32)
    dlb, dlq, dkr = zero, zero, zero
    for I in range(1, NSUB):
      eb = gates.between(I)
      right = jnp.where(blk < I, kr * eb, 0.0)
      rows = blk == I
      dlb = dlb + jnp.where(rows, tiles.dot(dT, right, precision), 0.0)
      dlq = dlq + jnp.where(rows, tiles.dot(dPs, right, precision), 0.0)
      # Row masks go on the per-tile operands, never on dT / dPs (masked copies of loop invariants cost memory).
      dr = (tiles.dot_tn(dT, jnp.where(rows, lb, 0.0), precision)
            + tiles.dot_tn(dPs, jnp.where(rows, lq, 0.0), precision))
      dkr = dkr + jnp.where(blk < I, dr * eb, 0.0)
    dE = kt(de_ref, cols)  # Y = A E (wy_bwd)
    gamma, etoend = jnp.exp(gates.G()), jnp.exp(gates.to_end())
    dqg, dks = kt(dqg_ref, cols), kt(dks_ref, cols)
    dbkd, dqd, dkd = kt(dbkd_ref, cols), kt(dqd_ref, cols), kt(dkd_ref, cols)
    dbk = eloc * dlb + dbkd + gamma * dE
    ks = k * etoend
    dq_ref[:, cols] = eloc * dlq + dqd + scale * gamma * dqg + dPd * k
    dk_ref[:, cols] = erev * dkr + dkd + etoend * dks + dPd * q + b * dbk
    db_ref[:, cols] = k * dbk
    # d/dG_i of every factor: + for exp(G_i) and the pair rows, - for the pair columns and exp(G_C - G_i); then
    # dg_m = sum_{i >= m} dG_i + dG_C (G_i sums g up to i; G_C the whole chunk).
    dG = (lb * dlb + lq * dlq - kr * dkr + bk * dbkd + q * dqd - k * dkd
          + gamma * (bk * dE + scale * q * dqg) - ks * dks)
    dGC = jnp.sum(ks * dks, axis=0, keepdims=True) + jnp.exp(gates.total()) * ddec_ref[cols][None, :]
    # Reverse sum over the chunk, from a forward scan: sum_{i >= m} dG_i = total - sum_{i <= m} dG_i + dG_m (a
    # gradient: its rounding is relative to the chunk's total, as any float32 sum of it would be).
    dg_ref[:, cols] = jnp.sum(dG, axis=0, keepdims=True) - jnp.cumsum(dG, axis=0) + dG + dGC
    return carry

  lax.fori_loop(0, K // BK, body, 0)


def pairs_bwd(q, k, sums, b, dt, dpf, de, dqg, dks, ddec, dbkd, dqd, dkd, *, scale: float, cfg: ChunkConfig,
              interpret: bool):
  """-> `dq, dk, db, dg [B, T, H, K]` (f32): the input gradients of the qk side, per qk head."""
  B, T, H, K = q.shape
  NC = T // C
  qk = _qk_rows(C, K)
  hk = _hm_rows(C, K)
  kern = functools.partial(_pairs_bwd_kernel, scale=scale, BK=cfg.key_tile("pairs_bwd", K), terms=cfg.gate_sum_terms,
                           precision=cfg.dot_precision())
  return _call(kern, grid=(B, H, NC),
               in_specs=[qk] * 4 + [_tot_spec(K), qk] + [_hm_rows(C, C)] * 2 + [hk, hk, hk, _per_chunk_vec(K), hk,
                                                                                  hk, hk],
               out_specs=[qk] * 4, out_shape=[_f32((B, T, H, K))] * 4, cfg=cfg,
               interpret=interpret, name="pairs_bwd")(q, k, sums.loc, sums.rev, sums.tot, b, dt, dpf, de, dqg,
                                                           dks, ddec, dbkd, dqd, dkd)
