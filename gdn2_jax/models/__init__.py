"""Language models built from the GDN-2 layers: `ModelConfig`, `LanguageModel`, `count_params`.

    cfg = ModelConfig.tiny(pattern=("gdn2", "swa"))          # or ModelConfig.paper_1p3b_hybrid()
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens, segment_ids=seg)                   # [B, T] int32 -> [B, T, vocab] float32
    logits, cache = model.prefill(prompt, model.init_cache(B, max_len))
    step_logits, cache = model.decode_step(next_token, cache)  # [B] -> [B, vocab]

`gdn2_jax.generate.generate(model, prompt, max_new_tokens=...)` samples; `python -m gdn2_jax.models` prints the
presets' parameter counts.
"""

from gdn2_jax.models.config import MIXERS, ModelConfig
from gdn2_jax.models.lm import Block, Cell, LanguageModel, cache_nbytes, count_params

__all__ = ["Block", "Cell", "LanguageModel", "MIXERS", "ModelConfig", "cache_nbytes", "count_params"]
