"""Initialisers with logical sharding names, shared by every layer.

Logical axis names (mapped to mesh axes by the training code): "vocab", "embed", "mlp", "heads" (a projection's
flattened head * dim axis), "conv" (short-conv taps), "kv" (low-rank bottleneck of the decay and output gates), None.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Names = tuple[Optional[str], ...]


def partitioned(init, names: Sequence[Optional[str]]):
  """Attaches logical axis names to an initialiser (no eager sharding: models build without a mesh)."""
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def xavier_uniform(gain: float):
  """Xavier/Glorot uniform with a gain: `U(-a, a)`, `a = gain * sqrt(6 / (fan_in + fan_out))`."""
  return jax.nn.initializers.variance_scaling(gain * gain, "fan_avg", "uniform")


def torch_linear_default(scale: float = 1.0):
  """PyTorch's `nn.Linear` default (`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`), times `scale`."""
  def init(key, shape, dtype=jnp.float32):
    bound = scale / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


# NVIDIA's GDN-2 layer initialises every Linear with Xavier-uniform at gain 2^-2.5 and zero biases.
GDN2_GAIN = 2.0 ** -2.5


def linear(in_features: int, out_features: int, names: Names, *, rngs: nnx.Rngs, init=None, use_bias: bool = False,
           dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Linear:
  """`nnx.Linear` (kernel `[in, out]`) with logical names on the kernel (and on the bias: `names[1]`)."""
  init = xavier_uniform(GDN2_GAIN) if init is None else init
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=partitioned(init, names),
                    bias_init=partitioned(jax.nn.initializers.zeros, (names[1],)), rngs=rngs)
