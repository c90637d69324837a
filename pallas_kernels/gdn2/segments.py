"""Segment sums of the log-decay per 16-token sub-block: what `diag_fwd` writes once for the chunk-level kernels.

Every decay factor of the chunk kernels is the exponential of a sum of log-decays over a token range that lies in
the row's past (so every factor is <= 1). Between sub-blocks those ranges are unions of three pieces: from a row's
sub-block start to the row (`loc`), from after a row to its sub-block end (`rev`), and whole sub-blocks (`tot`).
Each is a sum of same-signed terms taken directly over its range, never a difference of two cumulative sums, so
g = -1e3 next to g = -1e-4 keeps full relative accuracy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

SUB = 16


class SubBlockSums(NamedTuple):
  """`loc, rev [B, T, H, K]` and `tot [B, T / 16, H, K]`, float32."""
  loc: jax.Array
  rev: jax.Array
  tot: jax.Array


def sub_block_sums(g: jax.Array) -> SubBlockSums:
  """`g [B, T, H, K]` float32 (T a multiple of 16) -> the sub-block segment sums, by XLA: the reference the kernels'
  own sums (`forward.diag_fwd`) are tested against.

  `loc[t] = sum_{s <= m <= t} g[m]`, `rev[t] = sum_{t < m <= e} g[m]` for the sub-block `[s, e]` holding t, and
  `tot[i] = sum over sub-block i`.
  """
  B, T, H, K = g.shape
  gs = g.astype(jnp.float32).reshape(B, T // SUB, SUB, H, K)
  loc = lax.cumsum(gs, axis=2)
  after = jnp.concatenate([gs[:, :, 1:], jnp.zeros_like(gs[:, :, :1])], axis=2)  # g of the next row, 0 at the end
  rev = lax.cumsum(after, axis=2, reverse=True)
  return SubBlockSums(loc.reshape(B, T, H, K), rev.reshape(B, T, H, K), loc[:, :, -1])
