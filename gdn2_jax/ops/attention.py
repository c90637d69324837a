"""Causal softmax attention with grouped KV heads, an optional sliding window and packed documents (segment ids).

One entry point, `attention`, with three implementations:
- 'xla': windowed attention runs blockwise (query blocks of `window` tokens attend to their own and the previous key
  block), so memory and work are linear in T; full attention runs the plain dense form.
- 'cudnn': `jax.nn.dot_product_attention` (cuDNN's fused sliding window); it has no segment ids.
- 'pallas': a Triton flash-attention kernel (online softmax, float32 accumulation) that skips key blocks outside the
  window and takes segment ids; forward and backward kernels through a custom VJP.

Window semantics as the attention layer: token i sees j with `i - window < j <= i` (the window counts the token).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")
_MASK = -1e30  # finite, so a row with no visible key yet never computes (-inf) - (-inf)


def _check(q, k, v, segment_ids, window, implementation):
  if q.ndim != 4:
    raise ValueError(f"`q` has shape {q.shape}; expected [B, T, N, D].")
  B, T, N, D = q.shape
  if k.ndim != 4 or k.shape[:2] != (B, T) or k.shape[3] != D or N % k.shape[2]:
    raise ValueError(f"`k` has shape {k.shape}; expected [B, T, NKV, D] = [{B}, {T}, NKV, {D}] with NKV dividing {N}.")
  if v.shape != k.shape:
    raise ValueError(f"`v` has shape {v.shape}; expected the shape of `k` {k.shape}.")
  if segment_ids is not None and segment_ids.shape != (B, T):
    raise ValueError(f"`segment_ids` has shape {segment_ids.shape}; expected [B, T] = [{B}, {T}].")
  if window is not None and window < 1:
    raise ValueError(f"`window` is {window}; expected a positive number of tokens or None (full attention).")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"`implementation` is {implementation!r}; expected one of {IMPLEMENTATIONS}.")
  if implementation == "cudnn" and segment_ids is not None:
    raise ValueError("`segment_ids` given with implementation='cudnn', which takes none; use 'xla' or 'pallas'.")


def attention(q: Array, k: Array, v: Array, *, segment_ids: Optional[Array] = None, window: Optional[int] = None,
              scale: Optional[float] = None, implementation: str = "xla", block: Optional[int] = None,
              interpret: bool = False) -> Array:
  """Causal attention: `q [B, T, N, D]`, `k, v [B, T, NKV, D]` (NKV divides N) -> `[B, T, N, D]` in q's dtype.

  Args:
    segment_ids: `[B, T]` int or None; a token attends only to tokens of its own segment (document).
    window: sliding window in tokens (counting the token itself) or None for full causal attention.
    scale: logit scale (default `D ** -0.5`).
    implementation: 'xla', 'cudnn' (no segment ids) or 'pallas'.
    block: Pallas tile (tokens; default 64). interpret: run the Pallas kernels in interpret mode (CPU).
  """
  _check(q, k, v, segment_ids, window, implementation)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  T = q.shape[1]
  if implementation == "cudnn":
    lw = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=lw,
                                        implementation="cudnn")
  if implementation == "pallas":
    return _pallas_attention(q, k, v, segment_ids, window, scale, block or 64, interpret)
  if window is None or window >= T:
    return dense_attention(q, k, v, segment_ids=segment_ids, window=window, scale=scale)
  return blockwise_attention(q, k, v, segment_ids=segment_ids, window=window, scale=scale)


def _grouped(q, k):
  """`q [B, T, N, D]` -> `[B, T, NKV, G, D]` (query heads of one KV head side by side)."""
  B, T, N, D = q.shape
  return q.reshape(B, T, k.shape[2], N // k.shape[2], D)


def _visible(qpos, kpos, window):
  m = kpos <= qpos
  if window is not None:
    m = m & (qpos - kpos < window)
  return m


def dense_attention(q: Array, k: Array, v: Array, *, segment_ids: Optional[Array] = None,
                    window: Optional[int] = None, scale: Optional[float] = None) -> Array:
  """The `[T, T]` form (for full attention and short sequences): shapes as `attention`; softmax in float32."""
  B, T, N, D = q.shape
  scale = D ** -0.5 if scale is None else scale
  acc = jnp.promote_types(q.dtype, jnp.float32)
  s = jnp.einsum("btkgd,bskd->bkgts", _grouped(q, k), k, preferred_element_type=acc) * scale
  pos = jnp.arange(T)
  mask = _visible(pos[:, None], pos[None, :], window)[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  s = jnp.where(mask[:, None, None], s, _MASK)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=acc)
  return o.reshape(B, T, N, D).astype(q.dtype)


def blockwise_attention(q: Array, k: Array, v: Array, *, segment_ids: Optional[Array], window: int,
                        scale: Optional[float] = None) -> Array:
  """Sliding-window attention without a `[T, T]` mask: shapes as `attention`.

  Query block b (C = window tokens) sees keys of blocks b - 1 and b, which hold every key within its window;
  logits are `[B, T/C, NKV, G, C, 2C]`, so memory and work are linear in T.
  """
  B, T, N, D = q.shape
  scale = D ** -0.5 if scale is None else scale
  C = window
  nb = -(-T // C)
  pad = nb * C - T
  seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if pad:  # padded keys lie after every real query (causally hidden); padded queries are sliced off
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
  NKV = k.shape[2]
  qb = q.reshape(B, nb, C, NKV, N // NKV, D)

  def two_blocks(x, fill):  # [B, nb*C, ...] -> [B, nb, 2C, ...]: the previous block, then the own block
    x = x.reshape(B, nb, C, *x.shape[2:])
    prev = jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)
    return jnp.concatenate([prev, x], axis=2)

  kb, vb, sk = two_blocks(k, 0), two_blocks(v, 0), two_blocks(seg, -1)
  acc = jnp.promote_types(q.dtype, jnp.float32)
  s = jnp.einsum("bncxgd,bnsxd->bnxgcs", qb, kb, preferred_element_type=acc) * scale
  qpos = jnp.arange(C)[:, None] + C  # positions inside the two-block key window
  mask = _visible(qpos, jnp.arange(2 * C)[None, :], window)
  first = (jnp.arange(nb)[:, None, None] == 0) & (jnp.arange(2 * C)[None, None, :] < C)  # block 0 has no previous
  mask = (mask[None] & ~first)[None] & (seg.reshape(B, nb, C)[:, :, :, None] == sk[:, :, None, :])  # [B, nb, C, 2C]
  s = jnp.where(mask[:, :, None, None], s, _MASK)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bnxgcs,bnsxd->bncxgd", p.astype(v.dtype), vb, preferred_element_type=acc)
  return o.reshape(B, nb * C, N, D)[:, :T].astype(q.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Pallas (Triton) flash attention


def _key_range(qs, bq, bk, window):
  """Key blocks [lo, hi) that queries [qs, qs + bq) can see (causal, window)."""
  hi = (qs + bq + bk - 1) // bk
  lo = 0 if window is None else jnp.maximum(qs - window + 1, 0) // bk
  return lo, hi


def _query_range(ks, bq, bk, window, nq):
  """Query blocks [lo, hi) that can see keys [ks, ks + bk)."""
  lo = ks // bq
  hi = nq if window is None else jnp.minimum((ks + bk + window - 1 + bq - 1) // bq, nq)
  return lo, hi


def _logits(q, k, qs, ks, qseg, kseg, scale, window, bq, bk):
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
  qpos = qs + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  kpos = ks + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  mask = _visible(qpos, kpos, window) & (qseg[:, None] == kseg[None, :])
  return jnp.where(mask, s, _MASK), mask


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, window, bq, bk):
  qs = pl.program_id(2) * bq
  q, qseg = q_ref[...], qseg_ref[...]
  D = q.shape[-1]

  def body(j, carry):
    m, l, acc = carry
    ks = j * bk
    k, v = k_ref[pl.ds(ks, bk), :], v_ref[pl.ds(ks, bk), :]
    s, _ = _logits(q, k, qs, ks, qseg, kseg_ref[pl.ds(ks, bk)], scale, window, bq, bk)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, acc

  lo, hi = _key_range(qs, bq, bk, window)
  init = (jnp.full((bq,), _MASK, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, D), jnp.float32))
  m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, window, bq, bk):
  qs = pl.program_id(2) * bq
  q, qseg, do = q_ref[...], qseg_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, dq):
    ks = j * bk
    k, v = k_ref[pl.ds(ks, bk), :], v_ref[pl.ds(ks, bk), :]
    s, mask = _logits(q, k, qs, ks, qseg, kseg_ref[pl.ds(ks, bk)], scale, window, bq, bk)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  lo, hi = _key_range(qs, bq, bk, window)
  dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, window,
                bq, bk, nq):
  ks = pl.program_id(2) * bk
  k, v, kseg = k_ref[...], v_ref[...], kseg_ref[...]

  def body(i, carry):
    dk, dv = carry
    qs = i * bq
    q, do = q_ref[pl.ds(qs, bq), :], do_ref[pl.ds(qs, bq), :]
    lse, delta = lse_ref[pl.ds(qs, bq)], delta_ref[pl.ds(qs, bq)]
    s, mask = _logits(q, k, qs, ks, qseg_ref[pl.ds(qs, bq)], kseg, scale, window, bq, bk)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
    return dk, dv

  lo, hi = _query_range(ks, bq, bk, window, nq)
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(lo, hi, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params():
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _specs(B, Tp, N, NKV, D, blk, full_q: bool):
  """BlockSpecs over grid (B, N, blocks): a tile of `blk` tokens, or the whole (padded) sequence of one head."""
  G = N // NKV
  tile = lambda heads: pl.BlockSpec((None, blk, None, D), lambda b, h, i: (b, i, heads(h), 0))
  row = lambda heads: pl.BlockSpec((None, Tp, None, D), lambda b, h, i: (b, 0, heads(h), 0))
  seg_tile = pl.BlockSpec((None, blk), lambda b, h, i: (b, i))
  seg_row = pl.BlockSpec((None, Tp), lambda b, h, i: (b, 0))
  qh, kh = (lambda h: h), (lambda h: h // G)
  if full_q:  # tiles of keys, whole rows of queries (the dk/dv kernel)
    return dict(q=row(qh), kv=tile(kh), qseg=seg_row, kseg=seg_tile, vec=pl.BlockSpec((None, None, Tp),
                                                                                     lambda b, h, i: (b, h, 0)))
  return dict(q=tile(qh), kv=row(kh), qseg=seg_tile, kseg=seg_row,
              vec=pl.BlockSpec((None, None, blk), lambda b, h, i: (b, h, i)))


def _pad(q, k, v, segment_ids, blk):
  B, T, N, D = q.shape
  Tp, Dp = -(-T // blk) * blk, max(16, 1 << (D - 1).bit_length())  # Triton tiles: power-of-two head dims, >= 16
  seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  seg = jnp.pad(seg, ((0, 0), (0, Tp - T)), constant_values=-1)
  padx = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, Dp - D)))  # zero dims leave q.k unchanged
  return padx(q), padx(k), padx(v), seg


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seg, window, scale, blk, interpret):
  return _flash_fwd(q, k, v, seg, window, scale, blk, interpret)[0]


def _flash_fwd(q, k, v, seg, window, scale, blk, interpret):
  B, Tp, N, D = q.shape
  NKV = k.shape[2]
  sp = _specs(B, Tp, N, NKV, D, blk, full_q=False)
  kern = functools.partial(_fwd_kernel, scale=scale, window=window, bq=blk, bk=blk)
  o, lse = pl.pallas_call(
      kern, grid=(B, N, Tp // blk), in_specs=[sp["q"], sp["kv"], sp["kv"], sp["qseg"], sp["kseg"]],
      out_specs=[sp["q"], sp["vec"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
      compiler_params=_compiler_params(), interpret=interpret, name="attention_fwd")(q, k, v, seg, seg)
  return o, (q, k, v, seg, o, lse)


def _flash_bwd(window, scale, blk, interpret, res, do):
  q, k, v, seg, o, lse = res
  B, Tp, N, D = q.shape
  NKV = k.shape[2]
  nb = Tp // blk
  delta = jnp.einsum("btnd,btnd->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
  args = (q, k, v, seg, seg, do, lse, delta)
  sp = _specs(B, Tp, N, NKV, D, blk, full_q=False)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, window=window, bq=blk, bk=blk), grid=(B, N, nb),
      in_specs=[sp["q"], sp["kv"], sp["kv"], sp["qseg"], sp["kseg"], sp["q"], sp["vec"], sp["vec"]],
      out_specs=sp["q"], out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(), interpret=interpret, name="attention_dq")(*args)
  sp = _specs(B, Tp, N, NKV, D, blk, full_q=True)
  # dk, dv per query head (float32), summed over each KV head's group below
  kv_out = pl.BlockSpec((None, blk, None, D), lambda b, h, i: (b, i, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, window=window, bq=blk, bk=blk, nq=nb), grid=(B, N, nb),
      in_specs=[sp["q"], sp["kv"], sp["kv"], sp["qseg"], sp["kseg"], sp["q"], sp["vec"], sp["vec"]],
      out_specs=[kv_out, kv_out], out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
      compiler_params=_compiler_params(), interpret=interpret, name="attention_dkv")(*args)
  group = lambda x, like: x.reshape(B, Tp, NKV, N // NKV, D).sum(3).astype(like.dtype)
  return dq, group(dk, k), group(dv, v), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pallas_attention(q, k, v, segment_ids, window, scale, blk, interpret):
  B, T, N, D = q.shape
  if blk < 16 or blk & (blk - 1):
    raise ValueError(f"`block` is {blk}; expected a power of two >= 16 (a Triton tile).")
  qp, kp, vp, seg = _pad(q, k, v, segment_ids, blk)
  o = _flash(qp, kp, vp, seg, window, scale, blk, interpret)
  return o[:, :T, :, :D]
