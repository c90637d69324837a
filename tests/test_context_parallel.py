"""Context parallelism: the segment transition of a span against the float64 recurrence, the op split over a
`context` mesh axis (chunk path, and the Pallas kernels in interpret mode in the slow tier) against the
single-device op, its collectives, the split layers, and the training code's `mesh.context` (8 simulated CPU
devices)."""

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
  # from that start on (the oracle forgets everything there: exp(-1e30) = 0 in float64 too).
  case = dataclasses.replace(GATE_CASE, B=2, T=130, gates="random", initial_state=False)
  x = make_inputs(case, seed=5)
  starts = np.zeros((2, case.T), bool)
  starts[0, 77] = True
  starts[1, [20, 64]] = True  # two starts, the second on a chunk boundary
  M, c = jax.jit(functools.partial(transition.segment_transition, chunk_size=32))(
      x["k"], x["v"], x["g"], x["b"], x["w"], resets=jnp.asarray(starts))
  assert np.all(np.asarray(M) == 0.0)
  forgets = dict(x, g=jnp.where(jnp.asarray(starts)[:, :, None, None], -1e30, x["g"]))
  ref = _oracle_final(forgets, np.random.default_rng(0).standard_normal((2, case.HV, case.K, case.V)))
  assert rel_err(c, ref) < 1e-5, rel_err(c, ref)


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


@pytest.mark.slow  # the kernels in interpret mode: about a minute on 2 cores
def test_pallas_context4_data2_equals_one_device():
  # The Pallas kernels (interpret mode) on context 4 x data 2 against the same kernels on one device: packed
  # documents across and on shard boundaries (segment_ids), grouped value heads, initial and final states.
  from gdn2_jax import gdn2
  from gdn2_jax.ops import context

  mesh = jax.make_mesh((4, 2), ("context", "data"))
  case = dataclasses.replace(GATE_CASE, B=2, T=256, H=1, HV=2, K=16, V=32, gates="random")
  x = make_inputs(case, seed=14)
  x["g"] = x["g"].at[1, 40:80].set(-30.0)  # strong decay across a shard boundary
  seg = np.zeros((2, case.T), np.int32)
  seg[0, 100:] = 1  # inside shard 1
  seg[0, 150:] = 2  # crosses from shard 2 into 3 (shards are 64 tokens)
  seg[1, 128:] = 1  # exactly on a shard boundary
  seg[1, 129:] = 2
  rng = np.random.default_rng(3)
  do = jnp.asarray(rng.standard_normal((2, case.T, case.HV, case.V)), jnp.float32)
  dS = jnp.asarray(rng.standard_normal((2, case.HV, case.K, case.V)), jnp.float32)
  argnames = NAMES + ("initial_state",)
  resets = _starts(seg)
  kw = dict(output_final_state=True, backend="pallas", interpret=True, precision="ieee")

  def single(q, k, v, g, b, w, initial_state):
    g = jnp.where(resets[:, :, None, None], -1e30, g)
    return gdn2(q, k, v, g, b, w, initial_state=initial_state, **kw)

  def split(q, k, v, g, b, w, initial_state):
    return context.gdn2_context(q, k, v, g, b, w, initial_state=initial_state, segment_ids=jnp.asarray(seg),
                                mesh=mesh, **kw)

  _assert_same(_grads(split, x, do, dS, argnames), _grads(single, x, do, dS, argnames), argnames)


