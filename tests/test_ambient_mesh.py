"""The op and the model under `jax.set_mesh` (no project context): per-shard results equal one device's, no gathers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import gdn2_jax
from gdn2_jax import mesh as mesh_lib
from train import loop, optim, sharding
from train.config import MeshConfig, OptimConfig
from train.testing import tiny_model

B, T, H, HV, K, V = 4, 40, 2, 4, 16, 16
TOK = P(("data", "fsdp"), None, "tensor", None)  # batch rows over data x fsdp, heads over tensor
STATE = P(("data", "fsdp"), "tensor", None, None)


def _inputs(seed=0):
  ks = jax.random.split(jax.random.key(seed), 7)
  q, k = (jax.random.normal(s, (B, T, H, K)) for s in ks[:2])
  v = jax.random.normal(ks[2], (B, T, HV, V))
  g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)))
  b = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H, K)))
  w = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, HV, V)))
  h0 = jax.random.normal(ks[6], (B, HV, K, V))
  return q, k, v, g, b, w, h0


def _value_and_grads(backend):
  def loss(q, k, v, g, b, w, h0):
    o, s = gdn2_jax.gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True, use_qk_l2norm=True,
                         backend=backend, interpret=True)
    return jnp.sum(o ** 2) + jnp.sum(jnp.sin(s)), (o, s)
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))


def _mesh(axis_type, shape=(2, 2, 2), names=(mesh_lib.DATA_AXIS, mesh_lib.FSDP_AXIS, mesh_lib.TENSOR_AXIS)):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def _assert_close(ref, got, rtol=2e-5):
  for a, c in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    a, c = np.asarray(a), np.asarray(c)
    np.testing.assert_allclose(c, a, rtol=rtol, atol=rtol * float(np.max(np.abs(a))))


# Pallas in interpret mode compiles slowly (15-40 s a case on 2 cores): slow tier.
CASES = [("chunk", AxisType.Explicit), ("chunk", AxisType.Auto), ("recurrent", AxisType.Explicit),
         ("recurrent", AxisType.Auto), pytest.param("pallas", AxisType.Auto, marks=pytest.mark.slow),
         pytest.param("pallas", AxisType.Explicit, marks=pytest.mark.slow)]


def _spec(x):
  spec = tuple(x.sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


@pytest.mark.parametrize("backend,axis_type", CASES)
def test_op_under_set_mesh_matches_one_device(backend, axis_type):
  args = _inputs()
  ref = _value_and_grads(backend)(*args)  # no mesh: one device
  with jax.set_mesh(_mesh(axis_type)):
    placed = [jax.device_put(x, TOK) for x in args[:6]] + [jax.device_put(args[6], STATE)]
    f = _value_and_grads(backend)
    hlo = f.lower(*placed).compile().as_text()
    got = f(*placed)
    (_, (o, s)), _ = got
    assert _spec(o) == tuple(TOK) and _spec(s) == tuple(STATE)  # results stay split as the inputs
  assert "all-gather" not in hlo  # every shard runs on its own rows and heads
  _assert_close(ref, got)


@pytest.mark.slow  # the fast tier's cases already split rows; this one leaves the heads whole
def test_batch_only_split_under_explicit_axes():
  """Heads replicated, rows split (the mesh's tensor axis unused): still per shard, no gathers."""
  args = _inputs(2)
  ref = _value_and_grads("recurrent")(*args)
  with jax.set_mesh(_mesh(AxisType.Explicit, (2, 2, 1))):
    placed = [jax.device_put(x, P(("data", "fsdp"))) for x in args]
    f = _value_and_grads("recurrent")
    hlo = f.lower(*placed).compile().as_text()
    got = f(*placed)
  assert "all-gather" not in hlo
  _assert_close(ref, got)


def test_family_entry_point_and_configured_axis_names():
  """`kda` under a mesh whose axes have other names: `axis_names` says which split what (Auto axes)."""
  q, k, v, g, _, _, _ = _inputs(1)
  v = v[:, :, :H]
  beta = jax.nn.sigmoid(jax.random.normal(jax.random.key(3), (B, T, H)))
  f = lambda *a: gdn2_jax.kda(*a, use_qk_l2norm=True, backend="chunk")[0]
  ref = jax.jit(f)(q, k, v, g, beta)
  mesh = _mesh(AxisType.Auto, (4, 2), ("dp", "tp"))
  with jax.set_mesh(mesh), mesh_lib.axis_names(batch=("dp",), head="tp"):
    jaxpr = str(jax.make_jaxpr(f)(q, k, v, g, beta))
    got = jax.jit(f)(q, k, v, g, beta)
  assert "shard_map" in jaxpr
  _assert_close(ref, got)


def test_plain_call_where_nothing_splits():
  """Auto axes that divide neither the batch nor the heads (and names not in the mesh) leave a plain call."""
  q = jnp.zeros((3, 8, 3, 16))
  with jax.set_mesh(_mesh(AxisType.Auto)):
    assert mesh_lib.plan(q, batch_size=3, head_counts=(3,)) is None
    assert mesh_lib.plan(q, batch_size=4, head_counts=(3,)).head is None
  with jax.set_mesh(_mesh(AxisType.Auto, (8,), ("x",))):
    assert mesh_lib.plan(q, batch_size=8, head_counts=(8,)) is None
  assert mesh_lib.plan(q, batch_size=8, head_counts=(8,)) is None  # no mesh at all


def test_axis_names_have_one_home():
  from gdn2_jax import parallel
  assert sharding.MESH_AXES is mesh_lib.MESH_AXES and sharding.BATCH_AXES is mesh_lib.BATCH_AXES
  assert sharding.LOGICAL_RULES["heads"] == mesh_lib.HEAD_AXIS
  assert parallel.MixerMesh.batch_axes == mesh_lib.BATCH_AXES and parallel.MixerMesh.head_axis == mesh_lib.HEAD_AXIS


def _batch(seed=0, Bm=8, Tm=32):
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(1, 4, (Bm, Tm)), axis=1).astype(np.int32)
  return {"tokens": rng.integers(0, 256, (Bm, Tm)).astype(np.int32),
          "targets": rng.integers(0, 256, (Bm, Tm)).astype(np.int32),
          "segment_ids": seg, "loss_mask": np.ones((Bm, Tm), np.float32)}


