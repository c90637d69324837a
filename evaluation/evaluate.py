"""Score language models on the retrieval tasks and held-out perplexity; write tables and plots.

    python -m evaluation.evaluate --fresh gdn2,kda --preset tiny --suite quick --out experiments/eval_smoke
    python -m evaluation.evaluate --checkpoint gdn2=runs/default --out experiments/eval_default

`--fresh` builds randomly initialised models (a smoke test of the pipeline; accuracy is chance). `--checkpoint
NAME=RUN_DIR` restores a run of `train/` (model config, tokenizer and parameters from its latest checkpoint step,
through `gdn2_jax.restore`; held-out perplexity from the run's `heldout_tokens.npy`). The needle tasks use the run's
tokenizer when there is one, else the built-in word vocabulary (`evaluation.tasks.WORD_VOCAB`). Results go to
`OUT/results.json`, `OUT/summary.json`, `OUT/results.md` and `OUT/*.png` (see `evaluation.report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import zlib
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evaluation import metrics, report, tasks

Array = jax.Array
# tokens [R?, B, T] -> dict of metric sums, each [R] (R stacked runs) or [] (one model).
SumsFn = Callable[[Array, Array, Array], dict]


@dataclasses.dataclass(frozen=True)
class Setting:
  """One scored setting: a task at one context length (and pair count for MQAR, needle depth for NIAH)."""

  task: str
  seq_len: int
  num_pairs: int = 0
  depth: Optional[float] = None

  @property
  def name(self) -> str:
    if self.task == "mqar":
      return f"mqar T={self.seq_len},pairs={self.num_pairs}"
    return f"{self.task} T={self.seq_len}" + (f",depth={self.depth}" if self.depth is not None else "")


# (T, pairs): Zoology's test settings up to (1024, 256), with lengths at 64 pairs and pair counts at T = 1024.
MQAR_TEST_GRID = ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64), (512, 64), (512, 128), (1024, 16), (1024, 32),
                  (1024, 64), (1024, 128), (1024, 256))
MQAR_TRAIN_MIX = ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """Which settings to score and on how many examples (all drawn from `seed`, disjoint from training seeds).

  mqar: (T, pairs) settings; niah_tasks x niah_lengths: needle settings (depths spread evenly over each batch).
  examples: sequences per setting; batch_size: sequences per forward pass (bounds memory: logits are [B, T, V]).
  mqar_vocab: MQAR's vocabulary (capped at the model's vocabulary).
  """

  mqar: tuple[tuple[int, int], ...] = MQAR_TEST_GRID
  niah_tasks: tuple[str, ...] = tasks.NIAH_TASKS
  niah_lengths: tuple[int, ...] = (256, 512, 1024)
  examples: int = 64
  batch_size: int = 16
  mqar_vocab: int = 8192
  seed: int = 20261123

  def settings(self) -> list[Setting]:
    out = [Setting("mqar", T, n) for T, n in self.mqar]
    out += [Setting(t, T) for t in self.niah_tasks for T in self.niah_lengths]
    return out


SUITES = {
    "full": SuiteConfig(),
    "mqar": SuiteConfig(niah_tasks=()),
    # One shape (T = 128) for every setting: one compilation, for CI and smoke runs.
    "quick": SuiteConfig(mqar=((128, 8), (128, 16)), niah_lengths=(128,), examples=4, batch_size=4),
}


def sums_fn_for(apply_fn: Callable[[Array], Array], stacked: bool = False) -> SumsFn:
  """Jitted scorer around `apply_fn(tokens [B, T]) -> logits [B, T, V]` (or `[R, B, T, V]` when `stacked`)."""

  @jax.jit
  def fn(tokens, targets, mask):
    logits = apply_fn(tokens)
    if stacked:
      return jax.vmap(metrics.masked_metrics, in_axes=(0, None, None))(logits, targets, mask)
    return metrics.masked_metrics(logits, targets, mask)

  return fn


def _batches(setting: Setting, suite: SuiteConfig, tokenizer, vocab_size: int):
  # A stable per-setting seed (Python's hash() of strings changes between processes).
  seed = suite.seed + zlib.crc32(setting.name.encode()) % 100_000
  whole = tasks.make_batch(setting.task, seq_len=setting.seq_len, batch_size=suite.examples, seed=seed,
                           num_pairs=setting.num_pairs, vocab_size=min(suite.mqar_vocab, vocab_size),
                           depth=setting.depth, tokenizer=tokenizer)
  for i in range(0, suite.examples, suite.batch_size):
    sl = slice(i, i + suite.batch_size)
    yield whole.tokens[sl], whole.targets[sl], whole.mask[sl]


def _to_scores(sums: dict) -> list[dict]:
  arrs = {k: np.atleast_1d(np.asarray(v, np.float64)) for k, v in sums.items()}
  R = len(arrs["count"])
  return [metrics.summarize({k: v[r] for k, v in arrs.items()}).as_dict() for r in range(R)]


def score_setting(sums_fn: SumsFn, setting: Setting, suite: SuiteConfig, *, tokenizer=tasks.WORD_VOCAB,
                  vocab_size: int = 8192) -> list[dict]:
  """Scores of one setting, one dict per run (`accuracy`, `exact_match`, `loss`, `perplexity`, `count`, `rows`)."""
  total: dict = {}
  for tok, tgt, msk in _batches(setting, suite, tokenizer, vocab_size):
    s = sums_fn(jnp.asarray(tok), jnp.asarray(tgt), jnp.asarray(msk))
    total = {k: np.asarray(v, np.float64) + total.get(k, 0.0) for k, v in s.items()}
  return _to_scores(total)


def run_suite(sums_fn: SumsFn, suite: SuiteConfig, *, tokenizer=tasks.WORD_VOCAB, vocab_size: int = 8192,
              log: Callable[[str], None] = print) -> dict[str, dict]:
  """`{setting_name: {"task", "seq_len", "num_pairs", "per_run": [score, ...]}}` over every setting of `suite`.

  Needle settings are skipped (with a note) when the tokenizer's ids do not fit the model's vocabulary, and any
  setting the generator cannot build (a needle, question and answer longer than T in this tokenizer's tokens).
  """
  out = {}
  for st in suite.settings():
    if st.task != "mqar" and getattr(tokenizer, "vocab_size", 0) > vocab_size:
      log(f"skip {st.name}: tokenizer has {tokenizer.vocab_size} ids, model vocabulary {vocab_size}")
      continue
    t0 = time.time()
    try:
      per_run = score_setting(sums_fn, st, suite, tokenizer=tokenizer, vocab_size=vocab_size)
    except ValueError as e:  # e.g. a needle task longer than T in this tokenizer's tokens
      log(f"skip {st.name}: {e}")
      continue
    accs = ", ".join(f"{100 * s['accuracy']:.1f}" for s in per_run)
    log(f"{st.name:32s} acc % [{accs}]  ({time.time() - t0:.1f}s)")
    out[st.name] = {"task": st.task, "seq_len": st.seq_len, "num_pairs": st.num_pairs, "depth": st.depth,
                    "per_run": per_run}
  return out


def heldout_perplexity(sums_fn: SumsFn, token_stream: np.ndarray, *, seq_len: int, batch_size: int = 8,
                       max_batches: int = 16) -> list[dict]:
  """Perplexity over consecutive `seq_len + 1` windows of a 1-D token stream, every position scored."""
  stream = np.asarray(token_stream, np.int32).reshape(-1)
  n = (len(stream) - 1) // seq_len
  if n < 1:
    raise ValueError(f"`token_stream` has {len(stream)} tokens; expected more than seq_len = {seq_len}.")
  n = min(n, batch_size * max_batches)
  total: dict = {}
  for i in range(0, n, batch_size):
    rows = np.arange(i, min(i + batch_size, n))
    idx = rows[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    win = stream[idx]
    s = sums_fn(jnp.asarray(win[:, :-1]), jnp.asarray(win[:, 1:]), jnp.ones((len(rows), seq_len), bool))
    total = {k: np.asarray(v, np.float64) + total.get(k, 0.0) for k, v in s.items()}
  return _to_scores(total)


# ----------------------------------------------------------------------------------------------------------------
# Models: fresh ones from a preset, or a `train/` run restored from its checkpoint.


def build_fresh(mixer: str, preset: str = "tiny", seed: int = 0, **overrides):
  """A randomly initialised `LanguageModel` of `ModelConfig.<preset>()` with `pattern=(mixer,)`."""
  from flax import nnx
  from gdn2_jax.models import LanguageModel, ModelConfig

  cfg = getattr(ModelConfig, preset)()
  cfg = dataclasses.replace(cfg, pattern=(mixer,), **overrides)
  return LanguageModel(cfg, rngs=nnx.Rngs(seed)), cfg


def apply_fn_for(model) -> Callable[[Array], Array]:
  """`tokens [B, T] -> logits [B, T, V]` as a pure function of the model's state (jit-friendly)."""
  from flax import nnx

  graphdef, state = nnx.split(model)

  def apply(tokens):
    return nnx.merge(graphdef, state)(tokens)

  return apply


class HFTokenizer:
  """Adapts a Hugging Face `tokenizers.Tokenizer` to `tasks.Tokenizer` (`encode(str) -> list[int]`)."""

  def __init__(self, tok):
    self.tok = tok
    self.vocab_size = tok.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text).ids


