"""Layers against independent float64 references (short conv, attention, the b-only and w-only ablation mixers);
gate collapses between family mixers; initialisation; Linen interop (`nnx.bridge`, against the NNX layer on the
same weights) and pure-function use (`nnx.split` / `nnx.merge`).

The GDN-2 layer against a float64 reference of the PyTorch layer and against fla's outputs is `tests/test_convert.py`;
whole models are `tests/test_model.py` (recurrent backend) and `tests/test_model_backends.py` (chunk, Pallas).
"""

import chex
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn2_jax.layers import Attention, GatedDeltaNet2, ShortConv, causal_depthwise_conv, rope
from tests import oracle

D, H, K, V = 24, 2, 8, 8


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _x(key, B=2, T=21, d=D):
  return jax.random.normal(jax.random.key(key), (B, T, d), jnp.float32)


def _gdn(gates="gdn2", seed=0, **kw):
  return GatedDeltaNet2(D, num_heads=H, head_k_dim=K, head_v_dim=V, gates=gates, backend="recurrent",
                        rngs=nnx.Rngs(seed), **kw)


_call = nnx.jit(lambda m, x: m(x))


def test_short_conv_resets_and_continues():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 11, 5)).astype(np.float32)
  w = rng.standard_normal((5, 4)).astype(np.float32)
  seg = np.array([[0] * 4 + [1] * 7, [3] * 11], np.int32)
  ref = np.zeros_like(x, dtype=np.float64)
  for bb in range(2):
    for t in range(11):
      for j in range(4):
        s = t - 3 + j
        if s >= 0 and seg[bb, s] == seg[bb, t]:
          ref[bb, t] += w[:, j] * x[bb, s]
  y, _ = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(w), segment_ids=jnp.asarray(seg))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  # Splitting the stream and carrying the tail gives the same outputs.
  y1, tail = causal_depthwise_conv(jnp.asarray(x[:, :6]), jnp.asarray(w))
  y2, _ = causal_depthwise_conv(jnp.asarray(x[:, 6:]), jnp.asarray(w), tail=tail)
  full, _ = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), full, rtol=1e-6, atol=1e-6)


