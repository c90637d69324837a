"""Adapter from the Pallas kernels (`pallas_kernels`, jax only) to the op API's backend registry: backend "pallas".

The kernels want T a multiple of 64 and K, V powers of two >= 16. This adapter pads (zero keys, values, gates and
log-decay are identity tokens and inert channels: they leave the state and every other output unchanged), lays
packed sequences with per-sequence states out chunk-aligned (`varlen.chunk_layout`, every sequence starts a chunk),
and slices the results back. Gradients flow through the kernels' `custom_vjp`; the padding is plain JAX.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from gdn2_jax.ops import api, varlen

Array = jax.Array
CHUNK = 64


def _pow2(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def _pad_last(x: Array, size: int) -> Array:
  extra = size - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


@functools.cache
def available() -> bool:
  """True on CUDA GPUs of compute capability >= 8.0 (Ampere, Hopper): where the Triton lowering runs the kernels."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  if dev.platform != "gpu" or "cuda" not in getattr(dev.client, "platform_version", "cuda").lower():
    return False
  try:
    import pallas_kernels  # noqa: F401
    major = int(str(getattr(dev, "compute_capability", "0")).split(".")[0])
  except (ImportError, ValueError):
    return False
  return major >= 8


def pallas_fwd(q: Array, k: Array, v: Array, g: Array, b: Array, w: Array, *, scale: float,
               initial_state: Optional[Array] = None, cu_seqlens: Optional[Array] = None,
               interpret: bool = False) -> tuple[Array, Array]:
  """Canonical-input backend: `q, k, g, b [B, T, H, K]`, `v, w [B, T, HV, V]` -> `(o [B, T, HV, V], S [N, HV, K, V])`.

  `o` comes back in v's dtype (float32 for float64 inputs: the kernels compute in float32).
  """
  from pallas_kernels import ChunkConfig, chunk_gdn2

  B, T, H, K = q.shape
  HV, V = v.shape[2:]
  Kp, Vp = _pow2(K), _pow2(V)
  narrow = lambda x: x.astype(jnp.float32) if x.dtype == jnp.float64 else x
  q, k, v, b, w = (narrow(x) for x in (q, k, v, b, w))
  g = g.astype(jnp.float32)
  q, k, g, b = (_pad_last(x, Kp) for x in (q, k, g, b))
  v, w = (_pad_last(x, Vp) for x in (v, w))
  N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
  h0 = jnp.zeros((N, HV, K, V), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
  h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
  layout = None
  if cu_seqlens is not None:
    lay = varlen.chunk_layout(cu_seqlens, T, CHUNK)
    q, k, v, g, b, w = (varlen.pack(x, lay) for x in (q, k, v, g, b, w))
    layout = (lay.seq, lay.reset.astype(jnp.int32), lay.last.astype(jnp.int32))
  else:
    pad = -T % CHUNK
    if pad:
      q, k, v, g, b, w = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v, g, b, w))
  o, final = chunk_gdn2(q, k, v, g, b, w, h0, scale=scale, layout=layout, config=ChunkConfig(),
                        interpret=interpret)
  o = varlen.unpack(o, lay) if cu_seqlens is not None else o[:, :T]
  return o[..., :V], final[:, :, :K, :V]


api.register_backend(
    api.Backend("pallas", pallas_fwd, available,
                "Pallas (Triton) chunkwise WY kernels, custom_vjp gate-aware backward; CUDA GPUs (sm80+), "
                "or interpret=True on any platform", options=("interpret",)),
    auto_priority=0)
