"""Weight import from PyTorch: fla's `GatedDeltaNet2` layer and NVIDIA's lit_gpt model (see `names` for the map)."""

from gdn2_jax.convert.names import (
    FLA_GDN2_LAYER_MAP,
    fla_layer_to_flat,
    layer_from_fla_state_dict,
    lit_gpt_config,
    lit_gpt_to_flat,
    load_fla_layer,
    load_state_dict,
    model_from_lit_gpt,
)

__all__ = ["FLA_GDN2_LAYER_MAP", "fla_layer_to_flat", "layer_from_fla_state_dict", "lit_gpt_config",
           "lit_gpt_to_flat", "load_fla_layer", "load_state_dict", "model_from_lit_gpt"]
