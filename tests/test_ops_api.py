"""The op API around the backends: family collapses against their textbook recurrences, jit/vmap/grad/checkpoint
composition, the decode step, `backend="auto"` observed picking a backend, packed sequences (traced offsets,
isolation, one definition of a sequence start), errors and checked mode.

The op suite itself (shapes, gate regimes, packed sequences, every gradient against float64) runs per backend in
`tests/test_ops.py` and `tests/test_pallas.py`; the oracle's own check is `tests/test_oracle.py`.
"""

import dataclasses
import functools
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdn2_jax
from tests import oracle
from tests.op_suite import Case, make_inputs, rel_err

BACKENDS = ["chunk", "recurrent"]
TOL = 1e-5


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _family_inputs(seed, B=2, T=75, H=2, K=16, V=24):
  rng = np.random.default_rng(seed)
  q = _unit(rng.standard_normal((B, T, H, K)))
  k = _unit(rng.standard_normal((B, T, H, K)))
  v = rng.standard_normal((B, T, H, V))
  beta = rng.uniform(0, 1, (B, T, H))
  g_vec = -np.exp(rng.uniform(np.log(1e-3), np.log(3.0), (B, T, H, K)))
  g_scalar = -np.exp(rng.uniform(np.log(1e-3), np.log(3.0), (B, T, H)))
  return q, k, v, beta, g_vec, g_scalar


