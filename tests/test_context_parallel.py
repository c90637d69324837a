"""Context parallelism: the segment transition of a span against the float64 recurrence, and the op split over a
`context` mesh axis against the single-device op (8 simulated CPU devices)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn2_jax.ops import transition
from tests import oracle
from tests.op_suite import GATE_CASE, make_inputs, rel_err


def _oracle_final(inputs, S0):
  with jax.enable_x64(True):
    names = ("q", "k", "v", "g", "b", "w")
    _, S = oracle.gdn2_oracle(*(inputs[n] for n in names), initial_state=S0)
    return np.asarray(S)


def test_segment_transition_maps_any_entering_state():
  # One batch row per gate regime (b, w at 0 and 1, g down to -1e3 and mixed with -1e-4), grouped value heads,
  # T not a multiple of the chunk: M S0 + c must be the state after running the span from S0.
  case = dataclasses.replace(GATE_CASE, T=150)
  x = make_inputs(case, seed=3)
  M, c = transition.segment_transition(x["k"], x["v"], x["g"], x["b"], x["w"], chunk_size=32)
  assert M.shape == (case.B, case.HV, case.K, case.K) and c.shape == (case.B, case.HV, case.K, case.V)
  for seed in (0, 1):
    S0 = np.random.default_rng(seed).standard_normal((case.B, case.HV, case.K, case.V))
    got = transition.apply_transition(M, c, jnp.asarray(S0, jnp.float32))
    ref = _oracle_final(x, S0)
    for row in range(case.B):  # per regime, so a small row cannot hide behind a large one
      assert rel_err(got[row], ref[row]) < 1e-5, (row, rel_err(got[row], ref[row]))


def test_segment_transition_resets_inside_the_span():
  # A document starting inside the span: nothing of the entering state survives (M = 0 exactly) and c is the run
  # of the tokens from that start on, from a zero state.
  case = dataclasses.replace(GATE_CASE, B=2, T=130, gates="random", initial_state=False)
  x = make_inputs(case, seed=5)
  starts = np.zeros((2, case.T), bool)
  starts[0, 77] = True
  starts[1, [20, 64]] = True  # two starts, the second on a chunk boundary
  M, c = transition.segment_transition(x["k"], x["v"], x["g"], x["b"], x["w"], resets=jnp.asarray(starts),
                                       chunk_size=32)
  assert np.all(np.asarray(M) == 0.0)
  for row, s in ((0, 77), (1, 64)):
    tail = {n: x[n][row:row + 1, s:] for n in ("q", "k", "v", "g", "b", "w")}
    ref = _oracle_final(tail, np.zeros((1, case.HV, case.K, case.V)))
    assert rel_err(c[row:row + 1], ref) < 1e-5


def test_span_forward_corrects_outputs_for_the_entering_state():
  # o(S0) = o(0) + q_eff S0 token by token, and the end state is M S0 + c (the pieces the context split uses).
  case = dataclasses.replace(GATE_CASE, T=100, HV=4, H=2)
  x = make_inputs(case, seed=7)
  names = ("q", "k", "v", "g", "b", "w")
  r = transition.span_forward(*(x[n] for n in names), scale=case.K ** -0.5, chunk_size=32)
  S0 = x["initial_state"]
  o = r.o + jnp.einsum("btnk,bnkv->btnv", r.q_eff, S0, precision="highest")
  with jax.enable_x64(True):
    o_ref, S_ref = oracle.gdn2_oracle(*(x[n] for n in names), initial_state=S0)
  assert rel_err(o, o_ref) < 1e-5
  assert rel_err(transition.apply_transition(r.M, r.c, S0), S_ref) < 1e-5
