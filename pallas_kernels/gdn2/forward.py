"""Pallas (Triton lowering) kernels of the chunkwise GDN-2 forward.

Layout (already padded by the caller): `q, k, g, b [B, T, H, K]`, `v, w [B, T, HV, V]`, T a multiple of 64, K and V
powers of two >= 16, HV a multiple of H. Everything that depends only on q, k, g, b (the pair products, the WY
inverse) is computed once per qk head; value heads read it through index maps (`h // groups`).

Four kernels, each stage's outputs a named tuple:
- `diag_fwd`   grid (B, H, T/16): the pair products inside each 16-token sub-block (a 15-step loop, one row of g
               at a time), compact `[16, 16]` per sub-block -> `SubBlockPairs`.
- `chunk_fwd`  grid (B, H, T/64): the pairs between sub-blocks (matrix products), `A = (I + T)^-1`
               (`tiles.wy_inverse`), `P`, `A`, `Y = A E`, `qg`, the decayed keys, `exp(G_C)` and `U = A (w*v)` for
               each value head of the group -> `ChunkTerms`. With `ChunkConfig.split_wy` it stops after A (stored),
               and `wy_fwd` (same grid) forms Y and U from the stored A.
- `state_fwd`  grid (B, HV, V/bv, S): the pass over chunks, state tile `[K, bv]` in registers (bv:
               `ChunkConfig.state_block_v`): `R = U - Y S` (written), `S' = exp(G_C) S + k_state^T R`; writes every
               chunk's entering state -> `StatePass`. With S > 1 segments, `segment_maps` first.
- `out_fwd`    grid (B, HV, T/64, V/block_v): `o = qg S + P R`, in parallel over chunks.

Packed sequences with per-sequence states (`common.Layout`, B = 1): the state pass resets the state at a sequence's
first chunk and records it at its last.
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
from pallas_kernels.gdn2.tiles import F32, NSUB, SUB


class SubBlockPairs(NamedTuple):
  """`diag_fwd`'s outputs. `t_diag, p_diag [B, H, T, 16]` (f32): the diagonal sub-blocks of the pair products T
  (strict) and P (unscaled, diagonal `q_i . k_i` included), row i and column `i // 16 * 16 + jl` at `[..., i, jl]`;
  `sums`: the segment sums of g per sub-block (`segments.SubBlockSums`)."""
  t_diag: jax.Array
  p_diag: jax.Array
  sums: segments.SubBlockSums


class ChunkTerms(NamedTuple):
  """`chunk_fwd`'s outputs, per qk head unless said: `p [B, H, T, 64]` (the scaled P, block lower triangular),
  `a [B, H, T, 64]` (`A = (I + T)^-1`, f32), `y [B, H, T, K]` (`Y = A (exp(G) b k)`), `qg [B, H, T, K]`
  (`scale exp(G) q`), `k_state [B, H, T, K]` (the decayed keys `k exp(G_C - G)` that write the state),
  `decay [B, H, NC, K]` (the chunk decay `exp(G_C)`, f32), `u [B, HV, T, V]` (`U = A (w v)`, per value head)."""
  p: jax.Array
  a: jax.Array
  y: jax.Array
  qg: jax.Array
  k_state: jax.Array
  decay: jax.Array
  u: Optional[jax.Array]


class StatePass(NamedTuple):
  """`state_fwd`'s outputs: `r [B, HV, T, V]` (`R = U - Y S`), `final [N, HV, K, V]` (f32), `states
  [B, HV, NC, K, V]` (the state entering every chunk)."""
  r: jax.Array
  final: jax.Array
  states: jax.Array


def _diag_fwd_kernel(q_ref, k_ref, g_ref, b_ref, tc_ref, pc_ref, loc_ref, rev_ref, tot_ref, *, BK, unroll, terms,
                     precision, levels=False):
  K = q_ref.shape[-1]
  row_idx, col_idx = tiles.iota((SUB, SUB), 0), tiles.iota((SUB, SUB), 1)
  upto, after = tiles.mask(col_idx <= row_idx), tiles.mask(col_idx > row_idx)

  def body(kb, carry):
    Tc, Pc, qk = carry
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    if levels:
      t, p = tiles.diag_pairs_levels(q_ref, k_ref, g_ref, b_ref, cols, terms=terms, precision=precision,
                                     unroll=unroll)
    else:
      t, p = tiles.diag_pairs(q_ref, k_ref, g_ref, b_ref, cols, with_q=True, unroll=unroll)
    qk = qk + jnp.sum(q_ref[:, cols].astype(F32) * k_ref[:, cols].astype(F32), axis=1, keepdims=True)
    # The sub-block's segment sums of g for the chunk-level kernels, as exact 0/1 products (`tiles.masked_sum`).
    g = g_ref[:, cols].astype(F32)
    loc_ref[:, cols] = tiles.masked_sum(upto, g, terms, precision)
    rev_ref[:, cols] = tiles.masked_sum(after, g, terms, precision)
    tot_ref[cols] = jnp.sum(g, axis=0)
    return Tc + t, Pc + p, qk

  zero = jnp.zeros((SUB, SUB), F32)
  Tc, Pc, qk = lax.fori_loop(0, K // BK, body, (zero, zero, jnp.zeros((SUB, 1), F32)))
  tc_ref[...] = Tc
  pc_ref[...] = jnp.where(row_idx == col_idx, qk, Pc)


def diag_fwd(shape: ChunkShape, q, k, g, b, *, cfg: ChunkConfig, interpret: bool) -> SubBlockPairs:
  """`q, k, g, b [B, T, H, K]` -> `SubBlockPairs` (the in-sub-block pairs and the segment sums of g)."""
  B, T, H, K = shape.B, shape.T, shape.H, shape.K
  spec = qk_rows(SUB, K)
  out = hm_rows(SUB, SUB)
  kern = functools.partial(_diag_fwd_kernel, BK=cfg.key_tile("diag_fwd", K), unroll=cfg.tiling("diag_fwd").unroll,
                           terms=cfg.gate_sum_terms, precision=cfg.dot_precision(),
                           levels=cfg.diag_pairs == "levels")
  tc, pc, loc, rev, tot = call(
      kern, grid=(B, H, T // SUB), in_specs=[spec] * 4,
      out_specs=[out, out, spec, spec, pl.BlockSpec((None, None, None, K), lambda b, h, s: (b, s, h, 0))],
      out_shape=[f32((B, H, T, SUB))] * 2 + [f32((B, T, H, K))] * 2 + [f32((B, T // SUB, H, K))], cfg=cfg,
      interpret=interpret, name="diag_fwd")(q, k, g, b)
  return SubBlockPairs(tc, pc, segments.SubBlockSums(loc, rev, tot))


def _kt(ref, cols):
  return ref[:, cols].astype(F32)


def _write_terms(q_ref, qg_ref, k_state_ref, decay_ref, cols, gates, k, gamma, scale):
  """qg, the decayed keys and the chunk decay of one key tile (`gates` with `rev` loaded)."""
  qg_ref[:, cols] = (scale * gamma * _kt(q_ref, cols)).astype(qg_ref.dtype)
  k_state_ref[:, cols] = (k * jnp.exp(gates.to_end())).astype(k_state_ref.dtype)
  decay_ref[cols] = jnp.exp(gates.total())[0]


def _pairs_and_inverse(q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, tc_ref, pc_ref, p_ref, *, scale, BK, terms,
                       precision, precision3, early_terms):
  """The pairs between sub-blocks (one key loop; with `early_terms` also qg, the decayed keys and the decay, written
  through `early_terms = (qg_ref, k_state_ref, decay_ref)`), P written; returns `A = (I + T)^-1 [64, 64]`."""
  K = q_ref.shape[-1]
  blk = tiles.row_block()

  def pairs(kb, acc):  # rows of sub-block I against columns of the ones before it
    Tm, Pm = acc
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    k = _kt(k_ref, cols)
    gates = tiles.DenseGates.load(loc_ref, rev_ref, tot_ref, cols)
    e = jnp.exp(gates.loc)
    lb, lq = _kt(b_ref, cols) * k * e, _kt(q_ref, cols) * e
    kr = k * jnp.exp(gates.rev)
    if early_terms:  # here, while the tile's `rev` is loaded, so the WY loop need not read it again
      _write_terms(q_ref, *early_terms, cols, gates, k, jnp.exp(gates.G()), scale)
    for I in range(1, NSUB):
      right = gates.right(kr, I)
      rows = blk == I
      Tm = Tm + jnp.where(rows, tiles.dot_nt(lb, right, precision), 0.0)
      Pm = Pm + jnp.where(rows, tiles.dot_nt(lq, right, precision), 0.0)
    return Tm, Pm

  zero = jnp.zeros((C, C), F32)
  Tm, Pm = lax.fori_loop(0, K // BK, pairs, (zero, zero))
  p_ref[...] = (scale * (Pm + tiles.expand_compact(pc_ref[...], terms, precision))).astype(p_ref.dtype)
  return tiles.wy_inverse(Tm, tc_ref, terms, precision, precision3)


def _wy_products(A, q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, v_ref, w_ref, y_ref, qg_ref, k_state_ref,
                 decay_ref, u_ref, *, scale, BK, BV, precision, early_terms):
  """`Y = A (exp(G) b k)` (and, unless `early_terms`, qg, the decayed keys and the decay) per key tile, then
  `U = A (w v)` per value head of the group."""
  K = q_ref.shape[-1]
  groups, V = v_ref.shape[1], v_ref.shape[2]

  def wy(kb, carry):
    cols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    k = _kt(k_ref, cols)
    gates = tiles.DenseGates.load(loc_ref, None if early_terms else rev_ref, tot_ref, cols)
    gamma = jnp.exp(gates.G())
    y_ref[:, cols] = tiles.dot(A, gamma * _kt(b_ref, cols) * k, precision).astype(y_ref.dtype)
    if not early_terms:
      _write_terms(q_ref, qg_ref, k_state_ref, decay_ref, cols, gates, k, gamma, scale)
    return carry

  lax.fori_loop(0, K // BK, wy, 0)

  for gi in range(groups):
    def wu(vb, carry, gi=gi):
      vcols = pl.ds(pl.multiple_of(vb * BV, BV), BV)
      Z = v_ref[:, gi, vcols].astype(F32) * w_ref[:, gi, vcols].astype(F32)
      u_ref[gi, :, vcols] = tiles.dot(A, Z, precision).astype(u_ref.dtype)
      return carry

    lax.fori_loop(0, V // BV, wu, 0)


def _chunk_fwd_kernel(q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, v_ref, w_ref, tc_ref, pc_ref, *out_refs,
                      scale, BK, BV, terms, precision, precision3, early_terms=False, with_a=True):
  if with_a:
    p_ref, a_ref, y_ref, qg_ref, k_state_ref, decay_ref, u_ref = out_refs
  else:
    (p_ref, y_ref, qg_ref, k_state_ref, decay_ref, u_ref), a_ref = out_refs, None
  early = (qg_ref, k_state_ref, decay_ref) if early_terms else None
  A = _pairs_and_inverse(q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, tc_ref, pc_ref, p_ref, scale=scale, BK=BK,
                         terms=terms, precision=precision, precision3=precision3, early_terms=early)
  if with_a:
    a_ref[...] = A
  _wy_products(A, q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, v_ref, w_ref, y_ref, qg_ref, k_state_ref,
               decay_ref, u_ref, scale=scale, BK=BK, BV=BV, precision=precision, early_terms=early_terms)


def _chunk_solve_kernel(q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, tc_ref, pc_ref, *out_refs, scale, BK, terms,
                        precision, precision3, early_terms):
  """`split_wy`'s first kernel: P and A (and with `early_terms` qg, the decayed keys and the decay)."""
  p_ref, a_ref = out_refs[:2]
  a_ref[...] = _pairs_and_inverse(q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, tc_ref, pc_ref, p_ref, scale=scale,
                                  BK=BK, terms=terms, precision=precision, precision3=precision3,
                                  early_terms=tuple(out_refs[2:]) if early_terms else None)


def _wy_fwd_kernel(a_ref, q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, v_ref, w_ref, *out_refs, scale, BK, BV,
                   precision, early_terms):
  """`split_wy`'s second kernel: Y and U from the stored A (and without `early_terms` qg, the decayed keys and the
  decay)."""
  if early_terms:
    (y_ref, u_ref), (qg_ref, k_state_ref, decay_ref) = out_refs, (None, None, None)
  else:
    y_ref, qg_ref, k_state_ref, decay_ref, u_ref = out_refs
  _wy_products(a_ref[...], q_ref, k_ref, loc_ref, rev_ref, tot_ref, b_ref, v_ref, w_ref, y_ref, qg_ref, k_state_ref,
               decay_ref, u_ref, scale=scale, BK=BK, BV=BV, precision=precision, early_terms=early_terms)


def chunk_fwd(shape: ChunkShape, q, k, b, v, w, diag: SubBlockPairs, *, scale: float, rdt, cfg: ChunkConfig,
              interpret: bool, with_a: bool = True) -> ChunkTerms:
  """`q, k, b [B, T, H, K]`, `v, w [B, T, HV, V]`, `diag` from `diag_fwd` -> `ChunkTerms`.

  What feeds the pass over chunks (`y`, `u`, `k_state`) is stored in `wdt = cfg.wy_residual_dtype(v.dtype)`
  (bf16 for bf16 inputs unless `ChunkConfig.wy_residuals` says otherwise). What only feeds the output and the
  backward's products (`p`, `qg`) is stored in `rdt`; `a` and `decay` in float32. With `ChunkConfig.split_wy` two
  kernels: `chunk_fwd` (P and A) and `wy_fwd` (Y and U from the stored A, per qk head). `with_a=False` (the
  forward alone, nothing differentiated: A is only a residual of the backward) leaves `a` out (`None`) unless
  `split_wy` needs it stored.
  """
  B, T, H, HV, K, V, groups, NC = shape
  sums = diag.sums
  wdt = cfg.wy_residual_dtype(v.dtype)
  qk = qk_rows(C, K)
  vw = pl.BlockSpec((None, C, groups, V), lambda b, h, c: (b, c, h, 0))
  rows_k, rows_c = hm_rows(C, K), hm_rows(C, C)
  u_spec = pl.BlockSpec((None, groups, C, V), lambda b, h, c: (b, h, c, 0))
  p_shape, a_shape = arr((B, H, T, C), rdt), f32((B, H, T, C))
  y_shape, qg_shape, ks_shape = arr((B, H, T, K), wdt), arr((B, H, T, K), rdt), arr((B, H, T, K), wdt)
  decay_shape, u_shape = f32((B, H, NC, K)), arr((B, HV, T, V), wdt)
  precision, precision3 = cfg.dot_precision(), cfg.dot3_precision(interpret)
  BV = min(cfg.block_v, V)
  if not cfg.split_wy:
    kern = functools.partial(_chunk_fwd_kernel, scale=scale, BK=cfg.key_tile("chunk_fwd", K), BV=BV,
                             terms=cfg.gate_sum_terms, precision=precision, precision3=precision3,
                             early_terms=cfg.early_terms, with_a=with_a)
    a_out = ([rows_c], [a_shape]) if with_a else ([], [])
    p, *rest = call(
        kern, grid=(B, H, NC),
        in_specs=[qk, qk, qk, qk, tot_spec(K), qk, vw, vw, hm_rows(C, SUB), hm_rows(C, SUB)],
        out_specs=[rows_c] + a_out[0] + [rows_k, rows_k, rows_k, per_chunk_vec(K), u_spec],
        out_shape=[p_shape] + a_out[1] + [y_shape, qg_shape, ks_shape, decay_shape, u_shape],
        cfg=cfg, interpret=interpret, name="chunk_fwd")(
            q, k, sums.loc, sums.rev, sums.tot, b, v, w, diag.t_diag, diag.p_diag)
    return ChunkTerms(p, *(rest if with_a else [None] + rest))
  early = cfg.early_terms
  terms_specs, terms_shapes = [rows_k, rows_k, per_chunk_vec(K)], [qg_shape, ks_shape, decay_shape]
  solve = functools.partial(_chunk_solve_kernel, scale=scale, BK=cfg.key_tile("chunk_fwd", K),
                            terms=cfg.gate_sum_terms, precision=precision, precision3=precision3, early_terms=early)
  p, a, *early_out = call(
      solve, grid=(B, H, NC),
      in_specs=[qk, qk, qk, qk, tot_spec(K), qk, hm_rows(C, SUB), hm_rows(C, SUB)],
      out_specs=[rows_c, rows_c] + (terms_specs if early else []),
      out_shape=[p_shape, a_shape] + (terms_shapes if early else []),
      cfg=cfg, interpret=interpret, name="chunk_fwd")(
          q, k, sums.loc, sums.rev, sums.tot, b, diag.t_diag, diag.p_diag)
  wy = functools.partial(_wy_fwd_kernel, scale=scale, BK=cfg.key_tile("wy_fwd", K), BV=BV, precision=precision,
                         early_terms=early)
  outs = call(
      wy, grid=(B, H, NC), in_specs=[rows_c, qk, qk, qk, qk, tot_spec(K), qk, vw, vw],
      out_specs=[rows_k] + ([] if early else terms_specs) + [u_spec],
      out_shape=[y_shape] + ([] if early else terms_shapes) + [u_shape],
      cfg=cfg, interpret=interpret, name="wy_fwd")(a, q, k, sums.loc, sums.rev, sums.tot, b, v, w)
  if early:
    (y, u), (qg, k_state, decay) = outs, early_out
  else:
    y, qg, k_state, decay, u = outs
  return ChunkTerms(p, a, y, qg, k_state, decay, u)


def _state_fwd_kernel(*refs, NC, varlen, precision):
  """One segment of the pass over chunks (`NC` chunks; the whole sequence unless `state_fwd` splits it)."""
  if varlen:
    (seq_ref, reset_ref, last_ref, u_ref, y_ref, k_state_ref, decay_ref, h0_ref, sin_ref, r_ref, final_ref,
     states_ref) = refs
  else:
    u_ref, y_ref, k_state_ref, decay_ref, sin_ref, r_ref, final_ref, states_ref = refs
  n_last = h0_ref.shape[0] - 1 if varlen else 0

  def body(chunk, S):
    if varlen:
      seq = jnp.minimum(seq_ref[chunk], n_last)  # unused trailing chunks (seq = N) hold zeros: any state will do
      S = jnp.where(reset_ref[chunk] != 0, h0_ref[seq], S)
    rows = pl.ds(pl.multiple_of(chunk * C, C), C)
    states_ref[chunk] = S.astype(states_ref.dtype)
    # The carried state and R stay float32 in these products (TF32): rounding them to the residual dtype every
    # chunk would compound along the sequence; only what is stored for later kernels is rounded.
    R = u_ref[rows, :].astype(F32) - tiles.dot(y_ref[rows, :].astype(F32), S, precision)
    r_ref[rows, :] = R.astype(r_ref.dtype)
    S = decay_ref[chunk, :][:, None] * S + tiles.dot_tn(k_state_ref[rows, :].astype(F32), R, precision)
    if varlen:
      @pl.when(last_ref[chunk] != 0)
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
    seq_ref, reset_ref, u_ref, y_ref, k_state_ref, decay_ref, h0_ref, map_ref = refs
  else:
    u_ref, y_ref, k_state_ref, decay_ref, map_ref = refs
  K, bv = map_ref.shape
  m_cols, S0 = map_columns(K, bv, nvb)
  u_scale = 1.0 - m_cols
  n_last = h0_ref.shape[0] - 1 if varlen else 0

  def body(chunk, S):
    if varlen:
      seq = jnp.minimum(seq_ref[chunk], n_last)
      S = jnp.where(reset_ref[chunk] != 0, u_scale * h0_ref[seq], S)
    rows = pl.ds(pl.multiple_of(chunk * C, C), C)
    R = u_scale * u_ref[rows, :].astype(F32) - tiles.dot(y_ref[rows, :].astype(F32), S, precision)
    return decay_ref[chunk, :][:, None] * S + tiles.dot_tn(k_state_ref[rows, :].astype(F32), R, precision)

  map_ref[...] = lax.fori_loop(0, NC, body, S0)


def state_fwd(shape: ChunkShape, terms: ChunkTerms, h0, layout: Optional[Layout], *, rdt, cfg: ChunkConfig,
              interpret: bool) -> StatePass:
  """The pass over chunks, from `terms`' `u, y, k_state, decay` and `h0 [N, HV, K, V]` (f32) -> `StatePass`: `r` and
  the entering `states` stored in `rdt` (the residual dtype), the carried state and `final` float32.

  With `ChunkConfig.state_segments` S > 1 (long sequences, few heads: too few programs to fill the GPU), the chunks
  are cut into S segments run in parallel twice: first each segment's affine map `S -> M S + c` (`segment_maps`),
  then, after a short scan over the segments for their entering states, the pass itself from those states.
  """
  B, T, H, HV, K, V, groups, NC = shape
  N = h0.shape[0]
  bv = cfg.state_block_v(B, HV, V)
  varlen = layout is not None
  nseg = cfg.segments(B, HV, V, NC)
  L = NC // nseg
  if nseg == 1:
    sin = h0[:, None] if not varlen else jnp.zeros((1, 1, HV, K, V), F32)
  else:
    maps = segment_maps(shape, terms, h0, layout, nseg=nseg, bv=min(bv, K), cfg=cfg, interpret=interpret)
    sin = segment_scan(maps, jnp.zeros((B, HV, K, V), F32) if varlen else h0, V)
  seg_v = pl.BlockSpec((None, None, L * C, bv), lambda b, h, j, s: (b, h, s, j))
  seg_k = pl.BlockSpec((None, None, L * C, K), lambda b, h, j, s: (b, h // groups, s, 0))
  seg_decay = pl.BlockSpec((None, None, L, K), lambda b, h, j, s: (b, h // groups, s, 0))
  per_seg = pl.BlockSpec((None, None, None, K, bv), lambda b, h, j, s: (b, s, h, 0, j))
  states_spec = pl.BlockSpec((None, None, L, K, bv), lambda b, h, j, s: (b, h, s, 0, j))
  in_specs = [seg_v, seg_k, seg_k, seg_decay]
  args = [terms.u, terms.y, terms.k_state, terms.decay]
  if varlen:
    table = pl.BlockSpec((N, None, K, bv), lambda b, h, j, s: (0, h, 0, j))
    in_specs = [pl.BlockSpec((L,), lambda b, h, j, s: (s,))] * 3 + in_specs + [table]
    args = list(layout) + args + [h0]
    final_spec, final_shape = table, f32((N, HV, K, V))
  else:
    final_spec, final_shape = per_seg, f32((B, nseg, HV, K, V))
  r, final, states = call(
      functools.partial(_state_fwd_kernel, NC=L, varlen=varlen, precision=cfg.dot_precision()),
      grid=(B, HV, V // bv, nseg), in_specs=in_specs + [per_seg],
      out_specs=[seg_v, final_spec, states_spec],
      out_shape=[arr((B, HV, T, V), rdt), final_shape, arr((B, HV, NC, K, V), rdt)],
      cfg=cfg, interpret=interpret, name="state_fwd")(*args, sin)
  return StatePass(r, final if varlen else final[:, -1], states)


def segment_maps(shape: ChunkShape, terms: ChunkTerms, h0, layout: Optional[Layout], *, nseg: int, bv: int,
                 cfg: ChunkConfig, interpret: bool):
  """The affine map of each of `nseg` equal segments of chunks: `[B, nseg, HV, K, V + K]` (f32), columns `[c | M]`:
  a segment entered with state S leaves with `M S + c` (c: its exit state when entered with zeros; with `layout`,
  sequences starting inside it start from their `h0`). `bv` divides K and V."""
  B, T, H, HV, K, V, groups, NC = shape
  L = NC // nseg
  nvb = V // bv
  varlen = layout is not None
  in_specs = [pl.BlockSpec((None, None, L * C, bv), lambda b, h, j, s: (b, h, s, jnp.minimum(j, nvb - 1))),
              pl.BlockSpec((None, None, L * C, K), lambda b, h, j, s: (b, h // groups, s, 0)),
              pl.BlockSpec((None, None, L * C, K), lambda b, h, j, s: (b, h // groups, s, 0)),
              pl.BlockSpec((None, None, L, K), lambda b, h, j, s: (b, h // groups, s, 0))]
  args = [terms.u, terms.y, terms.k_state, terms.decay]
  if varlen:
    in_specs = [pl.BlockSpec((L,), lambda b, h, j, s: (s,))] * 2 + in_specs + [
        pl.BlockSpec((h0.shape[0], None, K, bv), lambda b, h, j, s: (0, h, 0, jnp.minimum(j, nvb - 1)))]
    args = list(layout[:2]) + args + [h0]
  return call(
      functools.partial(_state_map_kernel, NC=L, nvb=nvb, varlen=varlen, precision=cfg.dot_precision()),
      grid=(B, HV, nvb + K // bv, nseg), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, None, K, bv), lambda b, h, j, s: (b, s, h, 0, j)),
      out_shape=f32((B, nseg, HV, K, V + K)), cfg=cfg, interpret=interpret, name="state_fwd")(*args)


def _out_kernel(qg_ref, p_ref, s_ref, r_ref, o_ref, *, BK, precision):
  K = qg_ref.shape[-1]

  def body(kb, acc):
    kcols = pl.ds(pl.multiple_of(kb * BK, BK), BK)
    return acc + tiles.dot(qg_ref[:, kcols], s_ref[kcols, :], precision)

  acc = tiles.dot(p_ref[...], r_ref[...], precision)
  o_ref[...] = lax.fori_loop(0, K // BK, body, acc).astype(o_ref.dtype)


def out_fwd(shape: ChunkShape, terms: ChunkTerms, state: StatePass, *, o_dtype, cfg: ChunkConfig, interpret: bool):
  """`o = qg S + P R` per chunk, from `terms`' `qg, p` and `state`'s `states, r`. -> `o [B, T, HV, V]` in
  `o_dtype`."""
  B, T, H, HV, K, V, groups, NC = shape
  bv = min(cfg.block_v, V)
  return call(
      functools.partial(_out_kernel, BK=cfg.key_tile("out_fwd", K), precision=cfg.dot_precision()),
      grid=(B, HV, NC, V // bv),
      in_specs=[hm_rows(C, K, groups), hm_rows(C, C, groups),
                pl.BlockSpec((None, None, None, K, bv), lambda b, h, c, j: (b, h, c, 0, j)),
                pl.BlockSpec((None, None, C, bv), lambda b, h, c, j: (b, h, c, j))],
      out_specs=pl.BlockSpec((None, C, None, bv), lambda b, h, c, j: (b, c, h, j)),
      out_shape=jax.ShapeDtypeStruct((B, T, HV, V), o_dtype),
      cfg=cfg, interpret=interpret, name="out_fwd")(terms.qg, terms.p, state.states, state.r)
