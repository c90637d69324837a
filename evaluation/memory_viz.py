"""What a GDN-2 layer does to its memory, token by token: erase and write gates, decay, and the state norm.

For one layer of a trained model and one token sequence it records, per token,

    b_t  [H, K]   erase gate (key channels)       w_t  [HV, V]  write gate (value channels)
    exp(g_t) [H, K]  per-channel retention        ||S_t||_F [HV] the state norm after the token

by running the layer's own projections (`GatedDeltaNet2._inputs`) and the recurrence one token at a time
(`gdn2_jax.gdn2_step`), and draws them as heatmaps over tokens x channels.

    python -m evaluation.memory_viz --params experiments/mqar_cpu_reduced/gdn2_params.npz --preset cpu_reduced \
        --mqar 128,16 --out experiments/mqar_cpu_reduced/memory_gdn2.png
    python -m evaluation.memory_viz --checkpoint runs/default --text "Some text to look at." --out memory.png

With `--mqar T,PAIRS` the sequence is an MQAR example and the plot marks keys, values and queries.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gdn2_jax.ops import api

Array = jax.Array


def gate_trace(model, tokens: Array, layer: int) -> dict[str, np.ndarray]:
  """Gates and state norms of GDN-2 family layer `layer` on `tokens [T]` (one sequence).

  Returns numpy arrays: `b [T, H, K]`, `w [T, HV, V]`, `decay [T, H, K]` (= exp(g), the fraction kept),
  `state_norm [T, HV]` (Frobenius norm of each head's state after each token), `out_norm [T, HV]`.
  """
  if tokens.ndim != 1:
    raise ValueError(f"`tokens` has shape {tokens.shape}; expected [T] (one sequence).")
  layers = list(getattr(model, "layers", []))
  if not layers:
    raise ValueError("the model has no `layers` list (scan_layers=True?); rebuild it with scan_layers=False.")
  if not 0 <= layer < len(layers):
    raise ValueError(f"`layer` is {layer}; expected 0..{len(layers) - 1}.")
  mixer = layers[layer].mixer
  if not hasattr(mixer, "_inputs"):
    raise ValueError(f"layer {layer} is a {type(mixer).__name__}, not a GDN-2 family mixer; pick another layer.")

  @jax.jit
  def run(tok):
    x = model.embed(tok[None])
    for blk in layers[:layer]:
      x = blk(x)
    (q, k, v, g, b, w), _ = mixer._inputs(layers[layer].norm1(x), None, None)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]

    def step(S, inp):
      qt, kt, vt, gt, bt, wt = inp
      o, S = api.gdn2_step(S, qt, kt, vt, gt, bt, wt, use_qk_l2norm=True)
      return S, (jnp.sqrt(jnp.sum(S * S, axis=(-2, -1)))[0], jnp.linalg.norm(o.astype(jnp.float32), axis=-1)[0])

    S0 = jnp.zeros((B, HV, K, V), jnp.float32)
    seq = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, b, w))
    _, (snorm, onorm) = jax.lax.scan(step, S0, seq)
    return {"b": b[0].astype(jnp.float32), "w": w[0].astype(jnp.float32), "decay": jnp.exp(g[0]),
            "state_norm": snorm, "out_norm": onorm}

  return {k: np.asarray(v) for k, v in run(jnp.asarray(tokens, jnp.int32)).items()}


def plot_trace(trace: dict[str, np.ndarray], path: str, *, labels: Optional[Sequence[str]] = None,
               marks: Optional[dict[str, np.ndarray]] = None, head: int = 0, title: str = "") -> str:
  """Four panels over tokens: erase gate b (key channels of `head`), write gate w (value channels of `head`),
  retention exp(g) (key channels), and the state norm of every head. `marks`: name -> token indices to flag."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  T = trace["b"].shape[0]
  hv = min(head, trace["w"].shape[1] - 1)
  fig, axes = plt.subplots(4, 1, figsize=(max(8.0, min(T / 12, 24.0)), 11.0), sharex=True,
                           gridspec_kw={"height_ratios": [3, 3, 3, 2]})
  panels = [("erase gate b (key channels)", trace["b"][:, head].T, "viridis", (0, 1)),
            ("write gate w (value channels)", trace["w"][:, hv].T, "magma", (0, 1)),
            ("retention exp(g) (key channels)", trace["decay"][:, head].T, "cividis", (0, 1))]
  for ax, (name, img, cmap, lim) in zip(axes, panels):
    im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap=cmap, vmin=lim[0], vmax=lim[1],
                   extent=(-0.5, T - 0.5, img.shape[0] - 0.5, -0.5))
    ax.set_ylabel(f"{name}\nhead {head if 'w' not in name else hv}", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
  ax = axes[3]
  for h in range(trace["state_norm"].shape[1]):
    ax.plot(np.arange(T), trace["state_norm"][:, h], label=f"head {h}")
  ax.set_ylabel("||S_t||_F", fontsize=8)
  ax.set_xlabel("token")
  ax.legend(fontsize=7, loc="upper left")
  ax.grid(alpha=0.3)
  colors = {"key": "tab:blue", "value": "tab:green", "query": "tab:red"}
  for name, idx in (marks or {}).items():
    for a in axes:
      for i in np.asarray(idx):
        a.axvline(i, color=colors.get(name, "k"), alpha=0.25, lw=0.6)
    axes[0].plot([], [], color=colors.get(name, "k"), label=name)
  if marks:
    axes[0].legend(fontsize=7, loc="upper right")
  if labels is not None and T <= 96:
    axes[3].set_xticks(np.arange(T))
    axes[3].set_xticklabels(list(labels), rotation=90, fontsize=6)
  fig.suptitle(title or "GDN-2 memory editing", fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def mqar_marks(tokens: np.ndarray, mask: np.ndarray, num_pairs: int) -> dict[str, np.ndarray]:
  """Key, value and query positions of one MQAR sequence (`tokens [T]`, its scored-position `mask [T]`)."""
  return {"key": np.arange(0, 2 * num_pairs, 2), "value": np.arange(1, 2 * num_pairs, 2),
          "query": np.flatnonzero(mask)}


def main(argv: Optional[Sequence[str]] = None) -> int:
  from flax import nnx
  from evaluation import replicate, tasks
  from gdn2_jax.models import LanguageModel

  p = argparse.ArgumentParser(prog="python -m evaluation.memory_viz", description=__doc__.split("\n\n")[0])
  p.add_argument("--params", default=None, help=".npz written by evaluation.replicate (with --preset/--mixer)")
  p.add_argument("--preset", default="full", help="replicate preset the params were trained with")
  p.add_argument("--mixer", default="gdn2")
  p.add_argument("--vocab-size", type=int, default=None,
                 help="the vocabulary the params were trained with, where replicate's --vocab-size changed it")
  p.add_argument("--checkpoint", default=None, help="a train/ run directory (instead of --params)")
  p.add_argument("--text", default=None, help="text to run (tokenised with the run's tokenizer or the word vocab)")
  p.add_argument("--mqar", default=None, help="T,PAIRS: run one MQAR example instead of text")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--layer", type=int, default=0)
  p.add_argument("--head", type=int, default=0)
  p.add_argument("--out", default="experiments/memory_gdn2.png")
  args = p.parse_args(argv)

  tokenizer = tasks.WORD_VOCAB
  if args.checkpoint:
    from evaluation import checkpoints
    model, _, tok, _ = checkpoints.load_run(args.checkpoint, with_data=False)
    tokenizer = tok or tokenizer
    vocab = model.cfg.vocab_size
  else:
    study = replicate.PRESETS[args.preset]
    if args.vocab_size is not None:
      study = dataclasses.replace(study, vocab_size=args.vocab_size)
    model = LanguageModel(study.model_config(args.mixer), rngs=nnx.Rngs(0))
    if args.params:
      replicate.load_params(args.params, model)
    vocab = study.vocab_size
  marks, labels = None, None
  if args.mqar:
    T, n = (int(x) for x in args.mqar.split(","))
    b = tasks.mqar(tasks.MQARConfig(T, n, vocab), 1, args.seed)
    tokens, marks = b.tokens[0], mqar_marks(b.tokens[0], b.mask[0], n)
    title = f"{args.mixer} layer {args.layer}: MQAR T={T}, {n} pairs (keys, values, then queries)"
  else:
    text = args.text or "One of the special magic numbers for quiet-river is: 4721905. The grass is green."
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    if getattr(tokenizer, "decode", None) is not None and hasattr(tokenizer, "words"):
      labels = [tokenizer.words[i] for i in tokens]
    title = f"layer {args.layer}: {text[:80]}"
  trace = gate_trace(model, jnp.asarray(tokens), args.layer)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  np.savez_compressed(os.path.splitext(args.out)[0] + ".npz", tokens=tokens, **trace)
  print(plot_trace(trace, args.out, labels=labels, marks=marks, head=args.head, title=title))
  return 0


if __name__ == "__main__":
  sys.exit(main())