# Textbook recurrences, written separately from the GDN-2 oracle (NumPy, float64, one head at a time).
def _textbook(q, k, v, beta, decay, scale):
  """S_t = (I - beta_t k_t k_t^T) Diag(decay_t) S_{t-1} + beta_t k_t v_t^T; decay_t [K] (a vector or repeated)."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  o = np.zeros((B, T, H, V))
  for bi in range(B):
    for h in range(H):
      S = np.zeros((K, V))
      for t in range(T):
        kt = k[bi, t, h]
        S = (np.eye(K) - beta[bi, t, h] * np.outer(kt, kt)) @ (decay[bi, t, h][:, None] * S)
        S = S + beta[bi, t, h] * np.outer(kt, v[bi, t, h])
        o[bi, t, h] = scale * S.T @ q[bi, t, h]
  return o


@pytest.mark.parametrize("backend", BACKENDS)
def test_kda_is_its_own_recurrence(backend):
  q, k, v, beta, g, _ = _family_inputs(0)
  ref = _textbook(q, k, v, beta, np.exp(g), q.shape[-1] ** -0.5)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  o, _ = gdn2_jax.kda(f32(q), f32(k), f32(v), f32(g), f32(beta), backend=backend)
  assert rel_err(o, ref) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_delta_rule_is_its_own_recurrence(backend):
  q, k, v, beta, _, g = _family_inputs(1)
  # Gated DeltaNet: S_t = exp(g_t) (I - beta k k^T) S_{t-1} + beta k v^T; a scalar decay commutes with the rest.
  ref = _textbook(q, k, v, beta, np.repeat(np.exp(g)[..., None], q.shape[-1], -1), q.shape[-1] ** -0.5)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  o, _ = gdn2_jax.gated_delta_rule(f32(q), f32(k), f32(v), f32(g), f32(beta), backend=backend)
  assert rel_err(o, ref) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_rule_is_its_own_recurrence(backend):
  q, k, v, beta, _, _ = _family_inputs(2)
  ref = _textbook(q, k, v, beta, np.ones(q.shape), q.shape[-1] ** -0.5)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  o, _ = gdn2_jax.delta_rule(f32(q), f32(k), f32(v), f32(beta), backend=backend)
  assert rel_err(o, ref) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_delta_rule_gate_activation_gradients(backend):
  """Scalar-decay family member with the in-op activation: gradients reach A_log and the per-head dt_bias."""
  q, k, v, beta, _, graw = _family_inputs(3, T=40)
  A_log = np.log(np.array([2.0, 7.0]))
  dt_bias = np.array([0.3, -0.2])
  f32 = lambda x: jnp.asarray(x, jnp.float32)

  def loss(A_log, dt_bias, fn, **kw):
    o, _ = fn(q=kw["q"], k=kw["k"], v=kw["v"], g=kw["g"], beta=kw["beta"], A_log=A_log, dt_bias=dt_bias)
    return jnp.sum(o ** 2)

  ours = jax.grad(loss, argnums=(0, 1))(f32(A_log), f32(dt_bias),
                                         functools.partial(gdn2_jax.gated_delta_rule, backend=backend),
                                         q=f32(q), k=f32(k), v=f32(v), g=f32(graw), beta=f32(beta))
  with jax.enable_x64(True):
    K = q.shape[-1]

    def ref_fn(q, k, v, g, beta, A_log, dt_bias):
      lead = v.shape[:3]
      bk = jnp.broadcast_to(beta[..., None], lead + (K,))
      bv = jnp.broadcast_to(beta[..., None], v.shape)
      return oracle.gdn2_oracle(q, k, v, jnp.broadcast_to(g[..., None], lead + (K,)), bk, bv, A_log=A_log,
                                dt_bias=jnp.repeat(dt_bias, K))

    d = lambda x: jnp.asarray(x, jnp.float64)
    ref = jax.grad(loss, argnums=(0, 1))(d(A_log), d(dt_bias), ref_fn, q=d(q), k=d(k), v=d(v), g=d(graw),
                                          beta=d(beta))
  for a, r in zip(ours, ref):
    assert rel_err(a, np.asarray(r)) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_vmap_grad_checkpoint_compose(backend):
  """jit(vmap(value_and_grad(checkpoint(op)))) equals the float64 oracle, example by example."""
  case = Case("compose", B=1, T=40, H=1, HV=1, K=16, V=16)
  xs = [make_inputs(case, s) for s in (11, 12)]
  stacked = {n: jnp.stack([x[n] for x in xs]) for n in xs[0]}

  def loss(fn, inputs):
    o, s = fn(**inputs)
    return jnp.sum(o ** 2) + jnp.sum(s ** 2)

  ours = functools.partial(gdn2_jax.gdn2, output_final_state=True, backend=backend)
  batched = jax.jit(jax.vmap(jax.value_and_grad(jax.checkpoint(functools.partial(loss, ours)))))(stacked)
  for i, x in enumerate(xs):
    with jax.enable_x64(True):
      x64 = {n: jnp.asarray(np.asarray(a, np.float64)) for n, a in x.items()}
      ref = jax.value_and_grad(functools.partial(loss, oracle.gdn2_oracle))(x64)
    assert rel_err(batched[0][i], np.asarray(ref[0])) < TOL
    for n in x:
      assert rel_err(batched[1][n][i], np.asarray(ref[1][n])) < TOL, n


def test_step_matches_sequence_and_oracle():
  case = Case("step", B=2, T=9, H=1, HV=2, K=16, V=8)
  x = make_inputs(case, 21)
  o_seq, s_seq = gdn2_jax.gdn2(**x, output_final_state=True, backend="chunk")
  S = x["initial_state"]
  outs = []
  step = jax.jit(gdn2_jax.gdn2_step)
  for t in range(case.T):
    o_t, S = step(S, *(x[n][:, t] for n in ("q", "k", "v", "g", "b", "w")))
    outs.append(o_t)
  o_steps = jnp.stack(outs, axis=1)
  with jax.enable_x64(True):
    ref_o, ref_s = oracle.gdn2_oracle(**x)
  assert rel_err(o_steps, np.asarray(ref_o)) < TOL
  assert rel_err(S, np.asarray(ref_s)) < TOL
  assert rel_err(o_seq, o_steps) < TOL and rel_err(s_seq, S) < TOL
  assert S.dtype == jnp.float32 and S.shape == (2, 2, 16, 8)


def test_step_with_gate_activation_and_l2norm_matches_op():
  rng = np.random.default_rng(5)
  B, H, K, V = 2, 2, 8, 8
  q, k = (jnp.asarray(rng.standard_normal((B, 1, H, K)), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((B, 1, H, V)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((B, 1, H, K)), jnp.float32)
  b, w = jnp.asarray(rng.uniform(size=(B, 1, H, K)), jnp.float32), jnp.asarray(rng.uniform(size=(B, 1, H, V)), jnp.float32)
  S0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
  kw = dict(use_qk_l2norm=True, A_log=jnp.log(jnp.array([2.0, 5.0])), dt_bias=jnp.full((H * K,), 0.1),
            lower_bound=-3.0)
  o, s = gdn2_jax.gdn2(q, k, v, g, b, w, initial_state=S0, output_final_state=True, backend="recurrent", **kw)
  o1, s1 = gdn2_jax.gdn2_step(S0, q[:, 0], k[:, 0], v[:, 0], g[:, 0], b[:, 0], w[:, 0], **kw)
  chex.assert_trees_all_close((o[:, 0], s), (o1, s1), rtol=1e-6, atol=1e-6)


def test_bf16_output_dtype():
  case = Case("dtype", T=20, H=1, HV=1, K=16, V=16)
  x = make_inputs(case, 1, jnp.bfloat16)
  o, s = gdn2_jax.gdn2(**x, output_final_state=True)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32


def test_auto_backend_is_observed_picking(monkeypatch, caplog):
  """`backend="auto"` runs the chunk path on the CPU, and the Pallas backend wherever that says it is available."""
  from gdn2_jax.ops import api
  case = Case("auto", T=20, H=1, HV=1, K=16, V=16)
  x = make_inputs(case, 2)
  assert gdn2_jax.available_backends()[0] == "chunk"  # CPU: no Pallas GPU kernels
  calls = []

  def spy(name):
    real = api._BACKENDS[name]

    def fn(*a, **kw):
      calls.append(name)
      return real.fn(*a, **kw)
    return fn

  for name in ("chunk", "recurrent"):
    monkeypatch.setitem(api._BACKENDS, name, dataclasses.replace(api._BACKENDS[name], fn=spy(name)))
  with caplog.at_level(logging.DEBUG, logger="gdn2_jax"):
    o_auto, _ = gdn2_jax.gdn2(**x)
  assert calls == ["chunk"] and "picked 'chunk'" in caplog.text
  np.testing.assert_array_equal(o_auto, gdn2_jax.gdn2(**x, backend="chunk")[0])
  # A platform where the kernels run (a GPU, simulated): auto must pick them (a stand-in records the call and
  # answers with the chunk path; the kernels themselves are tests/test_pallas*.py).
  stand_in = lambda *a, **kw: (calls.append("pallas"), api.chunk.chunk_fwd(*a, scale=kw["scale"],
                                                                          initial_state=kw["initial_state"]))[1]
  pallas = api._BACKENDS["pallas"]
  monkeypatch.setitem(api._BACKENDS, "pallas", dataclasses.replace(pallas, available=lambda: True, fn=stand_in))
  calls.clear()
  gdn2_jax.gdn2(**x)
  assert calls == ["pallas"]


def test_varlen_under_jit_with_traced_offsets():
  """cu_seqlens as a traced array of fixed length: one compile serves different packings."""
  case = Case("jit_varlen", T=50, H=1, HV=1, K=16, V=16, cu_seqlens=(0, 10, 50, 50))
  x = make_inputs(case, 2)

  @jax.jit
  def f(x, cu):
    return gdn2_jax.gdn2(**x, cu_seqlens=cu, output_final_state=True)

  for cu in ((0, 10, 50, 50), (0, 31, 32, 50)):
    o, s = f(x, jnp.asarray(cu, jnp.int32))
    with jax.enable_x64(True):
      ro, rs = oracle.gdn2_oracle(**x, cu_seqlens=np.asarray(cu))
    assert rel_err(o, np.asarray(ro)) < TOL and rel_err(s, np.asarray(rs)) < TOL
  assert f._cache_size() == 1


def test_varlen_isolates_sequences():
  """Changing one packed sequence changes nothing in the others."""
  case = Case("isolation", T=60, H=1, HV=1, K=16, V=16, cu_seqlens=(0, 25, 60), initial_state=False)
  x = make_inputs(case, 4)
  cu = jnp.asarray(case.cu_seqlens, jnp.int32)
  o1, _ = gdn2_jax.gdn2(**x, cu_seqlens=cu)
  x2 = dict(x, v=x["v"].at[:, :25].set(100.0))
  o2, _ = gdn2_jax.gdn2(**x2, cu_seqlens=cu)
  np.testing.assert_array_equal(np.asarray(o1[:, 25:]), np.asarray(o2[:, 25:]))


class TestErrors:
  def _x(self, **over):
    case = Case("err", T=8, H=2, HV=2, K=16, V=16)
    x = make_inputs(case, 0)
    x.update(over)
    return x

  @pytest.mark.parametrize("over, match", [
      (dict(k=jnp.zeros((1, 8, 2, 8))), r"`k` has shape \(1, 8, 2, 8\); expected \(1, 8, 2, 16\)"),
      (dict(w=jnp.zeros((1, 8, 2, 4))), r"`w` has shape"),
      (dict(q=jnp.zeros((8, 2, 16))), r"`q` has shape \(8, 2, 16\); expected rank 4"),
      (dict(v=jnp.zeros((1, 8, 3, 16)), w=jnp.zeros((1, 8, 3, 16))), r"multiple of the qk heads"),
      (dict(initial_state=jnp.zeros((1, 2, 16, 8))), r"`initial_state` has shape \(1, 2, 16, 8\); expected"),
      (dict(b=jnp.zeros((1, 8, 2, 16), jnp.int32)), r"`b` has dtype int32; expected a floating dtype"),
  ])
  def test_bad_inputs(self, over, match):
    with pytest.raises((ValueError, TypeError), match=match):
      gdn2_jax.gdn2(**self._x(**over))

  def test_head_dim_too_large(self):
    z = jnp.zeros((1, 4, 1, 512))
    with pytest.raises(ValueError, match="at most 256"):
      gdn2_jax.gdn2(z, z, z[..., :16], z, z, z[..., :16])

  def test_cu_seqlens_needs_batch_one(self):
    x = self._x()
    x = {n: (jnp.concatenate([a, a]) if a is not None else None) for n, a in x.items()}
    x["initial_state"] = None
    with pytest.raises(ValueError, match="batch must be 1"):
      gdn2_jax.gdn2(**x, cu_seqlens=jnp.array([0, 4, 8]))

  @pytest.mark.parametrize("cu", [[0, 5, 3, 8], [-1, 4, 8], [0, 4, 9], [0, 4, 6]],
                           ids=["decreasing", "below_0", "past_T", "ends_before_T"])
  def test_bad_cu_seqlens(self, cu):
    x = dict(self._x(), initial_state=None)
    with pytest.raises(ValueError, match=r"`cu_seqlens` is \[.*\]; expected offsets that start at 0, never decrease "
                                         r"and end at T=8"):
      gdn2_jax.gdn2(**x, cu_seqlens=jnp.asarray(cu, jnp.int32))

  def test_checked_mode_catches_traced_cu_seqlens_and_erase_gate(self):
    from jax.experimental import checkify
    x = dict(self._x(), initial_state=None)
    f = checkify.checkify(jax.jit(lambda cu, **a: gdn2_jax.gdn2(**a, cu_seqlens=cu, check_values=True)))
    err, _ = f(jnp.asarray([0, 5, 3, 8], jnp.int32), **x)
    with pytest.raises(Exception, match="`cu_seqlens` must start at 0, never decrease and end at T=8"):
      err.throw()
    err, _ = f(jnp.asarray([0, 3, 8, 8], jnp.int32), **x)
    err.throw()  # valid, padded by repeating the last offset
    with pytest.raises(Exception, match=r"`b` has values outside \[0, 2\] \(min 0.*, max 3"):
      gdn2_jax.gdn2_checked(**dict(x, b=x["b"].at[0, 0, 0, 0].set(3.0)))

  def test_chunk_size_zero_and_python_lists(self):
    x = self._x()
    with pytest.raises(ValueError, match=r"`chunk_size` is 0; expected a positive integer"):
      gdn2_jax.gdn2(**x, backend="chunk", chunk_size=0)
    as_lists = {n: (np.asarray(a).tolist() if a is not None else None) for n, a in x.items()}
    o, _ = gdn2_jax.gdn2(**as_lists, backend="recurrent")  # lists are arrays
    np.testing.assert_array_equal(np.asarray(o), np.asarray(gdn2_jax.gdn2(**x, backend="recurrent")[0]))
    with pytest.raises(ValueError, match=r"`q` has shape \(8, 2, 16\); expected rank 4"):
      gdn2_jax.gdn2(**dict(x, q=np.asarray(x["q"])[0].tolist()))
    with pytest.raises(ValueError, match=r"`cu_seqlens` is \[0, 4, 7\]"):
      gdn2_jax.gdn2(**dict(x, initial_state=None), cu_seqlens=[0, 4, 7])

  def test_unknown_backend(self):
    with pytest.raises(ValueError, match="`backend` is 'cuda'; expected 'auto' or one of"):
      gdn2_jax.gdn2(**self._x(), backend="cuda")

  def test_family_gate_shape(self):
    x = self._x()
    with pytest.raises(ValueError, match=r"`beta` has shape \(1, 8, 2, 16\); expected \(1, 8, 2\)"):
      gdn2_jax.kda(x["q"], x["k"], x["v"], x["g"], x["b"])

  def test_checked_mode_catches_values(self):
    x = self._x()
    with pytest.raises(Exception, match="positive values"):
      gdn2_jax.gdn2_checked(**dict(x, g=-x["g"]))
    with pytest.raises(Exception, match="`v` has non-finite"):
      gdn2_jax.gdn2_checked(**dict(x, v=x["v"].at[0, 0, 0, 0].set(jnp.nan)))
    o, _ = gdn2_jax.gdn2_checked(**x)
    assert np.all(np.isfinite(np.asarray(o)))


@pytest.mark.slow
def test_chunk_path_memory_is_linear_in_T():
  """Compiled forward+backward temporaries grow linearly with T (no (T/C) x C x C x K buffer, no per-token state)."""
  def temp_bytes(T, K=32, V=32):
    spec = lambda d: jax.ShapeDtypeStruct((1, T, 1, d), jnp.float32)

    def loss(q, k, v, g, b, w):
      return jnp.sum(gdn2_jax.gdn2(q, k, v, g, b, w, backend="chunk")[0])

    compiled = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(
        spec(K), spec(K), spec(V), spec(K), spec(K), spec(V)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(256), temp_bytes(1024)
  assert large / small < 4.4, (small, large)


def test_sequence_starts_from_offsets_and_from_segment_ids_agree():
  """One definition of a sequence start (`varlen.sequence_starts`) for both ways of marking packed sequences: offsets
  with an empty sequence and trailing repeats, and the model's segment ids."""
  from gdn2_jax.ops import varlen
  cu = jnp.array([0, 5, 9, 9, 14, 16, 16], jnp.int32)
  ids = varlen.segment_ids_from_cu_seqlens(cu, 16)
  np.testing.assert_array_equal(ids, [0] * 5 + [1] * 4 + [3] * 5 + [4] * 2)
  expected = np.zeros(16, bool)
  expected[[0, 5, 9, 14]] = True
  np.testing.assert_array_equal(varlen.sequence_starts(ids), expected)
  seg = jnp.array([[7, 7, 8, 8, 8], [2, 3, 3, 3, 3]], jnp.int32)
  np.testing.assert_array_equal(varlen.sequence_starts(seg), [[1, 0, 1, 0, 0], [1, 1, 0, 0, 0]])
