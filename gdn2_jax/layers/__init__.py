"""Flax NNX layers: the GDN-2 mixer and its family, attention (SWA / full) with RoPE, SwiGLU, RMSNorm, short conv.

Every layer takes `[B, T, D]` and optional `segment_ids [B, T]` (packed documents), and offers `init_cache` /
`apply_cached` for constant-memory decoding. Parameters carry logical axis names (see `layers.init`).
"""

from gdn2_jax.layers.attention import Attention, rope
from gdn2_jax.layers.conv import ShortConv, causal_depthwise_conv
from gdn2_jax.layers.gdn2 import GATE_LAYOUTS, GatedDeltaNet2, GateLayout, document_starts
from gdn2_jax.layers.mlp import SwiGLU
from gdn2_jax.layers.norm import GatedRMSNorm, RMSNorm

__all__ = ["Attention", "GATE_LAYOUTS", "GateLayout", "GatedDeltaNet2", "GatedRMSNorm", "RMSNorm", "ShortConv",
           "SwiGLU", "causal_depthwise_conv", "document_starts", "rope"]
