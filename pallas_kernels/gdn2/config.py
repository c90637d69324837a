"""Static settings of the GDN-2 chunk kernels."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

CHUNK = 64  # tokens per chunk (fixed: the kernels work on four sub-blocks of 16)

KERNELS = ("diag_fwd", "chunk_fwd", "wy_fwd", "state_fwd", "out_fwd", "state_bwd", "contract", "wy_bwd", "diag_bwd",
           "pairs_bwd")


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Launch settings of one kernel.

  Attributes:
    block_k: key tile (`[rows, block_k]` tiles; rows 16 in the in-sub-block kernels, 64 elsewhere). Unused by the
      passes over chunks, which hold whole `[K, block_v_state]` states.
    num_warps: warps per program.
    num_stages: Triton software pipelining depth (loads of the next loop step overlap the current one's products).
    unroll: unroll the 15-step row loops (in-sub-block kernels only): static slices, steps scheduled together.
  """

  block_k: int = 16
  num_warps: int = 4
  num_stages: int = 1
  unroll: bool = False


# Measured on an H100 at B8 T2048 H16 K=V=128, bf16 (benchmarks/results_ops.md, 2026-12-07): each kernel's fastest
# setting of the ones tried.
DEFAULT_TILINGS = {
    "diag_fwd": Tiling(block_k=32, num_warps=2, unroll=True),
    "chunk_fwd": Tiling(block_k=32),
    "wy_fwd": Tiling(block_k=32),  # not yet timed (`ChunkConfig.split_wy`)
    "state_fwd": Tiling(num_stages=2),
    "out_fwd": Tiling(block_k=16),
    "state_bwd": Tiling(),
    "contract": Tiling(block_k=32),
    "wy_bwd": Tiling(block_k=32),
    "diag_bwd": Tiling(block_k=16, num_warps=2),
    "pairs_bwd": Tiling(block_k=16, num_stages=2),
}


