"""Text generation with constant-memory decoding, and a command line to run it from a training checkpoint.

    python -m gdn2_jax.generate RUN_DIR --prompt "Once upon a time" --max-new-tokens 64 --temperature 0.8 --top-p 0.9

`RUN_DIR` is a training run directory, its checkpoint directory or one step directory: each checkpoint step holds
the model config and the tokenizer (`gdn2_jax.restore`), so nothing else is needed. The newest finalised step is
loaded unless `--step` is given. The prompt is tokenised with the checkpoint's tokenizer (`--tokenizer PATH`
replaces it; checkpoints written before tokenizers were saved need it), or given as ids with `--ids "1 2 3"`.
Prompts of one batch share one length.

The prompt goes through the chunk path once (`LanguageModel.prefill`); each new token is one recurrent step
(`LanguageModel.decode_step`), so memory does not grow with the length (SWA layers keep a ring of `window` keys).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn2_jax import restore as restore_lib
from gdn2_jax.models import LanguageModel

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


def load_model(path: str, *, step: Optional[int] = None, **overrides) -> tuple[LanguageModel, int]:
  """`(model, step)` of a run, checkpoint or step directory, through the one loader (`gdn2_jax.restore.restore`).

  `overrides` replace config fields (e.g. backend).
  """
  r = restore_lib.restore(path, step=step, **overrides)
  return r.model, r.step


def param_key(path) -> str:
  """Dotted name of a parameter without the trailing ".value": `layers.0.mixer.q_proj.kernel`."""
  k = restore_lib.dotted_key(path)
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


def main(argv: Optional[list[str]] = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m gdn2_jax.generate", description=__doc__.split("\n\n")[0])
  ap.add_argument("run", help="training run directory, its checkpoint directory, or one step directory")
  ap.add_argument("--prompt", default="", help="text prompt (needs a tokenizer)")
  ap.add_argument("--ids", default=None, help="prompt as space-separated token ids instead of text")
  ap.add_argument("--tokenizer", default=None, help="tokenizer.json replacing the one saved in the checkpoint")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--backend", default=None, help="override the op backend (auto, chunk, recurrent, pallas)")
  args = ap.parse_args(argv)

  overrides = {"backend": args.backend} if args.backend else {}
  try:
    r = restore_lib.restore(args.run, step=args.step, tokenizer=args.tokenizer, **overrides)
  except (FileNotFoundError, KeyError, ValueError, TypeError) as e:  # a missing run or step, another model
    print(f"error: {str(e).strip(chr(39)) if isinstance(e, KeyError) else e}", file=sys.stderr)
    return 2
  tok = r.tokenizer
  if args.ids is not None:
    ids = [int(t) for t in args.ids.split()]
  elif tok is not None:
    ids = tok.encode(args.prompt).ids
  else:
    print(f"error: {restore_lib.missing_tokenizer_message(r.step_dir)[:-1]}, or give the prompt as --ids '1 2 3'.",
          file=sys.stderr)
    return 2
  if not ids:
    print("error: the prompt is empty; pass --prompt TEXT or --ids.", file=sys.stderr)
    return 2
  out = generate(r.model, jnp.asarray([ids], jnp.int32), max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, key=jax.random.key(args.seed))
  new = [int(t) for t in np.asarray(out[0, len(ids):])]
  print(f"# step {r.step}", file=sys.stderr)
  print(tok.decode(ids + new) if tok is not None else " ".join(map(str, ids + new)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
