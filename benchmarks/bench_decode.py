"""Decode throughput and memory vs context: GDN-2 (recurrent and hybrid) vs a Transformer with a KV cache.

For each model and context N, the cache is filled as if N tokens had been seen (the step's cost does not depend
on the cache's values), then one jitted program runs `steps` greedy decode steps (`lax.scan`, no Python between
tokens); the median over `reps` gives ms per step and tokens/s (batch / step time). Memory is the cache's bytes
(exact, from its arrays) next to the weights' bytes. GDN-2 keeps a fixed state per layer (and the hybrid a ring of
`window` keys), so its cache and step time are flat; the Transformer's KV cache grows with N.

Also times the bare GDN-2 decode step op (`gdn2_step`, one layer, H=16, K=V=128) at batch 1/64/256 next to fla's
fused_recurrent_gdn2 numbers in docs/algorithm.md section 10.

    python benchmarks/bench_decode.py --out /tmp/out          # H100: the paper's 1.3B shapes, bf16
    python benchmarks/bench_decode.py --out /tmp/out --small  # CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn2_jax import gdn2_step
from gdn2_jax.models import LanguageModel, ModelConfig, cache_nbytes


def model_configs(small: bool) -> dict[str, ModelConfig]:
  kw = dict(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, max_seq_len=4096)
  if small:
    kw = dict(dtype="float32", scan_layers=True, max_seq_len=512)
    base = ModelConfig.tiny(window=64, n_layers=2, **kw)
    return {"gdn2": base, "hybrid": base.replace(pattern=("gdn2", "swa")),
            "transformer": base.replace(pattern=("attention",))}
  return {
      "gdn2": ModelConfig.paper_1p3b_recurrent(**kw),
      "hybrid": ModelConfig.paper_1p3b_hybrid(**kw),
      # Transformer baseline: the hybrid's attention layers (18 heads x 128, RoPE) in all 18 layers, MLP 6784.
      "transformer": ModelConfig.paper_1p3b_hybrid(pattern=("attention",), **kw),
  }


def filled_cache(model: LanguageModel, batch: int, context: int, steps: int) -> dict:
  """A cache that has seen `context` tokens: position set, attention slots marked as holding positions < context."""
  cache = model.init_cache(batch, context + steps)

  def fill(path, x):
    if getattr(path[-1], "key", None) != "slot_pos":
      return x
    L = x.shape[-1]
    s = jnp.arange(L)
    p = context - 1 - ((context - 1 - s) % L)  # newest position < context stored in slot s
    return jnp.broadcast_to(jnp.where(p >= 0, p, -1).astype(jnp.int32), x.shape)

  layers = jax.tree_util.tree_map_with_path(fill, cache["layers"])
  return {"pos": jnp.asarray(context, jnp.int32), "layers": layers}


def time_model(name: str, cfg: ModelConfig, contexts, batch: int, steps: int, reps: int, deadline: float) -> list:
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  weight_bytes = cache_nbytes(state)

  @jax.jit(donate_argnums=(1,))
  def run(state, cache, tok):
    m = nnx.merge(graphdef, state)

    def body(carry, _):
      tok, cache = carry
      logits, cache = m.decode_step(tok, cache)
      return (jnp.argmax(logits, -1).astype(jnp.int32), cache), None

    (tok, cache), _ = jax.lax.scan(body, (tok, cache), None, length=steps)
    return tok, cache

  rows = []
  compiled_for = None
  for ctx in contexts:
    if time.time() > deadline:
      print(f"{name}: skipping context {ctx} (time budget)", flush=True)
      continue
    cache = filled_cache(model, batch, ctx, steps)
    cbytes = cache_nbytes(cache)
    tok = jnp.zeros((batch,), jnp.int32)
    t0 = time.time()
    tok, cache = run(state, cache, tok)
    jax.block_until_ready(tok)
    first = time.time() - t0
    times = []
    for _ in range(reps):
      cache = jax.tree.map(lambda x: x, cache)
      cache["pos"] = jnp.asarray(ctx, jnp.int32)
      t0 = time.time()
      tok, cache = run(state, cache, tok)
      jax.block_until_ready(tok)
      times.append(time.time() - t0)
    ms = 1e3 * float(np.median(times)) / steps
    shape_key = jax.tree.map(jnp.shape, cache)
    row = dict(model=name, context=ctx, batch=batch, ms_per_step=ms, tokens_per_s=batch * 1e3 / ms,
               cache_bytes=cbytes, weight_bytes=weight_bytes, first_call_s=first,
               recompiled=shape_key != compiled_for)
    compiled_for = shape_key
    rows.append(row)
    print(json.dumps(row), flush=True)
    del cache
  del model, state
  return rows


def time_step_op(batches, small: bool, steps: int = 64) -> list:
  H, K, V = (2, 16, 16) if small else (16, 128, 128)
  rows = []
  for B in batches:
    key = jax.random.key(B)
    ks = jax.random.split(key, 6)
    dt = jnp.bfloat16
    q, k = (jax.random.normal(x, (B, H, K), dt) for x in ks[:2])
    v = jax.random.normal(ks[2], (B, H, V), dt)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, H, K), jnp.float32) + 3)
    b, w = jax.random.uniform(ks[4], (B, H, K), dt), jax.random.uniform(ks[5], (B, H, V), dt)

    @jax.jit(donate_argnums=(0,))
    def run(S):
      def body(S, _):
        o, S = gdn2_step(S, q, k, v, g, b, w, use_qk_l2norm=True)
        return S, o
      S, o = jax.lax.scan(body, S, None, length=steps)
      return S, o[-1]

    S = jnp.zeros((B, H, K, V), jnp.float32)
    S, o = run(S)
    jax.block_until_ready(o)
    times = []
    for _ in range(5):
      t0 = time.time()
      S, o = run(S)
      jax.block_until_ready(o)
      times.append(time.time() - t0)
    ms = 1e3 * float(np.median(times)) / steps
    rows.append(dict(op="gdn2_step", batch=B, heads=H, K=K, V=V, ms_per_step=ms))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def plot(rows, out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = sorted({r["model"] for r in rows})
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for n in names:
    rs = sorted((r for r in rows if r["model"] == n), key=lambda r: r["context"])
    x = [r["context"] for r in rs]
    axes[0].plot(x, [r["tokens_per_s"] for r in rs], "o-", label=n)
    axes[1].plot(x, [r["cache_bytes"] / 2 ** 30 for r in rs], "o-", label=n)
  for ax, title in zip(axes, ("decode tokens/s (batch %d)" % rows[0]["batch"], "decode cache (GiB)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  axes[1].set_yscale("log")
  fig.suptitle(f"{jax.devices()[0].device_kind}, {time.strftime('%Y-%m-%d')}")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "decode_tokens_memory.png"), dpi=120)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting new measurements after this")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  deadline = start + args.budget_s
  contexts = [64, 256] if args.small else [1024, 4096, 16384, 65536, 131072]
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
  print("device:", device, flush=True)
  op_rows = time_step_op([1, 64, 256] if not args.small else [1, 4], args.small)
  rows = []
  for name, cfg in model_configs(args.small).items():
    # Transformer contexts are spread over the remaining time; the GDN-2 models reuse one compiled program.
    rows += time_model(name, cfg, contexts, args.batch, args.steps, args.reps, deadline)
  res = dict(device=device, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), steps=args.steps,
             reps=args.reps, rows=rows, op_rows=op_rows, wall_s=time.time() - start)
  with open(os.path.join(args.out, "decode_results.json"), "w") as f:
    json.dump(res, f, indent=1)
  if rows:
    plot(rows, args.out)
  print(f"done in {time.time() - start:.1f}s", flush=True)


if __name__ == "__main__":
  main()
