"""Meshes on 8 simulated CPU devices: same loss and gradients as one device, params really sharded, op per shard
(recurrent backend; the chunk and Pallas backends on the mesh are `tests/test_model_backends.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from gdn2_jax import gdn2
from gdn2_jax.parallel import call_mixer_op, mixer_mesh
from train import loop, optim, sharding
from train.config import ConfigError, MeshConfig, OptimConfig
from train.testing import tiny_model

B, T = 8, 32


def _model():
  # GDN-2 (2 q/k heads, 4 value heads) + sliding-window attention (2 heads). The token-scan backend compiles
  # fastest; the chunk path under shard_map is checked op by op in test_call_mixer_op_per_shard_equals_plain_call.
  return tiny_model(n_layers=2, pattern=("gdn2", "swa"), num_heads=2, num_v_heads=4, head_v_dim=16,
                    backend="recurrent", vocab_size=256)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(1, 4, (B, T)), axis=1).astype(np.int32)
  return {"tokens": rng.integers(0, 256, (B, T)).astype(np.int32),
          "targets": rng.integers(0, 256, (B, T)).astype(np.int32),
          "segment_ids": seg, "loss_mask": (rng.random((B, T)) > 0.1).astype(np.float32)}


def _loss_and_grads(mesh_cfg, devices):
  mc = _model()
  tx, _ = optim.make_optimizer(OptimConfig(), 10)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  setup = loop.init_state(mc, tx, mesh, seed=0)
  b_sh = sharding.batch_sharding(mesh)

  def f(params, rest, batch):
    (s, c), g = jax.value_and_grad(lambda p: loop.loss_sums(setup.graphdef, p, rest, batch), has_aux=True)(params)
    return s / c, jax.tree.map(lambda x: x / c, g)

  fn = jax.jit(f, in_shardings=(setup.shardings["params"], setup.shardings["rest"], b_sh))
  batch = loop.to_global(_batch(), b_sh)
  with mixer_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(f)(setup.state["params"], setup.state["rest"], batch))
    loss, grads = fn(setup.state["params"], setup.state["rest"], batch)
  return setup, float(loss), grads, jaxpr


@pytest.fixture(scope="module")
def reference():
  return _loss_and_grads(MeshConfig(data=1), jax.devices()[:1])


def _check_same(reference, got):
  _, loss0, g0, _ = reference
  _, loss1, g1, _ = got
  np.testing.assert_allclose(loss1, loss0, rtol=2e-6)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g0)[0], jax.tree.leaves(g1)):
    scale = float(jnp.max(jnp.abs(a))) + 1e-12
    err = float(jnp.max(jnp.abs(np.asarray(b) - np.asarray(a)))) / scale
    assert err < 2e-5, (jax.tree_util.keystr(path), err)


def _spec(setup, *names):
  """The PartitionSpec of the first parameter whose path contains all of `names`."""
  for path, s in jax.tree_util.tree_flatten_with_path(setup.shardings["params"])[0]:
    key = jax.tree_util.keystr(path)
    if all(n in key for n in names):
      return s.spec, key
  raise KeyError(names)


def test_data_fsdp_tensor_mesh_matches_one_device(reference):
  got = _loss_and_grads(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
  _check_same(reference, got)
  setup, _, _, jaxpr = got
  assert "shard_map" in jaxpr  # the GDN-2 op runs per shard
  assert _spec(setup, "q_proj", "kernel")[0] == P("fsdp", "tensor")
  assert _spec(setup, "mlp", "w3")[0] == P("tensor", "fsdp")
  assert _spec(setup, "embed", "embedding")[0] == P("tensor", "fsdp")
  assert _spec(setup, "A_log")[0] == P("tensor")
  # Arrays really are split: each device holds a quarter of q_proj's kernel.
  params = setup.state["params"]
  kernel = params["layers"][0]["mixer"]["q_proj"]["kernel"][...]
  shard = kernel.addressable_shards[0].data
  assert shard.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)
  assert len({d for s in kernel.addressable_shards for d in [s.device]}) == 8


@pytest.mark.slow  # the fast tier's 2 x 2 x 2 mesh already splits data, fsdp and tensor at once
def test_fsdp_mesh_matches_one_device(reference):
  got = _loss_and_grads(MeshConfig(data=1, fsdp=8, tensor=1), jax.devices())
  _check_same(reference, got)
  setup = got[0]
  assert _spec(setup, "mlp", "w1")[0] == P("fsdp", None)
  assert "shard_map" in got[3]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=8), MeshConfig(data=1, fsdp=1, tensor=8),
                                      MeshConfig(data=2, fsdp=1, tensor=4)])
def test_more_meshes_match_one_device(reference, mesh_cfg):
  got = _loss_and_grads(mesh_cfg, jax.devices())
  _check_same(reference, got)
  if mesh_cfg.tensor >= 4:
    # 2 q/k heads do not divide the tensor axis: GDN-2 head projections stay whole (documented fallback).
    assert got[0].report and _spec(got[0], "layers'][0]['mixer']['q_proj", "kernel")[0][1] is None


def test_heads_that_do_not_divide_stay_replicated():
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
  _, params, _ = loop.abstract_model(_model())
  shardings, report = sharding.param_shardings(params, mesh, _model())
  q = shardings["layers"][0]["mixer"]["q_proj"]["kernel"]
  assert q.spec == P("fsdp", None)
  assert any("heads (2, 4) replicated on 'tensor'" in n for notes in report.values() for n in notes)
  assert shardings["layers"][0]["mlp"]["w1"]["kernel"].spec == P("fsdp", "tensor")


def test_mesh_and_batch_errors():
  with pytest.raises(ConfigError, match="needs 16 devices but 8 are present"):
    sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=4))
  mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2))
  with pytest.raises(ConfigError, match="multiple of 8"):
    sharding.check_batch(12, mesh)
  with pytest.raises(ConfigError, match="optim.grad_accum"):
    sharding.check_batch(16, mesh, grad_accum=3)
  sharding.check_batch(16, mesh, grad_accum=2)


def test_call_mixer_op_per_shard_equals_plain_call():
  """Grouped value heads, A_log/dt_bias gradients (summed over batch shards), final states, per-shard placement."""
  Bq, Tq, H, HV, K, V = 4, 32, 4, 8, 16, 8
  ks = jax.random.split(jax.random.key(1), 9)
  q, k, g = (jax.random.normal(ks[i], (Bq, Tq, H, K)) for i in range(3))
  b = jax.nn.sigmoid(jax.random.normal(ks[3], (Bq, Tq, H, K)))
  v = jax.random.normal(ks[4], (Bq, Tq, HV, V))
  w = jax.nn.sigmoid(jax.random.normal(ks[5], (Bq, Tq, HV, V)))
  A = jnp.log(jax.random.uniform(ks[6], (H,), minval=1, maxval=16))
  dt = 0.1 * jax.random.normal(ks[7], (H * K,))
  h0 = jax.random.normal(ks[8], (Bq, HV, K, V))

  def make_f():  # a fresh function per context: jax caches traces by function identity
    def loss(q, k, v, g, b, w, A, dt, h0):
      o, s = call_mixer_op(gdn2, q, k, v, g, b, w, A_log=A, dt_bias=dt, initial_state=h0, output_final_state=True,
                           use_qk_l2norm=True, backend="chunk", chunk_size=16)
      return jnp.sum(o ** 2) + jnp.sum(jnp.sin(s))
    return jax.value_and_grad(loss, argnums=tuple(range(9)))

  args = (q, k, v, g, b, w, A, dt, h0)
  ref = jax.jit(make_f())(*args)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 4), ("data", "fsdp", "tensor"))
  with mixer_mesh(mesh):
    f = make_f()
    assert "shard_map" in str(jax.make_jaxpr(f)(*args))
    got = jax.jit(f)(*args)
  for a, c in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(a))))
