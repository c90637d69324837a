"""Backends carry their settings: ChunkConfig and precision reach the kernels, unset stays None, refusals say why."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import gdn2_jax
import pallas_kernels
from gdn2_jax.ops import api, settings
from pallas_kernels import ChunkConfig

B, T, H, K, V = 1, 64, 2, 16, 16
CFG = ChunkConfig(block_v=32, block_k=32).with_tiling("out_fwd", num_stages=2, num_warps=8)


def _x():
  ks = jax.random.split(jax.random.key(0), 6)
  q, k, g, b = (jax.random.normal(s, (B, T, H, K)) for s in ks[:4])
  v, w = (jax.random.normal(s, (B, T, H, V)) for s in ks[4:])
  return q, k, v, -jax.nn.softplus(g), jax.nn.sigmoid(b), jax.nn.sigmoid(w)


@pytest.fixture
def kernel_spy(monkeypatch):
  """Records the `config` every `pallas_kernels.chunk_gdn2` call receives (and runs nothing: zeros out)."""
  seen = []

  def fake(q, k, v, g, b, w, h0, *, scale, layout=None, config, interpret=False):
    seen.append(config)
    return jnp.zeros(v.shape, v.dtype), jnp.zeros(h0.shape, jnp.float32)

  monkeypatch.setattr(pallas_kernels, "chunk_gdn2", fake)
  return seen


@pytest.fixture
def gpu_like(monkeypatch):
  """Makes the Pallas backend report itself available (as on a CUDA GPU), so `auto` picks it."""
  pallas = api._BACKENDS["pallas"]
  monkeypatch.setitem(api._BACKENDS, "pallas", dataclasses.replace(pallas, available=lambda: True))


@pytest.fixture
def backend_spy(monkeypatch):
  """Records the options the Pallas backend function receives."""
  api._loaded()
  pallas = api._BACKENDS["pallas"]
  seen = []

  def spy(*args, **kw):
    seen.append({n: kw.get(n) for n in pallas.options})
    return pallas.fn(*args, **kw)

  monkeypatch.setitem(api._BACKENDS, "pallas", dataclasses.replace(pallas, fn=spy))
  return seen


def test_config_reaches_the_kernel_three_ways(kernel_spy):
  x = _x()
  jax.eval_shape(lambda *a: gdn2_jax.gdn2(*a, backend="pallas", config=CFG, interpret=True), *x)
  jax.eval_shape(lambda *a: gdn2_jax.gdn2(*a, backend=gdn2_jax.backend("pallas", config=CFG, interpret=True)), *x)
  jax.eval_shape(lambda *a: gdn2_jax.gdn2(*a, backend=gdn2_jax.backend("pallas", config=CFG), interpret=True,
                                          precision="ieee"), *x)
  assert kernel_spy[:2] == [CFG, CFG]
  assert kernel_spy[2] == dataclasses.replace(CFG, precision="ieee")  # the op's precision replaces config's


@pytest.mark.parametrize("precision,expected", [(None, "tf32"), ("ieee", "ieee"), ("highest", "ieee")])
def test_model_config_reaches_the_kernel_under_auto(kernel_spy, gpu_like, precision, expected):
  """ModelConfig.kernel_config and op_precision -> layers -> `gdn2(backend='auto')` -> the kernels (GPU case)."""
  from gdn2_jax.models import LanguageModel
  from train.testing import tiny_model
  mc = tiny_model(backend="auto", chunk_size=64, kernel_config=CFG, op_precision=precision, head_k_dim=16,
                  head_v_dim=16)
  model = LanguageModel(mc, rngs=nnx.Rngs(0))
  jax.eval_shape(lambda t: model(t), jnp.zeros((2, 32), jnp.int32))
  assert kernel_spy and all(c == dataclasses.replace(CFG, precision=expected) for c in kernel_spy)


def test_unset_settings_reach_the_backend_as_none(backend_spy, kernel_spy):
  jax.eval_shape(lambda *a: gdn2_jax.gdn2(*a, backend="pallas", interpret=True), *_x())
  assert backend_spy == [{"interpret": True, "config": None, "precision": None, "chunk_size": None}]
  assert kernel_spy == [ChunkConfig()]  # the kernels' defaults fill what was left unset


def test_named_backend_that_cannot_take_the_call_says_why():
  x = _x()
  cases = [
      (dict(backend="pallas"), "backend 'pallas' cannot take this call: it does not run on platform 'cpu'"),
      (dict(backend="pallas", interpret=True, chunk_size=32), "fixed chunk of 64 tokens"),
      (dict(backend="chunk", config=CFG), "it takes no `config`"),
      (dict(backend="recurrent", precision="tf32"), "exact float32 only"),
      (dict(backend="chunk", precision="tf32_emulated"), "interpret mode"),
      (dict(backend="chunk", precision="fast"), "`precision` is 'fast'; expected None, 'ieee'"),
      (dict(backend=gdn2_jax.backend("chunk", chunk_size=32), chunk_size=16), "set it in one place"),
  ]
  for kw, match in cases:
    with pytest.raises((ValueError, TypeError), match=match) as e:
      gdn2_jax.gdn2(*x, **kw)
    assert "\n" not in str(e.value)


def test_auto_falls_through_and_logs_why(gpu_like, kernel_spy, caplog):
  with caplog.at_level(logging.INFO, logger="gdn2_jax"):
    # Pallas is "available" but its kernels need chunk 64.
    o, _ = jax.eval_shape(lambda *a: gdn2_jax.gdn2(*a, chunk_size=32, config=CFG), *_x())
  assert not kernel_spy and o.shape == (B, T, H, V)  # the chunk path ran (the ChunkConfig is not its setting)
  assert "skips 'pallas': its kernels use a fixed chunk of 64 tokens" in caplog.text


def test_one_precision_vocabulary():
  assert settings.canonical_precision(jax.lax.Precision.DEFAULT) == "tf32"
  assert settings.canonical_precision("HIGHEST") == "ieee"
  assert settings.lax_precision("tf32") == jax.lax.Precision.DEFAULT
  assert settings.lax_precision(None) == jax.lax.Precision.HIGHEST
  with pytest.raises(ValueError, match="op_precision"):
    from train.testing import tiny_model
    tiny_model(op_precision="fp8")


def test_kernel_config_survives_the_saved_model_config():
  """A run's saved config (JSON) gives back the same ChunkConfig."""
  import json
  from gdn2_jax.models import ModelConfig
  from train.config import to_dict
  from train.testing import tiny_model
  mc = tiny_model(kernel_config=CFG, op_precision="tf32")
  assert ModelConfig(**json.loads(json.dumps(to_dict(mc)))) == mc
