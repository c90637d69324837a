"""Command line: `python -m train.main [--config FILE] [key=value ...] [--set key=value ...]`.

With no arguments it trains the embedded default (`configs/default.py`): a small GDN-2 model on this Python's
standard library sources, on the CPU, in a few minutes. Bad input ends with one line `error: ...` saying what to
fix (exit status 2), as do run-directory and disk problems (a reused run_dir, a full or read-only disk); a diverged
run ends with the step number and the last good checkpoint (exit status 3). A complete run is not trained again: it
says so and where its results are (exit status 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m train.main", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default=DEFAULT_CONFIG, help="Python config file with get_config() (default: %(default)s)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
  p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as --set")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  for name in ("absl", "orbax", "jax._src"):
    logging.getLogger(name).setLevel(logging.WARNING)
  from train.config import ConfigError, RunError, apply_overrides, load_config_file, to_dict
  from train.data import DataError
  try:
    cfg = apply_overrides(load_config_file(args.config), args.set + args.overrides)
    if args.print_config:
      print(json.dumps(to_dict(cfg), indent=1))
      return 0
    from train.loop import TrainingDiverged, run
    try:
      summary = run(cfg)
    except TrainingDiverged as e:
      print(f"error: {e}", file=sys.stderr)
      return 3
  except (ConfigError, DataError, RunError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summary.pop("state", None)
  if summary.get("complete"):
    print(summary["message"], file=sys.stderr)
  keys = ("first_loss", "last_loss", "eval_loss", "eval_ppl", "tokens_per_s", "wall_s", "plot", "metrics")
  print(json.dumps({k: summary.get(k) for k in keys}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
