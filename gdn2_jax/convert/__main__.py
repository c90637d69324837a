"""Converter CLI: PyTorch GDN-2 checkpoints and fla Hugging Face models <-> gdn2_jax checkpoints.

    python -m gdn2_jax.convert lit_gpt.pt OUT --format lit_gpt [--gdn2-per-layer 2] [--scan-layers]
    python -m gdn2_jax.convert layer.safetensors OUT --format fla-layer [--allow-neg-eigval] [--output-gate sigmoid]
    python -m gdn2_jax.convert FLA_HF_DIR OUT --format fla-hf [--scan-layers]
    python -m gdn2_jax.convert RUN_DIR OUT --to fla-hf

lit_gpt, fla-hf: write `OUT/config.json` ({"model": ModelConfig}) and an orbax checkpoint `OUT/checkpoints/0` with
items "state" (`params.<path>` arrays) and "model_config", the layout `train/` writes, so
`python -m gdn2_jax.generate OUT` runs it (`gdn2_jax.restore`). fla-hf reads an fla model directory (`config.json` +
`model.safetensors` or its sharded index) of fla's `KDAForCausalLM` or of a GDN-2 model (see `gdn2_jax.convert.hf`
for what is refused).
fla-layer: writes `OUT/layer.npz` (Flax paths -> arrays) and `OUT/layer_config.json` (constructor arguments).
--to fla-hf: reads a gdn2_jax run or checkpoint directory (its latest step) and writes it as an fla HF directory in
the layout of fla's `fla/models/gdn2` (`config.json` + `model.safetensors`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from gdn2_jax.convert import hf, names


def save_model_checkpoint(out: str, cfg, flat: dict) -> str:
  import orbax.checkpoint as ocp
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({"model": dataclasses.asdict(cfg)}, f, indent=1)
  from gdn2_jax import restore
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints")),
                               item_handlers={"state": ocp.StandardCheckpointHandler(), **restore.metadata_handlers()})
  # Keys as `train/` writes its nnx.State params: "params.<path>.value"; the model config inside the step (no
  # tokenizer: the source checkpoint has none), so `gdn2_jax.restore` needs nothing else.
  state = {f"params.{k}.value": v for k, v in flat.items()}
  mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state), **restore.metadata_args(cfg)))
  mngr.wait_until_finished()
  mngr.close()
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m gdn2_jax.convert", description=__doc__.split("\n\n")[0])
  ap.add_argument("input", help=".pt/.pth/.bin (needs torch), .safetensors or .npz state dict; an fla HF directory "
                  "(--format fla-hf); a gdn2_jax run directory (--to fla-hf)")
  ap.add_argument("output", help="output directory")
  ap.add_argument("--format", choices=("lit_gpt", "fla-layer", "fla-hf"), default=None, help="the input's format")
  ap.add_argument("--to", choices=("fla-hf",), default=None, help="export a gdn2_jax run to this format")
  ap.add_argument("--gdn2-per-layer", type=int, default=1, help="lit_gpt: 1 recurrent, 2 hybrid (GDN-2 / SWA)")
  ap.add_argument("--n-head", type=int, default=None, help="lit_gpt: attention heads (default 18)")
  ap.add_argument("--n-query-groups", type=int, default=None, help="lit_gpt: key/value groups (default n_head)")
  ap.add_argument("--local-window", type=int, default=2048, help="lit_gpt: SWA window")
  ap.add_argument("--scan-layers", action="store_true", help="lit_gpt, fla-hf: store as a scanned model")
  ap.add_argument("--allow-neg-eigval", action="store_true", help="the layer was trained with b in [0, 2]")
  ap.add_argument("--output-gate", choices=("silu", "sigmoid"), default=None,
                  help="output-gate activation (default: silu for lit_gpt, sigmoid for fla)")
  args = ap.parse_args(argv)
  if (args.format is None) == (args.to is None):
    ap.error("give exactly one of --format (import) or --to fla-hf (export).")
  try:
    return _convert(args)
  except (FileNotFoundError, KeyError, ValueError) as e:  # a wrong path, config or checkpoint: one line, no traceback
    print(f"error: {str(e).strip(chr(39)) if isinstance(e, KeyError) else e}", file=sys.stderr)
    return 2


def _convert(args) -> int:
  if args.to == "fla-hf":
    from gdn2_jax.generate import load_model
    model, step = load_model(args.input)
    hf.save_fla_hf(model, args.output)
    print(f"wrote {args.output}: config.json and model.safetensors (fla {model.cfg.pattern[0]} layout), step {step}")
    return 0
  if args.format == "fla-hf":
    raw, sd = hf.read_fla_hf_dir(args.input)
    cfg = hf.fla_hf_config(raw, scan_layers=args.scan_layers)
    flat = hf.fla_hf_to_flat(sd, cfg)  # every key and shape checked against the config
    save_model_checkpoint(args.output, cfg, flat)
    n = sum(int(np.prod(v.shape)) for v in flat.values())
    print(f"wrote {args.output}: {cfg.n_layers} {cfg.pattern[0]} layers, {n:,} parameters")
    return 0

  sd = names.load_state_dict(args.input)
  if args.format == "lit_gpt":
    cfg = names.lit_gpt_config(sd, gdn2_per_layer=args.gdn2_per_layer, n_head=args.n_head,
                               n_query_groups=args.n_query_groups, local_window=args.local_window,
                               scan_layers=args.scan_layers, allow_neg_eigval=args.allow_neg_eigval,
                               output_gate=args.output_gate or "silu")
    flat = names.lit_gpt_to_flat(sd, cfg)
    save_model_checkpoint(args.output, cfg, flat)
    n = sum(int(np.prod(v.shape)) for v in flat.values())
    print(f"wrote {args.output}: {cfg.n_layers} layers, pattern {cfg.pattern}, {n:,} parameters")
  else:
    dims = names.fla_layer_dims(sd)
    dims.update(allow_neg_eigval=args.allow_neg_eigval, output_gate=args.output_gate or "sigmoid")
    os.makedirs(args.output, exist_ok=True)
    np.savez(os.path.join(args.output, "layer.npz"), **names.fla_layer_to_flat(sd))
    with open(os.path.join(args.output, "layer_config.json"), "w") as f:
      json.dump(dims, f, indent=1)
    print(f"wrote {args.output}/layer.npz and layer_config.json: {dims}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
