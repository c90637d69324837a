"""fla Hugging Face model directories (`config.json` + `model.safetensors`) <-> `gdn2_jax.models.LanguageModel`.

Import: fla's `KDAForCausalLM` (model_type "kda", fla 0.6.0) is our model with the "kda" gate layout (GDN-2 with
`b = w = beta`, one erase scalar per head) when `num_v_heads == num_heads` and the short convs have no bias; a
GDN-2 directory (model_type "gdn2", as `save_fla_hf` writes) is our "gdn2" layout. A setting of fla's config that
our model cannot express is refused in one line naming it (hybrid `attn` layers, `use_short_conv=False`,
`attnres_block_size`, a `hidden_act` other than "swish", ...). Sharded checkpoints (`model.safetensors.index.json`)
are read too.

Export: a "gdn2" (or "kda") model is written in the layout of fla's `fla/models/gdn2` (main branch): the
`GDN2Config` field names in `config.json` and the key names below in `model.safetensors`. The layer's parameters
are those of fla's `GatedDeltaNet2` (fla/layers/gdn2.py, fla 0.6.0 and main), whose output gate is a sigmoid: a
model with the SiLU output gate (NVIDIA's, our default) cannot be exported, nor one with a bounded decay
(`gate_lower_bound`, which fla's GDN-2 model config has no field for). The names and shapes are transcribed in
`tests/fixtures/fla_gdn2_hf_layout.json` with the fla commits they were read at; fla 0.6.0 has the layer but not the
model, so `benchmarks/make_fla_hf_fixtures.py` checks an export in fla's own modules on a GPU.

| fla key (`model.layers.{i}.` prefix for blocks) | Flax path (`layers.{i}.`)      | transform |
|--------------------------------------------------|--------------------------------|-----------|
| model.embeddings.weight [vocab, D]               | embed.embedding                |           |
| attn_norm.weight / mlp_norm.weight [D]           | norm1.weight / norm2.weight    |           |
| attn.<layer name> (see `names.FLA_GDN2_LAYER_MAP`; KDA: no w_proj, b_proj [H, D]) | mixer.<Flax name> | |
| mlp.gate_proj.weight [I, D]                      | mlp.w1.kernel (SiLU gate)      | T         |
| mlp.up_proj.weight [I, D]                        | mlp.w2.kernel                  | T         |
| mlp.down_proj.weight [D, I]                      | mlp.w3.kernel                  | T         |
| model.norm.weight [D]                            | final_norm.weight              |           |
| lm_head.weight [vocab, D] (absent when tied)     | lm_head [D, vocab]             | T         |

    python -m gdn2_jax.convert FLA_HF_DIR OUT --format fla-hf     # fla -> gdn2_jax checkpoint directory
    python -m gdn2_jax.convert RUN_DIR OUT --to fla-hf            # gdn2_jax run/checkpoint -> fla HF directory
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from gdn2_jax.convert.names import FLA_GDN2_LAYER_MAP, _apply, _np, _update, stack_layers

Array = np.ndarray

# The layer map per fla model type: KDA has GDN-2's names without the write gate (w = beta, tied).
FLA_LAYER_MAPS: dict[str, dict[str, tuple[str, str]]] = {
    "gdn2": dict(FLA_GDN2_LAYER_MAP),
    "kda": {k: v for k, v in FLA_GDN2_LAYER_MAP.items() if k != "w_proj.weight"},
}
FLA_BLOCK_MAP: dict[str, tuple[str, str]] = {
    "attn_norm.weight": ("norm1.weight", ""),
    "mlp_norm.weight": ("norm2.weight", ""),
    "mlp.gate_proj.weight": ("mlp.w1.kernel", "T"),
    "mlp.up_proj.weight": ("mlp.w2.kernel", "T"),
    "mlp.down_proj.weight": ("mlp.w3.kernel", "T"),
}
ARCHITECTURES = {"kda": "KDAForCausalLM", "gdn2": "GDN2ForCausalLM"}

# Fields of fla's configs that change nothing in the forward pass we compute (kernel choice, fused training ops,
# generation, token ids), and the generic ones transformers writes.
_NO_EFFECT = {"attn_mode", "use_cache", "fuse_norm", "fuse_swiglu", "fuse_cross_entropy",
              "fuse_linear_cross_entropy", "use_l2warp", "pad_token_id", "bos_token_id", "eos_token_id",
              "architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype",
              "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder",
              "keys_to_ignore_at_inference"}
# fla's config fields per model type (fla 0.6.0 `KDAConfig`; `GDN2Config` of fla/models/gdn2 on main) that we read.
_READ = {"hidden_size", "expand_v", "use_short_conv", "allow_neg_eigval", "conv_size", "head_dim", "num_heads",
         "num_v_heads", "max_position_embeddings", "hidden_ratio", "intermediate_size", "hidden_act",
         "num_hidden_layers", "norm_eps", "attn", "tie_word_embeddings", "vocab_size", "conv_bias",
         "initializer_range"}
_KNOWN = {"kda": _READ | {"safe_gate", "lower_bound", "attnres_block_size"}, "gdn2": _READ | {"use_gate"}}


def _refuse(setting: str, value: Any, why: str) -> ValueError:
  return ValueError(f"fla config.json has {setting}={value!r}: {why}")


def mlp_width(hidden_size: int, hidden_ratio: Optional[float], intermediate_size: Optional[int]) -> int:
  """fla's `GatedMLP` width: `intermediate_size`, else 2/3 * hidden_ratio (4) * hidden_size rounded up to 256."""
  if intermediate_size is not None:
    return int(intermediate_size)
  width = int(hidden_size * (4 if hidden_ratio is None else hidden_ratio) * 2 / 3)
  return 256 * ((width + 255) // 256)


def fla_hf_config(raw: Mapping[str, Any], **overrides):
  """The `ModelConfig` of an fla `config.json` dict (model_type "kda" or "gdn2"); `overrides` replace fields
  (backend, dtype, scan_layers, ...). Raises `ValueError` naming the first setting our model cannot express."""
  from gdn2_jax.models import ModelConfig
  model_type = raw.get("model_type")
  if model_type not in _KNOWN:
    raise ValueError(f"fla config.json has model_type={model_type!r}; expected 'kda' (fla's KDAForCausalLM) or "
                     "'gdn2' (fla/models/gdn2, as gdn2_jax exports).")
  unknown = sorted(set(raw) - _KNOWN[model_type] - _NO_EFFECT)
  if unknown:
    raise ValueError(f"fla config.json has the key {unknown[0]!r} (= {raw[unknown[0]]!r}), unknown to the "
                     f"{model_type!r} importer; remove it if it does not change the model, else the model cannot be "
                     "imported.")
  get = lambda k, default=None: raw.get(k, default)
  H, K = int(get("num_heads", 16)), int(get("head_dim", 128))
  HV = H if get("num_v_heads") is None else int(get("num_v_heads"))
  if get("attn") is not None:
    raise _refuse("attn", get("attn"), "hybrid softmax-attention layers are not imported; only all-recurrent "
                  "models are.")
  if not get("use_short_conv", True):
    raise _refuse("use_short_conv", False, "gdn2_jax layers always have the short convs; only use_short_conv=true "
                  "models are imported.")
  if get("conv_bias", False):
    raise _refuse("conv_bias", True, "short convs with a bias are not supported (the paper and fla's models use "
                  "none).")
  if get("hidden_act", "swish") not in ("swish", "silu"):
    raise _refuse("hidden_act", get("hidden_act"), "the MLP is SwiGLU only; expected 'swish'.")
  if get("attnres_block_size") is not None:
    raise _refuse("attnres_block_size", get("attnres_block_size"), "attention residuals are not supported; "
                  "expected null.")
  if model_type == "kda" and HV != H:
    raise _refuse("num_v_heads", get("num_v_heads"), f"KDA with grouped value heads has one beta per value head, "
                  f"which our KDA layout (one per qk head) cannot express; expected null or num_heads={H}.")
  if model_type == "gdn2" and not get("use_gate", True):
    raise _refuse("use_gate", False, "the GDN-2 layer always has its output gate; expected true.")
  expand_v = float(get("expand_v", 1.0))
  V = int(K * expand_v)
  if not math.isclose(K * expand_v, V, rel_tol=1e-5):
    raise _refuse("expand_v", expand_v, f"head_dim * expand_v = {K * expand_v} is not an integer.")
  D = int(get("hidden_size", 2048))
  kw = dict(vocab_size=int(get("vocab_size", 32000)), d_model=D, n_layers=int(get("num_hidden_layers", 24)),
            pattern=(model_type,), mlp_hidden=mlp_width(D, get("hidden_ratio", 4), get("intermediate_size")),
            num_heads=H, head_k_dim=K, head_v_dim=V, num_v_heads=None if HV == H else HV,
            conv_size=int(get("conv_size", 4)), output_gate="sigmoid",
            allow_neg_eigval=bool(get("allow_neg_eigval", False)),
            gate_lower_bound=None if get("lower_bound") is None else float(get("lower_bound")),
            norm_eps=float(get("norm_eps", 1e-6)), tie_embeddings=bool(get("tie_word_embeddings", False)),
            max_seq_len=int(get("max_position_embeddings", 2048)),
            embed_init_std=float(get("initializer_range", 0.02)))
  kw.update(overrides)
  return ModelConfig(**kw)


def fla_hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """`{fla key: PyTorch shape}` of the fla model with `cfg`'s sizes (pattern ("kda",) or ("gdn2",))."""
  kind = _kind(cfg)
  D, H, HV, K, V = cfg.d_model, cfg.num_heads, cfg.v_heads, cfg.head_k_dim, cfg.head_v_dim
  KD, VD, W, I = H * K, HV * V, cfg.conv_size, cfg.mlp_hidden
  layer = {"q_proj.weight": (KD, D), "k_proj.weight": (KD, D), "v_proj.weight": (VD, D),
           "q_conv1d.weight": (KD, 1, W), "k_conv1d.weight": (KD, 1, W), "v_conv1d.weight": (VD, 1, W),
           "f_proj.0.weight": (V, D), "f_proj.1.weight": (KD, V), "b_proj.weight": (KD if kind == "gdn2" else H, D),
           "w_proj.weight": (VD, D), "A_log": (H,), "dt_bias": (KD,), "g_proj.0.weight": (V, D),
           "g_proj.1.weight": (VD, V), "g_proj.1.bias": (VD,), "o_norm.weight": (V,), "o_proj.weight": (D, VD)}
  block = {"attn_norm.weight": (D,), "mlp_norm.weight": (D,), "mlp.gate_proj.weight": (I, D),
           "mlp.up_proj.weight": (I, D), "mlp.down_proj.weight": (D, I)}
  shapes = {"model.embeddings.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
  for i in range(cfg.n_layers):
    shapes.update({f"model.layers.{i}.{k}": s for k, s in block.items()})
    shapes.update({f"model.layers.{i}.attn.{k}": layer[k] for k in FLA_LAYER_MAPS[kind]})
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, D)
  return shapes


def _kind(cfg) -> str:
  if tuple(cfg.pattern) not in (("kda",), ("gdn2",)):
    raise ValueError(f"`pattern` is {cfg.pattern}; fla's KDA / GDN-2 models hold one layer kind: ('kda',) or "
                     "('gdn2',) (hybrid attention layers are not converted).")
  return cfg.pattern[0]


def fla_hf_to_flat(sd: Mapping[str, Any], cfg) -> dict[str, Array]:
  """`{Flax path: array}` from an fla state dict, every key and shape checked against `fla_hf_shapes(cfg)`.

  Raises on a missing key, a shape other than the config implies, or a key with no place in our model (conv
  biases included); an untied-looking `lm_head.weight` in a tied model must equal the embeddings.
  """
  expected = fla_hf_shapes(cfg)
  extra = sorted(set(sd) - set(expected))
  if cfg.tie_embeddings and "lm_head.weight" in extra:
    extra.remove("lm_head.weight")
    if not np.array_equal(_np(sd["lm_head.weight"]), _np(sd["model.embeddings.weight"])):
      raise ValueError("tie_word_embeddings is true but lm_head.weight differs from model.embeddings.weight; set "
                       "tie_word_embeddings=false in config.json.")
  conv_bias = [k for k in extra if k.endswith("conv1d.bias")]
  if conv_bias:
    raise ValueError(f"the checkpoint has {conv_bias[0]}: short convs with a bias are not supported.")
  if extra:
    raise ValueError(f"the checkpoint has {len(extra)} keys the config has no place for, e.g. {extra[:3]}; check "
                     f"config.json (num_hidden_layers={cfg.n_layers}, tie_word_embeddings={cfg.tie_embeddings}).")
  for key, shape in expected.items():
    if key not in sd:
      raise KeyError(f"the checkpoint has no {key!r} (expected shape {list(shape)}); is config.json the one of "
                     "these weights?")
    if tuple(sd[key].shape) != shape:
      raise ValueError(f"{key} has shape {list(sd[key].shape)}; config.json implies {list(shape)} (check hidden_size, "
                       "num_heads, head_dim, expand_v, num_v_heads, conv_size, intermediate_size, vocab_size).")
  layer_map = FLA_LAYER_MAPS[_kind(cfg)]
  per_layer = []
  for i in range(cfg.n_layers):
    pre = f"model.layers.{i}."
    d = {path: _apply(_np(sd[pre + name]), tr) for name, (path, tr) in FLA_BLOCK_MAP.items()}
    d.update({"mixer." + path: _apply(_np(sd[pre + "attn." + name]), tr) for name, (path, tr) in layer_map.items()})
    per_layer.append(d)
  flat = {"embed.embedding": _np(sd["model.embeddings.weight"]), "final_norm.weight": _np(sd["model.norm.weight"])}
  if not cfg.tie_embeddings:
    flat["lm_head"] = _apply(_np(sd["lm_head.weight"]), "T")
  flat.update(stack_layers(per_layer, cfg))
  return flat


def read_fla_hf_dir(path: str) -> tuple[dict, dict[str, Array]]:
  """`(config dict, {key: array})` of an HF model directory: `config.json` and `model.safetensors`, or the shards
  listed in `model.safetensors.index.json`."""
  if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{path!r} is not a Hugging Face model directory (no config.json in it); pass the "
                            "directory that holds config.json and model.safetensors.")
  with open(os.path.join(path, "config.json")) as f:
    raw = json.load(f)
  single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index) as f:
      files = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
  else:
    raise FileNotFoundError(f"{path!r} has no model.safetensors nor model.safetensors.index.json; save the fla model "
                            "with save_pretrained(..., safe_serialization=True).")
  from safetensors.numpy import load_file
  sd: dict[str, Array] = {}
  for file in files:
    sd.update(load_file(file))
  return raw, sd


