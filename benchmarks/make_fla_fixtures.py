"""Makes the fla weight-import fixtures (`tests/fixtures/fla_*.npz`). Runs on a CUDA GPU with torch and fla 0.6.0.

Each fixture holds a random fla `GatedDeltaNet2` layer in float32, perturbed away from its initial values (every
weight moves by a random amount comparable to its spread, so ones, zeros and the A_log / dt_bias inits are all
off their defaults), an input `x [B, T, D]` and fla's output in `fused_recurrent` mode (the token-by-token kernel:
no TF32 products; fla picks it for T <= 64 in eval mode without gradients). Arrays:

    sd.<torch name>   the layer's state dict          x   input            y   fla's output
    config            JSON: layer arguments, output-gate activation, cu_seqlens (packed case) or null

Cases: grouped value heads with negative eigenvalues (fla's sigmoid output gate); K != V with the SiLU ("swish")
output gate of NVIDIA's layer; packed documents (`cu_seqlens`, batch 1) through the same kind of layer.

    python benchmarks/make_fla_fixtures.py --out tests/fixtures
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def build_case(name, *, hidden, head_dim, num_heads, num_v_heads=None, expand_v=1.0, allow_neg_eigval=False,
               gate="sigmoid", B=2, T=40, cu_seqlens=None, seed=0):
  import torch
  from fla.layers.gdn2 import GatedDeltaNet2
  from fla.modules import FusedRMSNormGated
  torch.manual_seed(seed)
  layer = GatedDeltaNet2(hidden_size=hidden, head_dim=head_dim, num_heads=num_heads, num_v_heads=num_v_heads,
                         expand_v=expand_v, allow_neg_eigval=allow_neg_eigval, mode="fused_recurrent")
  if gate != "sigmoid":  # NVIDIA's layer: the same names, a SiLU ("swish") output gate
    layer.o_norm = FusedRMSNormGated(layer.head_v_dim, activation="swish", eps=1e-5)
  layer = layer.float().cuda().eval()
  with torch.no_grad():
    for p in layer.parameters():
      spread = max(float(p.std()) if p.numel() > 1 else 0.0, 0.1)
      p.add_(0.3 * spread * torch.randn_like(p))
  x = torch.randn(B, T, hidden, device="cuda", dtype=torch.float32)
  kw = {}
  if cu_seqlens is not None:
    kw["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int32, device="cuda")
  with torch.no_grad():
    y = layer(x, **kw)[0]
  config = dict(hidden_size=hidden, head_dim=head_dim, num_heads=num_heads, num_v_heads=num_v_heads,
                expand_v=expand_v, allow_neg_eigval=allow_neg_eigval, output_gate="silu" if gate != "sigmoid"
                else "sigmoid", cu_seqlens=cu_seqlens, fla_mode="fused_recurrent", float32=True)
  arrays = {f"sd.{k}": v.detach().float().cpu().numpy() for k, v in layer.state_dict().items()}
  arrays.update(x=x.cpu().numpy(), y=y.float().cpu().numpy(), config=np.array(json.dumps(config)))
  assert np.all(np.isfinite(arrays["y"])), name
  return arrays


CASES = {
    "fla_gdn2_gva_negeig": dict(hidden=64, head_dim=16, num_heads=2, num_v_heads=4, allow_neg_eigval=True, seed=1),
    "fla_gdn2_silu_expandv": dict(hidden=48, head_dim=16, num_heads=2, expand_v=2.0, gate="swish", seed=2),
    "fla_gdn2_packed": dict(hidden=48, head_dim=16, num_heads=2, num_v_heads=4, allow_neg_eigval=True, B=1, T=48,
                            cu_seqlens=[0, 13, 30, 48], seed=3),
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="tests/fixtures")
  args = ap.parse_args()
  import torch
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  torch.set_float32_matmul_precision("highest")
  os.makedirs(args.out, exist_ok=True)
  for name, kw in CASES.items():
    arrays = build_case(name, **kw)
    path = os.path.join(args.out, name + ".npz")
    np.savez_compressed(path, **arrays)
    print(f"{path}: {os.path.getsize(path)} bytes, y rms {np.sqrt(np.mean(arrays['y'] ** 2)):.4g}", flush=True)


if __name__ == "__main__":
  main()