# The automatic segment count of the passes over chunks (`ChunkConfig.segments`). Measured on an H100 (2026-12-07,
# bf16, H16, K=V=128; fwd+bwd ms, segments 1 / auto (at most 256 programs) / 8): B1 T32768 (64 programs) 16.19 /
# 15.75 (4) / 15.87; B2 T8192 (128 programs) 7.93 / 8.51 (2) / 8.61; B8 T2048 (256 programs) 7.14 / - / 8.79. So
# the passes split only when they have at most 64 programs, into enough segments for 256.
SEGMENT_MAX_PROGRAMS = 64
SEGMENT_TARGET_PROGRAMS = 256
MIN_SEGMENT_CHUNKS = 64  # 4K tokens: short passes gain too little to pay for the maps


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
  """Kernel settings. Hashable: it is a static argument of the custom_vjp.

  Attributes:
    precision: 'tf32' (tensor cores, float32 accumulation; about 2e-4 relative error per product) or 'ieee'
      (exact float32 products on CUDA cores, 10-50x slower). Interpret mode on a CPU is exact float32 either way;
      'tf32_emulated' (interpret mode only) cuts every operand to TF32 first, as the GPU does, so that CPU tests see
      the GPU kernels' rounding. Products whose operands are bf16 residuals are bf16 products with float32
      accumulation whatever this says.
    residuals: dtype of the intermediates that only feed the output and the backward's products (`P`, `qg`, `R`,
      the entering states, and in the backward `dR` and the states' cotangents): 'input' keeps them in the dtype
      of `v` when that is bf16 or float16 (fla keeps its per-chunk states so) and in float32 otherwise; 'float32'
      always in float32. What feeds the pass over chunks (`Y`, `U`, `k_state`), the inverse `A`, gate sums, the
      carried state and every gradient stay float32: their rounding would compound along the sequence.
    wy_residuals: dtype of what feeds the passes over chunks (`Y`, `U`, `k_state`): 'input' (default: the dtype of `v`
      when that is bf16 or float16, as fla keeps its WY factors; float32 otherwise) or 'float32'. The passes read
      them into float32 either way and the carried state stays float32. Measured on an H100 (2026-12-07, B8 T2048
      H16 K=V=128, bf16): 'input' takes the op from 2.63 / 7.53 to 2.53 / 7.16 ms (fwd / fwd+bwd); against float64,
      bf16 inputs, o 2.9e-3 -> 3.3e-3 (fla 3.75e-3), final state 3.6e-4 -> 2.3e-3; float32 inputs unchanged.
    gate_sum_terms: TF32-exact parts a float32 operand is split into for the exact 0/1 products (segment sums of
      the log-decay, the compact block expansion, the reverse segment sum of the gate gradient): 2: ~5e-7 relative
      error, 3: ~1e-7.
    block_v: value tile of the output kernel and of the value-axis loops.
    block_v_state: value tile of the passes over chunks (state tile `[K, block_v_state]` in registers); 0 picks
      64 when that gives at least 256 programs (B * HV * V / 64), else 32: the passes are sequential over chunks,
      so with few sequences more, smaller programs keep more multiprocessors busy (a guess to be measured).
    tilings: per-kernel `Tiling` overrides, as `((kernel name, Tiling), ...)` (names in `KERNELS`); kernels not
      named use `DEFAULT_TILINGS`. `ChunkConfig().with_tiling("pairs_bwd", num_warps=8)` builds one.
    block_k: if set (non-zero), the key tile of every kernel not named in `tilings` (tests use it to make every
      key loop take several steps).
    native_tf32x3: with `precision='tf32'`, the inverse's 3xTF32 products use the GPU's own split (Triton's tf32x3)
      instead of splitting the operands in the kernel: the same three products. Ignored in interpret mode. Off
      until timed and checked on a GPU (it compiles for sm90; `benchmarks/kernel_times.py` compares the two).
    early_terms: `chunk_fwd` writes `qg`, the decayed keys and the chunk decay in its first key loop (where the
      tile's gate sums are loaded anyway), so its second loop reads only `loc` and `tot`, not `rev`: 134 MB less
      read at B8 T2048 H16 K128, of the 1.47 GB Nsight counted. Off until timed on a GPU.
    split_wy: `chunk_fwd` as two kernels: `chunk_fwd` (the pairs between sub-blocks, P and the inverse A, stored)
      and `wy_fwd` (`Y` and `U` from the stored A: a light kernel bound by memory traffic), so that neither holds
      the other's tiles (fla splits its forward so). With `early_terms` the first writes qg, the decayed keys and
      the decay, else the second. Off until timed on a GPU.
    diag_pairs: how `diag_fwd` forms the pairs inside a sub-block, and `diag_bwd` their cotangents: 'rows' (a
      15-step loop multiplying in one row's decay at a time, on CUDA cores in float32) or 'levels'
      (`tiles.diag_pairs_levels`: four levels of halves, each pair's decay split at its level's midpoint into two
      factors <= 1, so each level is a matrix product on tensor cores in `precision`). 'rows' until 'levels' is
      timed on a GPU.
    state_segments: segments of the two passes over chunks run in parallel (`forward.state_fwd`,
      `backward.state_bwd`): a divisor of T / 64; 1 is the plain sequential pass; 0 (default) picks the count from
      the shape (`segments`: only few sequences of long T are split).
  """

  precision: str = "tf32"
  residuals: str = "input"
  wy_residuals: str = "input"
  gate_sum_terms: int = 2
  block_v: int = 64
  block_v_state: int = 0
  tilings: tuple = ()
  block_k: int = 0
  native_tf32x3: bool = False
  state_segments: int = 0
  early_terms: bool = False
  split_wy: bool = False
  diag_pairs: str = "rows"

  def __post_init__(self):
    # Read back from JSON (a saved model config): lists of [name, {Tiling fields}] become `Tiling`s.
    object.__setattr__(self, "tilings", tuple(
        (n, Tiling(**t) if isinstance(t, dict) else t) for n, t in (self.tilings or ())))
    for name, t in self.tilings:
      if name not in KERNELS:
        raise ValueError(f"`tilings` names kernel {name!r}; expected one of {KERNELS}.")
      if not isinstance(t, Tiling):
        raise ValueError(f"`tilings` entry for {name!r} is {t!r}; expected a `Tiling`.")
    self._validate()

  def _validate(self):
    if self.diag_pairs not in ("rows", "levels"):
      raise ValueError(f"`diag_pairs` is {self.diag_pairs!r}; expected 'rows' or 'levels'.")

  def tiling(self, name: str) -> Tiling:
    """The launch settings of kernel `name`."""
    for n, t in self.tilings:
      if n == name:
        return t
    t = DEFAULT_TILINGS[name]
    return dataclasses.replace(t, block_k=self.block_k) if self.block_k else t

  def with_tiling(self, name: str, **fields) -> "ChunkConfig":
    """A copy with kernel `name`'s settings changed (`Tiling` fields)."""
    t = dataclasses.replace(self.tiling(name), **fields)
    return dataclasses.replace(self, tilings=tuple((n, x) for n, x in self.tilings if n != name) + ((name, t),))

  def key_tile(self, name: str, K: int) -> int:
    return min(self.tiling(name).block_k, K)

  def state_block_v(self, B: int, HV: int, V: int) -> int:
    if self.block_v_state:
      return min(self.block_v_state, V)
    return min(64 if B * HV * max(V // 64, 1) >= 256 else 32, V)

  def segments(self, B: int, HV: int, V: int, NC: int) -> int:
    """Segments of the passes over `NC` chunks: `state_segments` if set (it must divide NC); else 1 when the pass
    has more than `SEGMENT_MAX_PROGRAMS` programs, otherwise the smallest power of two that gives it at least
    `SEGMENT_TARGET_PROGRAMS` programs, keeping segments of at least `MIN_SEGMENT_CHUNKS` chunks."""
    if self.state_segments:
      if NC % self.state_segments:
        raise ValueError(f"`state_segments` is {self.state_segments}; it must divide the {NC} chunks of the sequence.")
      return self.state_segments
    programs = B * HV * max(V // self.state_block_v(B, HV, V), 1)
    n = 1
    if programs > SEGMENT_MAX_PROGRAMS:
      return n
    while programs * n < SEGMENT_TARGET_PROGRAMS and NC % (2 * n) == 0 and NC // (2 * n) >= MIN_SEGMENT_CHUNKS:
      n *= 2
    return n

  def residual_dtype(self, input_dtype) -> jnp.dtype:
    """The dtype of `P`, `qg`, `R` and the entering states (`residuals`)."""
    return _narrow_or_f32(self.residuals, "residuals", input_dtype)

  def wy_residual_dtype(self, input_dtype) -> jnp.dtype:
    """The dtype of `Y`, `U` and `k_state` (`wy_residuals`)."""
    return _narrow_or_f32(self.wy_residuals, "wy_residuals", input_dtype)


  def dot3_precision(self, interpret: bool):
    """Precision of the inverse's 3xTF32 products."""
    if self.precision == "tf32" and self.native_tf32x3 and not interpret:
      from pallas_kernels.gdn2.tiles import NATIVE_TF32X3
      return NATIVE_TF32X3
    return self.dot_precision()

  def dot_precision(self):
    if self.precision == "tf32":
      return lax.Precision.DEFAULT
    if self.precision == "ieee":
      return lax.Precision.HIGHEST
    if self.precision == "tf32_emulated":
      from pallas_kernels.gdn2.tiles import EMULATE_TF32
      return EMULATE_TF32
    raise ValueError(f"`precision` is {self.precision!r}; expected 'tf32', 'ieee' or 'tf32_emulated'.")


def _narrow_or_f32(setting: str, field: str, input_dtype) -> jnp.dtype:
  if setting == "float32":
    return jnp.dtype(jnp.float32)
  if setting != "input":
    raise ValueError(f"`{field}` is {setting!r}; expected 'input' or 'float32'.")
  dt = jnp.dtype(input_dtype)
  return dt if dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else jnp.dtype(jnp.float32)
