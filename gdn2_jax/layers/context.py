"""The layers' token-mixing pieces with the sequence split over the mixer mesh's `context` axis.

Under `gdn2_jax.parallel.mixer_mesh(mesh)` with a context axis of size P > 1, every device holds T / P consecutive
tokens. The GDN-2 op composes shard transitions (`gdn2_jax.ops.context`); the two other pieces that look back
along the sequence need only a fixed number of the previous shard's last tokens, one `ppermute` each:

  - the causal short conv (kernel W): the previous shard's last W - 1 inputs (and their document ids);
  - sliding-window attention (window L): the previous shard's last L - 1 keys and values (and document ids).

Left to XLA, the shifted concatenations of the unsplit code become all-to-alls of whole activations.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gdn2_jax import parallel

Array = jax.Array


def active_split() -> Optional[parallel.MixerMesh]:
  """The installed mixer mesh when it splits the sequence (a context axis of size > 1), else None."""
  ctx = parallel.current_mixer_mesh()
  if ctx is None or ctx.context_axis is None or ctx.mesh.shape[ctx.context_axis] <= 1:
    return None
  return ctx


def _mesh_and_batch(ctx: parallel.MixerMesh, B: int):
  mesh = ctx.mesh
  ambient = jax.sharding.get_abstract_mesh()
  if not ambient.empty and ambient.shape == mesh.shape:
    mesh = ambient  # shard_map must use the ambient mesh's axis types
  axes = [a for a in ctx.batch_axes if mesh.shape[a] > 1]
  batch = None
  if axes and B % math.prod(mesh.shape[a] for a in axes) == 0:
    batch = axes[0] if len(axes) == 1 else tuple(axes)
  return mesh, batch


def _from_previous_shard(x: Array, n: int, axis: str, fill) -> Array:
  """`x[:, -n:]` of the previous shard along `axis` (`fill` on the first shard), one `ppermute`."""
  P_ = jax.lax.axis_size(axis)
  got = jax.lax.ppermute(x[:, -n:], axis, perm=[(p, p + 1) for p in range(P_ - 1)])
  return jnp.where(jax.lax.axis_index(axis) == 0, jnp.asarray(fill, x.dtype), got)


def _check_lookback(need: int, T: int, P_: int, axis: str, what: str) -> None:
  if need > T // P_:
    raise ValueError(f"{what} looks back {need} tokens but each shard of T={T} over mesh axis {axis!r} (size {P_}) "
                     f"holds {T // P_}; use fewer shards, a longer sequence or a shorter {what.split()[0]}.")


def split_causal_conv(conv_fn, x: Array, weight: Array, segment_ids: Optional[Array],
                      ctx: parallel.MixerMesh) -> Array:
  """`conv_fn(x, weight, tail=, segment_ids=, tail_segment_ids=)[0]` per shard of the sequence: `x [B, T, D]`.

  `conv_fn` is `gdn2_jax.layers.conv.causal_depthwise_conv`; returns `y [B, T, D]` float32 as it does.
  """
  B, T, _ = x.shape
  W = weight.shape[1]
  axis = ctx.context_axis
  if W == 1:
    return conv_fn(x, weight, segment_ids=segment_ids)[0]
  mesh, batch = _mesh_and_batch(ctx, B)
  _check_lookback(W - 1, T, mesh.shape[axis], axis, "short conv (kernel {W})".format(W=W))
  tok = P(batch, axis, None)

  def body(x, weight, *seg):
    tail = _from_previous_shard(x, W - 1, axis, 0)  # zeros before the sequence, as the unsplit conv
    if not seg:
      return conv_fn(x, weight, tail=tail)[0]
    ids = seg[0]
    tail_ids = _from_previous_shard(ids, W - 1, axis, -1)
    return conv_fn(x, weight, tail=tail, segment_ids=ids, tail_segment_ids=tail_ids)[0]

  args, specs = (x, weight), (tok, P())
  if segment_ids is not None:
    args, specs = args + (segment_ids,), specs + (P(batch, axis),)
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=tok)(*args)


def split_window_attention(q: Array, k: Array, v: Array, segment_ids: Optional[Array], window: int,
                           ctx: parallel.MixerMesh, implementation: Optional[str] = None) -> Array:
  """Causal sliding-window attention (token i sees j with `i - window < j <= i`, same document) per shard.

  Args:
    q: `[B, T, N, Dh]`; k, v: `[B, T, NKV, Dh]` (RoPE applied); segment_ids: `[B, T]` int or None.
  Returns:
    `[B, T, N, Dh]`, as `jax.nn.dot_product_attention`.
  """
  B, T = q.shape[:2]
  axis = ctx.context_axis
  mesh, batch = _mesh_and_batch(ctx, B)
  L = window - 1  # keys before the shard that a query of the shard can see
  _check_lookback(L, T, mesh.shape[axis], axis, f"sliding-window attention (window {window})")
  tok = P(batch, axis, None, None)

  def body(q, k, v, *seg):
    Tl = q.shape[1]
    first = jax.lax.axis_index(axis) == 0
    if L > 0:
      k = jnp.concatenate([_from_previous_shard(k, L, axis, 0), k], axis=1)
      v = jnp.concatenate([_from_previous_shard(v, L, axis, 0), v], axis=1)
    i = jnp.arange(Tl)[:, None] + L  # query positions among the keys
    j = jnp.arange(Tl + L)[None, :]
    mask = (j <= i) & (i - j < window) & ((j >= L) | ~first)  # the first shard has nothing before it
    mask = mask[None]
    if seg:
      ids = seg[0]
      keys_ids = jnp.concatenate([_from_previous_shard(ids, L, axis, -1), ids], axis=1) if L > 0 else ids
      mask = mask & (ids[:, :, None] == keys_ids[:, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)

  args, specs = (q, k, v), (tok,) * 3
  if segment_ids is not None:
    args, specs = args + (segment_ids,), specs + (P(batch, axis),)
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=tok)(*args)
