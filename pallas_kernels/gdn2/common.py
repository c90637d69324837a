"""What the forward and backward kernels share: the derived sizes (`ChunkShape`), the packed-sequence layout, the
`pallas_call` launcher and the block specs of the `[B, T, H, D]` inputs and head-major intermediates."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gdn2.config import CHUNK, ChunkConfig
from pallas_kernels.gdn2 import tiles
from pallas_kernels.gdn2.tiles import F32, NSUB

C = CHUNK


class ChunkShape(NamedTuple):
  """The sizes of one `chunk_gdn2` call, derived once from `q [B, T, H, K]` and `v [B, T, HV, V]`: `groups` value
  heads per qk head and `NC` chunks of 64 tokens. Python ints (static under `jit`)."""
  B: int
  T: int
  H: int
  HV: int
  K: int
  V: int
  groups: int
  NC: int

  @classmethod
  def of(cls, q, v) -> "ChunkShape":
    """From `q [B, T, H, K]` and `v [B, T, HV, V]` (arrays or shape structs)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    return cls(B, T, H, HV, K, V, HV // H, T // C)


class Layout(NamedTuple):
  """Packed sequences in chunk-aligned layout (B = 1), each `[NC]` int32: the sequence of each chunk (N for unused
  chunks), and 1 where a chunk starts (`reset`) / ends (`last`) its sequence. `None` stands for unpacked batches."""
  seq: jax.Array
  reset: jax.Array
  last: jax.Array


def call(kernel, *, grid, in_specs, out_specs, out_shape, cfg: ChunkConfig, interpret: bool, name: str):
  """`pl.pallas_call` named `gdn2_<name>`, launched with kernel `name`'s warps and pipelining depth."""
  t = cfg.tiling(name)
  params = plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        compiler_params=params, interpret=interpret, name="gdn2_" + name)


def f32(shape):
  return jax.ShapeDtypeStruct(shape, F32)


def arr(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def tot_spec(K):
  """The four sub-block totals `[4, K]` of a chunk, from `tot [B, T / 16, H, K]`."""
  return pl.BlockSpec((None, NSUB, None, K), lambda b, h, c, *_: (b, c, h, 0))


# Block specs. `qk_*`: the `[B, T, H, D]` inputs; `hm_*`: head-major `[B, H, T, D]` kernel intermediates.

def qk_rows(rows, K, groups=1):
  """Rows of the `[B, T, H, K]` inputs, grid (b, h, chunk-or-sub-block, ...); value head h reads qk head h // groups."""
  return pl.BlockSpec((None, rows, None, K), lambda b, h, c, *_: (b, c, h // groups, 0))


def hm_rows(rows, D, groups=1):
  return pl.BlockSpec((None, None, rows, D), lambda b, h, c, *_: (b, h // groups, c, 0))


def per_chunk_vec(K, groups=1):
  return pl.BlockSpec((None, None, None, K), lambda b, h, c, *_: (b, h // groups, c, 0))


def segment_scan(maps, s0, V):
  """The state entering each segment, `[B, nseg, HV, K, V]`, from the maps `[B, nseg, HV, K, V + K]` and the state
  entering the first, `s0 [B, HV, K, V]`: a scan over segments in float32 (XLA; nseg is small)."""
  offset, M = maps[..., :V], maps[..., V:]

  def step(S, segment):  # S enters segment s; M_s S + offset_s enters segment s + 1
    offset_s, M_s = segment
    nxt = jnp.einsum("bhkj,bhjv->bhkv", M_s, S, precision=lax.Precision.HIGHEST) + offset_s
    return nxt, nxt

  _, after = lax.scan(step, s0, (jnp.moveaxis(offset, 1, 0)[:-1], jnp.moveaxis(M, 1, 0)[:-1]))
  return jnp.concatenate([s0[:, None], jnp.moveaxis(after, 0, 1)], axis=1)


def map_columns(K: int, bv: int, nvb: int):
  """Start of a segment-map kernel (grid axis 2: `nvb` column blocks of c, then M's): `(m_cols, S0)`, `m_cols` 1.0
  on M's column blocks and 0.0 on c's (integer arithmetic: the lowering has no scalar select), `S0 [K, bv]` this
  block of `[0 | I]`."""
  j = pl.program_id(2)
  m_cols = jnp.clip(j - nvb + 1, 0, 1).astype(F32)
  col = tiles.iota((K, bv), 1) + (j - nvb) * bv
  return m_cols, m_cols * tiles.mask(tiles.iota((K, bv), 0) == col)
