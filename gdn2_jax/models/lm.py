"""The language model: embeddings, blocks of [mixer, SwiGLU] with pre-RMSNorm residuals, final norm, head.

With `scan_layers`, one period of the block pattern is a cell; the cells' parameters are stacked (leading axis,
logical name None) and run by `lax.scan`, so the 1.3B model traces one cell instead of 18 blocks.

Decoding: `init_cache(batch, max_len)` builds a cache whose size does not depend on the context for GDN-2 family
and SWA layers (state + conv tails; a ring buffer of `window` keys); `prefill` runs the chunk path over a prompt,
`decode_step` runs one token with the recurrent step.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax import mesh as mesh_lib
from gdn2_jax.layers.attention import Attention
from gdn2_jax.layers.gdn2 import GATE_LAYOUTS, GatedDeltaNet2
from gdn2_jax.layers.init import partitioned, torch_linear_default
from gdn2_jax.layers.mlp import SwiGLU
from gdn2_jax.layers.norm import RMSNorm
from gdn2_jax.models.config import ModelConfig

Array = jax.Array

_POLICIES = {
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def make_mixer(cfg: ModelConfig, kind: str, rngs: nnx.Rngs) -> nnx.Module:
  """The token mixer named `kind` for `cfg`."""
  kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)
  if kind in GATE_LAYOUTS:
    return GatedDeltaNet2(cfg.d_model, num_heads=cfg.num_heads, head_k_dim=cfg.head_k_dim, head_v_dim=cfg.head_v_dim,
                          num_v_heads=cfg.num_v_heads, gates=kind, conv_size=cfg.conv_size,
                          output_gate=cfg.output_gate, allow_neg_eigval=cfg.allow_neg_eigval,
                          gate_lower_bound=cfg.gate_lower_bound, norm_eps=cfg.norm_eps, backend=cfg.backend,
                          chunk_size=cfg.chunk_size, precision=cfg.op_precision, config=cfg.kernel_config, **kw)
  window = cfg.window if kind == "swa" else None
  return Attention(cfg.d_model, num_heads=cfg.swa_heads, head_dim=cfg.attn_head_dim, num_kv_heads=cfg.swa_kv_heads,
                   window=window, rope_base=cfg.rope_base, implementation=cfg.attention_impl,
                   n_layers=cfg.n_layers, **kw)


class Block(nnx.Module):
  """`x + mixer(norm1(x))`, then `x + mlp(norm2(x))`. `[B, T, D] -> [B, T, D]`."""

  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    self.kind = kind
    self.norm1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, **kw)
    self.mixer = make_mixer(cfg, kind, rngs)
    self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, **kw)
    self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, n_layers=cfg.n_layers, rngs=rngs, **kw)

  def __call__(self, x: Array, segment_ids: Optional[Array] = None) -> Array:
    x = x + self.mixer(self.norm1(x), segment_ids=segment_ids)
    return x + self.mlp(self.norm2(x))

  def init_cache(self, batch: int, max_len: int) -> dict:
    return self.mixer.init_cache(batch, max_len)

  def apply_cached(self, x: Array, cache: dict, pos: Array, fresh: bool) -> tuple[Array, dict]:
    h, cache = self.mixer.apply_cached(self.norm1(x), cache, pos, fresh=fresh)
    x = x + h
    return x + self.mlp(self.norm2(x)), cache


class Cell(nnx.Module):
  """One period of the block pattern (the unit `scan_layers` repeats)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, kind, rngs=rngs) for kind in cfg.pattern])

  def __call__(self, x: Array, segment_ids: Optional[Array] = None) -> Array:
    for blk in self.blocks:
      x = blk(x, segment_ids)
    return x

  def apply_cached(self, x, caches, pos, fresh):
    new = []
    for blk, c in zip(self.blocks, caches):
      x, c = blk.apply_cached(x, c, pos, fresh)
      new.append(c)
    return x, tuple(new)


def _maybe_remat(fn, policy: Optional[str]):
  if policy is None:
    return fn
  return jax.checkpoint(fn, policy=_POLICIES[policy])