def load_fla_hf(path: str, **overrides):
  """`(LanguageModel, ModelConfig)` holding the fla HF model in directory `path` (float32 parameters by default;
  `overrides` replace config fields, e.g. backend="recurrent", scan_layers=True)."""
  from flax import nnx
  from gdn2_jax.models import LanguageModel
  raw, sd = read_fla_hf_dir(path)
  cfg = fla_hf_config(raw, **overrides)
  flat = fla_hf_to_flat(sd, cfg)
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))  # shapes only: every parameter is replaced
  _update(model, flat)
  return model, cfg


# -- export -------------------------------------------------------------------------------------------------------


def fla_hf_config_dict(cfg) -> dict:
  """The `config.json` dict (fla's field names) of a "gdn2" / "kda" `ModelConfig`; one-line error for what fla's
  models cannot express."""
  kind = _kind(cfg)
  if cfg.output_gate != "sigmoid":
    raise ValueError(f"`output_gate` is {cfg.output_gate!r}: fla's GatedDeltaNet2 / KDA layers gate the output with a "
                     "sigmoid only, so this model cannot be exported to fla (train it with output_gate='sigmoid').")
  if kind == "gdn2" and cfg.gate_lower_bound is not None:
    raise ValueError(f"`gate_lower_bound` is {cfg.gate_lower_bound}: fla's GDN-2 model config has no field for a "
                     "bounded decay; export a model with gate_lower_bound=None.")
  if kind == "kda" and cfg.v_heads != cfg.num_heads:
    raise ValueError(f"`num_v_heads` is {cfg.v_heads}: fla's KDA with grouped value heads has one beta per value head; "
                     "export a KDA model with num_v_heads=None.")
  expand_v = cfg.head_v_dim / cfg.head_k_dim
  if int(cfg.head_k_dim * expand_v) != cfg.head_v_dim:
    raise ValueError(f"head_v_dim={cfg.head_v_dim} is not int(head_k_dim * expand_v) for any float expand_v "
                     f"(head_k_dim={cfg.head_k_dim}); fla derives the value width that way.")
  out = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "attn_mode": "chunk",
         "hidden_size": cfg.d_model, "expand_v": expand_v, "use_short_conv": True,
         "allow_neg_eigval": cfg.allow_neg_eigval, "conv_size": cfg.conv_size, "head_dim": cfg.head_k_dim,
         "num_heads": cfg.num_heads, "num_v_heads": cfg.num_v_heads, "max_position_embeddings": cfg.max_seq_len,
         "hidden_ratio": 4, "intermediate_size": cfg.mlp_hidden, "hidden_act": "swish",
         "num_hidden_layers": cfg.n_layers, "norm_eps": cfg.norm_eps, "attn": None, "use_cache": True,
         "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": cfg.tie_embeddings,
         "initializer_range": cfg.embed_init_std, "fuse_norm": True, "fuse_swiglu": True,
         "fuse_cross_entropy": True, "use_l2warp": False, "vocab_size": cfg.vocab_size, "dtype": cfg.param_dtype}
  if kind == "gdn2":
    out["use_gate"] = True
  else:
    out.update(safe_gate=False, lower_bound=cfg.gate_lower_bound, attnres_block_size=None)
  return out