def _attention_reference(x, q_w, k_w, v_w, o_w, nq, nkv, hs, window, base, seg):
  """Causal softmax attention in float64 with RoPE written as a complex rotation of (x_i, x_{i + hs/2})."""
  x = np.asarray(x, np.float64)
  B, T, _ = x.shape
  q = (x @ q_w).reshape(B, T, nq, hs)
  k = (x @ k_w).reshape(B, T, nkv, hs)
  v = (x @ v_w).reshape(B, T, nkv, hs)
  half = hs // 2
  theta = np.arange(T)[:, None] * base ** (-np.arange(half) * 2.0 / hs)
  rot = lambda a: (a[..., :half] + 1j * a[..., half:]) * np.exp(1j * theta)[None, :, None, :]
  qc, kc = rot(q), rot(k)
  q = np.concatenate([qc.real, qc.imag], -1)
  k = np.concatenate([kc.real, kc.imag], -1)
  k, v = np.repeat(k, nq // nkv, 2), np.repeat(v, nq // nkv, 2)
  s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(hs)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  mask = (j <= i) & (i - j < window) & (seg[:, None, :, None] == seg[:, None, None, :])
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("bhij,bjhd->bihd", p, v).reshape(B, T, nq * hs)
  return o @ o_w


@pytest.mark.parametrize("implementation", [None, "pallas"])  # documents: the blockwise XLA form, the Triton kernel
def test_attention_matches_float64_reference_with_window_gqa_and_documents(implementation):
  attn = Attention(D, num_heads=4, num_kv_heads=2, head_dim=6, window=5, rope_base=100.0,
                   implementation=implementation, rngs=nnx.Rngs(0))
  x = _x(1)
  seg = np.array([[0] * 9 + [1] * 12, [2] * 21], np.int32)
  fwd = nnx.jit(lambda m, x, s: m(x, segment_ids=s))
  y = fwd(attn, x, jnp.asarray(seg))
  p = lambda m: np.asarray(m.kernel[...], np.float64)
  ref = _attention_reference(x, p(attn.q_proj), p(attn.k_proj), p(attn.v_proj), p(attn.o_proj), 4, 2, 6, 5,
                             100.0, seg)
  assert _rel(y, ref) < 1e-5
  # Without documents, the plain causal sliding-window path (no explicit mask) agrees.
  same = np.zeros_like(seg)
  assert _rel(fwd(attn, x, None), _attention_reference(x, p(attn.q_proj), p(attn.k_proj), p(attn.v_proj), p(attn.o_proj), 4,
                                            2, 6, 5, 100.0, same)) < 1e-5


def test_rope_is_relative():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
  dot = lambda a, b: float(jnp.sum(rope(q, jnp.array([a]), 10000.0) * rope(k, jnp.array([b]), 10000.0)))
  np.testing.assert_allclose(dot(7, 3), dot(107, 103), rtol=1e-4)


def _copy(dst, src, names):
  for n in names:
    getattr(dst, n).kernel[...] = getattr(src, n).kernel[...]


def test_gate_collapse_gdn2_to_kda_to_gdn_to_deltanet():
  x = _x(2)
  kda = _gdn("kda", seed=1)
  # GDN-2 with every erase/write channel of a head equal to KDA's beta column: the same layer.
  g2 = _gdn("gdn2", seed=2)
  _copy(g2, kda, ["q_proj", "k_proj", "v_proj", "f_down", "f_up", "g_down", "g_up", "o_proj"])
  for n in ("q_conv1d", "k_conv1d", "v_conv1d"):
    getattr(g2, n).weight[...] = getattr(kda, n).weight[...]
  g2.A_log[...], g2.dt_bias[...] = kda.A_log[...], kda.dt_bias[...]
  beta = kda.b_proj.kernel[...]  # [D, H]
  g2.b_proj.kernel[...] = jnp.repeat(beta, K, axis=1)
  g2.w_proj.kernel[...] = jnp.repeat(beta, V, axis=1)
  assert _rel(_call(g2, x), _call(kda, x)) < 1e-6
  # KDA whose low-rank decay gives every channel of head h the same value: Gated DeltaNet (one decay per head).
  gdn = _gdn("gdn", seed=3)
  _copy(kda, gdn, ["q_proj", "k_proj", "v_proj", "b_proj", "g_down", "g_up", "o_proj"])
  for n in ("q_conv1d", "k_conv1d", "v_conv1d"):
    getattr(kda, n).weight[...] = getattr(gdn, n).weight[...]
  kda.f_down.kernel[...] = jnp.pad(gdn.a_proj.kernel[...], ((0, 0), (0, V - H)))  # [D, V], first H columns
  kda.f_up.kernel[...] = jnp.pad(jnp.repeat(jnp.eye(H), K, axis=1), ((0, V - H), (0, 0)))  # column h -> head h
  kda.A_log[...], kda.dt_bias[...] = gdn.A_log[...], jnp.repeat(gdn.dt_bias[...], K)
  assert _rel(_call(kda, x), _call(gdn, x)) < 1e-6
  # Gated DeltaNet with exp(A_log) = 0 (no decay): DeltaNet.
  dn = _gdn("deltanet", seed=4)
  _copy(gdn, dn, ["q_proj", "k_proj", "v_proj", "b_proj", "g_down", "g_up", "o_proj"])
  for n in ("q_conv1d", "k_conv1d", "v_conv1d"):
    getattr(gdn, n).weight[...] = getattr(dn, n).weight[...]
  gdn.A_log[...] = jnp.full((H,), -1e30)
  assert _rel(_call(gdn, x), _call(dn, x)) < 1e-6


def test_gdn2_initialisation():
  layer = GatedDeltaNet2(256, num_heads=4, head_k_dim=64, head_v_dim=32, rngs=nnx.Rngs(0))
  bound = 2 ** -2.5 * np.sqrt(6 / (256 + 256))  # Xavier-uniform, gain 2^-2.5
  kq = np.asarray(layer.q_proj.kernel[...])
  assert np.abs(kq).max() <= bound and np.abs(kq).max() > 0.9 * bound
  A = np.exp(np.asarray(layer.A_log[...]))
  assert A.shape == (4,) and np.all((A >= 1) & (A <= 16))
  dt = np.log1p(np.exp(np.asarray(layer.dt_bias[...])))  # softplus(dt_bias) = dt
  assert dt.shape == (256,) and np.all((dt >= 1e-4 - 1e-7) & (dt <= 0.1 + 1e-6))
  np.testing.assert_array_equal(layer.o_norm.weight[...], 1.0)
  np.testing.assert_array_equal(layer.g_up.bias[...], 0.0)


@pytest.mark.parametrize("kw, match", [
    (dict(num_v_heads=3), "multiple of num_heads"),
    (dict(gates="mamba"), "gates"),
    (dict(output_gate="relu"), "output_gate"),
    (dict(gate_lower_bound=-7.0), "gate_lower_bound"),
])
def test_layer_rejects_bad_settings(kw, match):
  with pytest.raises(ValueError, match=match):
    _gdn(**kw)


def test_pure_function_split_merge_and_grad():
  layer = _gdn()
  x = _x(3)
  graphdef, params = nnx.split(layer, nnx.Param)

  @jax.jit
  def f(params, x):
    return nnx.merge(graphdef, params)(x)

  np.testing.assert_allclose(f(params, x), _call(layer, x), rtol=1e-6, atol=1e-7)
  grads = jax.grad(lambda p: jnp.sum(f(p, x) ** 2))(params)
  chex.assert_trees_all_equal_shapes(grads, params)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_linen_bridge():
  class Residual(linen.Module):
    @linen.compact
    def __call__(self, x):
      mixer = nnx.bridge.to_linen(GatedDeltaNet2, D, num_heads=H, head_k_dim=K, head_v_dim=V, backend="recurrent")
      return x + mixer(x)

  x = _x(4, B=1, T=9)
  model = Residual()
  variables = model.init(jax.random.key(0), x)
  y = jax.jit(model.apply)(variables, x)
  chex.assert_shape(y, x.shape)
  # The bridged layer is the NNX layer: the same weights give the same outputs and the same gradients.
  unbox = lambda tree: jax.tree.map(lambda m: m.value, tree, is_leaf=lambda m: isinstance(m, nnx.bridge.NNXMeta))
  weights = unbox(variables["params"]["ToLinen_0"])
  layer = _gdn(seed=7)
  graphdef, params = nnx.split(layer, nnx.Param)
  nnx.replace_by_pure_dict(params, weights)
  nnx_apply = lambda p: x + nnx.merge(graphdef, p)(x)
  np.testing.assert_allclose(y, jax.jit(nnx_apply)(params), rtol=1e-6, atol=1e-6)
  grads = unbox(jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, x) ** 2)))(variables)["params"]["ToLinen_0"])
  nnx_grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx_apply(p) ** 2)))(params)
  chex.assert_trees_all_close(grads, nnx.to_pure_dict(nnx_grads), rtol=1e-5, atol=1e-7)