class LanguageModel(nnx.Module):
  """`tokens [B, T] int32 -> logits [B, T, vocab] float32`.

  Args (call): `segment_ids [B, T]` int marks packed documents (a new id starts a document; convs, recurrences and
  attention restart there).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    dt, pdt = cfg.compute_dtype, cfg.params_dtype
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=pdt, rngs=rngs,
                           embedding_init=partitioned(jax.nn.initializers.normal(cfg.embed_init_std),
                                                      ("vocab", "embed")))
    if cfg.scan_layers:
      n_cells = cfg.n_layers // len(cfg.pattern)

      @nnx.split_rngs(splits=n_cells)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
      def make_cells(r):
        return Cell(cfg, rngs=r)

      self.cells = make_cells(rngs)
    else:
      self.layers = nnx.List([Block(cfg, kind, rngs=rngs) for kind in cfg.layer_kinds()])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(partitioned(torch_linear_default(), ("embed", "vocab"))(
          rngs.params(), (cfg.d_model, cfg.vocab_size), pdt))

  # -- forward -----------------------------------------------------------------------------------------------------

  def _logits(self, x: Array) -> Array:
    x = self.final_norm(x)
    dt = self.cfg.compute_dtype
    w = self.embed.embedding[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return jnp.dot(x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32).astype(jnp.float32)

  def __call__(self, tokens: Array, *, segment_ids: Optional[Array] = None) -> Array:
    """`tokens [B, T]` int -> logits `[B, T, vocab]` float32."""
    if tokens.ndim != 2:
      raise ValueError(f"`tokens` has shape {tokens.shape}; expected [B, T] int32.")
    if segment_ids is not None and segment_ids.shape != tokens.shape:
      raise ValueError(f"`segment_ids` has shape {segment_ids.shape}; expected {tokens.shape} ([B, T], as tokens).")
    if mesh_lib.explicit_axes():
      # The layers place activations through XLA's sharding propagation from the parameters' logical-axis rules.
      # Under an explicit-axes mesh they run with those axes as auto ones; logits come back split as the token rows.
      graphdef, state = nnx.split(self)
      fwd = lambda st, t, s: nnx.merge(graphdef, st)._forward(t, s)
      return mesh_lib.as_auto_axes(fwd, state, tokens, segment_ids, rows_like=tokens, out_rank=3)
    return self._forward(tokens, segment_ids)

  def _forward(self, tokens: Array, segment_ids: Optional[Array]) -> Array:
    x = self.embed(tokens)
    policy = self.cfg.remat
    if self.cfg.scan_layers:
      graphdef, state = nnx.split(self.cells)

      def body(h, st):
        return nnx.merge(graphdef, st)(h, segment_ids), None

      x, _ = jax.lax.scan(_maybe_remat(body, policy), x, state)
    else:
      for blk in self.layers:
        if policy is None:
          x = blk(x, segment_ids)
        else:
          graphdef, state = nnx.split(blk)
          x = _maybe_remat(lambda st, h: nnx.merge(graphdef, st)(h, segment_ids), policy)(state, x)
    return self._logits(x)

  # -- decoding ----------------------------------------------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int) -> dict:
    """An empty decoding cache: `{"pos": int32 scalar, "layers": ...}`. For GDN-2 family and SWA layers its size does
    not depend on `max_len` (full-attention layers keep `max_len` keys)."""
    if self.cfg.scan_layers:
      n_cells = self.cfg.n_layers // len(self.cfg.pattern)
      probe = [Block.init_cache(blk, batch, max_len) for blk in _cell_template(self.cells)]
      layers = tuple(jax.tree.map(lambda a: jnp.broadcast_to(a, (n_cells,) + a.shape), c) for c in probe)
    else:
      layers = tuple(blk.init_cache(batch, max_len) for blk in self.layers)
    return {"pos": jnp.zeros((), jnp.int32), "layers": layers}

  def apply_cached(self, tokens: Array, cache: dict, *, fresh: bool = False) -> tuple[Array, dict]:
    """Runs `tokens [B, T]` on top of `cache` -> (logits `[B, T, vocab]` float32, new cache)."""
    x = self.embed(tokens)
    pos = cache["pos"]
    if self.cfg.scan_layers:
      graphdef, state = nnx.split(self.cells)

      def body(h, inp):
        st, c = inp
        return nnx.merge(graphdef, st).apply_cached(h, c, pos, fresh)

      x, layers = jax.lax.scan(body, x, (state, cache["layers"]))
    else:
      layers = []
      for blk, c in zip(self.layers, cache["layers"]):
        x, c = blk.apply_cached(x, c, pos, fresh)
        layers.append(c)
      layers = tuple(layers)
    return self._logits(x), {"pos": pos + tokens.shape[1], "layers": layers}

  def prefill(self, tokens: Array, cache: dict) -> tuple[Array, dict]:
    """Prompt `tokens [B, T]` into an EMPTY cache (chunk path) -> (logits `[B, T, vocab]`, cache)."""
    return self.apply_cached(tokens, cache, fresh=True)

  def decode_step(self, token: Array, cache: dict) -> tuple[Array, dict]:
    """One token `[B]` -> (logits `[B, vocab]`, cache), with the recurrent step."""
    logits, cache = self.apply_cached(token[:, None], cache)
    return logits[:, 0], cache


def _cell_template(cells: Cell):
  """The blocks of one (unstacked) cell, for shape-only questions such as the cache layout."""
  graphdef, state = nnx.split(cells)
  one = jax.tree.map(lambda a: a[0], state)
  return list(nnx.merge(graphdef, one).blocks)


def cache_nbytes(cache: Any) -> int:
  """Total bytes of a decoding cache (or any pytree of arrays)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def count_params(model_or_cfg, *, part: str = "all") -> int:
  """Number of parameters, without allocating when given a `ModelConfig` (`nnx.eval_shape`).

  `part`: "all"; "blocks" (the repeated blocks only: embeddings, head and final norm excluded, as NVIDIA's count);
  "non_embedding" (all but the embedding table and the untied head).
  """
  if isinstance(model_or_cfg, ModelConfig):
    model = nnx.eval_shape(lambda: LanguageModel(model_or_cfg, rngs=nnx.Rngs(0)))
  else:
    model = model_or_cfg
  state = nnx.state(model, nnx.Param)
  sizes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    top = str(getattr(path[0], "key", path[0]))
    sizes[top] = sizes.get(top, 0) + _prod(leaf.shape)
  if part == "all":
    return sum(sizes.values())
  if part == "blocks":
    return sizes.get("cells", 0) + sizes.get("layers", 0)
  if part == "non_embedding":
    return sum(v for k, v in sizes.items() if k not in ("embed", "lm_head"))
  raise ValueError(f"`part` is {part!r}; expected 'all', 'blocks' or 'non_embedding'.")


def _prod(shape) -> int:
  n = 1
  for s in shape:
    n *= int(s)
  return n
