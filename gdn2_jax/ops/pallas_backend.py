"""Adapter from the Pallas kernels (`pallas_kernels`, jax only) to the op API's backend registry: backend "pallas".

The kernels want T a multiple of 64 and K, V powers of two >= 16. This adapter pads (zero keys, values, gates and
log-decay are identity tokens and inert channels: they leave the state and every other output unchanged), lays
packed sequences with per-sequence states out chunk-aligned (`varlen.chunk_layout`, every sequence starts a chunk),
and slices the results back. Gradients flow through the kernels' `custom_vjp`; the padding is plain JAX.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from gdn2_jax.ops import api, varlen
from pallas_kernels.gdn2.config import CHUNK  # the kernels' fixed chunk (one name, defined with the kernels)

Array = jax.Array


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


MAX_HEAD_DIM = 256  # K and V after padding to a power of two: the state tile [K, block_v_state] of one program


def kernel_config(config=None, precision: Optional[str] = None):
  """The `ChunkConfig` the kernels run with: the user's `config` (None: unset), `precision` replacing its own.

  `config is None` means the user set nothing: the kernels' defaults apply (a per-shape choice belongs here).
  """
  from pallas_kernels import ChunkConfig

  cfg = ChunkConfig() if config is None else config
  if not isinstance(cfg, ChunkConfig):
    raise TypeError(f"`config` is a {type(cfg).__name__}; backend 'pallas' expects a pallas_kernels.ChunkConfig.")
  if precision is not None and precision != cfg.precision:
    cfg = dataclasses.replace(cfg, precision=precision)
  return cfg


def reject(dims, choice) -> Optional[str]:
  """Why the kernels cannot take a call (`gdn2_jax.ops.api.Backend.reject`), or None."""
  if choice.chunk_size is not None and choice.chunk_size != CHUNK:
    return f"its kernels use a fixed chunk of {CHUNK} tokens (chunk_size={choice.chunk_size}; pass {CHUNK} or None)"
  if max(_pow2(dims.K), _pow2(dims.V)) > MAX_HEAD_DIM:
    return f"head dims K={dims.K}, V={dims.V} exceed its limit of {MAX_HEAD_DIM} (after padding to a power of two)"
  if choice.precision == "tf32_emulated" and not choice.interpret:
    return "precision 'tf32_emulated' needs interpret=True"
  return None


def pallas_fwd(q: Array, k: Array, v: Array, g: Array, b: Array, w: Array, *, scale: float,
               initial_state: Optional[Array] = None, cu_seqlens: Optional[Array] = None,
               interpret: bool = False, config=None, precision: Optional[str] = None,
               chunk_size: Optional[int] = None) -> tuple[Array, Array]:
  """Canonical-input backend: `q, k, g, b [B, T, H, K]`, `v, w [B, T, HV, V]` -> `(o [B, T, HV, V], S [N, HV, K, V])`.

  `config` (a `ChunkConfig`, None when unset) and `precision` (None or 'tf32' / 'ieee' / 'tf32_emulated') go to the
  kernels; `chunk_size` is 64 or None (checked by `reject`). `o` comes back in v's dtype (float32 for float64
  inputs: the kernels compute in float32).
  """
  from pallas_kernels import chunk_gdn2

  del chunk_size
  cfg = kernel_config(config, precision)

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
  o, final = chunk_gdn2(q, k, v, g, b, w, h0, scale=scale, layout=layout, config=cfg,
                        interpret=interpret)
  o = varlen.unpack(o, lay) if cu_seqlens is not None else o[:, :T]
  return o[..., :V], final[:, :, :K, :V]


api.register_backend(
    api.Backend("pallas", pallas_fwd, available,
                "Pallas (Triton) chunkwise WY kernels, custom_vjp gate-aware backward; CUDA GPUs (sm80+), "
                "or interpret=True on any platform", options=("interpret", "config", "precision", "chunk_size"),
                reject=reject),
    auto_priority=0)
