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
chunk kernels' autotuning costs about a minute per new shape).

    pip install --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:.
    python3 benchmarks/make_fla_hf_fixtures.py --out $OUT/fla_hf     # then copy $OUT/fla_hf to tests/fixtures/
"""

from __future__ import annotations

import argparse
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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "tests/fixtures"), "fla_hf"))
  ap.add_argument("--chunk-check", choices=("first", "all", "none"), default="first")
  args = ap.parse_args()
  import torch
  import fla
  import transformers
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  torch.set_float32_matmul_precision("highest")
  print(f"torch {torch.__version__}, fla {getattr(fla, '__version__', '?')}, transformers {transformers.__version__}, "
        f"{torch.cuda.get_device_name()}", flush=True)
  for n, (name, case) in enumerate(CASES.items()):
    t0 = time.time()
    out = os.path.join(args.out, name)
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


if __name__ == "__main__":
  main()