def _model_flat(model) -> dict[str, Array]:
  """`{Flax path: numpy array}` of an unscanned model's parameters (a scanned one is unstacked to layers.{i})."""
  import jax
  from flax import nnx
  from gdn2_jax.generate import param_key
  cfg = model.cfg
  flat = {param_key(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
  if not cfg.scan_layers:
    return flat
  P, out = len(cfg.pattern), {}
  for k, v in flat.items():
    if k.startswith("cells.blocks."):
      p, rest = k[len("cells.blocks."):].split(".", 1)
      for c in range(v.shape[0]):
        out[f"layers.{c * P + int(p)}.{rest}"] = v[c]
    else:
      out[k] = v
  return out


def _unapply(x: Array, transform: str) -> Array:
  if transform == "T":
    return np.ascontiguousarray(x.T)
  if transform == "squeeze":
    return np.ascontiguousarray(x[:, None, :])
  return np.ascontiguousarray(x)


def fla_hf_state_dict(model) -> dict[str, Array]:
  """`{fla key: array}` of a "gdn2" / "kda" `LanguageModel` (parameter dtype kept)."""
  cfg = model.cfg
  flat = _model_flat(model)
  layer_map = FLA_LAYER_MAPS[_kind(cfg)]
  sd = {"model.embeddings.weight": _unapply(flat["embed.embedding"], ""),
        "model.norm.weight": _unapply(flat["final_norm.weight"], "")}
  if not cfg.tie_embeddings:
    sd["lm_head.weight"] = _unapply(flat["lm_head"], "T")
  for i in range(cfg.n_layers):
    pre, src = f"model.layers.{i}.", f"layers.{i}."
    sd.update({pre + name: _unapply(flat[src + path], tr) for name, (path, tr) in FLA_BLOCK_MAP.items()})
    sd.update({pre + "attn." + name: _unapply(flat[src + "mixer." + path], tr) for name, (path, tr) in
               layer_map.items()})
  return sd


def save_fla_hf(model, out: str) -> str:
  """Writes `model` (pattern ("gdn2",) or ("kda",), sigmoid output gate) as an fla HF directory `out`:
  `config.json` and `model.safetensors`. Returns `out`."""
  from safetensors.numpy import save_file
  config = fla_hf_config_dict(model.cfg)
  sd = fla_hf_state_dict(model)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  # transformers refuses safetensors files whose metadata does not say format "pt".
  save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  return out