@pytest.mark.slow
def test_pallas_context8_packed_cu_seqlens_equals_one_device():
  # `gdn2(backend="pallas")` under `jax.set_mesh` of an auto-axes mesh of 8 on `context`: cu_seqlens (B = 1) with
  # documents across shard boundaries and an empty one, grouped value heads, q/k normalised in the op. (No `A_log`
  # here: its gradient sums dg over all T x K with cancellation, and the kernels' own dg is 1.5e-6 from float64, so
  # the sum is 5e-6 off float64 on one device already; `A_log` through the split is checked on the chunk path.)
  from gdn2_jax import gdn2

  mesh = jax.make_mesh((8,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
  case = dataclasses.replace(GATE_CASE, B=1, T=512, H=1, HV=2, K=16, V=16, gates="random", initial_state=False)
  x = make_inputs(case, seed=15)
  rng = np.random.default_rng(4)
  cu = jnp.asarray([0, 30, 200, 200, 448, 512], jnp.int32)
  do = jnp.asarray(rng.standard_normal((1, case.T, case.HV, case.V)), jnp.float32)
  argnames = NAMES
  kw = dict(cu_seqlens=cu, use_qk_l2norm=True, backend="pallas", interpret=True, precision="ieee")
  ref = _grads(lambda **a: gdn2(**a, **kw), x, do, None, argnames)
  with jax.set_mesh(mesh):
    got = _grads(lambda **a: gdn2(**a, **kw), x, do, None, argnames)
  _assert_same(got, ref, argnames)


def test_context8_packed_cu_seqlens_equals_one_device():
  # `gdn2` under `jax.set_mesh` of an auto-axes mesh of 8 on `context` alone; cu_seqlens (B = 1) with documents
  # across shard boundaries and an empty one, the in-op gate activation and q/k normalisation (their gradients too).
  from gdn2_jax import gdn2

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
  with jax.set_mesh(mesh):  # `gdn2` under an ambient mesh with a context axis takes the split path
    got = _grads(lambda **a: gdn2(**a, **kw, backend="chunk"), x, do, None, argnames)
    jaxpr = str(jax.make_jaxpr(lambda *a: gdn2(*a, **kw))(*(x[n] for n in NAMES)))
  assert "all_gather" in jaxpr  # the shards' transitions, not an unsplit call
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


@pytest.mark.parametrize("K, V, lengths", [(16, 32, (1024, 4096)), (16, 128, (1024,))])
def test_communication_does_not_grow_with_T(K, V, lengths):
  # Compile the forward, and the forward + backward, over context 4 x data 2 (packed rows): at T = 1024 and 4096
  # the same collectives of the same sizes; each direction moves at most 4 bytes x P x HV x K x (K + V) per batch
  # row, besides the previous shard's last document ids. V = 128 > P K: the backward must not move (P + 1) K V.
  from gdn2_jax.ops import context

  Pc, B, H, HV = 4, 2, 2, 2
  mesh = jax.make_mesh((Pc, 2), ("context", "data"))
  rows = B // 2  # per device

  def compiled(T, backward):
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = (f32(B, T, H, K),) * 2 + (f32(B, T, HV, V),) + (f32(B, T, H, K),) * 2 + (f32(B, T, HV, V),)

    def f(q, k, v, g, b, w, seg, do):
      fwd = lambda *a: context.gdn2_context(*a, segment_ids=seg, mesh=mesh, chunk_size=64)[0]
      if not backward:
        return fwd(q, k, v, g, b, w)
      o, vjp = jax.vjp(fwd, q, k, v, g, b, w)
      return o, vjp(do)

    text = jax.jit(f).lower(*args, jax.ShapeDtypeStruct((B, T), jnp.int32), f32(B, T, HV, V)).compile().as_text()
    return sorted(_collectives(text))

  bound = 4 * Pc * rows * HV * K * (K + V)
  ids = 4 * rows  # the previous shard's last document id
  runs = [compiled(T, True) for T in lengths]
  assert all(run == runs[0] for run in runs), runs
  forward, both = compiled(lengths[0], False), runs[0]
  assert any(kind == "all-gather" for kind, _, _ in forward), forward  # the test reads the collectives at all
  backward = list(both)
  for item in forward:  # the forward + backward holds the forward's collectives, and the backward's
    assert item in backward, (item, both)
    backward.remove(item)
  fwd_bytes = sum(size for *_, size in forward)
  bwd_bytes = sum(size for *_, size in backward)
  assert fwd_bytes <= bound + ids and bwd_bytes <= bound, (bound, forward, backward)


_LOWERED_COLLECTIVE = re.compile(r'"stablehlo\.(all_gather|all_reduce|reduce_scatter|collective_permute|all_to_all)"'
                                 r".*-> (tensor<[0-9x]*x?(?:f32|bf16|i32)>)")
_TENSOR = re.compile(r"tensor<([0-9x]*?)x?(f32|bf16|i32)>")


def test_pallas_split_communication_does_not_grow_with_T():
  # The Pallas split's collectives, read from the module lowered for sm90 (no GPU: the kernels need not compile):
  # at T = 1024 and 4096 the same ones, of the same sizes, at most 4 bytes x P x HV x K x (K + V) per batch row
  # each way, besides the previous shard's last document ids.
  from gdn2_jax.ops import context
  from pallas_kernels.tools.sm90 import lowering_for_sm90

  Pc, B, H, HV, K, V = 4, 2, 2, 2, 16, 32
  mesh = jax.make_mesh((Pc, 2), ("context", "data"))

  def collectives(T):
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = (f32(B, T, H, K),) * 2 + (f32(B, T, HV, V),) + (f32(B, T, H, K),) * 2 + (f32(B, T, HV, V),)

    def f(q, k, v, g, b, w, seg, do):
      fwd = lambda *a: context.gdn2_context(*a, segment_ids=seg, mesh=mesh, backend="pallas")[0]
      o, vjp = jax.vjp(fwd, q, k, v, g, b, w)
      return o, vjp(do)

    text = jax.jit(f).trace(*args, jax.ShapeDtypeStruct((B, T), jnp.int32), f32(B, T, HV, V)).lower(
        lowering_platforms=("cuda",)).as_text()
    found = []
    for line in text.splitlines():
      m = _LOWERED_COLLECTIVE.search(line)
      if m:
        dims, dtype = _TENSOR.search(m.group(2)).groups()
        found.append((m.group(1), m.group(2), (2 if dtype == "bf16" else 4) * int(np.prod(
            [int(n) for n in dims.split("x") if n] or [1]))))
    return sorted(found)

  with lowering_for_sm90():
    short, long = collectives(1024), collectives(4096)
  assert short == long, (short, long)
  kinds = [kind for kind, _, _ in short]
  assert kinds.count("all_gather") == 3 and set(kinds) == {"all_gather", "collective_permute"}, short
  rows = B // 2
  bound = 4 * Pc * rows * HV * K * (K + V)
  gathered = sum(size for kind, _, size in short if kind == "all_gather")
  assert gathered <= 2 * bound, (gathered, bound, short)  # (M, c) forward, the entering states' cotangents back
  assert all(size <= 4 * rows for kind, _, size in short if kind == "collective_permute"), short


# ---- layers and the hybrid model under a mixer mesh with a `context` axis ------------------------------------------

def _layer_grads(module, x, segment_ids, mesh=None, x_spec=None):
  """Loss and gradients (parameters and input) of `module(x, segment_ids=...)`, split under `mixer_mesh(mesh)`."""
  from flax import nnx

  from gdn2_jax.parallel import mixer_mesh

  graphdef, params = nnx.split(module)
  w = jnp.sin(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) * 0.1)

  def loss(params, x):
    y = nnx.merge(graphdef, params)(x, segment_ids=segment_ids)
    return jnp.sum(y * w[..., :y.shape[-1]]) if y.shape == x.shape else jnp.sum(y * y)

  fn = jax.value_and_grad(loss, argnums=(0, 1))
  if mesh is None:
    return jax.jit(fn)(params, x)
  with mixer_mesh(mesh):  # traced inside the context (a fresh jit of a fresh function)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*x_spec))
    return jax.jit(lambda p, x: fn(p, x), in_shardings=(None, sh))(params, x)


def _assert_tree_close(got, ref, tol=1e-5):
  (l1, g1), (l0, g0) = got, ref
  assert rel_err(l1, l0) < tol, (float(l1), float(l0))
  for path, a in jax.tree_util.tree_leaves_with_path(g1):
    b = dict(jax.tree_util.tree_leaves_with_path(g0))[path]
    assert rel_err(a, b) < tol, (jax.tree_util.keystr(path), rel_err(a, b))


def _packed_ids(B, T, cuts):
  seg = np.zeros((B, T), np.int32)
  for row, row_cuts in enumerate(cuts):
    for c in row_cuts:
      seg[row, c:] += 1
  return jnp.asarray(seg)


def test_split_short_conv_and_window_attention_equal_unsplit():
  # The two look-back pieces of the hybrid with the sequence over context 4 (x data 2): documents that start 1 and
  # 2 tokens after a shard boundary (the conv's taps and the window reach back across it) and on it.
  from flax import nnx

  from gdn2_jax.layers import Attention, ShortConv

  mesh = jax.make_mesh((4, 2), ("context", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  B, T, D = 2, 64, 8
  x = jax.random.normal(jax.random.key(0), (B, T, D), jnp.float32)
  seg = _packed_ids(B, T, [(17, 34), (32, 50)])
  conv = ShortConv(D, 4, rngs=nnx.Rngs(0))
  attn = Attention(D, num_heads=2, num_kv_heads=1, head_dim=4, window=9, rngs=nnx.Rngs(1))
  for module in (_ConvOnly(conv), attn):
    ref = _layer_grads(module, x, seg)
    got = _layer_grads(module, x, seg, mesh, ("data", "context", None))
    _assert_tree_close(got, ref)


def test_window_longer_than_a_shard_is_a_one_line_error():
  from flax import nnx

  from gdn2_jax.layers import Attention

  mesh = jax.make_mesh((8,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
  attn = Attention(8, num_heads=2, head_dim=4, window=10, rngs=nnx.Rngs(1))
  x = jnp.zeros((1, 64, 8), jnp.float32)  # shards of 8 tokens; the window looks back 9
  with pytest.raises(ValueError, match=r"looks back 9 tokens but each shard of T=64 .* holds 8") as e:
    _layer_grads(attn, x, None, mesh, (None, "context", None))
  assert "\n" not in str(e.value)


class _ConvOnly:
  """A ShortConv called as a mixer (`module(x, segment_ids=...) -> y`), for `_layer_grads`."""

  def __new__(cls, conv):
    from flax import nnx

    class Wrapped(nnx.Module):
      def __init__(self, conv):
        self.conv = conv

      def __call__(self, x, *, segment_ids=None):
        return self.conv(x, segment_ids=segment_ids)[0]

    return Wrapped(conv)


@pytest.mark.slow
def test_gdn2_layer_split_equals_unsplit():
  from flax import nnx

  from gdn2_jax.layers import GatedDeltaNet2

  mesh = jax.make_mesh((4, 2), ("context", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  layer = GatedDeltaNet2(24, num_heads=1, num_v_heads=2, head_k_dim=16, head_v_dim=16, backend="chunk",
                         chunk_size=16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 128, 24), jnp.float32)
  seg = _packed_ids(2, 128, [(30, 70), (64, 66)])
  _assert_tree_close(_layer_grads(layer, x, seg, mesh, ("data", "context", None)), _layer_grads(layer, x, seg))


@pytest.mark.slow
def test_hybrid_model_split_over_context_equals_unsplit():
  # A training loss of the hybrid (GDN-2, MLP, SWA, MLP) with context 4 x data 2: loss and every gradient.
  from flax import nnx

  from gdn2_jax.models import LanguageModel, ModelConfig
  from gdn2_jax.parallel import mixer_mesh

  cfg = ModelConfig.tiny(vocab_size=64, d_model=32, n_layers=2, pattern=("gdn2", "swa"), mlp_hidden=64,
                         num_heads=2, head_k_dim=16, head_v_dim=16, swa_heads=2, window=12, max_seq_len=128,
                         backend="chunk", chunk_size=16)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  B, T = 2, 128
  tokens = jnp.asarray(rng.integers(0, 64, (B, T)), jnp.int32)
  targets = jnp.asarray(rng.integers(0, 64, (B, T)), jnp.int32)
  seg = _packed_ids(B, T, [(30, 70), (64, 97)])

  def loss(params, tokens, seg):
    logits = nnx.merge(graphdef, params)(tokens, segment_ids=seg)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  fn = jax.value_and_grad(loss)
  ref = jax.jit(fn)(params, tokens, seg)
  mesh = jax.make_mesh((4, 2), ("context", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "context"))
  with mixer_mesh(mesh):
    got = jax.jit(lambda p, t, s: fn(p, t, s), in_shardings=(None, sh, sh))(params, tokens, seg)
  _assert_tree_close(got, ref)


@pytest.mark.slow
def test_context2_data2_tensor2_heads_split_equals_one_device():
  # Grouped value heads split over `tensor` beside the sequence over `context` and rows over `data`.
  from gdn2_jax import gdn2
  from gdn2_jax.ops import context

  mesh = jax.make_mesh((2, 2, 2), ("context", "data", "tensor"))
  case = dataclasses.replace(GATE_CASE, B=2, T=64, H=2, HV=4, K=16, V=16, gates="random")
  x = make_inputs(case, seed=13)
  rng = np.random.default_rng(2)
  do = jnp.asarray(rng.standard_normal((2, case.T, case.HV, case.V)), jnp.float32)
  dS = jnp.asarray(rng.standard_normal((2, case.HV, case.K, case.V)), jnp.float32)
  argnames = NAMES + ("initial_state",)
  kw = dict(output_final_state=True, chunk_size=16)
  ref = _grads(lambda **a: gdn2(**a, **kw, backend="chunk"), x, do, dS, argnames)
  got = _grads(lambda **a: context.gdn2_context(**a, **kw, mesh=mesh), x, do, dS, argnames)
  _assert_same(got, ref, argnames)


# ---- the training code: `mesh.context` in the config, the mesh, the batch placement and the train step -------------

def _keep_grads():
  """An optax transformation that applies no update and keeps the last gradients as its state (so the real train
  step hands back its gradients exactly)."""
  import optax

  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _train_batch(B, T, cuts, seed=0):
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(0, 64, (B, T)).astype(np.int32),
          "targets": rng.integers(0, 64, (B, T)).astype(np.int32),
          "segment_ids": np.asarray(_packed_ids(B, T, cuts)) + 1,
          "loss_mask": (rng.random((B, T)) > 0.1).astype(np.float32)}


def _train_step_grads(model_cfg, mesh_cfg, devices, batch):
  """(loss, grad norm, gradients) of one step of the training loop's own step on the mesh of `mesh_cfg`."""
  from train import loop, sharding

  tx = _keep_grads()
  mesh = sharding.make_mesh(mesh_cfg, devices)
  setup = loop.init_state(model_cfg, tx, mesh, seed=0)
  b_sh = sharding.batch_sharding(mesh)
  step = loop.make_train_step(setup.graphdef, tx, lambda s: 0.0, grad_accum=1, shardings=setup.shardings,
                              batch_sharding=b_sh, mesh=mesh)
  placed = loop.to_global(batch, b_sh)
  state, metrics = step(setup.state, placed)
  return mesh, placed, (metrics["loss"], state["opt_state"]), float(metrics["grad_norm"])


def _hybrid_cfg(**kw):
  from gdn2_jax.models import ModelConfig

  base = dict(vocab_size=64, d_model=32, n_layers=2, pattern=("gdn2", "swa"), mlp_hidden=64, num_heads=1,
              num_v_heads=2, head_k_dim=16, head_v_dim=16, swa_heads=2, window=12, max_seq_len=64,
              backend="chunk", chunk_size=16)
  return ModelConfig.tiny(**dict(base, **kw))


@pytest.fixture(scope="module")
def unsplit_step():
  from train.config import MeshConfig

  batch = _train_batch(2, 64, [(13, 33), (16, 47)])
  return batch, _train_step_grads(_hybrid_cfg(), MeshConfig(data=1), jax.devices()[:1], batch)


def _check_split_step(unsplit_step, mesh_cfg):
  batch, (_, _, ref, ref_norm) = unsplit_step
  mesh, placed, got, norm = _train_step_grads(_hybrid_cfg(), mesh_cfg, jax.devices(), batch)
  assert mesh.shape["context"] == mesh_cfg.context
  # The loader's batch reaches every device as its own rows and its own T / context consecutive tokens.
  Tl = 64 // mesh_cfg.context
  for name, x in placed.items():
    assert x.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "context"), (name, x.sharding.spec)
    for shard in x.addressable_shards:
      rows, cols = shard.index
      assert cols.stop - cols.start == Tl
      np.testing.assert_array_equal(np.asarray(shard.data), batch[name][rows, cols])
  _assert_tree_close(got, ref)
  assert abs(norm - ref_norm) <= 1e-5 * ref_norm


def test_train_step_with_context4_data2_equals_unsplit(unsplit_step):
  # The hybrid's training step through train/loop.py with mesh.context=4 x data=2: documents straddle the 16-token
  # shards (the conv taps and the 12-token window reach back over a boundary).
  from train.config import MeshConfig

  _check_split_step(unsplit_step, MeshConfig(data=2, context=4))


@pytest.mark.slow
def test_train_step_with_context2_data2_tensor2_equals_unsplit(unsplit_step):
  from train.config import MeshConfig

  _check_split_step(unsplit_step, MeshConfig(data=2, context=2, tensor=2))


@pytest.mark.parametrize("seq_len, model, match", [
    (96, {}, r"^data.seq_len=96 does not split over mesh.context=4 into shards of whole 16-token chunks"),
    (64, dict(window=24), r"^model.window=24 looks back 23 tokens but each shard of data.seq_len=64 over "
                          r"mesh.context=4 holds 16"),
    (64, dict(backend="recurrent"), r"^model.backend='recurrent' cannot split the sequence over mesh.context=4"),
])
def test_bad_context_mesh_is_a_one_line_error(tmp_path, seq_len, model, match):
  # Refused by the training entry point before any data is read or model built.
  from train import loop
  from train.config import ConfigError, MeshConfig
  from train.testing import tiny_config

  cfg = tiny_config(str(tmp_path), str(tmp_path / "no-corpus.jsonl"), model=_hybrid_cfg(**model),
                    mesh=MeshConfig(data=2, context=4))
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len))
  with pytest.raises(ConfigError, match=match) as e:
    loop.run(cfg)
  assert "\n" not in str(e.value)