class _Saturated(nnx.Module):
  """Stands in for a gate projection: a constant pre-activation of 30, so its sigmoid is exactly 1 in float32."""

  def __init__(self, width: int):
    self.width = width

  def __call__(self, x):
    return jnp.full(x.shape[:-1] + (self.width,), 30.0, x.dtype)


def _mixer_reference(layer, x, b_one: bool, w_one: bool):
  """float64 GDN-2 mixer with channel-wise b and w (NVIDIA's layer), or with b or w fixed at 1."""
  p = lambda a: np.asarray(a[...], np.float64)
  x = np.asarray(x, np.float64)
  B, T, _ = x.shape
  H, HV, K, V = layer.num_heads, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim
  silu = lambda a: a / (1 + np.exp(-a))
  sigmoid = lambda a: 1 / (1 + np.exp(-a))

  def conv(a, w):  # causal depthwise, kernel [D, W], tap W-1 the current token
    W = w.shape[1]
    a = np.pad(a, ((0, 0), (W - 1, 0), (0, 0)))
    return sum(a[:, j:j + T] * w[:, j] for j in range(W))

  q = silu(conv(x @ p(layer.q_proj.kernel), p(layer.q_conv1d.weight))).reshape(B, T, H, K)
  k = silu(conv(x @ p(layer.k_proj.kernel), p(layer.k_conv1d.weight))).reshape(B, T, H, K)
  v = silu(conv(x @ p(layer.v_proj.kernel), p(layer.v_conv1d.weight))).reshape(B, T, HV, V)
  f = (x @ p(layer.f_down.kernel) @ p(layer.f_up.kernel)).reshape(B, T, H, K) + p(layer.dt_bias).reshape(H, K)
  g = -np.exp(p(layer.A_log))[:, None] * np.logaddexp(0, f)
  b = np.ones((B, T, H, K)) if b_one else sigmoid(x @ p(layer.b_proj.kernel)).reshape(B, T, H, K)
  w = np.ones((B, T, HV, V)) if w_one else sigmoid(x @ p(layer.w_proj.kernel)).reshape(B, T, HV, V)
  with jax.enable_x64(True):
    o, _ = oracle.gdn2_oracle(q, k, v, g, b, w, use_qk_l2norm=True)
  o = np.asarray(o)
  gate = (x @ p(layer.g_down.kernel) @ p(layer.g_up.kernel) + p(layer.g_up.bias)).reshape(B, T, HV, V)
  y = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + layer.o_norm.eps) * p(layer.o_norm.weight) * silu(gate)
  return y.reshape(B, T, HV * V) @ p(layer.o_proj.kernel)


