"""Name maps from PyTorch state dicts to the Flax parameters of `gdn2_jax`.

PyTorch `nn.Linear.weight` is `[out, in]`; a Flax `kernel` is `[in, out]` (transposed). A depthwise `Conv1d` weight
`[D, 1, W]` becomes `[D, W]` (tap W-1 multiplies the current token in both).

fla `GatedDeltaNet2` layer (fla/layers/gdn2.py, sigmoid output gate) and NVIDIA's lit_gpt `GatedDeltaNet2` (same
names, SiLU output gate) -> `gdn2_jax.layers.GatedDeltaNet2`:

| PyTorch                 | shape                  | Flax                  | transform |
|-------------------------|------------------------|-----------------------|-----------|
| q_proj.weight           | [H*K, D]               | q_proj.kernel         | T         |
| k_proj.weight           | [H*K, D]               | k_proj.kernel         | T         |
| v_proj.weight           | [HV*V, D]              | v_proj.kernel         | T         |
| q_conv1d.weight         | [H*K, 1, W]            | q_conv1d.weight       | squeeze   |
| k_conv1d.weight         | [H*K, 1, W]            | k_conv1d.weight       | squeeze   |
| v_conv1d.weight         | [HV*V, 1, W]           | v_conv1d.weight       | squeeze   |
| f_proj.0.weight         | [V, D]                 | f_down.kernel         | T         |
| f_proj.1.weight         | [H*K, V]               | f_up.kernel           | T         |
| b_proj.weight           | [H*K, D]               | b_proj.kernel         | T         |
| w_proj.weight           | [HV*V, D]              | w_proj.kernel         | T         |
| A_log                   | [H]                    | A_log                 |           |
| dt_bias                 | [H*K]                  | dt_bias               |           |
| g_proj.0.weight         | [V, D]                 | g_down.kernel         | T         |
| g_proj.1.weight         | [HV*V, V]              | g_up.kernel           | T         |
| g_proj.1.bias           | [HV*V]                 | g_up.bias             |           |
| o_norm.weight           | [V]                    | o_norm.weight         |           |
| o_proj.weight           | [D, HV*V]              | o_proj.kernel         | T         |

NVIDIA lit_gpt model (lit_gpt/model.py, `GPT`) -> `gdn2_jax.models.LanguageModel` (`layers.{i}` below; with
`scan_layers` layer `i = c * P + p` goes to `cells.blocks.{p}` at index c of the stacked axis, P = len(pattern)):

| PyTorch                                   | Flax                                  | transform |
|-------------------------------------------|---------------------------------------|-----------|
| transformer.wte.weight [vocab, D]         | embed.embedding                       |           |
| transformer.h.{i}.norm_1.weight           | layers.{i}.norm1.weight               |           |
| transformer.h.{i}.norm_2.weight           | layers.{i}.norm2.weight               |           |
| transformer.h.{i}.attn.<GDN-2 name>       | layers.{i}.mixer.<layer map above>    |           |
| transformer.h.{i}.attn.attn.weight        | layers.{i}.mixer.{q,k,v}_proj.kernel  | split, T  |
| transformer.h.{i}.attn.proj.weight        | layers.{i}.mixer.o_proj.kernel        | T         |
| transformer.h.{i}.mlp.swiglu.w1.weight    | layers.{i}.mlp.w1.kernel (SiLU gate)  | T         |
| transformer.h.{i}.mlp.swiglu.w2.weight    | layers.{i}.mlp.w2.kernel              | T         |
| transformer.h.{i}.mlp.swiglu.w3.weight    | layers.{i}.mlp.w3.kernel              | T         |
| transformer.ln_f.weight                   | final_norm.weight                     |           |
| lm_head.weight [vocab, D]                 | lm_head [D, vocab]                    | T         |

lit_gpt's fused attention projection `attn.attn.weight` has `(n_head + 2 * n_groups) * hs` rows grouped per
key/value group: `[n_groups, q_per_kv + 2, hs]` (the queries of the group, then its key, then its value).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np
from flax import nnx

Array = np.ndarray

# PyTorch name -> (Flax path, transform); transform "T" transposes, "squeeze" drops the conv's middle axis.
FLA_GDN2_LAYER_MAP: dict[str, tuple[str, str]] = {
    "q_proj.weight": ("q_proj.kernel", "T"),
    "k_proj.weight": ("k_proj.kernel", "T"),
    "v_proj.weight": ("v_proj.kernel", "T"),
    "q_conv1d.weight": ("q_conv1d.weight", "squeeze"),
    "k_conv1d.weight": ("k_conv1d.weight", "squeeze"),
    "v_conv1d.weight": ("v_conv1d.weight", "squeeze"),
    "f_proj.0.weight": ("f_down.kernel", "T"),
    "f_proj.1.weight": ("f_up.kernel", "T"),
    "b_proj.weight": ("b_proj.kernel", "T"),
    "w_proj.weight": ("w_proj.kernel", "T"),
    "A_log": ("A_log", ""),
    "dt_bias": ("dt_bias", ""),
    "g_proj.0.weight": ("g_down.kernel", "T"),
    "g_proj.1.weight": ("g_up.kernel", "T"),
    "g_proj.1.bias": ("g_up.bias", ""),
    "o_norm.weight": ("o_norm.weight", ""),
    "o_proj.weight": ("o_proj.kernel", "T"),
}


def _np(x) -> Array:
  """A torch tensor (any dtype, any device) or array -> float32 numpy array."""
  if hasattr(x, "detach"):
    x = x.detach().float().cpu().numpy()
  return np.asarray(x, np.float32)


def _apply(x: Array, transform: str) -> Array:
  if transform == "T":
    return np.ascontiguousarray(x.T)
  if transform == "squeeze":
    if x.ndim != 3 or x.shape[1] != 1:
      raise ValueError(f"a depthwise conv weight has shape {x.shape}; expected [D, 1, W].")
    return np.ascontiguousarray(x[:, 0, :])
  return x


def fla_layer_to_flat(sd: Mapping[str, Any], prefix: str = "") -> dict[str, Array]:
  """`{Flax path: array}` for one GDN-2 layer from a state dict whose names start with `prefix`."""
  if prefix + "q_conv1d.bias" in sd:
    raise ValueError(f"{prefix}q_conv1d.bias is present: short convs with a bias (conv_bias=True) are not "
                     "supported; the paper and both codebases use conv_bias=False.")
  flat = {}
  for name, (path, tr) in FLA_GDN2_LAYER_MAP.items():
    if prefix + name not in sd:
      raise KeyError(f"the state dict has no {prefix + name!r}; is it a GDN-2 layer (fla/layers/gdn2.py)?")
    flat[path] = _apply(_np(sd[prefix + name]), tr)
  return flat


def fla_layer_dims(sd: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
  """`hidden_size`, `num_heads`, `head_k_dim`, `head_v_dim`, `num_v_heads`, `conv_size` read off the shapes."""
  key_dim, D = _np(sd[prefix + "q_proj.weight"]).shape
  value_dim = _np(sd[prefix + "v_proj.weight"]).shape[0]
  H = _np(sd[prefix + "A_log"]).shape[0]
  V = _np(sd[prefix + "g_proj.0.weight"]).shape[0]  # the output-gate bottleneck is head_v_dim wide
  return dict(hidden_size=D, num_heads=H, head_k_dim=key_dim // H, head_v_dim=V, num_v_heads=value_dim // V,
              conv_size=_np(sd[prefix + "q_conv1d.weight"]).shape[-1])


def load_fla_layer(layer, sd: Mapping[str, Any], prefix: str = "") -> None:
  """Copies a fla/NVIDIA GDN-2 layer state dict into `layer` (a `gdn2_jax.layers.GatedDeltaNet2`, gates="gdn2")."""
  _update(layer, fla_layer_to_flat(sd, prefix))


def layer_from_fla_state_dict(sd: Mapping[str, Any], *, allow_neg_eigval: bool = False,
                              output_gate: str = "sigmoid", norm_eps: float = 1e-5, **kwargs):
  """A `GatedDeltaNet2` with the sizes and weights of a PyTorch GDN-2 layer.

  The state dict does not say whether negative eigenvalues were on, nor the output-gate activation: pass them
  (fla: `output_gate="sigmoid"`, NVIDIA: "silu"). `kwargs` go to the layer (backend, dtype, ...).
  """
  from gdn2_jax.layers import GatedDeltaNet2
  dims = fla_layer_dims(sd)
  D = dims.pop("hidden_size")
  layer = GatedDeltaNet2(D, **dims, allow_neg_eigval=allow_neg_eigval, output_gate=output_gate, norm_eps=norm_eps,
                         rngs=nnx.Rngs(0), **kwargs)
  load_fla_layer(layer, sd)
  return layer


def _split_fused_qkv(w: Array, n_head: int, n_groups: int, hs: int) -> tuple[Array, Array, Array]:
  """lit_gpt `attn.attn.weight` `[(n_head + 2 n_groups) hs, D]` -> q `[n_head hs, D]`, k, v `[n_groups hs, D]`."""
  q_per_kv = n_head // n_groups
  D = w.shape[1]
  if w.shape[0] != (n_head + 2 * n_groups) * hs:
    raise ValueError(f"attn.attn.weight has shape {w.shape}; expected [{(n_head + 2 * n_groups) * hs}, D] for "
                     f"n_head={n_head}, n_query_groups={n_groups}, head_size={hs}.")
  g = w.reshape(n_groups, q_per_kv + 2, hs, D)
  q = g[:, :q_per_kv].reshape(n_head * hs, D)
  return q, g[:, q_per_kv].reshape(n_groups * hs, D), g[:, q_per_kv + 1].reshape(n_groups * hs, D)


def lit_gpt_config(sd: Mapping[str, Any], *, gdn2_per_layer: int = 1, n_head: Optional[int] = None,
                   n_query_groups: Optional[int] = None, local_window: int = 2048, **overrides):
  """A `ModelConfig` matching a lit_gpt GDN-2 checkpoint (sizes read off the shapes).

  `gdn2_per_layer` is lit_gpt's setting: 1 = every layer GDN-2 (recurrent), 2 = GDN-2 on even layers and
  sliding-window attention on odd ones (hybrid). `n_head` / `n_query_groups` describe the attention layers.
  """
  from gdn2_jax.models import ModelConfig
  vocab, D = _np(sd["transformer.wte.weight"]).shape
  n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
  dims = fla_layer_dims(sd, "transformer.h.0.attn.")
  mlp = _np(sd["transformer.h.0.mlp.swiglu.w1.weight"]).shape[0]
  if gdn2_per_layer not in (1, 2):
    raise ValueError(f"`gdn2_per_layer` is {gdn2_per_layer}; expected 1 (recurrent) or 2 (hybrid).")
  pattern = ("gdn2",) if gdn2_per_layer == 1 else ("gdn2", "swa")
  kw = dict(vocab_size=vocab, d_model=D, n_layers=n_layers, pattern=pattern, mlp_hidden=mlp,
            num_heads=dims["num_heads"], head_k_dim=dims["head_k_dim"], head_v_dim=dims["head_v_dim"],
            num_v_heads=dims["num_v_heads"], conv_size=dims["conv_size"], output_gate="silu", window=local_window,
            max_seq_len=max(4096, local_window), tie_embeddings="lm_head.weight" not in sd)
  if gdn2_per_layer == 2:
    n_head = n_head or 18
    kw.update(swa_heads=n_head, swa_kv_heads=n_query_groups or n_head, swa_head_dim=D // n_head)
  kw.update(overrides)
  return ModelConfig(**kw)


class _ReadTracker(Mapping):
  """A read-only view of a state dict that records which keys were read (`__getitem__`)."""

  def __init__(self, sd: Mapping[str, Any]):
    self._sd, self.read = sd, set()

  def __getitem__(self, key):
    value = self._sd[key]
    self.read.add(key)
    return value

  def __iter__(self):
    return iter(self._sd)

  def __len__(self):
    return len(self._sd)

  def __contains__(self, key):
    return key in self._sd


def lit_gpt_to_flat(sd: Mapping[str, Any], cfg) -> dict[str, Array]:
  """`{Flax path: array}` for a whole lit_gpt GDN-2 model (layout of `cfg`, with or without `scan_layers`).

  Raises `ValueError` on a source key it does not read (a bias, a tied or extra tensor, a layer beyond
  `cfg.n_layers`): a weight of the checkpoint is never dropped silently.
  """
  sd = _ReadTracker(sd)
  flat = _lit_gpt_to_flat(sd, cfg)
  unread = sorted(set(sd) - sd.read)
  if unread:
    raise ValueError(f"the lit_gpt state dict has {len(unread)} keys this model has no place for, e.g. {unread[:3]}; "
                     f"check the config (n_layers={cfg.n_layers}, pattern={cfg.pattern}, tie_embeddings="
                     f"{cfg.tie_embeddings}) or remove them from the checkpoint.")
  return flat


def _lit_gpt_to_flat(sd: Mapping[str, Any], cfg) -> dict[str, Array]:
  per_layer: list[dict[str, Array]] = []
  for i, kind in enumerate(cfg.layer_kinds()):
    pre = f"transformer.h.{i}."
    d = {"norm1.weight": _np(sd[pre + "norm_1.weight"]), "norm2.weight": _np(sd[pre + "norm_2.weight"])}
    for j in (1, 2, 3):
      d[f"mlp.w{j}.kernel"] = _apply(_np(sd[f"{pre}mlp.swiglu.w{j}.weight"]), "T")
    if kind == "gdn2":
      d.update({"mixer." + k: v for k, v in fla_layer_to_flat(sd, pre + "attn.").items()})
    elif kind in ("swa", "attention"):
      q, k, v = _split_fused_qkv(_np(sd[pre + "attn.attn.weight"]), cfg.swa_heads, cfg.attn_kv_heads,
                                 cfg.attn_head_dim)
      d.update({"mixer.q_proj.kernel": q.T, "mixer.k_proj.kernel": k.T, "mixer.v_proj.kernel": v.T,
                "mixer.o_proj.kernel": _apply(_np(sd[pre + "attn.proj.weight"]), "T")})
    else:
      raise ValueError(f"layer {i} is {kind!r}; lit_gpt checkpoints hold GDN-2 and attention layers only.")
    per_layer.append(d)
  flat = {"embed.embedding": _np(sd["transformer.wte.weight"]),
          "final_norm.weight": _np(sd["transformer.ln_f.weight"])}
  if not cfg.tie_embeddings:
    flat["lm_head"] = _apply(_np(sd["lm_head.weight"]), "T")
  flat.update(stack_layers(per_layer, cfg))
  return flat


def stack_layers(per_layer: list[dict[str, Array]], cfg) -> dict[str, Array]:
  """Per-layer `{Flax path in a block: array}` -> model paths: `layers.{i}.<path>`, or with `cfg.scan_layers` layer
  `i = c * P + p` at index c of `cells.blocks.{p}.<path>` (P = len(pattern))."""
  flat = {}
  if cfg.scan_layers:
    P = len(cfg.pattern)
    for p in range(P):
      cells = per_layer[p::P]
      for k in cells[0]:
        flat[f"cells.blocks.{p}.{k}"] = np.stack([c[k] for c in cells])
  else:
    for i, d in enumerate(per_layer):
      flat.update({f"layers.{i}.{k}": v for k, v in d.items()})
  return flat


def model_from_lit_gpt(sd: Mapping[str, Any], cfg=None, **config_kw):
  """A `LanguageModel` holding a lit_gpt GDN-2 checkpoint's weights (config from `lit_gpt_config` unless given)."""
  from gdn2_jax.models import LanguageModel
  cfg = lit_gpt_config(sd, **config_kw) if cfg is None else cfg
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  _update(model, lit_gpt_to_flat(sd, cfg))
  return model


def _update(module, flat: dict[str, Array]) -> None:
  import jax
  from gdn2_jax.generate import load_flat_params, param_key
  params = nnx.state(module, nnx.Param)
  expected = {param_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  extra = sorted(set(flat) - expected)
  if extra:
    raise KeyError(f"converted arrays {extra[:3]} have no place in this model; check the config (gates, pattern).")
  load_flat_params(module, flat)


def load_state_dict(path: str) -> dict[str, Array]:
  """Reads a `.safetensors` (numpy, no torch needed) or `.pt`/`.pth`/`.bin` (needs torch) file into numpy arrays.

  A lit_gpt training checkpoint that wraps the weights (`{"model": state_dict, ...}`) is unwrapped.
  """
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    from safetensors.numpy import load_file
    return dict(load_file(path))
  if ext == ".npz":
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading {path!r} needs torch (pip install torch), or convert it to .safetensors first.") \
        from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("model", "state_dict", "module"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
  return {k: _np(v) for k, v in obj.items() if hasattr(v, "shape")}
