"""Makes the fla Hugging Face model fixtures (`tests/fixtures/fla_hf/<case>/`). Runs on a CUDA GPU with torch, fla 0.6.0
and transformers 5.6.2 (fla 0.6.0's models need transformers >= 5.6.2, < 6).

Each case is fla's own `KDAForCausalLM` built from a small random `KDAConfig` in float32, every parameter moved away
from its initial value by a random amount comparable to its spread (norm weights, A_log and dt_bias included), saved
with `save_pretrained` (config.json + model.safetensors, one case sharded with an index), loaded back with
`from_pretrained`, and run on random tokens in `fused_recurrent` mode (the token-by-token kernels: no TF32 products;
`attn_mode="fused_recurrent"` under `torch.no_grad()`). Files per case:

    config.json, model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    reference.npz    tokens [B, T] int32, logits [B, T, vocab] float32, chunk_rel (fla chunk vs fused_recurrent)

Sanity line per case: the relative difference between fla's own chunk path (forward with autograd on, which fla
routes to `chunk_kda`) and its fused_recurrent logits (run for the first case only unless `--chunk-check all`: the
chunk kernels' autotuning costs tens of seconds per new shape).

Export check: every directory under `tests/fixtures/fla_hf_export/` is a GDN-2 model written by our exporter
(`gdn2_jax.convert.save_fla_hf`; made on the CPU with `--make-export-dirs`). fla 0.6.0 has the GDN-2 layer but not
its model, so the script assembles fla's modules in the layout of `fla/models/gdn2` (embeddings, blocks of
[RMSNorm, GatedDeltaNet2, RMSNorm, GatedMLP], norm, lm_head), loads the exported file with `strict=True` (every
name and shape must match fla's) and writes fla's logits next to it (`reference.npz`, fused_recurrent).

    pip install --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:.
    python3 benchmarks/make_fla_hf_fixtures.py --out $OUT     # then copy $OUT/fla_hf* into tests/fixtures/
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np

# Cases: fla's default MLP width (intermediate_size None) and norm_eps 1e-6; negative eigenvalues, a value width
# twice the key width, conv size 3, tied embeddings; the bounded "safe gate" decay (lower_bound) in a sharded file.
CASES = {
    "kda_default_mlp": dict(cfg=dict(vocab_size=67, hidden_size=32, num_heads=2, head_dim=16, num_hidden_layers=2),
                            seed=1),
    "kda_negeig_expandv_tied": dict(cfg=dict(vocab_size=53, hidden_size=32, num_heads=2, head_dim=16, expand_v=2.0,
                                             allow_neg_eigval=True, tie_word_embeddings=True, intermediate_size=72,
                                             conv_size=3, norm_eps=1e-5, num_hidden_layers=3), seed=2),
    "kda_lower_bound_sharded": dict(cfg=dict(vocab_size=61, hidden_size=48, num_heads=3, head_dim=16,
                                             safe_gate=True, lower_bound=-5.0, intermediate_size=64,
                                             num_hidden_layers=2), seed=3, shard="40KB"),
}
B, T = 2, 48


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def build_case(out: str, cfg: dict, seed: int, shard: str | None, chunk_check: bool) -> dict:
  import torch
  from fla.models import KDAConfig, KDAForCausalLM
  torch.manual_seed(seed)
  config = KDAConfig(attn_mode="fused_recurrent", initializer_range=0.1, **cfg)
  model = KDAForCausalLM(config).float().cuda().eval()
  with torch.no_grad():
    for p in model.parameters():  # a tied lm_head / embeddings pair is one parameter, moved once
      spread = max(float(p.std()) if p.numel() > 1 else 0.0, 0.1)
      p.add_(0.3 * spread * torch.randn_like(p))
  kw = {} if shard is None else {"max_shard_size": shard}
  model.save_pretrained(out, **kw)
  # The reference comes from the saved files, as a user would load them.
  model = KDAForCausalLM.from_pretrained(out, dtype=torch.float32).cuda().eval()
  tokens = torch.randint(0, cfg["vocab_size"], (B, T), device="cuda")
  with torch.no_grad():
    logits = model(input_ids=tokens).logits.float()
  chunk_rel = float("nan")
  if chunk_check:
    with torch.enable_grad():  # fla's KDA layer runs chunk_kda whenever autograd is on
      chunk = model(input_ids=tokens).logits.float().detach()
    chunk_rel = _rel(chunk.cpu().numpy(), logits.cpu().numpy())
  arrays = dict(tokens=tokens.cpu().numpy().astype(np.int32), logits=logits.cpu().numpy(),
                chunk_rel=np.float64(chunk_rel))
  assert np.all(np.isfinite(arrays["logits"])), out
  np.savez_compressed(os.path.join(out, "reference.npz"), **arrays)
  return arrays


EXPORT_DIRS = "tests/fixtures/fla_hf_export"


def make_export_dirs(root: str = EXPORT_DIRS) -> None:
  """CPU, JAX: a random GDN-2 model of ours (grouped value heads, negative eigenvalues, sigmoid output gate, every
  parameter away from its init) written by `save_fla_hf`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from gdn2_jax.convert import save_fla_hf
  from gdn2_jax.models import LanguageModel, ModelConfig
  cfg = ModelConfig(vocab_size=45, d_model=32, n_layers=2, pattern=("gdn2",), mlp_hidden=64, num_heads=2,
                    head_k_dim=16, head_v_dim=16, num_v_heads=4, conv_size=4, output_gate="sigmoid",
                    allow_neg_eigval=True, norm_eps=1e-6, max_seq_len=256)
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(7)

  def fill(path, p):
    x = rng.standard_normal(p.shape)
    if p.ndim >= 2:
      x = x / np.sqrt(p.shape[-2])
    elif str(getattr(path[-1], "key", path[-1])) == "weight":  # norm scales around 1
      x = 1 + 0.3 * x
    return jnp.asarray(x, p.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model, nnx.Param)))
  out = save_fla_hf(model, os.path.join(root, "gdn2_gva_negeig"))
  print(f"wrote {out}: {sorted(os.listdir(out))}")


