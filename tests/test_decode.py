"""Decoding: prefill (chunk path) then token steps (recurrent step) equals the full forward; flat cache memory;
sampling; `generate`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn2_jax import generate as gen
from gdn2_jax.models import LanguageModel, ModelConfig, cache_nbytes


def _cfg(**kw):
  base = dict(d_model=32, num_heads=2, head_k_dim=16, head_v_dim=16, swa_heads=2, window=8, mlp_hidden=64,
              vocab_size=50, backend="chunk", chunk_size=16)
  base.update(kw)
  return ModelConfig.tiny(**base)


def _rel_per_token(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("cfg", [
    _cfg(pattern=("gdn2",), num_v_heads=4, allow_neg_eigval=True),
    _cfg(pattern=("gdn2", "swa"), n_layers=4, scan_layers=True),
], ids=["recurrent-gva-negeig", "hybrid-scan"])
def test_prefill_then_decode_equals_full_forward(cfg):
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  B, T, P = 2, 44, 21  # the prompt crosses a chunk boundary (16); decoding crosses the window (8) many times
  toks = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size, dtype=jnp.int32)
  full = nnx.jit(lambda m, t: m(t))(model, toks)
  logits, cache = nnx.jit(lambda m, t, c: m.prefill(t, c))(model, toks[:, :P], model.init_cache(B, T))
  outs = [logits]
  step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  for t in range(P, T):
    lt, cache = step(model, toks[:, t], cache)
    outs.append(lt[:, None])
  assert int(cache["pos"]) == T
  dec = jnp.concatenate(outs, axis=1)
  assert _rel_per_token(dec, full) < 1e-5


def test_decode_after_decode_only_equals_forward_for_full_attention():
  # The Transformer baseline: decode every token from an empty cache (no prefill).
  cfg = _cfg(pattern=("attention", "gdn2"), n_layers=2)
  model = LanguageModel(cfg, rngs=nnx.Rngs(2))
  toks = jax.random.randint(jax.random.key(3), (1, 12), 0, cfg.vocab_size, dtype=jnp.int32)
  full = nnx.jit(lambda m, t: m(t))(model, toks)
  cache = model.init_cache(1, 12)
  step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  outs = []
  for t in range(12):
    lt, cache = step(model, toks[:, t], cache)
    outs.append(lt[:, None])
  assert _rel_per_token(jnp.concatenate(outs, axis=1), full) < 1e-5


def test_cache_size_is_flat_in_context():
  cfg = _cfg(pattern=("gdn2", "swa"), n_layers=2, window=512, max_seq_len=65536)
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  short = jax.eval_shape(lambda: model.init_cache(4, 1024))
  long = jax.eval_shape(lambda: model.init_cache(4, 65536))
  assert cache_nbytes(short) == cache_nbytes(long)
  # The Transformer baseline's KV cache grows with the context.
  tf = nnx.eval_shape(lambda: LanguageModel(cfg.replace(pattern=("attention",)), rngs=nnx.Rngs(0)))
  assert cache_nbytes(jax.eval_shape(lambda: tf.init_cache(4, 65536))) > 60 * cache_nbytes(
      jax.eval_shape(lambda: tf.init_cache(4, 1024)))


def test_sampling_greedy_temperature_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]]))
  np.testing.assert_array_equal(gen.sample(logits, jax.random.key(0), temperature=0.0), [0, 3])
  # top_p = 0.6 keeps {0, 1} in row 0 and {3} in row 1.
  keys = jax.random.split(jax.random.key(1), 400)
  draws = np.asarray(jax.vmap(lambda k: gen.sample(logits, k, temperature=1.0, top_p=0.6))(keys))
  assert set(draws[:, 0]) == {0, 1}
  assert set(draws[:, 1]) == {3}
  assert abs(np.mean(draws[:, 0] == 0) - 0.5 / 0.8) < 0.08
  # Pure temperature sampling reaches every token with probability > 0.
  draws = np.asarray(jax.vmap(lambda k: gen.sample(logits, k, temperature=1.0))(keys))
  assert set(draws[:, 0]) == {0, 1, 2, 3}


def test_generate_greedy_matches_argmax_of_forward():
  cfg = _cfg(pattern=("gdn2", "swa"), n_layers=2, backend="recurrent")
  model = LanguageModel(cfg, rngs=nnx.Rngs(4))
  prompt = jax.random.randint(jax.random.key(5), (2, 7), 0, cfg.vocab_size, dtype=jnp.int32)
  out = gen.generate(model, prompt, max_new_tokens=6)
  chex.assert_shape(out, (2, 13))
  np.testing.assert_array_equal(out[:, :7], prompt)
  # Each generated token is the argmax of the full forward over what precedes it.
  full = nnx.jit(lambda m, t: m(t))(model, out)
  np.testing.assert_array_equal(out[:, 7:], np.argmax(np.asarray(full[:, 6:12]), -1))
