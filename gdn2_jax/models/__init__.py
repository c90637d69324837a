"""Language models built from the GDN-2 layers: `ModelConfig`, `LanguageModel`, `count_params`."""

from gdn2_jax.models.config import MIXERS, ModelConfig
from gdn2_jax.models.lm import Block, Cell, LanguageModel, cache_nbytes, count_params

__all__ = ["Block", "Cell", "LanguageModel", "MIXERS", "ModelConfig", "cache_nbytes", "count_params"]
