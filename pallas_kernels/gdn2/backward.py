"""Pallas (Triton lowering) kernels of the chunkwise GDN-2 backward, from the forward's residuals (no recomputation
of the pairs or the inverse). Layout and head grouping as in `forward`.

Five kernels, each stage's cotangents a named tuple:
- `state_bwd`  the reverse pass over chunks: `dR = P^T dO + k_state dS'`, `dS = exp(G_C) dS' + qg^T dO - Y^T dR`
               -> `StateCotangents` (with S > 1 segments, each segment's reverse map first, as `state_fwd`).
- `contract`   grid (B, HV, T/64): the contractions over V -> `ContractCotangents` (`dqg, dk_state, dy, ddecay,
               dp_full, da_from_u, dv, dw`).
- `wy_bwd`     grid (B, H, T/64): `dA += dY E^T`, `dT = -strict_lower(A^T dA A^T)`, `dE = A^T dY` -> `WyCotangents`.
- `diag_bwd`   grid (B, H, T/16): cotangents of the in-sub-block pairs -> `SubBlockCotangents`.
- `pairs_bwd`  grid (B, H, T/64): cotangents of the pairs between sub-blocks, of E, qg, k_state, exp(G_C), and every
               qk-side input gradient, the log-decay's by reverse segment sums -> `QkGrads`.

Packed sequences (`common.Layout`, B = 1): the reverse pass starts a sequence's cotangent at its last chunk from
`dfinal` and records `dh0` at its first.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gdn2 import segments, tiles
from pallas_kernels.gdn2.common import (C, ChunkShape, Layout, arr, call, f32, hm_rows, map_columns, per_chunk_vec,
                                        qk_rows, segment_scan, tot_spec)
from pallas_kernels.gdn2.config import ChunkConfig
from pallas_kernels.gdn2.forward import ChunkTerms, StatePass
from pallas_kernels.gdn2.tiles import F32, NSUB, SUB


class StateCotangents(NamedTuple):
  """`state_bwd`'s outputs: `dr [B, HV, T, V]` (of `R`) and `dstate_next [B, HV, NC, K, V]` (of the state leaving
  each chunk), both in P's dtype (the residual dtype); `dh0 [N, HV, K, V]` (f32)."""
  dr: jax.Array
  dstate_next: jax.Array
  dh0: jax.Array


class ContractCotangents(NamedTuple):
  """`contract`'s outputs, per value head (f32): `dqg, dk_state, dy [B, HV, T, K]`, `ddecay [B, HV, NC, K]` (of
  `exp(G_C)`), `dp_full [B, HV, T, 64]` (of the scaled P, lower triangular with the diagonal), `da_from_u
  [B, HV, T, 64]` (of A through `U = A (w v)`), `dv, dw [B, T, HV, V]` (in the dtypes of v and w: the final
  gradients, rounded once where they are formed rather than by a conversion pass). The first six are summed over
  each qk head's value heads (`[B, H, ...]`) before `wy_bwd`."""
  dqg: jax.Array
  dk_state: jax.Array
  dy: jax.Array
  ddecay: jax.Array
  dp_full: jax.Array
  da_from_u: jax.Array
  dv: jax.Array
  dw: jax.Array


class WyCotangents(NamedTuple):
  """`wy_bwd`'s outputs (f32): `dt [B, H, T, 64]` (of T through `A = (I + T)^-1`, strictly lower) and
  `de [B, H, T, K]` (`A^T dY`, of `E = exp(G) b k`)."""
  dt: jax.Array
  de: jax.Array


class SubBlockCotangents(NamedTuple):
  """`diag_bwd`'s outputs `[B, H, T, K]` (f32): the in-sub-block pairs' parts of the cotangents of `b*k`, q and k
  (the decay factors not differentiated: `pairs_bwd` adds their gate gradient)."""
  dbk_diag: jax.Array
  dq_diag: jax.Array
  dk_diag: jax.Array


class QkGrads(NamedTuple):
  """`pairs_bwd`'s outputs `[B, T, H, K]`: the gradients of q, k, b (in their dtypes) and g (f32)."""
  dq: jax.Array
  dk: jax.Array
  db: jax.Array
  dg: jax.Array


