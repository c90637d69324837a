"""Static settings of the GDN-2 chunk kernels."""

from __future__ import annotations

import dataclasses

from jax import lax

CHUNK = 64  # tokens per chunk (fixed: the kernels' sub-block loops assume 4 sub-blocks of 16)


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
  """Kernel settings. Hashable: it is a static argument of the custom_vjp.

  Attributes:
    precision: 'tf32' (tensor cores, float32 accumulation; about 2e-4 relative error per product) or 'ieee'
      (exact float32 products on CUDA cores, 10-50x slower). Interpret mode on a CPU is exact float32 either way.
    gate_sum_terms: TF32-exact parts the log-decay is split into for the masked segment sums (2: ~5e-7 relative
      error per exponent, 3: ~1e-7).
    block_v: value-dimension tile of the passes over chunks (the state tile `[K, block_v]` lives in registers).
    block_k: key-dimension tile of the intra-chunk kernels (they loop over K in tiles `[64, block_k]`, so that the
      register file holds them; measured 2026-11-23 on the H100: whole-K `[64, 128]` tiles spilled, 14 ms for the
      intra kernel at B8 T2048 H16).
    keep_intra: keep the forward's intra-chunk outputs (U, Y, qg, ks, P, exp(G_C): about 1.8 KB per token and value
      head at K = V = 128, float32) for the backward instead of recomputing them (the `intra` kernel, 3.8 ms of the
      29.2 ms forward+backward measured at B8 T2048 H16). Off by default: backward memory stays at the inputs plus
      chunk states.
    num_warps_intra, num_warps_bwd, num_warps_contract, num_warps_state, num_stages: Triton launch settings
      (num_stages=1 measured fastest for the passes over chunks: 0.79 vs 1.16 ms forward at B8 T2048 H16).
  """

  precision: str = "tf32"
  gate_sum_terms: int = 2
  block_v: int = 64
  block_k: int = 32
  num_warps_intra: int = 4
  num_warps_bwd: int = 4
  num_warps_contract: int = 4
  num_warps_state: int = 4
  num_stages: int = 1
  keep_intra: bool = False

  def dot_precision(self) -> lax.Precision:
    if self.precision == "tf32":
      return lax.Precision.DEFAULT
    if self.precision == "ieee":
      return lax.Precision.HIGHEST
    raise ValueError(f"`precision` is {self.precision!r}; expected 'tf32' or 'ieee'.")
