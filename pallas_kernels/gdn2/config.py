"""Static settings of the GDN-2 chunk kernels."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

CHUNK = 64  # tokens per chunk (fixed: the kernels work on four sub-blocks of 16)


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
  """Kernel settings. Hashable: it is a static argument of the custom_vjp.

  Attributes:
    precision: 'tf32' (tensor cores, float32 accumulation; about 2e-4 relative error per product) or 'ieee'
      (exact float32 products on CUDA cores, 10-50x slower). Interpret mode on a CPU is exact float32 either way;
      'tf32_emulated' (interpret mode only) cuts every operand to TF32 first, as the GPU does, so that CPU tests see
      the GPU kernels' rounding. Products whose operands are bf16 residuals are bf16 products with float32
      accumulation whatever this says.
    residuals: dtype of the per-chunk intermediates the passes over chunks and the backward read (`Y`, `qg`, `ks`,
      `U`, `R`, `P`, the entering states, `dR`, the states' cotangents): 'input' keeps them in the dtype of `v`
      when that is bf16 or float16 (as fla keeps its per-chunk states) and in float32 otherwise; 'float32' always
      in float32. The inverse `A`, gate sums, gradients and the carried state stay float32.
    gate_sum_terms: TF32-exact parts a float32 operand is split into for the exact 0/1 products (the compact
      block expansion, the reverse segment sum of the gate gradient): 2: ~5e-7 relative error, 3: ~1e-7.
    block_k: key tile of the forward kernels and of contract, wy_bwd and diag_bwd (tiles `[16, block_k]`).
    block_k_bwd: key tile of pairs_bwd, which holds the most tiles at once.
    block_k_diag: key tile of the in-sub-block kernels (diag_fwd, diag_bwd); 0: `block_k`.
    unroll_diag: unroll the 15-step row loops of the in-sub-block kernels (static slices, independent steps
      scheduled together).
    block_v: value tile of the output kernel and of the value-axis loops.
    block_v_state: value tile of the passes over chunks (state tile `[K, block_v_state]` in registers); 0 picks
      64 when that gives at least 256 programs (B * HV * V / 64), else 32: the passes are sequential over chunks,
      so with few sequences more, smaller programs keep more multiprocessors busy (a guess to be measured).
    num_warps_*: warps per program of each kernel (diag: diag_fwd and diag_bwd; chunk: chunk_fwd and wy_bwd).
    num_stages: Triton software pipelining depth of the parallel kernels.
    num_stages_state: pipelining depth of the passes over chunks (0: `num_stages`); loads of the next chunk can
      overlap the current one's products there.
  """

  precision: str = "tf32"
  residuals: str = "input"
  gate_sum_terms: int = 2
  block_k: int = 16
  block_k_bwd: int = 16
  block_k_diag: int = 0
  unroll_diag: bool = False
  block_v: int = 64
  block_v_state: int = 0
  num_warps_diag: int = 2
  num_warps_chunk: int = 4
  num_warps_state: int = 4
  num_warps_out: int = 4
  num_warps_contract: int = 4
  num_warps_pairs_bwd: int = 4
  num_stages: int = 1
  num_stages_state: int = 0

  def state_block_v(self, B: int, HV: int, V: int) -> int:
    if self.block_v_state:
      return min(self.block_v_state, V)
    return min(64 if B * HV * max(V // 64, 1) >= 256 else 32, V)

  def diag_block_k(self, K: int) -> int:
    return min(self.block_k_diag or self.block_k, K)

  def state_stages(self) -> int:
    return self.num_stages_state or self.num_stages

  def residual_dtype(self, input_dtype) -> jnp.dtype:
    if self.residuals == "float32":
      return jnp.dtype(jnp.float32)
    if self.residuals != "input":
      raise ValueError(f"`residuals` is {self.residuals!r}; expected 'input' or 'float32'.")
    dt = jnp.dtype(input_dtype)
    return dt if dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else jnp.dtype(jnp.float32)

  def dot_precision(self):
    if self.precision == "tf32":
      return lax.Precision.DEFAULT
    if self.precision == "ieee":
      return lax.Precision.HIGHEST
    if self.precision == "tf32_emulated":
      from pallas_kernels.gdn2.tiles import EMULATE_TF32
      return EMULATE_TF32
    raise ValueError(f"`precision` is {self.precision!r}; expected 'tf32', 'ieee' or 'tf32_emulated'.")