def _state_bwd_kernel(*refs, NC, varlen, precision):
  """One segment of the reverse pass over chunks (`NC` chunks; the whole sequence unless `state_bwd` splits it)."""
  if varlen:
    (seq_ref, reset_ref, last_ref, y_ref, qg_ref, k_state_ref, p_ref, decay_ref, do_ref, dfinal_ref, sin_ref,
     dr_ref, dstate_next_ref, dh0_ref) = refs
  else:
    (y_ref, qg_ref, k_state_ref, p_ref, decay_ref, do_ref, sin_ref, dr_ref, dstate_next_ref,
     dh0_ref) = refs
  n_last = dfinal_ref.shape[0] - 1 if varlen else 0

  def body(step, dS):
    chunk = NC - 1 - step
    if varlen:
      seq = jnp.minimum(seq_ref[chunk], n_last)
      dS = jnp.where(last_ref[chunk] != 0, dfinal_ref[seq], dS)
    rows = pl.ds(pl.multiple_of(chunk * C, C), C)
    dstate_next_ref[chunk] = dS.astype(dstate_next_ref.dtype)
    dO = do_ref[rows, :]
    if p_ref.dtype == F32:
      dO = dO.astype(F32)
    dR = tiles.dot_tn(p_ref[rows, :], dO, precision) + tiles.dot(k_state_ref[rows, :].astype(F32), dS, precision)
    dr_ref[rows, :] = dR.astype(dr_ref.dtype)
    dS = (decay_ref[chunk, :][:, None] * dS + tiles.dot_tn(qg_ref[rows, :], dO, precision)
          - tiles.dot_tn(y_ref[rows, :].astype(F32), dR, precision))
    if varlen:
      @pl.when((reset_ref[chunk] != 0) & (seq_ref[chunk] <= n_last))
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
    seq_ref, last_ref, y_ref, qg_ref, k_state_ref, p_ref, decay_ref, do_ref, dfinal_ref, map_ref = refs
  else:
    y_ref, qg_ref, k_state_ref, p_ref, decay_ref, do_ref, map_ref = refs
  K, bv = map_ref.shape
  m_cols, S0 = map_columns(K, bv, nvb)
  do_scale = 1.0 - m_cols
  n_last = dfinal_ref.shape[0] - 1 if varlen else 0

  def body(step, dS):
    chunk = NC - 1 - step
    if varlen:
      seq = jnp.minimum(seq_ref[chunk], n_last)
      dS = jnp.where(last_ref[chunk] != 0, do_scale * dfinal_ref[seq], dS)
    rows = pl.ds(pl.multiple_of(chunk * C, C), C)
    dO = do_ref[rows, :]
    if p_ref.dtype == F32:
      dO = dO.astype(F32)
    dR = (do_scale * tiles.dot_tn(p_ref[rows, :], dO, precision)
          + tiles.dot(k_state_ref[rows, :].astype(F32), dS, precision))
    return (decay_ref[chunk, :][:, None] * dS + do_scale * tiles.dot_tn(qg_ref[rows, :], dO, precision)
            - tiles.dot_tn(y_ref[rows, :].astype(F32), dR, precision))

  map_ref[...] = lax.fori_loop(0, NC, body, S0)