def load_run(run_dir: str):
  """Restores a `train/` run: returns `(model, model_config, tokenizer or None, heldout token stream or None)`."""
  from evaluation import checkpoints

  return checkpoints.load_run(run_dir)


def _device() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


def meta(argv: Sequence[str]) -> dict[str, Any]:
  return {"command": "python -m " + " ".join(["evaluation.evaluate"] + list(argv)) if argv is not None else "",
          "device": _device(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "jax": jax.__version__, "host": platform.node()}


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog="python -m evaluation.evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("--fresh", default="", help="comma-separated mixer names to build untrained (e.g. gdn2,kda)")
  p.add_argument("--preset", default="tiny", help="ModelConfig preset for --fresh")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="ModelConfig overrides for --fresh (int, float or str)")
  p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=RUN_DIR", help="a train/ run to score")
  p.add_argument("--suite", default="full", choices=sorted(SUITES))
  p.add_argument("--examples", type=int, default=None, help="sequences per setting (overrides the suite)")
  p.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass")
  p.add_argument("--ppl-tokens", default=None, help=".npy 1-D token stream for held-out perplexity")
  p.add_argument("--ppl-seq-len", type=int, default=256)
  p.add_argument("--seed", type=int, default=0, help="init seed of --fresh models")
  p.add_argument("--out", default="experiments/eval", help="output directory")
  p.add_argument("--no-plots", action="store_true")
  args = p.parse_args(argv)

  suite = SUITES[args.suite]
  if args.examples:
    suite = dataclasses.replace(suite, examples=args.examples)
  if args.batch_size:
    suite = dataclasses.replace(suite, batch_size=args.batch_size)
  overrides = {}
  for kv in args.set:
    k, _, v = kv.partition("=")
    for cast in (int, float):
      try:
        v = cast(v)
        break
      except ValueError:
        pass
    overrides[k] = v

  models: list[tuple[str, Any, Any, Any, Any]] = []  # name, model, cfg, tokenizer, heldout stream
  for mixer in [m for m in args.fresh.split(",") if m]:
    model, cfg = build_fresh(mixer, args.preset, args.seed, **overrides)
    models.append((mixer, model, cfg, None, None))
  for spec in args.checkpoint:
    name, _, path = spec.rpartition("=")
    try:
      model, cfg, tok, stream = load_run(path)
    except (FileNotFoundError, KeyError, ValueError) as e:  # no such run or step, another model: one line
      print(f"error: --checkpoint {spec}: {e}", file=sys.stderr)
      return 2
    models.append((name or os.path.basename(path.rstrip("/")), model, cfg, tok, stream))
  if not models:
    p.error("nothing to score: pass --fresh MIXERS and/or --checkpoint NAME=RUN_DIR")

  results = {"meta": meta(argv), "suite": dataclasses.asdict(suite), "models": {}}
  for name, model, cfg, tok, stream in models:
    print(f"== {name}: {getattr(cfg, 'pattern', '')} d_model={getattr(cfg, 'd_model', '?')}", flush=True)
    fn = sums_fn_for(apply_fn_for(model))
    tokenizer = tok or tasks.WORD_VOCAB
    entry = {"runs": [{"label": name}], "config": _config_dict(cfg),
             "settings": run_suite(fn, suite, tokenizer=tokenizer, vocab_size=cfg.vocab_size)}
    if args.ppl_tokens:
      stream = np.load(args.ppl_tokens)
    if stream is not None:
      entry["perplexity"] = {"per_run": heldout_perplexity(fn, stream, seq_len=args.ppl_seq_len,
                                                           batch_size=suite.batch_size)}
      print(f"{'held-out perplexity':32s} {entry['perplexity']['per_run'][0]['perplexity']:.2f}")
    results["models"][name] = entry
  paths = report.write(results, args.out, plots=not args.no_plots)
  print(json.dumps({k: v for k, v in paths.items()}, indent=1))
  return 0


def _config_dict(cfg) -> dict:
  if dataclasses.is_dataclass(cfg):
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else
                     v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
            for f in dataclasses.fields(cfg)}
  return {}


if __name__ == "__main__":
  sys.exit(main())
