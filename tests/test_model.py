"""The language model: parameter counts, every mixer, packed documents, scan = loop, remat, logical axis names,
configs, all on the recurrent backend.

The chunk and Pallas backends at model level (a training step on the CPU mesh) are `tests/test_model_backends.py`;
meshes against one device are `tests/test_sharding.py`; prefill and decoding are `tests/test_decode.py`.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn2_jax.models import MIXERS, LanguageModel, ModelConfig, count_params

VOCAB = {"vocab", "embed", "mlp", "heads", "conv", "kv", None}


def _tokens(key, B, T, vocab):
  return jax.random.randint(jax.random.key(key), (B, T), 0, vocab, dtype=jnp.int32)


def _tiny(**kw):
  # The exact token-loop backend compiles fastest on the CPU; the chunk path is covered by the op tests and by the
  # prefill/decode tests.
  base = dict(d_model=32, num_heads=2, head_k_dim=16, head_v_dim=16, swa_heads=2, window=8, mlp_hidden=64,
              vocab_size=50, backend="recurrent")
  base.update(kw)
  return ModelConfig.tiny(**base)


_forward = nnx.jit(lambda m, t, s: m(t, segment_ids=s))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_paper_param_counts_without_allocating():
  # NVIDIA's lit_gpt config comments: gdn2_1.3B 1,302,638,112 and swa_gdn2_1.3B 1,300,314,384 (blocks only).
  assert count_params(ModelConfig.paper_1p3b_recurrent(), part="blocks") == 1_302_638_112
  assert count_params(ModelConfig.paper_1p3b_hybrid(), part="blocks") == 1_300_314_384


def test_every_mixer_runs_and_is_finite():
  cfg = _tiny(pattern=MIXERS, n_layers=len(MIXERS), num_v_heads=4)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  logits = _forward(model, _tokens(1, 2, 24, 50), None)
  chex.assert_shape(logits, (2, 24, 50))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("attention_impl", [None, pytest.param("pallas", marks=pytest.mark.slow)])
def test_packed_documents_equal_separate_runs(attention_impl):
  # Every mixer kind restarts at a document start: the short convs, the recurrence and attention.
  model = LanguageModel(_tiny(pattern=("gdn2", "swa", "kda", "attention"), n_layers=4, attention_impl=attention_impl),
                        rngs=nnx.Rngs(3))
  lens = [7, 21, 12]
  toks = _tokens(2, 1, sum(lens), 50)
  seg = jnp.asarray(np.repeat(np.arange(3) + 5, lens)[None], jnp.int32)
  packed = _forward(model, toks, seg)
  # Each document alone at the start of its own row; what follows it (filler) cannot reach it (causal).
  starts = np.cumsum([0] + lens[:-1])
  alone = np.array(_tokens(9, len(lens), max(lens), 50))
  for i, (s0, n) in enumerate(zip(starts, lens)):
    alone[i, :n] = np.asarray(toks[0, s0:s0 + n])
  ref = _forward(model, jnp.asarray(alone), None)
  for i, (s0, n) in enumerate(zip(starts, lens)):
    assert _rel(packed[0, s0:s0 + n], ref[i, :n]) < 1e-5


def test_scan_layers_equals_python_loop():
  cfg = _tiny(pattern=("gdn2", "swa"), n_layers=4)
  loop = LanguageModel(cfg, rngs=nnx.Rngs(0))
  scan = LanguageModel(cfg.replace(scan_layers=True), rngs=nnx.Rngs(1))
  # Stack the loop model's blocks into the scan model's cells (cell c, position p = layer 2c + p).
  st = nnx.state(scan)
  for p in range(2):
    blk_states = [nnx.state(loop.layers[2 * c + p]) for c in range(2)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blk_states)
    nnx.update(scan.cells.blocks[p], stacked)
  nnx.update(scan, {"embed": nnx.state(loop.embed), "final_norm": nnx.state(loop.final_norm)})
  scan.lm_head[...] = loop.lm_head[...]
  del st
  toks = _tokens(4, 2, 20, 50)
  assert _rel(_forward(scan, toks, None), _forward(loop, toks, None)) < 1e-6


@pytest.mark.parametrize("scan", [False, True])
def test_remat_does_not_change_values_or_grads(scan):
  cfg = _tiny(n_layers=1, scan_layers=scan)
  toks = _tokens(5, 2, 16, 50)

  def loss(m):
    return jnp.mean(m(toks) ** 2)

  grad = nnx.jit(nnx.grad(loss))
  g0 = grad(LanguageModel(cfg, rngs=nnx.Rngs(0)))
  g1 = grad(LanguageModel(cfg.replace(remat="full"), rngs=nnx.Rngs(0)))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_every_param_has_logical_names_from_the_vocabulary():
  cfg = _tiny(pattern=MIXERS, n_layers=len(MIXERS), scan_layers=True)
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  for path, var in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param),
                                                        is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    names = var.get_metadata().get("out_sharding")
    assert names is not None, f"{path} has no logical axis names"
    assert len(names) == len(var.shape), (path, names, var.shape)
    assert set(names) <= VOCAB, (path, names)


@pytest.mark.parametrize("kw, match", [
    (dict(pattern=("gdn2", "mamba")), "unknown block name"),
    (dict(num_heads=3, num_v_heads=4), "multiple of `num_heads`"),
    (dict(pattern=("swa",), window=1024, max_seq_len=512), "larger than the context"),
    (dict(pattern=("swa",), d_model=130, swa_heads=4), "not divisible by `swa_heads`"),
    (dict(scan_layers=True, n_layers=3, pattern=("gdn2", "swa")), "multiple of 2"),
    (dict(remat="sometimes"), "remat"),
    (dict(dtype="float8"), "dtype"),
    (dict(chunk_size=40), "multiple of 16"),
])
def test_bad_configs_fail_at_construction(kw, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig.tiny(**kw)


def test_config_is_frozen_and_replace_validates():
  cfg = ModelConfig.tiny()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 3
  assert cfg.replace(n_layers=4).n_layers == 4
  with pytest.raises(ValueError, match="unknown block name"):
    cfg.replace(pattern=("nope",))


def test_bfloat16_compute_matches_float32():
  cfg = _tiny(pattern=("gdn2", "swa"), n_layers=2)
  f32 = LanguageModel(cfg, rngs=nnx.Rngs(0))
  bf16 = LanguageModel(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))  # same float32 weights
  toks = _tokens(6, 2, 24, 50)
  seg = jnp.asarray(np.repeat([[0, 1], [2, 3]], 12, axis=1), jnp.int32)
  lo, hi = _forward(bf16, toks, seg), _forward(f32, toks, seg)
  assert lo.dtype == jnp.float32
  assert _rel(lo, hi) < 3e-2