def state_bwd(shape: ChunkShape, terms: ChunkTerms, do, dfinal, layout: Optional[Layout], *, cfg: ChunkConfig,
              interpret: bool) -> StateCotangents:
  """The reverse pass, from `terms`' `y, qg, k_state, p, decay`, `do [B, T, HV, V]` and `dfinal [N, HV, K, V]` (f32)
  -> `StateCotangents` (`dr`, `dstate_next` stored in P's dtype; the carried cotangent stays float32).

  Split into `ChunkConfig.segments` parallel segments as `state_fwd`: each segment's reverse map, a scan over the
  segments from the last, then the pass from the cotangents entering each segment from its right."""
  B, T, H, HV, K, V, groups, NC = shape
  y, qg, k_state, p, decay = terms.y, terms.qg, terms.k_state, terms.p, terms.decay
  N = dfinal.shape[0]
  bv = cfg.state_block_v(B, HV, V)
  varlen = layout is not None
  nseg = cfg.segments(B, HV, V, NC)
  L = NC // nseg
  seg_k = pl.BlockSpec((None, None, L * C, K), lambda b, h, j, s: (b, h // groups, s, 0))
  seg_p = pl.BlockSpec((None, None, L * C, C), lambda b, h, j, s: (b, h // groups, s, 0))
  seg_decay = pl.BlockSpec((None, None, L, K), lambda b, h, j, s: (b, h // groups, s, 0))
  per_seg = pl.BlockSpec((None, None, None, K, bv), lambda b, h, j, s: (b, s, h, 0, j))
  if nseg == 1:
    sin = dfinal[:, None] if not varlen else jnp.zeros((1, 1, HV, K, V), F32)
  else:
    mb = min(bv, K)
    nvb = V // mb
    clamp = lambda j: jnp.minimum(j, nvb - 1)
    in_specs = [seg_k, seg_k, seg_k, seg_p, seg_decay,
                pl.BlockSpec((None, L * C, None, mb), lambda b, h, j, s: (b, s, h, clamp(j)))]
    args = [y, qg, k_state, p, decay, do]
    if varlen:
      in_specs = [pl.BlockSpec((L,), lambda b, h, j, s: (s,))] * 2 + in_specs + [
          pl.BlockSpec((N, None, K, mb), lambda b, h, j, s: (0, h, 0, clamp(j)))]
      args = [layout.seq, layout.last] + args + [dfinal]
    maps = call(
        functools.partial(_state_bwd_map_kernel, NC=L, nvb=nvb, varlen=varlen, precision=cfg.dot_precision()),
        grid=(B, HV, nvb + K // mb, nseg), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, None, K, mb), lambda b, h, j, s: (b, s, h, 0, j)),
        out_shape=f32((B, nseg, HV, K, V + K)), cfg=cfg, interpret=interpret, name="state_bwd")(*args)
    # The scan runs from the last segment: reverse the segment axis, scan, reverse back.
    sin = segment_scan(maps[:, ::-1], jnp.zeros((B, HV, K, V), F32) if varlen else dfinal, V)[:, ::-1]
  in_specs = [seg_k, seg_k, seg_k, seg_p, seg_decay,
              pl.BlockSpec((None, L * C, None, bv), lambda b, h, j, s: (b, s, h, j))]
  args = [y, qg, k_state, p, decay, do]
  if varlen:
    table = pl.BlockSpec((N, None, K, bv), lambda b, h, j, s: (0, h, 0, j))
    in_specs = [pl.BlockSpec((L,), lambda b, h, j, s: (s,))] * 3 + in_specs + [table]
    args = list(layout) + args + [dfinal]
    dh0_spec, dh0_shape = table, f32((N, HV, K, V))
  else:
    dh0_spec, dh0_shape = per_seg, f32((B, nseg, HV, K, V))
  dr, dstate_next, dh0 = call(
      functools.partial(_state_bwd_kernel, NC=L, varlen=varlen, precision=cfg.dot_precision()),
      grid=(B, HV, V // bv, nseg), in_specs=in_specs + [per_seg],
      out_specs=[pl.BlockSpec((None, None, L * C, bv), lambda b, h, j, s: (b, h, s, j)),
                 pl.BlockSpec((None, None, L, K, bv), lambda b, h, j, s: (b, h, s, 0, j)), dh0_spec],
      out_shape=[arr((B, HV, T, V), p.dtype), arr((B, HV, NC, K, V), p.dtype), dh0_shape],
      cfg=cfg, interpret=interpret, name="state_bwd")(*args, sin)
  return StateCotangents(dr, dstate_next, dh0 if varlen else dh0[:, 0])


def _contract_kernel(s_ref, dstate_next_ref, do_ref, dr_ref, r_ref, a_ref, v_ref, w_ref,
                     dqg_ref, dk_state_ref, dy_ref, ddecay_ref, dp_full_ref, da_from_u_ref, dv_ref, dw_ref, *, BK, BV,
                     precision):
  K, V = s_ref.shape
  narrow = s_ref.dtype  # the residual dtype: the products of residuals run in it (float32 accumulation)
  vcols = lambda vb: pl.ds(pl.multiple_of(vb * BV, BV), BV)
  vt = lambda ref, vb: ref[:, vcols(vb)].astype(narrow)
  vt32 = lambda ref, vb: ref[:, vcols(vb)].astype(F32)

  def cc(vb, acc):  # the C x C contractions over V
    dP, dA = acc
    Z = (vt32(v_ref, vb) * vt32(w_ref, vb)).astype(narrow)
    return (dP + tiles.dot_nt(vt(do_ref, vb), vt(r_ref, vb), precision),
            dA + tiles.dot_nt(vt(dr_ref, vb), Z, precision))

  zero = jnp.zeros((C, C), F32)
  dP, dA = lax.fori_loop(0, V // BV, cc, (zero, zero))
  row_idx, col_idx = tiles.iota((C, C), 0), tiles.iota((C, C), 1)
  dp_full_ref[...] = jnp.where(col_idx <= row_idx, dP, 0.0)
  da_from_u_ref[...] = dA
  A = a_ref[...]

  def dz(vb, carry):  # U = A (w*v); A stays float32
    dZ = tiles.dot_tn(A, vt32(dr_ref, vb), precision)
    dv_ref[:, vcols(vb)] = (vt32(w_ref, vb) * dZ).astype(dv_ref.dtype)
    dw_ref[:, vcols(vb)] = (vt32(v_ref, vb) * dZ).astype(dw_ref.dtype)
    return carry

  lax.fori_loop(0, V // BV, dz, 0)

  def ck(kb, carry):  # the C x K contractions over V
    kcols = pl.ds(pl.multiple_of(kb * BK, BK), BK)

    def inner(vb, acc):
      dqg, dk_state, dy, ddecay = acc
      S, dS_next = s_ref[kcols, vcols(vb)], dstate_next_ref[kcols, vcols(vb)]
      dO, R, dR = vt(do_ref, vb), vt(r_ref, vb), vt(dr_ref, vb)
      return (dqg + tiles.dot_nt(dO, S, precision), dk_state + tiles.dot_nt(R, dS_next, precision),
              dy - tiles.dot_nt(dR, S, precision), ddecay + jnp.sum(S.astype(F32) * dS_next.astype(F32), axis=1))

    z = jnp.zeros((C, BK), F32)
    dqg, dk_state, dy, ddecay = lax.fori_loop(0, V // BV, inner, (z, z, z, jnp.zeros((BK,), F32)))
    dqg_ref[:, kcols] = dqg
    dk_state_ref[:, kcols] = dk_state
    dy_ref[:, kcols] = dy
    ddecay_ref[kcols] = ddecay
    return carry

  lax.fori_loop(0, K // BK, ck, 0)


def contract(shape: ChunkShape, terms: ChunkTerms, state: StatePass, state_ct: StateCotangents, do, v, w, *,
             cfg: ChunkConfig, interpret: bool) -> ContractCotangents:
  """Per value head and chunk, from `state`'s `states, r`, `state_ct`'s `dstate_next, dr`, `terms.a`, `do`, `v`, `w`
  -> `ContractCotangents`."""
  B, T, H, HV, K, V, groups, NC = shape
  st = pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, c, 0, 0))
  vrow = pl.BlockSpec((None, C, None, V), lambda b, h, c: (b, c, h, 0))
  kern = functools.partial(_contract_kernel, BK=cfg.key_tile("contract", K), BV=min(cfg.block_v, V),
                           precision=cfg.dot_precision())
  return ContractCotangents(*call(
      kern, grid=(B, HV, NC),
      in_specs=[st, st, vrow, hm_rows(C, V), hm_rows(C, V), hm_rows(C, C, groups), vrow, vrow],
      out_specs=[hm_rows(C, K)] * 3 + [per_chunk_vec(K), hm_rows(C, C), hm_rows(C, C), vrow, vrow],
      out_shape=[f32((B, HV, T, K))] * 3 + [f32((B, HV, NC, K))] + [f32((B, HV, T, C))] * 2
      + [arr((B, T, HV, V), v.dtype), arr((B, T, HV, V), w.dtype)],
      cfg=cfg, interpret=interpret,
      name="contract")(state.states, state_ct.dstate_next, do, state_ct.dr, state.r, terms.a, v, w))


def _wy_bwd_kernel(k_ref, loc_ref, rev_ref, tot_ref, b_ref, a_ref, da_from_u_ref, dy_ref, dt_ref, de_ref, *, BK,
                   precision):
  K = k_ref.shape[-1]
  row_idx, col_idx = tiles.iota((C, C), 0), tiles.iota((C, C), 1)
  A = a_ref[...]

  def body(kb, dA):  # Y = A E, E = exp(G) * b * k: dE = A^T dY and dA += dY E^T
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    gates = tiles.DenseGates.load(loc_ref, rev_ref, tot_ref, cols)
    E = jnp.exp(gates.G()) * b_ref[:, cols].astype(F32) * k_ref[:, cols].astype(F32)
    dY = dy_ref[:, cols]
    de_ref[:, cols] = tiles.dot_tn(A, dY, precision)
    return dA + tiles.dot_nt(dY, E, precision)

  dA = lax.fori_loop(0, K // BK, body, da_from_u_ref[...])
  # A is lower triangular, so only the strictly lower part of dA reaches the strictly lower part of A^T dA A^T.
  dt_ref[...] = -jnp.where(col_idx < row_idx, tiles.dot_nt(tiles.dot_tn(A, dA, precision), A, precision), 0.0)


def wy_bwd(shape: ChunkShape, k, sums: segments.SubBlockSums, b, terms: ChunkTerms, contract_ct: ContractCotangents,
           *, cfg: ChunkConfig, interpret: bool) -> WyCotangents:
  """`k, b [B, T, H, K]`, `terms.a` and the per-qk-head `contract_ct.da_from_u, dy` -> `WyCotangents`."""
  B, T, H, K, NC = shape.B, shape.T, shape.H, shape.K, shape.NC
  qk = qk_rows(C, K)
  kern = functools.partial(_wy_bwd_kernel, BK=cfg.key_tile("wy_bwd", K), precision=cfg.dot_precision())
  return WyCotangents(*call(
      kern, grid=(B, H, NC), in_specs=[qk] * 3 + [tot_spec(K), qk] + [hm_rows(C, C)] * 2 + [hm_rows(C, K)],
      out_specs=[hm_rows(C, C), hm_rows(C, K)], out_shape=[f32((B, H, T, C)), f32((B, H, T, K))],
      cfg=cfg, interpret=interpret, name="wy_bwd")(
          k, sums.loc, sums.rev, sums.tot, b, terms.a, contract_ct.da_from_u, contract_ct.dy))


def _diag_bwd_kernel(q_ref, k_ref, g_ref, b_ref, dt_ref, dp_full_ref, dbk_ref, dq_ref, dk_ref, *, scale, BK, unroll,
                     levels=False, terms=2, precision=None):
  K = q_ref.shape[-1]
  col0 = pl.multiple_of((pl.program_id(2) % NSUB) * SUB, SUB)  # the sub-block's own columns in its chunk
  strict = tiles.iota((SUB, SUB), 1) < tiles.iota((SUB, SUB), 0)
  dTc = dt_ref[:, pl.ds(col0, SUB)]
  dPc = scale * jnp.where(strict, dp_full_ref[:, pl.ds(col0, SUB)], 0.0)

  def body(kb, carry):
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    if levels:
      dbk, dq, dk = tiles.diag_pairs_levels_bwd(q_ref, k_ref, g_ref, b_ref, cols, dTc, dPc, terms=terms,
                                                precision=precision, unroll=unroll)
    else:
      dbk, dq, dk = tiles.diag_pairs_bwd(q_ref, k_ref, g_ref, b_ref, cols, dTc, dPc, unroll=unroll)
    dbk_ref[:, cols] = dbk
    dq_ref[:, cols] = dq
    dk_ref[:, cols] = dk
    return carry

  lax.fori_loop(0, K // BK, body, 0)


def diag_bwd(shape: ChunkShape, q, k, g, b, wy_ct: WyCotangents, dp_full, *, scale: float, cfg: ChunkConfig,
             interpret: bool) -> SubBlockCotangents:
  """`q, k, g, b [B, T, H, K]`, `wy_ct.dt` and `dp_full [B, H, T, 64]` -> `SubBlockCotangents`."""
  B, T, H, K = shape.B, shape.T, shape.H, shape.K
  spec = qk_rows(SUB, K)
  out = hm_rows(SUB, K)
  kern = functools.partial(_diag_bwd_kernel, scale=scale, BK=cfg.key_tile("diag_bwd", K),
                           unroll=cfg.tiling("diag_bwd").unroll, levels=cfg.diag_pairs == "levels",
                           terms=cfg.gate_sum_terms, precision=cfg.dot_precision())
  return SubBlockCotangents(*call(
      kern, grid=(B, H, T // SUB), in_specs=[spec] * 4 + [hm_rows(SUB, C)] * 2, out_specs=[out] * 3,
      out_shape=[f32((B, H, T, K))] * 3, cfg=cfg, interpret=interpret, name="diag_bwd")(
          q, k, g, b, wy_ct.dt, dp_full))


def _pairs_bwd_kernel(q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, dt_ref, dp_full_ref, de_ref, dqg_ref,
                      dk_state_ref, ddecay_ref, dbk_diag_ref, dq_diag_ref, dk_diag_ref, dq_ref, dk_ref, db_ref, dg_ref,
                      *, scale, BK, terms, precision):
  K = q_ref.shape[-1]
  row_idx, col_idx = tiles.iota((C, C), 0), tiles.iota((C, C), 1)
  blk = tiles.row_block()
  off = (row_idx // SUB) > (col_idx // SUB)  # pairs between sub-blocks (the ones inside are diag_bwd's)
  dT = jnp.where(off, dt_ref[...], 0.0)
  dP_full = dp_full_ref[...]
  dPs = scale * jnp.where(off, dP_full, 0.0)
  dPd = scale * jnp.sum(jnp.where(col_idx == row_idx, dP_full, 0.0), axis=1, keepdims=True)  # P's diagonal q_i . k_i
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
      dright = (tiles.dot_tn(dT, jnp.where(rows, lb, 0.0), precision)
                + tiles.dot_tn(dPs, jnp.where(rows, lq, 0.0), precision))
      dkr = dkr + jnp.where(blk < I, dright * eb, 0.0)
    dE = kt(de_ref, cols)  # Y = A E (wy_bwd)
    gamma, etoend = jnp.exp(gates.G()), jnp.exp(gates.to_end())
    dqg, dk_state = kt(dqg_ref, cols), kt(dk_state_ref, cols)
    dbk_diag, dq_diag, dk_diag = kt(dbk_diag_ref, cols), kt(dq_diag_ref, cols), kt(dk_diag_ref, cols)
    dbk = eloc * dlb + dbk_diag + gamma * dE
    k_state = k * etoend
    dq_ref[:, cols] = (eloc * dlq + dq_diag + scale * gamma * dqg + dPd * k).astype(dq_ref.dtype)
    dk_ref[:, cols] = (erev * dkr + dk_diag + etoend * dk_state + dPd * q + b * dbk).astype(dk_ref.dtype)
    db_ref[:, cols] = (k * dbk).astype(db_ref.dtype)
    # d/dG_i of every factor: + for exp(G_i) and the pair rows, - for the pair columns and exp(G_C - G_i); then
    # dg_m = sum_{i >= m} dG_i + dG_C (G_i sums g up to i; G_C the whole chunk).
    dG = (lb * dlb + lq * dlq - kr * dkr + bk * dbk_diag + q * dq_diag - k * dk_diag
          + gamma * (bk * dE + scale * q * dqg) - k_state * dk_state)
    dGC = jnp.sum(k_state * dk_state, axis=0, keepdims=True) + jnp.exp(gates.total()) * ddecay_ref[cols][None, :]
    # Reverse sum over the chunk, from a forward scan: sum_{i >= m} dG_i = total - sum_{i <= m} dG_i + dG_m (a
    # gradient: its rounding is relative to the chunk's total, as any float32 sum of it would be).
    dg_ref[:, cols] = jnp.sum(dG, axis=0, keepdims=True) - jnp.cumsum(dG, axis=0) + dG + dGC
    return carry

  lax.fori_loop(0, K // BK, body, 0)


def pairs_bwd(shape: ChunkShape, q, k, sums: segments.SubBlockSums, b, wy_ct: WyCotangents,
              contract_ct: ContractCotangents, diag_ct: SubBlockCotangents, *, scale: float, cfg: ChunkConfig,
              interpret: bool) -> QkGrads:
  """`q, k, b [B, T, H, K]`, the segment sums, `wy_ct`, the per-qk-head `contract_ct` (`dp_full, dqg, dk_state,
  ddecay`) and `diag_ct` -> `QkGrads`: the input gradients of the qk side, per qk head."""
  B, T, H, K, NC = shape.B, shape.T, shape.H, shape.K, shape.NC
  qk = qk_rows(C, K)
  hk = hm_rows(C, K)
  kern = functools.partial(_pairs_bwd_kernel, scale=scale, BK=cfg.key_tile("pairs_bwd", K), terms=cfg.gate_sum_terms,
                           precision=cfg.dot_precision())
  return QkGrads(*call(
      kern, grid=(B, H, NC),
      in_specs=[qk] * 4 + [tot_spec(K), qk] + [hm_rows(C, C)] * 2 + [hk, hk, hk, per_chunk_vec(K), hk, hk, hk],
      out_specs=[qk] * 4, out_shape=[arr((B, T, H, K), x.dtype) for x in (q, k, b)] + [f32((B, T, H, K))], cfg=cfg,
      interpret=interpret, name="pairs_bwd")(
          q, k, sums.loc, sums.rev, sums.tot, b, wy_ct.dt, contract_ct.dp_full, wy_ct.de, contract_ct.dqg,
          contract_ct.dk_state, contract_ct.ddecay, diag_ct.dbk_diag, diag_ct.dq_diag, diag_ct.dk_diag))