def _model_loss_and_grads(axis_type):
  mc = tiny_model(n_layers=1, pattern=("gdn2",), num_heads=2, num_v_heads=4, head_v_dim=16, backend="recurrent",
                  vocab_size=256)
  tx, _ = optim.make_optimizer(OptimConfig(), 10)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), axis_type=axis_type)
  setup = loop.init_state(mc, tx, mesh, seed=0)
  b_sh = sharding.batch_sharding(mesh)

  def f(params, rest, batch):  # the training step's loss and gradients, without the project's mixer_mesh
    (s, c), g = jax.value_and_grad(lambda p: loop.loss_sums(setup.graphdef, p, rest, batch), has_aux=True)(params)
    return s / c, jax.tree.map(lambda x: x / c, g)

  with jax.set_mesh(mesh):
    batch = loop.to_global(_batch(), b_sh)
    loss, grads = jax.jit(f)(setup.state["params"], setup.state["rest"], batch)
  return float(loss), [np.asarray(x) for x in jax.tree.leaves(grads)]


@pytest.mark.slow  # two model compilations on 8 devices: about 40 s on 2 cores
def test_model_training_step_under_explicit_axes_matches_auto_axes():
  loss_a, grads_a = _model_loss_and_grads(AxisType.Auto)
  loss_e, grads_e = _model_loss_and_grads(AxisType.Explicit)
  assert abs(loss_e - loss_a) <= 1e-6 * abs(loss_a)
  for a, e in zip(grads_a, grads_e):
    assert float(np.max(np.abs(e - a))) <= 1e-6 * float(np.max(np.abs(a))) + 1e-30


def _train_step_metrics(axis_type):
  mc = tiny_model(n_layers=1, pattern=("gdn2",), num_heads=2, num_v_heads=4, head_v_dim=16, backend="recurrent",
                  vocab_size=256)
  tx, schedule = optim.make_optimizer(OptimConfig(), 10)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), axis_type=axis_type)
  setup = loop.init_state(mc, tx, mesh, seed=0)
  b_sh = sharding.batch_sharding(mesh)
  step = loop.make_train_step(setup.graphdef, tx, schedule, grad_accum=1, shardings=setup.shardings,
                              batch_sharding=b_sh, mesh=mesh)
  with jax.set_mesh(mesh):
    _, metrics = step(setup.state, loop.to_global(_batch(), b_sh))
  return {k: float(v) for k, v in metrics.items()}


@pytest.mark.slow
def test_project_train_step_under_explicit_axes_matches_auto_axes():
  """The project's own step (with its mixer_mesh override) under an explicit-axes mesh."""
  auto, explicit = _train_step_metrics(AxisType.Auto), _train_step_metrics(AxisType.Explicit)
  for name in ("loss", "grad_norm"):
    assert abs(explicit[name] - auto[name]) <= 1e-6 * abs(auto[name]), (name, auto, explicit)
