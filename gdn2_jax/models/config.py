"""`ModelConfig`: the one typed description of a GDN-2 language model (recurrent, hybrid or Transformer baseline)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from gdn2_jax.layers.gdn2 import GATE_LAYOUTS
from gdn2_jax.ops import common, settings

# Mixer names: the GDN-2 family (a gate layout of `GatedDeltaNet2`) and softmax attention.
ATTENTION_MIXERS = ("swa", "attention")
MIXERS = tuple(GATE_LAYOUTS) + ATTENTION_MIXERS
REMAT_POLICIES = ("full", "dots", "dots_no_batch", "nothing_saveable", "everything_saveable")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A language model: embeddings, `n_layers` blocks of [mixer, SwiGLU MLP] (pre-RMSNorm, residual), final norm, head.

  `pattern` is cycled over the layers: ("gdn2",) is the recurrent model, ("gdn2", "swa") the hybrid (GDN-2 on even
  layers as NVIDIA's `gdn2_per_layer=2`). Mixers: "gdn2", "gdn2_b_only", "gdn2_w_only" (Table 5 ablations), "kda",
  "gdn" (Gated DeltaNet), "deltanet", "swa" (sliding-window attention, RoPE), "attention" (full, the baseline).
  """

  vocab_size: int = 32000
  d_model: int = 2304
  n_layers: int = 18
  pattern: tuple[str, ...] = ("gdn2",)
  mlp_hidden: int = 6208
  # GDN-2 family mixers.
  num_heads: int = 16
  head_k_dim: int = 128
  head_v_dim: int = 128
  num_v_heads: Optional[int] = None  # None: = num_heads; a multiple of it gives grouped value heads
  conv_size: int = 4
  output_gate: str = "silu"  # "silu" (NVIDIA, paper) or "sigmoid" (fla)
  allow_neg_eigval: bool = False
  gate_lower_bound: Optional[float] = None  # fla's bounded decay in [-5, 0); None: unbounded (NVIDIA)
  chunk_size: int = 64
  op_precision: Optional[str] = None  # 'ieee' or 'tf32' for every backend's products (None: the backend's default)
  kernel_config: Any = None  # the Pallas kernels' `pallas_kernels.ChunkConfig` (None: their defaults)
  # Attention mixers.
  swa_heads: int = 18
  swa_kv_heads: Optional[int] = None  # None: = swa_heads
  swa_head_dim: Optional[int] = None  # None: d_model // swa_heads
  window: int = 2048
  rope_base: float = 10000.0
  attention_impl: Optional[str] = None  # None/"xla", "cudnn" (jax.nn.dot_product_attention) or "pallas" (ops.attention)
  # Whole model.
  max_seq_len: int = 4096  # training context; the SWA window must fit in it
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  embed_init_std: float = 0.02
  backend: str = "auto"  # gdn2 op backend
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: Optional[str] = None  # activation checkpointing policy per block (REMAT_POLICIES) or None
  scan_layers: bool = False  # lax.scan over repeated cells of `pattern` (compiles the 1.3B model fast)

  def __post_init__(self):
    object.__setattr__(self, "pattern", tuple(self.pattern))
    if isinstance(self.kernel_config, dict):  # read back from a saved config (JSON)
      from pallas_kernels import ChunkConfig
      object.__setattr__(self, "kernel_config", ChunkConfig(**self.kernel_config))
    self.validate()

  # -- derived ------------------------------------------------------------------------------------------------------

  @property
  def v_heads(self) -> int:
    return self.num_heads if self.num_v_heads is None else self.num_v_heads

  @property
  def attn_head_dim(self) -> int:
    return self.d_model // self.swa_heads if self.swa_head_dim is None else self.swa_head_dim

  @property
  def attn_kv_heads(self) -> int:
    return self.swa_heads if self.swa_kv_heads is None else self.swa_kv_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  def layer_kinds(self) -> tuple[str, ...]:
    """The mixer of every layer, `pattern` cycled."""
    return tuple(self.pattern[i % len(self.pattern)] for i in range(self.n_layers))

  def replace(self, **kw: Any) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # -- checks -------------------------------------------------------------------------------------------------------

  def validate(self) -> None:
    def bad(msg: str):
      raise ValueError(f"ModelConfig: {msg}")

    for name in ("vocab_size", "d_model", "n_layers", "mlp_hidden", "num_heads", "head_k_dim", "head_v_dim",
                 "conv_size", "chunk_size", "swa_heads", "window", "max_seq_len"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        bad(f"`{name}` is {v!r}; expected a positive integer.")
    if not self.pattern:
      bad("`pattern` is empty; give at least one mixer name, e.g. ('gdn2',) or ('gdn2', 'swa').")
    unknown = [p for p in self.pattern if p not in MIXERS]
    if unknown:
      bad(f"`pattern` has unknown block name(s) {unknown}; use names from {list(MIXERS)}.")
    if self.v_heads % self.num_heads:
      bad(f"`num_v_heads` ({self.v_heads}) must be a multiple of `num_heads` ({self.num_heads}); change one so "
          "that it divides.")
    if self.chunk_size % 16:
      bad(f"`chunk_size` is {self.chunk_size}; use a multiple of 16 (64 as fla/NVIDIA).")
    try:
      settings.canonical_precision(self.op_precision)
    except ValueError as e:
      bad(f"`op_precision`: {e}")
    if self.output_gate not in ("silu", "sigmoid"):
      bad(f"`output_gate` is {self.output_gate!r}; use 'silu' (NVIDIA) or 'sigmoid' (fla).")
    if common.lower_bound_error("gate_lower_bound", self.gate_lower_bound):
      bad(common.lower_bound_error("gate_lower_bound", self.gate_lower_bound))
    if any(p in ATTENTION_MIXERS for p in self.pattern):
      if self.swa_head_dim is None and self.d_model % self.swa_heads:
        bad(f"`d_model` ({self.d_model}) is not divisible by `swa_heads` ({self.swa_heads}); change swa_heads or set "
            "`swa_head_dim` explicitly.")
      if self.attn_head_dim % 2:
        bad(f"the attention head dim is {self.attn_head_dim}; RoPE needs it even (set `swa_head_dim`).")
      if self.swa_heads % self.attn_kv_heads:
        bad(f"`swa_kv_heads` ({self.attn_kv_heads}) must divide `swa_heads` ({self.swa_heads}).")
      if "swa" in self.pattern and self.window > self.max_seq_len:
        bad(f"`window` ({self.window}) is larger than the context `max_seq_len` ({self.max_seq_len}); lower the "
            "window or raise max_seq_len.")
    if self.attention_impl not in (None, "xla", "cudnn", "pallas"):
      bad(f"`attention_impl` is {self.attention_impl!r}; use None, 'xla', 'cudnn' or 'pallas'.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        bad(f"`{name}` is {getattr(self, name)!r}; use one of {DTYPES}.")
    if self.remat is not None and self.remat not in REMAT_POLICIES:
      bad(f"`remat` is {self.remat!r}; use None or one of {REMAT_POLICIES}.")
    if self.scan_layers and self.n_layers % len(self.pattern):
      bad(f"`scan_layers` repeats the pattern {self.pattern} as one cell, so `n_layers` ({self.n_layers}) must be a "
          f"multiple of {len(self.pattern)}; change n_layers or set scan_layers=False.")

  # -- presets ------------------------------------------------------------------------------------------------------

  @classmethod
  def tiny(cls, **kw: Any) -> "ModelConfig":
    """A 2-layer recurrent GDN-2 model (0.63M parameters, byte-sized vocabulary) for tests and CPU demos."""
    base = dict(vocab_size=256, d_model=128, n_layers=2, pattern=("gdn2",), mlp_hidden=384, num_heads=2,
                head_k_dim=64, head_v_dim=64, swa_heads=2, window=64, max_seq_len=512)
    base.update(kw)
    return cls(**base)

  @classmethod
  def paper_1p3b_recurrent(cls, **kw: Any) -> "ModelConfig":
    """NVIDIA's `gdn2_1.3B`: 18 x [GDN-2, SwiGLU 6208], d 2304, 16 heads x 128 (1,302,638,112 block params)."""
    base = dict(vocab_size=32000, d_model=2304, n_layers=18, pattern=("gdn2",), mlp_hidden=6208, num_heads=16,
                head_k_dim=128, head_v_dim=128, swa_heads=18, window=2048, max_seq_len=4096, dtype="bfloat16",
                scan_layers=True)
    base.update(kw)
    return cls(**base)

  @classmethod
  def paper_1p3b_hybrid(cls, **kw: Any) -> "ModelConfig":
    """NVIDIA's `swa_gdn2_1.3B`: 18 layers alternating GDN-2 / SWA (18 heads x 128, window 2048), SwiGLU 6784."""
    base = dict(vocab_size=32000, d_model=2304, n_layers=18, pattern=("gdn2", "swa"), mlp_hidden=6784,
                num_heads=16, head_k_dim=128, head_v_dim=128, swa_heads=18, window=2048, max_seq_len=4096,
                dtype="bfloat16", scan_layers=True)
    base.update(kw)
    return cls(**base)
