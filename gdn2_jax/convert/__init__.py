"""Weight conversion from PyTorch: fla's `GatedDeltaNet2` layer and NVIDIA's lit_gpt model (`names`); fla Hugging Face
model directories, import (fla's KDA and GDN-2 models) and export (GDN-2, fla's layout) (`hf`)."""

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
from gdn2_jax.convert.hf import (
    fla_hf_config,
    fla_hf_config_dict,
    fla_hf_shapes,
    fla_hf_state_dict,
    fla_hf_to_flat,
    load_fla_hf,
    read_fla_hf_dir,
    save_fla_hf,
)

__all__ = ["FLA_GDN2_LAYER_MAP", "fla_layer_to_flat", "layer_from_fla_state_dict", "lit_gpt_config",
           "lit_gpt_to_flat", "load_fla_layer", "load_state_dict", "model_from_lit_gpt", "fla_hf_config",
           "fla_hf_config_dict", "fla_hf_shapes", "fla_hf_state_dict", "fla_hf_to_flat", "load_fla_hf",
           "read_fla_hf_dir", "save_fla_hf"]
