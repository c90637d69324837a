"""Context parallelism: the segment transition of a span against the float64 recurrence, and the op split over a
`context` mesh axis against the single-device op (8 simulated CPU devices)."""

import dataclasses
import functools
import re

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


def test_span_transition_and_correction_for_any_entering_state():
  # One batch row per gate regime (b, w at 0 and 1, g down to -1e3 and mixed with -1e-4), grouped value heads, T not
  # a multiple of the chunk: from S0, the span ends at M S0 + c and its outputs are o(0) + q_eff S0.
  case = dataclasses.replace(GATE_CASE, T=100, HV=4, H=2)
  x = make_inputs(case, seed=7)
  names = ("q", "k", "v", "g", "b", "w")
  r = jax.jit(functools.partial(transition.span_forward, scale=case.K ** -0.5, chunk_size=32))(
      *(x[n] for n in names))
  assert r.M.shape == (case.B, case.HV, case.K, case.K) and r.c.shape == (case.B, case.HV, case.K, case.V)
  S0 = x["initial_state"]
  o = r.o + jnp.einsum("btnk,bnkv->btnv", r.q_eff, S0, precision="highest")
  S = transition.apply_transition(r.M, r.c, S0)
  with jax.enable_x64(True):
    o_ref, S_ref = oracle.gdn2_oracle(*(x[n] for n in names), initial_state=S0)
  for row in range(case.B):  # per regime, so a small row cannot hide behind a large one
    assert rel_err(S[row], S_ref[row]) < 1e-5, (row, rel_err(S[row], S_ref[row]))
    assert rel_err(o[row], o_ref[row]) < 1e-5, (row, rel_err(o[row], o_ref[row]))


# ---- the op split over a `context` mesh axis, against the single-device chunk path --------------------------------

NAMES = ("q", "k", "v", "g", "b", "w")


def _starts(segment_ids):
  s = np.concatenate([np.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return jnp.asarray(s)


def _grads(fn, x, do, dS, argnames):
  def loss(*arrays):
    o, S = fn(**dict(zip(argnames, arrays)))
    total = jnp.sum(o * do)
    return total + (0.0 if S is None else jnp.sum(S * dS)), (o, S)

  (_, (o, S)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(argnames))), has_aux=True))(
      *(x[n] for n in argnames))
  return o, S, grads


def _assert_same(got, ref, argnames):
  o1, S1, g1 = got
  o0, S0, g0 = ref
  assert rel_err(o1, o0) < 1e-5, rel_err(o1, o0)
  if S0 is not None:
    assert rel_err(S1, S0) < 1e-5, rel_err(S1, S0)
  for name, a, b in zip(argnames, g1, g0):
    assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


def test_context4_data2_equals_one_device():
  # Explicit-axes mesh context 4 x data 2; 2 rows of packed documents (segment_ids) whose boundaries straddle the
  # shards, grouped value heads, initial and final states, strong and mixed decay.
  from gdn2_jax import gdn2
  from gdn2_jax.ops import context

  mesh = jax.make_mesh((4, 2), ("context", "data"))
  case = dataclasses.replace(GATE_CASE, B=2, T=128, H=1, HV=2, K=16, V=32, gates="random")
  x = make_inputs(case, seed=11)
  x["g"] = x["g"].at[0, 90:110].set(-30.0)  # strong decay across a shard boundary
  seg = np.zeros((2, case.T), np.int32)
  seg[0, 30:] = 1  # inside shard 0
  seg[0, 70:] = 2  # crosses from shard 2 into 3 (shards are 32 tokens)
  seg[1, 64:] = 1  # exactly on a shard boundary
  seg[1, 65:] = 2  # one token later
  rng = np.random.default_rng(0)
  do = jnp.asarray(rng.standard_normal((2, case.T, case.HV, case.V)), jnp.float32)
  dS = jnp.asarray(rng.standard_normal((2, case.HV, case.K, case.V)), jnp.float32)
  argnames = NAMES + ("initial_state",)
  resets = _starts(seg)

  def single(q, k, v, g, b, w, initial_state):
    g = jnp.where(resets[:, :, None, None], -1e30, g)
    return gdn2(q, k, v, g, b, w, initial_state=initial_state, output_final_state=True, backend="chunk",
                chunk_size=16)

  def split(q, k, v, g, b, w, initial_state):
    return context.gdn2_context(q, k, v, g, b, w, initial_state=initial_state, output_final_state=True,
                                segment_ids=jnp.asarray(seg), mesh=mesh, chunk_size=16)

  ref = _grads(single, x, do, dS, argnames)
  got = _grads(split, x, do, dS, argnames)
  _assert_same(got, ref, argnames)