def fla_gdn2_model(config: dict):
  """fla 0.6.0's modules in the layout of fla/models/gdn2 (main): GDN2ForCausalLM's names and forward."""
  import torch.nn as nn
  from fla.layers.gdn2 import GatedDeltaNet2
  from fla.modules import GatedMLP, RMSNorm
  c = config
  D, eps = c["hidden_size"], c["norm_eps"]

  class Block(nn.Module):
    def __init__(self, i):
      super().__init__()
      self.attn_norm = RMSNorm(D, eps=eps)
      self.attn = GatedDeltaNet2(hidden_size=D, expand_v=c["expand_v"], head_dim=c["head_dim"],
                                 num_heads=c["num_heads"], num_v_heads=c["num_v_heads"], mode="fused_recurrent",
                                 use_short_conv=c["use_short_conv"], allow_neg_eigval=c["allow_neg_eigval"],
                                 conv_size=c["conv_size"], norm_eps=eps, layer_idx=i)
      self.mlp_norm = RMSNorm(D, eps=eps)
      self.mlp = GatedMLP(hidden_size=D, hidden_ratio=c["hidden_ratio"], intermediate_size=c["intermediate_size"],
                          hidden_act=c["hidden_act"], fuse_swiglu=c["fuse_swiglu"])

    def forward(self, x):
      x = x + self.attn(self.attn_norm(x))[0]
      return x + self.mlp(self.mlp_norm(x))

  class Inner(nn.Module):
    def __init__(self):
      super().__init__()
      self.embeddings = nn.Embedding(c["vocab_size"], D)
      self.layers = nn.ModuleList([Block(i) for i in range(c["num_hidden_layers"])])
      self.norm = RMSNorm(D, eps=eps)

  class CausalLM(nn.Module):
    def __init__(self):
      super().__init__()
      self.model = Inner()
      self.lm_head = nn.Linear(D, c["vocab_size"], bias=False)

    def forward(self, tokens):
      x = self.model.embeddings(tokens)
      for blk in self.model.layers:
        x = blk(x)
      return self.lm_head(self.model.norm(x))

  return CausalLM()


