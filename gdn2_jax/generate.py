"""Text generation with constant-memory decoding, and a command line to run it from a training checkpoint.

    python -m gdn2_jax.generate RUN_DIR --prompt "Once upon a time" --max-new-tokens 64 --temperature 0.8 --top-p 0.9

`RUN_DIR` is a training run directory (with `config.json` and `checkpoints/`, as `train/` writes them) or a
checkpoint directory inside one; the newest finalised step is loaded unless `--step` is given. The prompt is
tokenised with `--tokenizer` (a `tokenizer.json`; default: `RUN_DIR/tokenizer.json`, else the tokenizer the run's
config names or cached), or given as ids with `--ids "1 2 3"`. Prompts of one batch share one length.

The prompt goes through the chunk path once (`LanguageModel.prefill`); each new token is one recurrent step
(`LanguageModel.decode_step`), so memory does not grow with the length (SWA layers keep a ring of `window` keys).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn2_jax.models import LanguageModel, ModelConfig

Array = jax.Array


def sample(logits: Array, key: Array, *, temperature: float = 0.0, top_p: float = 1.0) -> Array:
  """Draws one token per row. `logits [B, V]` -> `[B]` int32.

  `temperature == 0` is greedy (argmax). Otherwise logits are divided by `temperature`, and with `top_p < 1` only
  the smallest set of most likely tokens whose probability reaches `top_p` is kept (nucleus sampling).
  """
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"`temperature` is {temperature} and `top_p` {top_p}; expected temperature >= 0 and "
                     "0 < top_p <= 1.")
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep_sorted = before < top_p  # the most likely token is always kept
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model: LanguageModel, prompt: Array, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, key: Optional[Array] = None, eos_id: Optional[int] = None) -> Array:
  """Continues `prompt [B, T]` int32 by `max_new_tokens` tokens -> `[B, T + max_new_tokens]` int32.

  One jitted program: prefill over the prompt, then a `lax.scan` of decode steps. After `eos_id` a row repeats it.
  """
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"`prompt` has shape {prompt.shape}; expected [B, T] int32 with T >= 1.")
  if max_new_tokens < 1:
    return prompt
  key = jax.random.key(0) if key is None else key
  B, T = prompt.shape
  graphdef, state = nnx.split(model)
  out = _generate_jit(graphdef, state, prompt.astype(jnp.int32), key, max_new_tokens, float(temperature),
                      float(top_p), -1 if eos_id is None else int(eos_id))
  return jnp.concatenate([prompt.astype(jnp.int32), out], axis=1)


@jax.jit(static_argnums=(0, 4, 5, 6, 7))
def _generate_jit(graphdef, state, prompt, key, n, temperature, top_p, eos_id):
  model = nnx.merge(graphdef, state)
  B, T = prompt.shape
  logits, cache = model.prefill(prompt, model.init_cache(B, T + n))
  keys = jax.random.split(key, n)

  def body(carry, k):
    last, cache, done = carry
    tok = sample(last, k, temperature=temperature, top_p=top_p)
    if eos_id >= 0:
      tok = jnp.where(done, eos_id, tok)
      done = done | (tok == eos_id)
    nxt, cache = model.decode_step(tok, cache)
    return (nxt, cache, done), tok

  # The last decode step's logits are unused; n steps keep the loop uniform (and the cache is in place anyway).
  _, toks = jax.lax.scan(body, (logits[:, -1], cache, jnp.zeros((B,), bool)), keys)
  return toks.T


# -- loading a training checkpoint ---------------------------------------------------------------------------------


def _find_run(path: str) -> tuple[str, str]:
  """`(config.json path, checkpoint directory)` for a run directory or a checkpoint directory."""
  path = os.path.abspath(path)
  for cand in (path, os.path.dirname(path)):
    cfg = os.path.join(cand, "config.json")
    if os.path.isfile(cfg):
      if cand != path:
        return cfg, path
      with open(cfg) as f:  # the run's checkpoint.dir, when it set one
        named = (json.load(f).get("train", {}).get("checkpoint", {}) or {}).get("dir")
      return cfg, os.path.abspath(named or os.path.join(cand, "checkpoints"))
  raise FileNotFoundError(f"no config.json in {path!r} or its parent; pass a training run directory (with "
                          "config.json and checkpoints/).")


def model_config_from_json(path: str) -> ModelConfig:
  """The `ModelConfig` in a run's `config.json` (its "model" entry, or the whole file)."""
  with open(path) as f:
    d = json.load(f)
  d = d.get("model", d)
  return ModelConfig(**d)


def load_model(path: str, *, step: Optional[int] = None, **overrides) -> tuple[LanguageModel, int]:
  """Builds the model of a training run and loads its parameters from an orbax checkpoint.

  `train/` saves with an orbax `CheckpointManager` (items "state" and "data"); "state" maps dotted keys such as
  `params.embed.embedding` to arrays. Returns `(model, step)`. `overrides` replace config fields (e.g. backend).
  """
  import orbax.checkpoint as ocp
  cfg_path, ckpt_dir = _find_run(path)
  cfg = model_config_from_json(cfg_path)
  if overrides:
    cfg = cfg.replace(**overrides)
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"))
  step = checked_step(mngr.all_steps(), step, ckpt_dir)
  try:
    flat = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  except Exception as e:  # noqa: BLE001 - tensorstore/JSON errors of a damaged checkpoint: one line
    raise ValueError(f"checkpoint step {step} in {ckpt_dir!r} could not be read ({type(e).__name__}: "
                     f"{(str(e).splitlines() or [''])[0][:120]}); pass --step with another of "
                     f"{sorted(mngr.all_steps())}.") from None
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  load_flat_params(model, flat, prefix="params.")
  return model, int(step)


