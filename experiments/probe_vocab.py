"""Does the study's training path learn MQAR at a given vocabulary (or MK-NIAH-1, with `"task": "mk_niah_1"`)?
One GDN-2 model per setting, on the CPU.

Each argument is a JSON object of `StudyConfig` fields over the preset `cpu_tiny` (one [GDN-2, SwiGLU] block, MQAR
T = 32 with 4 pairs, 64 sequences per step, lr 5e-3). Prints, and appends to `--out` as JSON lines, the value
accuracy on the held-out sequences and the loss every 100 steps:

  PYTHONPATH=. python experiments/probe_vocab.py --out experiments/probe_vocab_cpu.jsonl \
      '{"vocab_size": 1024, "d_model": 128, "num_heads": 2, "head_dim": 64, "mlp_hidden": 256, "steps": 2000}'
"""

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time

from evaluation import replicate


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("settings", nargs="+", help="JSON objects of StudyConfig fields")
  ap.add_argument("--out", default=None, help="JSON-lines file to append the results to")
  args = ap.parse_args()
  for spec in args.settings:
    # JSON lists become the tuples StudyConfig holds (`train_mix`, `test_grid` as tuples of (T, pairs) tuples).
    as_tuple = lambda v: tuple(as_tuple(x) for x in v) if isinstance(v, list) else v
    fields = {k: as_tuple(v) for k, v in json.loads(spec).items()}
    cfg = dataclasses.replace(replicate.PRESETS["cpu_tiny"], **fields)
    losses = []
    started = time.time()
    out = replicate.run_study(cfg, log=lambda m: losses.append(m) if m.startswith("step") else None,
                              compile_threads=1)
    entry = out[cfg.mixers[0]]
    row = {"settings": json.loads(spec), "accuracy": {k: v["per_run"][0]["accuracy"]
                                                      for k, v in entry["settings"].items()},
           "losses": losses, "wall_s": round(time.time() - started),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": f"cpu ({platform.machine()})", "command": " ".join(["python"] + sys.argv)}
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