def check_export(src: str, out: str, chunk_check: bool) -> None:
  import torch
  from safetensors.torch import load_file
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  assert config["model_type"] == "gdn2" and not config["tie_word_embeddings"], src
  model = fla_gdn2_model(config)
  model.load_state_dict(load_file(os.path.join(src, "model.safetensors")), strict=True)  # fla's names and shapes
  model = model.float().cuda().eval()
  tokens = torch.randint(0, config["vocab_size"], (B, T), device="cuda")
  with torch.no_grad():
    logits = model(tokens).float()
  chunk_rel = float("nan")
  if chunk_check:
    with torch.enable_grad():  # fla's GDN-2 layer runs chunk_gdn2 whenever autograd is on
      chunk = model(tokens).float().detach()
    chunk_rel = _rel(chunk.cpu().numpy(), logits.cpu().numpy())
  arrays = dict(tokens=tokens.cpu().numpy().astype(np.int32), logits=logits.cpu().numpy(),
                chunk_rel=np.float64(chunk_rel))
  assert np.all(np.isfinite(arrays["logits"])), src
  os.makedirs(out, exist_ok=True)
  np.savez_compressed(os.path.join(out, "reference.npz"), **arrays)
  print(f"{os.path.basename(src)} (our export, fla's GatedDeltaNet2 model): loaded strict, logits rms "
        f"{np.sqrt(np.mean(arrays['logits'] ** 2)):.4g}, fla chunk vs fused_recurrent rel "
        f"{float(arrays['chunk_rel']):.3g} -> {out}/reference.npz", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "tests/fixtures"),
                  help="writes OUT/fla_hf/<case>/ and OUT/fla_hf_export/<case>/reference.npz")
  ap.add_argument("--chunk-check", choices=("first", "all", "none"), default="first")
  ap.add_argument("--make-export-dirs", action="store_true", help="CPU, JAX: (re)write tests/fixtures/fla_hf_export")
  args = ap.parse_args()
  if args.make_export_dirs:
    make_export_dirs()
    return
  import torch
  import fla
  import transformers
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  torch.set_float32_matmul_precision("highest")
  print(f"torch {torch.__version__}, fla {getattr(fla, '__version__', '?')}, transformers {transformers.__version__}, "
        f"{torch.cuda.get_device_name()}", flush=True)
  t00 = time.time()
  for n, (name, case) in enumerate(CASES.items()):
    t0 = time.time()
    out = os.path.join(args.out, "fla_hf", name)
    os.makedirs(out, exist_ok=True)
    check = args.chunk_check == "all" or (args.chunk_check == "first" and n == 0)
    arrays = build_case(out, case["cfg"], case["seed"], case.get("shard"), check)
    files = sorted(os.listdir(out))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    with open(os.path.join(out, "config.json")) as f:
      keys = sorted(json.load(f))
    print(f"{name}: {files} {size} bytes, logits rms {np.sqrt(np.mean(arrays['logits'] ** 2)):.4g}, "
          f"fla chunk vs fused_recurrent rel {float(arrays['chunk_rel']):.3g}, {time.time() - t0:.1f} s", flush=True)
    print(f"  config.json keys: {keys}", flush=True)
  for src in sorted(glob.glob(os.path.join(EXPORT_DIRS, "*", "config.json"))):
    src = os.path.dirname(src)
    check_export(src, os.path.join(args.out, "fla_hf_export", os.path.basename(src)), args.chunk_check == "all")
  print(f"done in {time.time() - t00:.1f} s", flush=True)


if __name__ == "__main__":
  main()
