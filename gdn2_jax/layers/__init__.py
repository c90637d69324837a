"""Flax NNX layers: the GDN-2 mixer and its family, attention (SWA / full) with RoPE, SwiGLU, RMSNorm, short conv.

Every layer takes `[B, T, D]` and optional `segment_ids [B, T]` (packed documents), and offers `init_cache` /
`apply_cached` for constant-memory decoding. Parameters carry logical axis names (see `layers.init`).

    from flax import nnx
    from gdn2_jax.layers import GatedDeltaNet2
    mixer = GatedDeltaNet2(1024, num_heads=8, head_k_dim=128, head_v_dim=128, rngs=nnx.Rngs(0))
    y = mixer(x)                                    # x [B, T, 1024] -> [B, T, 1024]
    y = mixer(x, segment_ids=seg)                   # packed documents, seg [B, T] int
    kda = GatedDeltaNet2(1024, gates="kda", rngs=nnx.Rngs(0))   # the family by gate layout (GATE_LAYOUTS)

From Linen: `nnx.bridge.to_linen(GatedDeltaNet2, 1024, num_heads=8, ...)`; as a pure function:
`graphdef, params = nnx.split(mixer, nnx.Param)` then `nnx.merge(graphdef, params)(x)` inside `jax.jit`.
"""

from gdn2_jax.layers.attention import Attention, rope
from gdn2_jax.layers.conv import ShortConv, causal_depthwise_conv
from gdn2_jax.layers.gdn2 import GATE_LAYOUTS, GatedDeltaNet2, GateLayout
from gdn2_jax.layers.mlp import SwiGLU
from gdn2_jax.layers.norm import GatedRMSNorm, RMSNorm

__all__ = ["Attention", "GATE_LAYOUTS", "GateLayout", "GatedDeltaNet2", "GatedRMSNorm", "RMSNorm", "ShortConv",
           "SwiGLU", "causal_depthwise_conv", "rope"]