def test_context8_packed_cu_seqlens_equals_one_device():
  # Auto-axes mesh of 8 on `context` alone; cu_seqlens (B = 1) with documents across shard boundaries and an empty
  # one, the in-op gate activation and q/k normalisation (their parameters' gradients too).
  from gdn2_jax import gdn2
  from gdn2_jax.ops import context

  mesh = jax.make_mesh((8,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
  case = dataclasses.replace(GATE_CASE, B=1, T=128, H=2, HV=4, K=16, V=16, gates="random", initial_state=False)
  x = make_inputs(case, seed=12)
  rng = np.random.default_rng(1)
  x["A_log"] = jnp.asarray(np.log(rng.uniform(1, 16, case.H)), jnp.float32)
  x["dt_bias"] = jnp.asarray(rng.standard_normal(case.H * case.K) * 0.5, jnp.float32)
  cu = jnp.asarray([0, 5, 40, 40, 100, 128], jnp.int32)
  do = jnp.asarray(rng.standard_normal((1, case.T, case.HV, case.V)), jnp.float32)
  argnames = NAMES + ("A_log", "dt_bias")
  kw = dict(cu_seqlens=cu, use_qk_l2norm=True, chunk_size=16)
  ref = _grads(lambda **a: gdn2(**a, **kw, backend="chunk"), x, do, None, argnames)
  got = _grads(lambda **a: context.gdn2_context(**a, **kw, mesh=mesh), x, do, None, argnames)
  _assert_same(got, ref, argnames)


def test_bad_split_is_a_one_line_error():
  from gdn2_jax.ops import context

  mesh = jax.make_mesh((4, 2), ("context", "data"))
  x = make_inputs(dataclasses.replace(GATE_CASE, B=2, T=96, gates="random", initial_state=False), seed=0)
  with pytest.raises(ValueError, match=r"T=96 tokens.*4 shards of whole 32-token chunks.*multiple of 128") as e:
    context.gdn2_context(*(x[n] for n in NAMES), mesh=mesh, chunk_size=32)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="no context axis 'context'"):
    context.gdn2_context(*(x[n] for n in NAMES), mesh=jax.make_mesh((8,), ("data",)), chunk_size=32)


_COLLECTIVE = re.compile(r"= (.*?) (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(")
_SHAPE = re.compile(r"\b(f32|f64|bf16|s32|pred)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "s32": 4, "pred": 1}


def _collectives(compiled_text):
  """[(kind, result type, bytes)] of every collective in a compiled HLO module."""
  found = []
  for line in compiled_text.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      size = sum(_BYTES[d] * int(np.prod([int(n) for n in dims.split(",") if n] or [1]))
                 for d, dims in _SHAPE.findall(m.group(1)))
      found.append((m.group(2), m.group(1), size))
  return found


def test_communication_does_not_grow_with_T():
  # Compile the forward + backward at T = 1024 and 4096 over context 4 x data 2 (packed rows): the same
  # collectives, of the same sizes: the forward's all-gather and the backward's reduction each at most
  # 4 bytes x P x HV x K x (K + V) per batch row, and nothing else but the previous shard's last document ids.
  from gdn2_jax.ops import context

  Pc, B, H, HV, K, V = 4, 2, 2, 2, 16, 32
  mesh = jax.make_mesh((Pc, 2), ("context", "data"))
  rows = B // 2  # per device

  def compiled(T):
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = (f32(B, T, H, K),) * 2 + (f32(B, T, HV, V),) + (f32(B, T, H, K),) * 2 + (f32(B, T, HV, V),)

    def f(q, k, v, g, b, w, seg, do):
      fwd = lambda *a: context.gdn2_context(*a, segment_ids=seg, mesh=mesh, chunk_size=64)[0]
      o, vjp = jax.vjp(fwd, q, k, v, g, b, w)
      return o, vjp(do)

    text = jax.jit(f).lower(*args, jax.ShapeDtypeStruct((B, T), jnp.int32), f32(B, T, HV, V)).compile().as_text()
    return _collectives(text)

  bound = 4 * Pc * rows * HV * K * (K + V)
  ids = 4 * rows  # the previous shard's last document id
  short, long = compiled(1024), compiled(4096)
  assert short == long, (short, long)
  assert any(kind == "all-gather" for kind, _, _ in short), short  # the test reads the collectives at all
  forward = sum(size for kind, _, size in short if kind == "all-gather")
  backward = sum(size for kind, _, size in short if kind in ("all-reduce", "reduce-scatter"))
  assert forward <= bound and backward <= bound, short
  assert sum(size for *_, size in short) <= forward + backward + ids, short