@pytest.mark.parametrize("gates", ["gdn2_b_only", "gdn2_w_only"])
def test_ablation_mixers_match_float64_reference_with_the_other_gate_at_one(gates):
  """Paper Table 5 ablations: channel structure only in b (w one scalar per head), or only in w. With the per-head
  gate held at 1, each is GDN-2 with that one channel-wise gate, against the float64 oracle."""
  layer = _gdn(gates, seed=5, num_v_heads=2 * H)
  if gates == "gdn2_b_only":
    layer.w_proj = _Saturated(layer.num_v_heads)
  else:
    layer.b_proj = _Saturated(layer.num_heads)
  x = _x(6, T=19)
  ref = _mixer_reference(layer, x, b_one=gates == "gdn2_w_only", w_one=gates == "gdn2_b_only")
  assert _rel(_call(layer, x), ref) < 1e-5


def test_windowed_attention_with_documents_builds_no_full_mask():
  """Packed documents keep sliding-window attention linear in T: no `[T, T]` intermediate (the old dense mask)."""
  T, W = 2048, 64
  attn = Attention(16, num_heads=2, head_dim=8, window=W, rngs=nnx.Rngs(0))
  graph, state = nnx.split(attn)
  f = lambda state, x, s: nnx.merge(graph, state)(x, segment_ids=s)
  S = jax.ShapeDtypeStruct
  jaxpr = jax.make_jaxpr(f)(state, S((1, T, 16), jnp.float32), S((1, T), jnp.int32))
  sizes = [int(np.prod(v.aval.shape)) for e in jaxpr.eqns for v in e.outvars]
  assert max(sizes) < T * T, max(sizes)
