"""`gdn2_jax.fla`: fla 0.6.0's op signatures, results equal to the main API bit for bit, refusals in one line."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdn2_jax
from gdn2_jax import fla

# fla 0.6.0 (fla-core wheel), fla/ops/{gdn2,kda,gated_delta_rule,delta_rule}: the positional-or-keyword parameters
# after the tensors, in order, with their defaults. fla reads A_log, dt_bias, chunk_size (and for the gated delta
# rule use_gate_in_kernel) from **kwargs; here they are keyword-only parameters.
FLA_060 = {
    "chunk_gdn2": ("q k v g b w", dict(
        scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
        use_gate_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None, safe_gate=False, lower_bound=None,
        disable_recompute=False, return_intermediate_states=False, state_v_first=False, cp_context=None)),
    "fused_recurrent_gdn2": ("q k v g b w", dict(
        A_log=None, dt_bias=None, scale=None, initial_state=None, output_final_state=False,
        use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, lower_bound=None, state_v_first=False,
        cu_seqlens=None)),
    "chunk_kda": ("q k v g beta", dict(
        scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
        use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, safe_gate=False,
        lower_bound=None, disable_recompute=False, return_intermediate_states=False, state_v_first=False,
        cu_seqlens=None, cu_seqlens_cpu=None, cp_context=None, use_graph=False, max_num_seqs=None)),
    "fused_recurrent_kda": ("q k v g beta", dict(
        A_log=None, dt_bias=None, scale=None, initial_state=None, output_final_state=False,
        use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
        allow_neg_eigval=False, lower_bound=None, state_v_first=False, cu_seqlens=None)),
    "chunk_gated_delta_rule": ("q k v g beta", dict(
        scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
        use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False, cu_seqlens=None,
        cu_seqlens_cpu=None, chunk_indices=None, cp_context=None)),
    "fused_recurrent_gated_delta_rule": ("q k v", dict(
        g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None, output_final_state=False,
        use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None, dt_bias=None,
        use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False, cu_seqlens=None)),
    "chunk_delta_rule": ("q k v beta", dict(
        scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None,
        cu_seqlens_cpu=None)),
    "fused_recurrent_delta_rule": ("q k v", dict(
        beta=None, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
        cu_seqlens=None)),
}


@pytest.mark.parametrize("name", sorted(FLA_060))
def test_signatures_are_fla_060(name):
  tensors, defaults = FLA_060[name]
  params = inspect.signature(getattr(fla, name)).parameters.values()
  positional = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
  assert [p.name for p in positional] == tensors.split() + list(defaults)
  assert {p.name: p.default for p in positional if p.default is not p.empty} == defaults
  assert not any(p.kind == p.VAR_KEYWORD for p in params)  # nothing swallowed


B, T, H, K, V = 1, 24, 2, 16, 8


def _x(seed=0, HV=H):
  ks = jax.random.split(jax.random.key(seed), 9)
  q, k = (jax.random.normal(s, (B, T, H, K)) for s in ks[:2])
  v = jax.random.normal(ks[2], (B, T, HV, V))
  g = jax.random.normal(ks[3], (B, T, HV, K))
  b = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, HV, K)))
  w = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, HV, V)))
  beta = jax.random.normal(ks[6], (B, T, HV))
  h0 = jax.random.normal(ks[7], (2, HV, K, V))
  A = jnp.log(jnp.arange(1.0, HV + 1))
  dt = 0.1 * jax.random.normal(ks[8], (HV * K,))
  return dict(q=q, k=k, v=v, g=g, b=b, w=w, beta=beta, h0=h0, A=A, dt=dt)


CU = jnp.array([0, 10, 24])


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("chunked", [True, False])
def test_names_equal_the_main_api_bit_for_bit(chunked):
  x = _x()
  q, k, v, g, b, w, h0, A, dt = (x[n] for n in "q k v g b w h0 A dt".split())
  be = "recurrent"  # the same backend on both sides (the names are under test, not the backends); compiles fastest
  main = dict(initial_state=h0, output_final_state=True, use_qk_l2norm=True, cu_seqlens=CU, backend=be)
  ours = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=CU, backend=be)
  gate = dict(use_gate_in_kernel=True, A_log=A, dt_bias=dt)
  lg = -jax.nn.softplus(g)
  beta = jax.nn.sigmoid(x["beta"])
  gdn2_ = fla.chunk_gdn2 if chunked else fla.fused_recurrent_gdn2
  kda_ = fla.chunk_kda if chunked else fla.fused_recurrent_kda
  _same(gdn2_(q, k, v, g, b, w, **ours, **gate), gdn2_jax.gdn2(q, k, v, g, b, w, A_log=A, dt_bias=dt, **main))
  _same(gdn2_(q, k, v, g, b, w, **ours, **gate, lower_bound=-2.0),
        gdn2_jax.gdn2(q, k, v, g, b, w, A_log=A, dt_bias=dt, lower_bound=-2.0, **main))
  _same(gdn2_(q, k, v, lg, b, w, **ours, A_log=A), gdn2_jax.gdn2(q, k, v, lg, b, w, **main))  # A_log unused, as fla
  _same(kda_(q, k, v, lg, x["beta"], **ours, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True),
        gdn2_jax.kda(q, k, v, lg, 2 * beta, **main))
  if chunked:
    _same(fla.chunk_gated_delta_rule(q, k, v, lg[..., 0], beta, **ours),
          gdn2_jax.gated_delta_rule(q, k, v, lg[..., 0], beta, **main))
    _same(fla.chunk_delta_rule(q, k, v, beta, **ours), gdn2_jax.delta_rule(q, k, v, beta, **main))
  else:
    _same(fla.fused_recurrent_gated_delta_rule(q, k, v, g[..., 0], beta=beta, **ours, use_gate_in_kernel=True,
                                               A_log=A, dt_bias=dt[:H]),
          gdn2_jax.gated_delta_rule(q, k, v, g[..., 0], beta, A_log=A, dt_bias=dt[:H], **main))
    _same(fla.fused_recurrent_gated_delta_rule(q, k, v, gk=lg, beta=beta, **ours),
          gdn2_jax.kda(q, k, v, lg, beta, **main))
    _same(fla.fused_recurrent_delta_rule(q, k, v, None, **ours),
          gdn2_jax.delta_rule(q, k, v, jnp.ones((B, T, H)), **main))


def test_grouped_value_heads_follow_fla():
  """fla's gates are per value head; each value head gets its group's q and k."""
  x = _x(1, HV=2 * H)
  q, k, v, beta = x["q"], x["k"], x["v"], jax.nn.sigmoid(x["beta"])
  lg = -jax.nn.softplus(x["g"][..., 0])
  rq, rk = jnp.repeat(q, 2, axis=2), jnp.repeat(k, 2, axis=2)
  _same(fla.chunk_gated_delta_rule(q, k, v, lg, beta, output_final_state=True, backend="recurrent"),
        gdn2_jax.gated_delta_rule(rq, rk, v, lg, beta, output_final_state=True, backend="recurrent"))


def test_unsupported_arguments_refuse_in_one_line():
  x = _x()
  q, k, v, g, b, w = (x[n] for n in "q k v g b w".split())
  cases = [
      (lambda: fla.chunk_gdn2(q, k, v, g, b, w, state_v_first=True), NotImplementedError, "state_v_first=True"),
      (lambda: fla.chunk_gdn2(q, k, v, g, b, w, cp_context=object()), NotImplementedError, "cp_context"),
      (lambda: fla.chunk_kda(q, k, v, g, x["beta"], return_intermediate_states=True), NotImplementedError,
       "return_intermediate_states"),
      (lambda: fla.fused_recurrent_gated_delta_rule(q, k, v, gv=v), NotImplementedError, "`gv="),
      (lambda: fla.chunk_gdn2(q, k, v, g, b, w, chunk_size=32), ValueError, "chunk_size"),
      (lambda: fla.chunk_gdn2(q, k, v, g, b, w, use_gate_in_kernel=True), ValueError, "`A_log` is required"),
      (lambda: fla.chunk_kda(q, k, v, g, x["beta"], allow_neg_eigval=True), ValueError, "use_beta_sigmoid"),
  ]
  for call, err, match in cases:
    with pytest.raises(err, match=match) as e:
      call()
    assert "\n" not in str(e.value)
  with pytest.raises(TypeError):  # fla's deprecated alias is not swallowed by **kwargs
    fla.chunk_gdn2(q, k, v, g, b, w, transpose_state_layout=True)
