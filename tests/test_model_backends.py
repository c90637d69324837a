"""Model-level backends: one training step of a tiny model on the 8-device CPU mesh with the chunk path (slow tier)
and the Pallas kernels (interpret mode, fast tier) gives the loss and gradients of the exact token loop
(`backend="recurrent"`).

The step is the training loss (`train.loop.loss_sums`) and its gradients, jitted with the training shardings and
run under `mixer_mesh`, so the op runs per shard inside `shard_map`: packed documents (segment ids), full remat,
scanned layers, grouped value heads, a data x fsdp x tensor mesh. Other model tests (`tests/test_model.py`) use the
recurrent backend only; the op-level backends are `tests/test_ops.py` and `tests/test_pallas.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from gdn2_jax.ops import api
from gdn2_jax.parallel import mixer_mesh
from tests.op_suite import rel_err
from train import loop, optim, sharding
from train.config import MeshConfig, OptimConfig
from train.testing import tiny_model

B, T = 8, 40  # T: several chunks of the chunk path (16), one padded chunk of the kernels (64)
TOL = 1e-5  # float32 everywhere (interpret mode and the chunk path's 'highest' products are exact float32)


def _batch():
  rng = np.random.default_rng(0)
  seg = np.sort(rng.integers(1, 4, (B, T)), axis=1).astype(np.int32)  # up to three documents per row
  return {"tokens": rng.integers(0, 256, (B, T)).astype(np.int32),
          "targets": rng.integers(0, 256, (B, T)).astype(np.int32),
          "segment_ids": seg, "loss_mask": (rng.random((B, T)) > 0.1).astype(np.float32)}


def _model(backend: str):
  return tiny_model(n_layers=2, pattern=("gdn2",), num_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16,
                    backend=backend, vocab_size=256, scan_layers=True, remat="full",
                    chunk_size=64 if backend == "pallas" else 16)  # the kernels' chunk is fixed at 64


@pytest.fixture(scope="module")
def trained():
  """Sharded parameters, shardings and batch, made once (the backend only changes the graph, not the weights)."""
  tx, _ = optim.make_optimizer(OptimConfig(), 10)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  setup = loop.init_state(_model("recurrent"), tx, mesh, seed=0)
  b_sh = sharding.batch_sharding(mesh)
  return mesh, setup, b_sh, loop.to_global(_batch(), b_sh)


def _loss_and_grads(trained, backend: str):
  mesh, setup, b_sh, batch = trained
  graphdef = loop.abstract_model(_model(backend), 0)[0]

  def f(params, rest, batch):
    (s, c), g = jax.value_and_grad(lambda p: loop.loss_sums(graphdef, p, rest, batch), has_aux=True)(params)
    return s / c, jax.tree.map(lambda x: x / c, g)

  fn = jax.jit(f, in_shardings=(setup.shardings["params"], setup.shardings["rest"], b_sh))
  with mixer_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(f)(setup.state["params"], setup.state["rest"], batch))
    loss, grads = fn(setup.state["params"], setup.state["rest"], batch)
  return float(loss), grads


@pytest.fixture(scope="module")
def recurrent(trained):
  return _loss_and_grads(trained, "recurrent")


def _check_same(reference, got):
  loss0, g0 = reference
  loss1, g1 = got
  assert abs(loss1 - loss0) <= TOL * abs(loss0), (loss1, loss0)
  errors = {jax.tree_util.keystr(p): rel_err(b, a) for (p, a), b in
            zip(jax.tree_util.tree_flatten_with_path(g0)[0], jax.tree.leaves(g1))}
  bad = {k: e for k, e in errors.items() if not e < TOL}
  assert not bad, bad


@pytest.mark.slow  # the chunk path under shard_map is also tests/test_sharding.py: test_call_mixer_op_per_shard...
def test_chunk_backend_training_step_matches_recurrent(trained, recurrent):
  _check_same(recurrent, _loss_and_grads(trained, "chunk"))


def test_pallas_backend_training_step_matches_recurrent(trained, recurrent, monkeypatch):
  """The model asks for backend "pallas" as on a GPU; here its kernels run in interpret mode under shard_map."""
  pallas = api._BACKENDS["pallas"]
  interpreted = lambda *a, **kw: pallas.fn(*a, **{**kw, "interpret": True})
  monkeypatch.setitem(api._BACKENDS, "pallas", dataclasses.replace(pallas, available=lambda: True, fn=interpreted))
  _check_same(recurrent, _loss_and_grads(trained, "pallas"))
