"""SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.layers.init import linear, torch_linear_default


class SwiGLU(nnx.Module):
  """`[B, T, D] -> [B, T, D]` through a hidden width `hidden`. No biases.

  Names follow NVIDIA's lit_gpt SwiGLU: `w1` (gate, SiLU), `w2` (up), `w3` (down). Init as NVIDIA's `mamba_init`:
  PyTorch's Linear default, the output projection scaled by `1 / sqrt(2 * n_layers)`.
  """

  def __init__(self, dim: int, hidden: int, *, n_layers: int = 1, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.w1 = linear(dim, hidden, ("embed", "mlp"), init=torch_linear_default(), **kw)
    self.w2 = linear(dim, hidden, ("embed", "mlp"), init=torch_linear_default(), **kw)
    self.w3 = linear(hidden, dim, ("mlp", "embed"), init=torch_linear_default((2.0 * n_layers) ** -0.5), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))
