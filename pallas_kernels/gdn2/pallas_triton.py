"""Pallas (Triton lowering) kernels of the chunkwise GDN-2 forward and backward.

Layout (already padded by the caller): `q, k, g, b [B, T, H, K]`, `v, w [B, T, HV, V]`, T a multiple of 64, K and V
powers of two >= 16, HV a multiple of H (value head `h` reads qk head `h // (HV // H)` through the index maps).

Four kernels:
- `intra`      grid (B, HV, NC): per chunk, the state-independent WY quantities (`tiles.chunk_intra`).
- `state_fwd`  grid (B, HV, V / block_v): the pass over chunks, carrying the state tile `[K, block_v]` in registers;
               writes `o`, the final state and every chunk's entering state (the only residual the backward keeps
               besides the inputs: NC states per head, no per-token state).
- `state_bwd`  same grid, in reverse: carries `dS`, writes `dR` (cotangent of `R = U - Y S`) and the cotangent of
               every chunk's leaving state.
- `intra_bwd`  grid (B, HV, NC): recomputes the chunk's WY quantities and returns every input gradient.

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

from pallas_kernels.gdn2 import tiles
from pallas_kernels.gdn2.config import CHUNK, ChunkConfig

F32 = jnp.float32
C = CHUNK


def _params(cfg: ChunkConfig, warps: int):
  return plgpu.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


# ---------------------------------------------------------------------------------------------------- intra (fwd)

def _intra_kernel(*refs, scale, cfg):
  K = refs[0].shape[-1]
  tiles.intra_fwd(*refs, scale=scale, BK=min(cfg.block_k, K), terms=cfg.gate_sum_terms,
                  precision=cfg.dot_precision())


def _qk_spec(K, groups):
  return pl.BlockSpec((None, C, None, K), lambda b, h, c: (b, c, h // groups, 0))


def _v_spec(V):
  return pl.BlockSpec((None, C, None, V), lambda b, h, c: (b, c, h, 0))


def intra(q, k, g, b, v, w, *, scale: float, cfg: ChunkConfig, interpret: bool):
  """-> `U [B, HV, T, V]`, `Y, qg, ks [B, HV, T, K]`, `P [B, HV, T, C]`, `dec [B, HV, NC, K]` (float32)."""
  B, T, H, K = q.shape
  HV, V = v.shape[2:]
  NC = T // C
  qk = _qk_spec(K, HV // H)
  vs = _v_spec(V)
  chunk_out = lambda D: pl.BlockSpec((None, None, C, D), lambda b, h, c: (b, h, c, 0))
  out_shape = [jax.ShapeDtypeStruct((B, HV, T, V), F32)] + [jax.ShapeDtypeStruct((B, HV, T, K), F32)] * 3 + [
      jax.ShapeDtypeStruct((B, HV, T, C), F32), jax.ShapeDtypeStruct((B, HV, NC, K), F32)]
  return pl.pallas_call(
      functools.partial(_intra_kernel, scale=scale, cfg=cfg),
      grid=(B, HV, NC),
      in_specs=[qk, qk, qk, qk, vs, vs],
      out_specs=[chunk_out(V), chunk_out(K), chunk_out(K), chunk_out(K), chunk_out(C),
                 pl.BlockSpec((None, None, None, K), lambda b, h, c: (b, h, c, 0))],
      out_shape=out_shape,
      compiler_params=_params(cfg, cfg.num_warps_intra),
      interpret=interpret,
      name="gdn2_intra",
  )(q, k, g, b, v, w)


# ---------------------------------------------------------------------------------------------- state passes

def _state_fwd_kernel(*refs, NC, varlen, precision):
  if varlen:
    (seq_ref, reset_ref, last_ref, u_ref, y_ref, qg_ref, ks_ref, p_ref, dec_ref, h0_ref,
     o_ref, final_ref, states_ref) = refs
  else:
    u_ref, y_ref, qg_ref, ks_ref, p_ref, dec_ref, h0_ref, o_ref, final_ref, states_ref = refs
  n_last = h0_ref.shape[0] - 1 if varlen else 0

  def body(c, S):
    if varlen:
      seq = jnp.minimum(seq_ref[c], n_last)  # unused trailing chunks (seq = N) hold zeros: any state will do
      S = jnp.where(reset_ref[c] != 0, h0_ref[seq], S)
    rows = pl.ds(pl.multiple_of(c * C, C), C)
    Y = y_ref[rows, :]
    states_ref[c] = S
    R = u_ref[rows, :] - tiles.dot(Y, S, precision)
    o = tiles.dot(qg_ref[rows, :], S, precision) + tiles.dot(p_ref[rows, :], R, precision)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    S = dec_ref[c, :][:, None] * S + tiles.dot_tn(ks_ref[rows, :], R, precision)
    if varlen:
      @pl.when(last_ref[c] != 0)
      def _():
        final_ref[seq] = S
    return S

  S0 = jnp.zeros(h0_ref.shape[-2:], F32) if varlen else h0_ref[...]
  S = lax.fori_loop(0, NC, body, S0)
  if not varlen:
    final_ref[...] = S


def state_fwd(u, y, qg, ks, p, dec, h0, layout, *, o_dtype, cfg: ChunkConfig, interpret: bool):
  """Pass over chunks. -> `o [B, T, HV, V]` (o_dtype), `final [N, HV, K, V]`, `states [B, HV, NC, K, V]` (f32)."""
  B, HV, T, V = u.shape
  K = y.shape[-1]
  NC = T // C
  N = h0.shape[0]
  bv = min(cfg.block_v, V)
  varlen = layout is not None
  seqwise = lambda tile: pl.BlockSpec((None, None, T, tile), lambda b, h, j: (b, h, 0, j))
  seqwise_k = pl.BlockSpec((None, None, T, K), lambda b, h, j: (b, h, 0, 0))
  if varlen:
    state = pl.BlockSpec((N, None, K, bv), lambda b, h, j: (0, h, 0, j))
  else:
    state = pl.BlockSpec((None, None, K, bv), lambda b, h, j: (b, h, 0, j))
  in_specs = [seqwise(bv), seqwise_k, seqwise_k, seqwise_k,
              pl.BlockSpec((None, None, T, C), lambda b, h, j: (b, h, 0, 0)),
              pl.BlockSpec((None, None, NC, K), lambda b, h, j: (b, h, 0, 0)), state]
  args = [u, y, qg, ks, p, dec, h0]
  if varlen:
    flag = pl.BlockSpec((NC,), lambda b, h, j: (0,))
    in_specs = [flag] * 3 + in_specs
    args = list(layout) + args
  out_specs = [pl.BlockSpec((None, T, None, bv), lambda b, h, j: (b, 0, h, j)), state,
               pl.BlockSpec((None, None, NC, K, bv), lambda b, h, j: (b, h, 0, 0, j))]
  out_shape = [jax.ShapeDtypeStruct((B, T, HV, V), o_dtype), jax.ShapeDtypeStruct((N, HV, K, V), F32),
               jax.ShapeDtypeStruct((B, HV, NC, K, V), F32)]
  return pl.pallas_call(
      functools.partial(_state_fwd_kernel, NC=NC, varlen=varlen, precision=cfg.dot_precision()),
      grid=(B, HV, V // bv),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(cfg, cfg.num_warps_state),
      interpret=interpret,
      name="gdn2_state_fwd",
  )(*args)


def _state_bwd_kernel(*refs, NC, varlen, precision):
  if varlen:
    (seq_ref, reset_ref, last_ref, y_ref, qg_ref, ks_ref, p_ref, dec_ref, states_ref, do_ref, dfinal_ref,
     dr_ref, dsn_ref, dh0_ref) = refs
  else:
    y_ref, qg_ref, ks_ref, p_ref, dec_ref, states_ref, do_ref, dfinal_ref, dr_ref, dsn_ref, dh0_ref = refs
  n_last = dfinal_ref.shape[0] - 1 if varlen else 0

  def body(t, dS):
    c = NC - 1 - t
    if varlen:
      seq = jnp.minimum(seq_ref[c], n_last)
      dS = jnp.where(last_ref[c] != 0, dfinal_ref[seq], dS)
    rows = pl.ds(pl.multiple_of(c * C, C), C)
    dsn_ref[c] = dS
    dO = do_ref[rows, :].astype(F32)
    Y = y_ref[rows, :]
    dR = tiles.dot_tn(p_ref[rows, :], dO, precision) + tiles.dot(ks_ref[rows, :], dS, precision)
    dr_ref[rows, :] = dR
    dS = (dec_ref[c, :][:, None] * dS + tiles.dot_tn(qg_ref[rows, :], dO, precision)
          - tiles.dot_tn(Y, dR, precision))
    if varlen:
      @pl.when((reset_ref[c] != 0) & (seq_ref[c] <= n_last))
      def _():
        dh0_ref[seq] = dS
    return dS

  dS0 = jnp.zeros(dfinal_ref.shape[-2:], F32) if varlen else dfinal_ref[...]
  dS = lax.fori_loop(0, NC, body, dS0)
  if not varlen:
    dh0_ref[...] = dS


def state_bwd(y, qg, ks, p, dec, states, do, dfinal, layout, *, cfg: ChunkConfig, interpret: bool):
  """Reverse pass. -> `dR [B, HV, T, V]`, `dS_next [B, HV, NC, K, V]`, `dh0 [N, HV, K, V]` (f32)."""
  B, HV, T, K = y.shape
  V = do.shape[-1]
  NC = T // C
  N = dfinal.shape[0]
  bv = min(cfg.block_v, V)
  varlen = layout is not None
  seqwise_k = pl.BlockSpec((None, None, T, K), lambda b, h, j: (b, h, 0, 0))
  per_chunk_state = pl.BlockSpec((None, None, NC, K, bv), lambda b, h, j: (b, h, 0, 0, j))
  if varlen:
    state = pl.BlockSpec((N, None, K, bv), lambda b, h, j: (0, h, 0, j))
  else:
    state = pl.BlockSpec((None, None, K, bv), lambda b, h, j: (b, h, 0, j))
  in_specs = [seqwise_k, seqwise_k, seqwise_k, pl.BlockSpec((None, None, T, C), lambda b, h, j: (b, h, 0, 0)),
              pl.BlockSpec((None, None, NC, K), lambda b, h, j: (b, h, 0, 0)), per_chunk_state,
              pl.BlockSpec((None, T, None, bv), lambda b, h, j: (b, 0, h, j)), state]
  args = [y, qg, ks, p, dec, states, do, dfinal]
  if varlen:
    flag = pl.BlockSpec((NC,), lambda b, h, j: (0,))
    in_specs = [flag] * 3 + in_specs
    args = list(layout) + args
  out_specs = [pl.BlockSpec((None, None, T, bv), lambda b, h, j: (b, h, 0, j)), per_chunk_state, state]
  out_shape = [jax.ShapeDtypeStruct((B, HV, T, V), F32), jax.ShapeDtypeStruct((B, HV, NC, K, V), F32),
               jax.ShapeDtypeStruct((N, HV, K, V), F32)]
  return pl.pallas_call(
      functools.partial(_state_bwd_kernel, NC=NC, varlen=varlen, precision=cfg.dot_precision()),
      grid=(B, HV, V // bv),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(cfg, cfg.num_warps_state),
      interpret=interpret,
      name="gdn2_state_bwd",
  )(*args)


# ------------------------------------------------------------------------------------------------- intra (bwd)

def _contract_kernel(*refs, cfg):
  K = refs[1].shape[-1]
  tiles.bwd_contract(*refs, BK=min(cfg.block_k, K), precision=cfg.dot_precision())


def bwd_contract(u, y, states, dsn, do, dr, *, cfg: ChunkConfig, interpret: bool):
  """-> `dqg, dks, dY [B, HV, T, K]`, `ddec [B, HV, NC, K]`, `dPf [B, HV, T, C]` (f32), per chunk."""
  B, HV, T, V = u.shape
  K = y.shape[-1]
  NC = T // C
  chunk = lambda D: pl.BlockSpec((None, None, C, D), lambda b, h, c: (b, h, c, 0))
  st = pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, c, 0, 0))
  out_shape = [jax.ShapeDtypeStruct((B, HV, T, K), F32)] * 3 + [
      jax.ShapeDtypeStruct((B, HV, NC, K), F32), jax.ShapeDtypeStruct((B, HV, T, C), F32)]
  return pl.pallas_call(
      functools.partial(_contract_kernel, cfg=cfg),
      grid=(B, HV, NC),
      in_specs=[chunk(V), chunk(K), st, st, _v_spec(V), chunk(V)],
      out_specs=[chunk(K)] * 3 + [pl.BlockSpec((None, None, None, K), lambda b, h, c: (b, h, c, 0)), chunk(C)],
      out_shape=out_shape,
      compiler_params=_params(cfg, cfg.num_warps_contract),
      interpret=interpret,
      name="gdn2_bwd_contract",
  )(u, y, states, dsn, do, dr)


def _intra_bwd_kernel(*refs, scale, cfg):
  K = refs[0].shape[-1]
  tiles.intra_bwd(*refs, scale=scale, BK=min(cfg.block_k, K), terms=cfg.gate_sum_terms,
                  precision=cfg.dot_precision())


def intra_bwd(q, k, g, b, v, w, dqg, dks, dy, ddec, dpf, dr, *, scale: float, cfg: ChunkConfig, interpret: bool):
  """-> `dq, dk, dg, db [B, T, HV, K]` (per value head; the caller sums groups), `dv, dw [B, T, HV, V]` (f32)."""
  B, T, H, K = q.shape
  HV, V = v.shape[2:]
  NC = T // C
  qk = _qk_spec(K, HV // H)
  vs = _v_spec(V)
  chunk = lambda D: pl.BlockSpec((None, None, C, D), lambda b, h, c: (b, h, c, 0))
  kout = pl.BlockSpec((None, C, None, K), lambda b, h, c: (b, c, h, 0))
  out_shape = [jax.ShapeDtypeStruct((B, T, HV, K), F32)] * 4 + [jax.ShapeDtypeStruct((B, T, HV, V), F32)] * 2
  return pl.pallas_call(
      functools.partial(_intra_bwd_kernel, scale=scale, cfg=cfg),
      grid=(B, HV, NC),
      in_specs=[qk, qk, qk, qk, vs, vs, chunk(K), chunk(K), chunk(K),
                pl.BlockSpec((None, None, None, K), lambda b, h, c: (b, h, c, 0)), chunk(C), chunk(V)],
      out_specs=[kout] * 4 + [vs] * 2,
      out_shape=out_shape,
      compiler_params=_params(cfg, cfg.num_warps_bwd),
      interpret=interpret,
      name="gdn2_intra_bwd",
  )(q, k, g, b, v, w, dqg, dks, dy, ddec, dpf, dr)
