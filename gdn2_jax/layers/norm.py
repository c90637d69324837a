"""RMSNorm and the gated RMSNorm of the GDN-2 output (computed in float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.layers.init import partitioned

Array = jax.Array


def rms_normalize(x: Array, eps: float) -> Array:
  """`x / sqrt(mean(x^2) + eps)` over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learned scale (ones at init). `[..., D] -> [..., D]` in `dtype`."""

  def __init__(self, dim: int, *, eps: float = 1e-5, names=("embed",), dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.dtype = dtype
    self.weight = nnx.Param(partitioned(jax.nn.initializers.ones, names)(None, (dim,), param_dtype))

  def __call__(self, x: Array) -> Array:
    return (rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)).astype(self.dtype)


ACTIVATIONS = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}


class GatedRMSNorm(nnx.Module):
  """`rmsnorm(x) * weight * act(gate)` per head: x, gate `[..., HV, V]`, one `[V]` weight shared by the heads.

  `act` is SiLU in NVIDIA's code and the paper, sigmoid in fla's port.
  """

  def __init__(self, dim: int, *, activation: str = "silu", eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    if activation not in ACTIVATIONS:
      raise ValueError(f"`activation` is {activation!r}; expected one of {sorted(ACTIVATIONS)}.")
    self.eps = eps
    self.activation = activation
    self.dtype = dtype
    self.weight = nnx.Param(partitioned(jax.nn.initializers.ones, (None,))(None, (dim,), param_dtype))

  def __call__(self, x: Array, gate: Array) -> Array:
    y = rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
    return (y * ACTIVATIONS[self.activation](gate.astype(jnp.float32))).astype(self.dtype)
