"""Context parallelism: one long sequence split over the devices of a `context` mesh axis (chunk path or Pallas).

Each of the P devices of the axis holds T / P consecutive tokens of every sequence. The recurrence is affine in the
state, so a shard's effect on any state entering it is `S -> M_p S + c_p` (`gdn2_jax/ops/transition.py`):

  1. every shard runs its tokens from a zero state and forms `(M_p, c_p)` and its output correction `q_eff` in the
     same chunk pass (its outputs are `o_p + q_eff S_in`);
  2. the shards all-gather the `(M_p, c_p)`: P x HV x (K*K + K*V) numbers per batch row, whatever T;
  3. each shard composes its entering state `S_in,p = M_{p-1} (... (M_0 S_0 + c_0) ...) + c_{p-1}` from the initial
     state `S_0` (zeros, or `initial_state`), corrects its outputs, and the final state is the composition of all P.

The backward (`enter_states`' own VJP) is the same in reverse: each shard's outputs give it `dS_in,p = q_eff^T do`;
the shards all-gather these (P x HV x K*V numbers per batch row, less than the forward's), and every shard runs the
reverse recurrence `dS_p = dS_in,p + M_p^T dS_{p+1}` from the final state's cotangent with the forward's gathered
`M`, which carries dS from later shards to earlier ones and gives its own `(dM_p, dc_p)` and `dS_0`. (Left to JAX's
transpose, the gathered `[P + 1]` states' cotangent would be all-reduced instead: (P + 1) x K*V numbers, more than
the forward's P x (K*K + K*V) when V > P K.) Document starts (`cu_seqlens`, or
`segment_ids` for any batch layout) are total forgets inside a shard (`M_p` is 0 from there), so documents may
straddle shard boundaries. Batch rows split over the batch axes and heads over the head axis as in
`gdn2_jax/mesh.py`; the recurrence never mixes them, so the only communication is step 2.

On the Pallas kernels (`backend='pallas'`, or 'auto' on a CUDA GPU) step 1 is one call of the kernels on widened
value columns `[v | 0]` from the state `[0 | I]` (`pallas_span`): the run from a zero state, `(M_p, c_p)` and
`q_eff` at once, with the kernels' own backward for every gradient; steps 2 and 3 are as on the chunk path.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gdn2_jax import mesh as mesh_lib
from gdn2_jax.ops import api, chunk, common, settings, transition

Array = jax.Array


# The `backend` values a context split takes ('auto': the Pallas kernels where they run natively and the chunk
# size allows, else the chunk path, as for the unsplit op).
SPLIT_BACKENDS = ("auto", "chunk", "pallas")


def _pallas_chunk() -> int:
  from pallas_kernels.gdn2.config import CHUNK
  return CHUNK


def split_backend(backend: str, chunk_size: Optional[int]) -> str:
  """'chunk' or 'pallas': what a split with `backend` (one of `SPLIT_BACKENDS`) runs on this platform."""
  if backend != "auto":
    return backend
  from gdn2_jax.ops import pallas_backend
  return "pallas" if pallas_backend.available() and chunk_size in (None, _pallas_chunk()) else "chunk"


def split_chunk_size(backend: str, chunk_size: Optional[int]) -> int:
  """The chunk length a split with `backend` and `chunk_size` (None: the default) runs with: shards hold whole ones."""
  if split_backend(backend, chunk_size) == "pallas":
    return _pallas_chunk()
  return chunk.DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size


def _axes_that_split(mesh, axes: Sequence[str], size: int) -> Optional[object]:
  """The mesh axes of `axes` (those present, of size > 1) as a PartitionSpec entry if they divide `size`."""
  axes = [a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1]
  if not axes or size % math.prod(mesh.shape[a] for a in axes):
    return None
  return axes[0] if len(axes) == 1 else tuple(axes)


def check_split(T: int, num_shards: int, chunk_size: int, axis: str) -> int:
  """The tokens per shard, or a one-line error when `T` does not split into `num_shards` runs of whole chunks."""
  if T % (num_shards * chunk_size):
    raise ValueError(f"`q` has T={T} tokens, which do not split into {num_shards} shards of whole {chunk_size}-token "
                     f"chunks over mesh axis {axis!r} (size {num_shards}); use T a multiple of "
                     f"{num_shards * chunk_size}, or a smaller `chunk_size` (a multiple of 16).")
  return T // num_shards


def _entering_states(M: Array, c: Array, S0: Array, precision) -> Array:
  """States entering each of the P shards, then the final one: `[P + 1, ...]`; `M [P, ..., K, K]`, `c [P, ..., K, V]`.

  P small matrix products in sequence: P is a mesh-axis size (<= a few hundred), and each product is K x K x V.
  """
  states = [S0]
  for p in range(M.shape[0]):
    states.append(transition.apply_transition(M[p], c[p], states[-1], precision))
  return jnp.stack(states)


def _gathered_states(M: Array, c: Array, S0: Array, axis: str, precision):
  Mg = jax.lax.all_gather(M, axis, to="invarying")  # the same on every shard: so is the final state composed
  cg = jax.lax.all_gather(c, axis, to="invarying")
  states = _entering_states(Mg, cg, S0, precision)
  S_in = jax.lax.dynamic_index_in_dim(states, jax.lax.axis_index(axis), keepdims=False)
  return (S_in, states[-1]), (Mg, states)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def enter_states(M: Array, c: Array, S0: Array, axis: str, precision) -> tuple[Array, Array]:
  """The state entering this shard and the final state, from every shard's transition (inside `shard_map`).

  Args:
    M: `[B, HV, K, K]`, c: `[B, HV, K, V]` this shard's transition `S -> M S + c`.
    S0: `[B, HV, K, V]` the state entering the sequence (the same on every shard of `axis`).
    axis: the context mesh axis (size P); precision: of the products.
  Returns:
    `(S_in [B, HV, K, V]` this shard's, `final [B, HV, K, V]` the same on every shard`)`.
  Communication: an all-gather of `(M, c)` forward, of the entering states' cotangents backward (module docstring).
  """
  return _gathered_states(M, c, S0, axis, precision)[0]


def _enter_fwd(M, c, S0, axis, precision):
  return _gathered_states(M, c, S0, axis, precision)


def _enter_bwd(axis, precision, residuals, cotangents):
  Mg, states = residuals
  dS_in, dS_final = cotangents
  dG = jax.lax.all_gather(dS_in, axis, to="invarying")  # [P, ...]: every shard's own dS_in
  d = dS_final.astype(states.dtype)
  after = [d]  # the cotangent of the state leaving shard p, for p = P - 1, ..., 0
  for p in reversed(range(Mg.shape[0])):
    d = dG[p] + jnp.einsum("...ij,...iv->...jv", Mg[p], d, precision=precision)
    after.append(d)
  dS0 = after.pop()
  idx = jax.lax.axis_index(axis)
  d_own = jax.lax.dynamic_index_in_dim(jnp.stack(after[::-1]), idx, keepdims=False)
  S_own = jax.lax.dynamic_index_in_dim(states, idx, keepdims=False)
  dM = jnp.einsum("...iv,...jv->...ij", d_own, S_own, precision=precision)
  return dM, d_own, dS0


enter_states.defvjp(_enter_fwd, _enter_bwd)


def shard_starts(axis: str, shape: tuple[int, int], *, segment_ids: Optional[Array] = None,
                 cu_seqlens: Optional[Array] = None) -> Optional[Array]:
  """`[B, T/P]` bool, True at the document starts inside this shard (never at the sequence's first token), or None.

  Formed on the shard, so no `[T]` array is ever gathered: `segment_ids [B, T/P]` (this shard's) needs only the
  previous shard's last id (one `ppermute` of B numbers); `cu_seqlens [N + 1]` (replicated) needs none.
  """
  B, Tl = shape
  idx = jax.lax.axis_index(axis)
  if segment_ids is not None:
    P_ = jax.lax.axis_size(axis)
    prev_last = jax.lax.ppermute(segment_ids[:, -1:], axis, perm=[(p, p + 1) for p in range(P_ - 1)])
    prev = jnp.concatenate([prev_last, segment_ids[:, :-1]], axis=1)
    starts = segment_ids != prev
    # The first token of the sequence: the state entering it is `initial_state`, not a reset.
    return starts.at[:, 0].set(starts[:, 0] & (idx > 0))
  if cu_seqlens is not None:
    cu = jnp.asarray(cu_seqlens).astype(jnp.int32)[:-1]
    pos = cu - idx * Tl
    pos = jnp.where((cu > 0) & (pos >= 0) & (pos < Tl), pos, Tl)  # others land out of range and are dropped
    starts = jnp.zeros((Tl,), bool).at[pos].set(True, mode="drop")
    return jnp.broadcast_to(starts[None], (B, Tl))
  return None


def context_shard(q, k, v, g, b, w, S0, segment_ids=None, cu_seqlens=None, *, axis: str, scale: float,
                  chunk_size: int, precision):
  """The per-shard body, inside `shard_map` over `axis` (and the batch and head axes).

  Args:
    q, k, g, b: `[B, T/P, H, K]` this shard's tokens; v, w: `[B, T/P, HV, V]`.
    S0: `[B, HV, K, V]` the state entering the whole sequence (the same on every shard of `axis`).
    segment_ids: `[B, T/P]` this shard's document ids, or cu_seqlens: `[N + 1]` global offsets, or neither.
  Returns:
    `(o [B, T/P, HV, V], final [B, HV, K, V])`, `final` the state after the whole sequence (the same on every shard).
  """
  resets = shard_starts(axis, q.shape[:2], segment_ids=segment_ids, cu_seqlens=cu_seqlens)
  vma = tuple(jax.typeof(q).mat.varying)  # the axes this shard's tokens vary over
  r = transition.span_forward(q, k, v, g, b, w, scale=scale, resets=resets, chunk_size=chunk_size,
                              precision=precision, state_vma=vma)
  return enter_and_correct(r, S0, axis, precision)


def enter_and_correct(span: transition.SpanResult, S0: Array, axis: str, precision) -> tuple[Array, Array]:
  """Step 2 and 3 for one shard's `span` (inside `shard_map`): the exchange of the transitions (`enter_states`), then
  its outputs corrected for the state entering it, `o + q_eff S_in`, in the transition's dtype.

  The only communication (besides the previous shard's last document id): every shard's transition, P x
  (K*K + K*V) per batch row and value head forward, P x K*V backward. Returns `(o, final)`.
  """
  S_in, final = enter_states(span.M, span.c, S0.astype(span.c.dtype), axis, precision)
  dt = span.c.dtype
  o = span.o.astype(dt) + jnp.einsum("btnk,bnkv->btnv", span.q_eff.astype(dt), S_in, precision=precision)
  return o, final


def pallas_span(q, k, v, g, b, w, *, scale: float, kernel_options: dict) -> transition.SpanResult:
  """One shard's run from a zero state, its transition and its output correction, in one call of the Pallas op.

  The value columns are widened to `[v | 0]` (K zero columns, `w` likewise) and the state entering the shard to
  `[0 | I]`: the recurrence is linear in the state, so the first V columns are the run from a zero state (its
  outputs `o` and exit state `c`) and the last K carry the identity through the shard (exit state `M`, outputs
  `q_eff`, with `o = o_zero + q_eff S_in` for any entering state). The qk-dependent work (pair products, the WY
  inverse) is done once for both; `pallas_fwd` pads V + K to a power of two where needed.

  Args: `q, k, g, b [B, T/P, H, K]`, `v, w [B, T/P, HV, V]` (g with the document starts marked).
  Returns: `SpanResult` (`o [B, T/P, HV, V]` and `q_eff [B, T/P, HV, K]` in v's dtype, `M [B, HV, K, K]`,
  `c [B, HV, K, V]` float32).
  """
  from gdn2_jax.ops import pallas_backend

  V = v.shape[-1]
  v_aug, w_aug, h0 = transition.augmented(v, w, k.shape[-1], jnp.float32)
  o, final = pallas_backend.pallas_fwd(q, k, v_aug, g, b, w_aug, scale=scale, initial_state=h0, **kernel_options)
  return transition.SpanResult(o=o[..., :V], q_eff=o[..., V:], M=final[..., V:], c=final[..., :V])


def _split_pallas(args, names, *, mesh, axis, tok, state, scale, precision, kernel_options):
  """`(o, final)` of the Pallas split, in two `shard_map`s: the kernels per shard (`pallas_span`: the run from a
  zero state, the transition and the output correction in one op call), then the exchange and the correction
  (`enter_and_correct`, as `context_shard` on the chunk path). The kernels' `pallas_call` does not carry
  vma types, so the first `shard_map` runs unchecked, which is exact because every input that carries a gradient is
  split along `axis` (and its results along the batch and head axes); the exchange runs checked."""
  q, k, v, g, b, w, S0 = args[:7]
  extra = dict(zip(names, args[7:]))
  per_shard = P(axis, *state)
  specs = (tok,) * 6 + tuple(P(tok[0], axis) if n == "segment_ids" else P(None) for n in names)

  def kernels(q, k, v, g, b, w, *rest):
    resets = shard_starts(axis, k.shape[:2], **dict(zip(names, rest)))
    r = pallas_span(q, k, v, transition.mark_resets(g, resets), b, w, scale=scale, kernel_options=kernel_options)
    return r.o, r.q_eff, r.M[None], r.c[None]

  o, q_eff, M, c = jax.shard_map(kernels, mesh=mesh, in_specs=specs, out_specs=(tok, tok, per_shard, per_shard),
                                 check_vma=False)(q, k, v, g, b, w, *extra.values())

  def exchange(o, q_eff, M, c, S0):
    return enter_and_correct(transition.SpanResult(o, q_eff, M[0], c[0]), S0, axis, precision)

  return jax.shard_map(exchange, mesh=mesh, in_specs=(tok, tok, per_shard, per_shard, state),
                       out_specs=(tok, state))(o, q_eff, M, c, S0)


def gdn2_context(q: Array, k: Array, v: Array, g: Array, b: Array, w: Array, *,
                 mesh=None,
                 context_axis: str = mesh_lib.CONTEXT_AXIS,
                 batch_axes: Sequence[str] = mesh_lib.BATCH_AXES,
                 head_axis: Optional[str] = mesh_lib.HEAD_AXIS,
                 scale: Optional[float] = None,
                 initial_state: Optional[Array] = None,
                 output_final_state: bool = False,
                 use_qk_l2norm: bool = False,
                 cu_seqlens: Optional[Array] = None,
                 segment_ids: Optional[Array] = None,
                 A_log: Optional[Array] = None,
                 dt_bias: Optional[Array] = None,
                 lower_bound: Optional[float] = None,
                 chunk_size: Optional[int] = None,
                 precision=None,
                 backend: str = "chunk",
                 interpret: bool = False,
                 config=None) -> tuple[Array, Optional[Array]]:
  """`gdn2` with the sequence split over the mesh axis `context_axis`: each device holds T / P tokens.

  Same arguments and results as `gdn2_jax.gdn2` (`backend` one of `SPLIT_BACKENDS`: 'chunk', or 'pallas' whose
  kernels take `interpret` and `config`, or 'auto'), plus:
    mesh: the device mesh (None: the ambient one of `jax.set_mesh`). Batch rows split over `batch_axes` and heads
      over `head_axis` where those axes exist and divide the sizes; T over `context_axis` (size P), and
      `T / P` must be a multiple of `chunk_size` (default 64).
    segment_ids: `[B, T]` int document ids of packed rows (any batch size): a new document starts wherever the id
      changes. `initial_state` then enters each row's first document and the final state is the row's last one's.
    cu_seqlens: `[N + 1]` packed offsets (B = 1) as in `gdn2`, for training: without per-sequence initial or
      final states (use `segment_ids` to have them per row).

  Returns:
    `(o [B, T, HV, V]` in the dtype of `v`, `final_state [B, HV, K, V]` float32 or None`)`.
  """
  dims = common.validate(q, k, v, g, b, w, initial_state=initial_state, cu_seqlens=cu_seqlens, A_log=A_log,
                         dt_bias=dt_bias, lower_bound=lower_bound)
  if cu_seqlens is not None and (initial_state is not None or output_final_state):
    raise ValueError("`cu_seqlens` with per-sequence `initial_state` or `output_final_state` is not supported with "
                     "a context split; pass `segment_ids [B, T]` for per-row states instead.")
  if cu_seqlens is not None and segment_ids is not None:
    raise ValueError("pass one of `cu_seqlens` and `segment_ids`, not both.")
  if segment_ids is not None and tuple(segment_ids.shape) != (dims.B, dims.T):
    raise ValueError(f"`segment_ids` has shape {tuple(segment_ids.shape)}; expected ({dims.B}, {dims.T}) ([B, T]).")
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty or context_axis not in mesh.axis_names:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)} have no context axis {context_axis!r}; add it to the mesh "
                     "or call `gdn2` for an unsplit sequence.")
  num_shards = mesh.shape[context_axis]
  precision = settings.canonical_precision(precision)  # a name, or jax's Precision values mapped onto one
  if backend not in SPLIT_BACKENDS:
    raise ValueError(f"`backend` is {backend!r}; a context split (mesh axis {context_axis!r}) runs one of "
                     f"{SPLIT_BACKENDS}.")
  backend = split_backend(backend, chunk_size)
  C = split_chunk_size(backend, chunk_size)
  if C % chunk.SUB_BLOCK:
    raise ValueError(f"`chunk_size` is {C}; expected a multiple of {chunk.SUB_BLOCK}.")
  if backend == "pallas":
    from gdn2_jax.ops import pallas_backend
    why = pallas_backend.reject(dims, settings.BackendChoice("pallas", precision=precision, chunk_size=chunk_size,
                                                             interpret=interpret or None))
    if why is not None:
      raise ValueError(f"backend 'pallas' cannot take this context split: {why}; or use backend 'chunk'.")
  check_split(dims.T, num_shards, C, context_axis)
  # The transitions and the corrections run the chunk path's products: exact float32 unless 'tf32' is asked for.
  lax_precision = settings.lax_precision(None if precision == "tf32_emulated" else precision, default="ieee")

  if scale is None:
    scale = dims.K ** -0.5
  if A_log is not None:
    g = common.activate_log_decay(g, A_log, dt_bias, lower_bound)
  else:
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
  if use_qk_l2norm:
    q, k = common.l2_normalize(q), common.l2_normalize(k)
  S0 = jnp.zeros((dims.B, dims.HV, dims.K, dims.V), jnp.float32) if initial_state is None else initial_state
  S0 = S0.astype(jnp.promote_types(S0.dtype, jnp.float32))
  batch = _axes_that_split(mesh, batch_axes, dims.B)
  head = _axes_that_split(mesh, [head_axis] if head_axis else [], math.gcd(dims.H, dims.HV))
  tok = P(batch, context_axis, head, None)
  state = P(batch, head, None, None)
  body = functools.partial(context_shard, axis=context_axis, scale=float(scale), chunk_size=C,
                           precision=lax_precision)
  args, specs, names = (q, k, v, g, b, w, S0), (tok,) * 6 + (state,), ()
  if segment_ids is not None:  # split like the tokens
    args, specs, names = args + (jnp.asarray(segment_ids),), specs + (P(batch, context_axis),), ("segment_ids",)
  elif cu_seqlens is not None:  # replicated
    args, specs, names = args + (jnp.asarray(cu_seqlens),), specs + (P(None),), ("cu_seqlens",)

  def fn(*arrays):
    return body(*arrays[:7], **dict(zip(names, arrays[7:])))

  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):  # explicit axes: place inputs as split
    args = tuple(jax.sharding.reshard(a, jax.sharding.NamedSharding(mesh, s)) for a, s in zip(args, specs))
  if backend == "pallas":
    o, final = _split_pallas(args, names, mesh=mesh, axis=context_axis, tok=tok, state=state, scale=float(scale),
                             precision=lax_precision,
                             kernel_options=dict(interpret=bool(interpret), config=config, precision=precision))
  else:
    o, final = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=(tok, state))(*args)
  o = o.astype(v.dtype)
  return o, (final.astype(jnp.float32) if output_final_state else None)


def call_split(fn, *args, mesh, batch_axes: Sequence[str], head_axis: Optional[str], context_axis: str, **kwargs):
  """`fn(*args, **kwargs)` (`gdn2_jax.gdn2`) with the sequence split over `context_axis`; see `gdn2_context`.

  What `gdn2_jax.parallel.call_mixer_op` calls when its mixer mesh has a context axis of size > 1, and `gdn2` under
  `jax.set_mesh` with one (`mesh=None`: the ambient mesh). `backend` (a name or a `gdn2_jax.backend(...)` choice)
  must be one of `SPLIT_BACKENDS`.
  """
  if fn is not api.gdn2:
    raise ValueError(f"a context split (mesh axis {context_axis!r}) runs `gdn2` only; got "
                     f"{getattr(fn, '__name__', fn)} (call `gdn2` with its gates, or use a mesh without "
                     f"{context_axis!r}).")
  backend = kwargs.pop("backend", "auto")
  choice = backend if isinstance(backend, settings.BackendChoice) else settings.BackendChoice(backend)
  choice = settings.merge(choice, config=kwargs.pop("config", None), precision=kwargs.pop("precision", None),
                          chunk_size=kwargs.pop("chunk_size", None), interpret=kwargs.pop("interpret", None) or None)
  if choice.name not in SPLIT_BACKENDS:
    raise ValueError(f"`backend` is {choice.name!r}; a context split (mesh axis {context_axis!r}) runs one of "
                     f"{SPLIT_BACKENDS}: use one of those, or a mesh without {context_axis!r}.")
  if choice.config is not None and split_backend(choice.name, choice.chunk_size) != "pallas":
    raise ValueError(f"`config` is a {type(choice.config).__name__} but this context split runs the chunk path "
                     "(backend 'chunk', or 'auto' without native Pallas kernels), which takes none; drop it.")
  kwargs.update(backend=choice.name, config=choice.config, precision=choice.precision, chunk_size=choice.chunk_size,
                interpret=bool(choice.interpret))
  # The ambient mesh (under `jax.set_mesh`) carries the axis types shard_map must use.
  ambient = jax.sharding.get_abstract_mesh()
  if mesh is None or (not ambient.empty and ambient.shape == mesh.shape):
    mesh = ambient
  return gdn2_context(*args, mesh=mesh, batch_axes=batch_axes, head_axis=head_axis, context_axis=context_axis,
                      **kwargs)
