"""`chunk_gdn2`: the Pallas chunk kernels as one differentiable JAX function (`jax.custom_vjp`).

Residuals kept for the backward (no per-token state): the inputs, the sub-block segment sums of g, the state
entering every chunk (`[B, HV, T / 64, K, V]`, as fla keeps), `R = U - Y S` (`[B, HV, T, V]`), and per qk head the
chunk matrices P and `A = (I + T)^-1` (`[B, H, T, 64]`), `Y`, `qg`, the decayed keys
`k_state` (`[B, H, T, K]`) and `exp(G_C)`. P, qg, R
and the entering states are stored in the residual dtype (`ChunkConfig.residuals`: bf16 for bf16 inputs), the rest
in float32. Nothing of the forward is recomputed: the backward is the reverse pass over chunks and four parallel
kernels (see `forward` and `backward`). The stages pass their operands as named tuples (`forward.ChunkTerms`,
`backward.ContractCotangents`, ...).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.gdn2 import backward, forward, segments
from pallas_kernels.gdn2.common import ChunkShape, Layout
from pallas_kernels.gdn2.config import CHUNK, ChunkConfig

Array = jax.Array


def _check(q, k, v, g, b, w, initial_state, layout):
  B, T, H, K = q.shape
  HV, V = v.shape[2:]
  if T % CHUNK:
    raise ValueError(f"`q` has shape {q.shape}; T must be a multiple of {CHUNK} (pad first).")
  for name, d in (("K", K), ("V", V)):
    if d < 16 or d & (d - 1):
      raise ValueError(f"{name} = {d}; the kernels need a power of two >= 16 (pad first).")
  if HV % H:
    raise ValueError(f"`v` has {HV} heads, not a multiple of the {H} heads of `q`.")
  for name, x, shape in (("k", k, q.shape), ("g", g, q.shape), ("b", b, q.shape), ("w", w, v.shape)):
    if x.shape != shape:
      raise ValueError(f"`{name}` has shape {x.shape}; expected {shape}.")
  N = initial_state.shape[0]
  if initial_state.shape != (N, HV, K, V):
    raise ValueError(f"`initial_state` has shape {initial_state.shape}; expected [N, {HV}, {K}, {V}].")
  if layout is None and N != B:
    raise ValueError(f"`initial_state` has {N} states for a batch of {B}.")
  if layout is not None:
    if B != 1:
      raise ValueError(f"packed sequences need B = 1; `q` has shape {q.shape}.")
    for name, x in zip(("seq", "reset", "last"), layout):
      if x.shape != (T // CHUNK,):
        raise ValueError(f"layout `{name}` has shape {x.shape}; expected ({T // CHUNK},), one entry per chunk.")


def _has_chunks(layout: Layout, N):
  """`[N]` bool: sequence n owns at least one chunk (an empty sequence's final state is its initial state)."""
  return jnp.zeros((N + 1,), jnp.int32).at[layout.seq].max(layout.last)[:N] > 0


class Residuals(NamedTuple):
  """What the backward reads: the inputs, the segment sums of g, the forward's chunk terms (without `u`), and the
  state pass's `r` and entering `states` (`final` is an output, not a residual)."""
  q: Array
  k: Array
  v: Array
  g: Array
  b: Array
  w: Array
  h0: Array
  layout: Optional[Layout]
  sums: segments.SubBlockSums
  terms: forward.ChunkTerms
  state: forward.StatePass


def _forward(q, k, v, g, b, w, h0, layout, scale, cfg, interpret, residuals=True):
  """The four forward kernels. Returns `(o, final)` and the residuals the backward reads (`residuals=False`: the
  forward alone, without the ones only the backward reads; then the second item is not a full `Residuals`)."""
  kw = dict(cfg=cfg, interpret=interpret)
  shape = ChunkShape.of(q, v)
  diag = forward.diag_fwd(shape, q, k, g, b, **kw)
  rdt = cfg.residual_dtype(v.dtype)
  terms = forward.chunk_fwd(shape, q, k, b, v, w, diag, scale=scale, rdt=rdt, with_a=residuals, **kw)
  state = forward.state_fwd(shape, terms, h0, layout, rdt=rdt, **kw)
  o = forward.out_fwd(shape, terms, state, o_dtype=v.dtype, **kw)
  final = state.final
  if layout is not None:
    final = jnp.where(_has_chunks(layout, h0.shape[0])[:, None, None, None], final, h0)
  return (o, final), Residuals(q, k, v, g, b, w, h0, layout, diag.sums, terms._replace(u=None),
                               state._replace(final=None))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _chunk_gdn2(q, k, v, g, b, w, h0, layout, scale, cfg, interpret):
  return _forward(q, k, v, g, b, w, h0, layout, scale, cfg, interpret, residuals=False)[0]


def _fwd(q, k, v, g, b, w, h0, layout, scale, cfg, interpret):
  return _forward(q, k, v, g, b, w, h0, layout, scale, cfg, interpret)


def _group_sum(x, H):
  """`[B, HV, ...]` per value head -> `[B, H, ...]` per qk head (value head h serves qk head h // (HV / H))."""
  B, HV = x.shape[:2]
  return x if HV == H else x.reshape((B, H, HV // H) + x.shape[2:]).sum(axis=2)


def _bwd(scale, cfg, interpret, res: Residuals, cts):
  q, k, v, g, b, w, h0, layout = res[:8]
  do, dfinal = cts
  shape = ChunkShape.of(q, v)
  kw = dict(cfg=cfg, interpret=interpret)
  do = jnp.zeros(v.shape, v.dtype) if do is None else do
  dfinal = jnp.zeros(h0.shape, jnp.float32) if dfinal is None else dfinal.astype(jnp.float32)
  state_ct = backward.state_bwd(shape, res.terms, do, dfinal, layout, **kw)
  dh0 = state_ct.dh0
  if layout is not None:
    dh0 = jnp.where(_has_chunks(layout, h0.shape[0])[:, None, None, None], dh0, dfinal)
  contract_ct = backward.contract(shape, res.terms, res.state, state_ct, do, v, w, **kw)
  # Per qk head from here: the value heads of a group share q, k, g, b.
  contract_ct = contract_ct._replace(**{n: _group_sum(getattr(contract_ct, n), shape.H) for n in
                                        ("dqg", "dk_state", "dy", "ddecay", "dp_full", "da_from_u")})
  wy_ct = backward.wy_bwd(shape, k, res.sums, b, res.terms, contract_ct, **kw)
  diag_ct = backward.diag_bwd(shape, q, k, g, b, wy_ct, contract_ct.dp_full, scale=scale, **kw)
  dq, dk, db, dg = backward.pairs_bwd(shape, q, k, res.sums, b, wy_ct, contract_ct, diag_ct, scale=scale, **kw)
  dv, dw = contract_ct.dv, contract_ct.dw
  grads = tuple(d.astype(x.dtype) for d, x in zip((dq, dk, dv, dg, db, dw, dh0), (q, k, v, g, b, w, h0)))
  return grads + (None,)


_chunk_gdn2.defvjp(_fwd, _bwd)


def chunk_gdn2(q: Array, k: Array, v: Array, g: Array, b: Array, w: Array, initial_state: Array, *,
               scale: float, layout: Optional[tuple[Array, Array, Array]] = None,
               config: ChunkConfig = ChunkConfig(), interpret: bool = False) -> tuple[Array, Array]:
  """GDN-2 chunkwise WY forward with a gate-aware backward, on Pallas Triton kernels.

  Per value head, `S_t = (I - k_t (b_t * k_t)^T) Diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T`, `o_t = scale S_t^T q_t`.

  Args:
    q, k, g, b: `[B, T, H, K]` (g float32, log-decay <= 0); v, w: `[B, T, HV, V]`. T a multiple of 64, K and V
      powers of two >= 16, H divides HV. bf16 or float32 (g float32); the kernels compute in float32.
    initial_state: `[N, HV, K, V]` float32 (N = B, or the number of packed sequences with `layout`).
    scale: output scale.
    layout: packed sequences in chunk-aligned layout (B = 1): `(seq, reset, last)`, each `[T / 64]` int32: the
      sequence of each chunk (N for unused chunks), 1 where a chunk starts / ends its sequence.
    config: kernel settings (`ChunkConfig`).
    interpret: run the kernels in Pallas interpret mode (CPU).
  Returns:
    `(o [B, T, HV, V]` in v's dtype, `final_state [N, HV, K, V]` float32).
  Differentiable in q, k, v, g, b, w and initial_state, with cotangents on both outputs.
  """
  _check(q, k, v, g, b, w, initial_state, layout)
  if layout is not None:
    layout = Layout(*(jnp.asarray(x, jnp.int32) for x in layout))
  return _chunk_gdn2(q, k, v, g.astype(jnp.float32), b, w, initial_state.astype(jnp.float32), layout, float(scale),
                     config, bool(interpret))