def checked_step(steps, step: Optional[int], ckpt_dir: str) -> int:
  """`step`, or the newest of `steps` when None; FileNotFoundError (one line, the steps there) when it is not saved."""
  steps = sorted(int(s) for s in steps)
  if not steps:
    raise FileNotFoundError(f"no finalised checkpoint in {ckpt_dir!r}; train the run first (or pass another run).")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"--step {step}: no checkpoint of that step in {ckpt_dir!r} (removed, or never saved); "
                            f"it has steps {steps}.")
  return step


def _dotted(path) -> str:
  """Dotted key of a pytree path, as `train/` names checkpoint arrays (an nnx.State leaf ends in ".value")."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def param_key(path) -> str:
  """Dotted name of a parameter without the trailing ".value": `layers.0.mixer.q_proj.kernel`."""
  k = _dotted(path)
  return k[:-len(".value")] if k.endswith(".value") else k


def load_flat_params(model: LanguageModel, flat: dict, prefix: str = "") -> None:
  """Copies arrays from `{dotted path: array}` into the model's parameters (every parameter must be present).

  Keys may end in ".value" (as `train/` writes an nnx.State) or not (`layers.0.mixer.q_proj.kernel`).
  """
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  new = []
  for p, leaf in leaves:
    k = prefix + param_key(p)
    if k + ".value" in flat:
      k = k + ".value"
    if k not in flat:
      raise KeyError(f"the checkpoint has no array {k!r}; was it written for another model config?")
    v = np.asarray(flat[k])
    if v.shape != leaf.shape:
      raise ValueError(f"checkpoint array {k!r} has shape {v.shape}; the model expects {leaf.shape}.")
    new.append(jnp.asarray(v, leaf.dtype))
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))


def default_tokenizer(cfg_path: str) -> Optional[str]:
  """The tokenizer a run used: `RUN/tokenizer.json`, the run config's `data.tokenizer`, or the single BPE of its
  vocabulary size cached in `data.cache_dir` (as `train/` names it). None if none is found."""
  import glob
  run_dir = os.path.dirname(cfg_path)
  if os.path.isfile(os.path.join(run_dir, "tokenizer.json")):
    return os.path.join(run_dir, "tokenizer.json")
  with open(cfg_path) as f:
    data = json.load(f).get("train", {}).get("data", {})
  if data.get("tokenizer") and os.path.isfile(data["tokenizer"]):
    return data["tokenizer"]
  cache = data.get("cache_dir")
  if cache:
    found = glob.glob(os.path.join(cache, f"bpe-*-{data.get('vocab_size')}.json"))
    if len(found) == 1:
      return found[0]
  return None


def main(argv: Optional[list[str]] = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m gdn2_jax.generate", description=__doc__.split("\n\n")[0])
  ap.add_argument("run", help="training run directory (config.json + checkpoints/) or its checkpoint directory")
  ap.add_argument("--prompt", default="", help="text prompt (needs a tokenizer)")
  ap.add_argument("--ids", default=None, help="prompt as space-separated token ids instead of text")
  ap.add_argument("--tokenizer", default=None,
                  help="tokenizer.json (default: RUN/tokenizer.json, else the one the run's config names)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--backend", default=None, help="override the op backend (auto, chunk, recurrent, pallas)")
  args = ap.parse_args(argv)

  overrides = {"backend": args.backend} if args.backend else {}
  try:
    model, step = load_model(args.run, step=args.step, **overrides)
  except (FileNotFoundError, KeyError, ValueError, TypeError) as e:  # a missing run or step, another model
    print(f"error: {str(e).strip(chr(39)) if isinstance(e, KeyError) else e}", file=sys.stderr)
    return 2
  tok = None
  tok_path = args.tokenizer or default_tokenizer(_find_run(args.run)[0])
  if args.tokenizer and not os.path.isfile(args.tokenizer):
    print(f"error: --tokenizer {args.tokenizer!r} not found.", file=sys.stderr)
    return 2
  if tok_path and os.path.isfile(tok_path) and args.ids is None:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tok_path)
  if args.ids is not None:
    ids = [int(t) for t in args.ids.split()]
  elif tok is not None:
    ids = tok.encode(args.prompt).ids
  else:
    print("error: no tokenizer found; pass --tokenizer PATH or --ids '1 2 3'.", file=sys.stderr)
    return 2
  if not ids:
    print("error: the prompt is empty; pass --prompt TEXT or --ids.", file=sys.stderr)
    return 2
  out = generate(model, jnp.asarray([ids], jnp.int32), max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, key=jax.random.key(args.seed))
  new = [int(t) for t in np.asarray(out[0, len(ids):])]
  print(f"# step {step}", file=sys.stderr)
  print(tok.decode(ids + new) if tok is not None else " ".join(map(str, ids + new)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
