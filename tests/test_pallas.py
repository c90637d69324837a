"""The Pallas kernels in interpret mode on the CPU: the shared op suite, plus kernel-level cases.

Interpret mode compiles each kernel into an XLA loop over the grid (about 20 s per new shape on 2 cores), so the fast
tier runs the awkward shapes that stress padding and grouping and every gate and layout case of the suite; the
remaining shape cases and the family collapses are `slow`. Kernel-level cases here: tile-size independence, TF32
rounding with correlated keys, the sm90 lowering (kernel count), a stage test of the segment sums (the stage tests
of every kernel are in `test_pallas_stages.py`).

Elsewhere: the user paths through the op API (K = V = 128, bf16, in-op gate activation and l2norm, packed sequences,
the TF32 emulation per gate regime) in `test_pallas_paths.py`; a model's training step on the Pallas backend inside
`shard_map` in `test_model_backends.py`; settings reaching the kernels in `test_backend_settings.py`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdn2_jax
from pallas_kernels.tools.sm90 import lowering_for_sm90
from tests import op_suite, oracle
from tests.op_suite import Case, OpsSuite, rel_err

FAST_SHAPES = [c for c in op_suite.SHAPE_CASES if c.name in ("one_token", "T65_grouped")]
slow = pytest.mark.slow


class TestPallasInterpret(OpsSuite):
  """Fast tier: every gate regime with every gradient, packed sequences with states, one token, grouped heads with
  T = 65. The other suite cases run in the slow tier (each costs one interpret-mode compile)."""

  backend = "pallas"
  kwargs = {"interpret": True}
  shape_cases = FAST_SHAPES

  @slow
  @pytest.mark.parametrize("case", [c for c in op_suite.SHAPE_CASES if c not in FAST_SHAPES], ids=lambda c: c.name)
  def test_remaining_shapes(self, case):
    self.run(case, self.tol_f32)

  @pytest.mark.parametrize("case", [op_suite.VARLEN_CASES[0], pytest.param(op_suite.VARLEN_CASES[1], marks=slow)],
                           ids=lambda c: c.name)
  def test_varlen(self, case):
    super().test_varlen(case)

  @slow
  @pytest.mark.parametrize("lower_bound", [None, -5.0], ids=["softplus", "lower_bound"])
  def test_gate_activation_in_op(self, lower_bound):
    super().test_gate_activation_in_op(lower_bound)

  @slow
  def test_bf16_inputs(self):
    super().test_bf16_inputs()

  @slow
  def test_qk_l2norm_in_op(self):
    super().test_qk_l2norm_in_op()


def _inputs(B, T, H, HV, K, V, seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  f = lambda x: jnp.asarray(x, jnp.float32)
  return dict(q=f(unit(rng.standard_normal((B, T, H, K)))), k=f(unit(rng.standard_normal((B, T, H, K)))),
              v=f(rng.standard_normal((B, T, HV, V))), g=f(-rng.uniform(0.01, 1.0, (B, T, H, K))),
              b=f(rng.uniform(0, 1, (B, T, H, K))), w=f(rng.uniform(0, 1, (B, T, HV, V))))


def test_pallas_not_available_on_cpu():
  assert "pallas" not in gdn2_jax.available_backends()
  x = _inputs(1, 8, 1, 1, 16, 16)
  with pytest.raises(ValueError, match="interpret=True"):
    gdn2_jax.gdn2(**x, backend="pallas")


def test_odd_dims_and_l2norm_match_chunk_path():
  """K, V not powers of two (padded to the kernels' tiles), T not a multiple of the chunk, under jit and vmap."""
  x = _inputs(2, 70, 1, 2, 24, 40, seed=3)

  def run(backend, **kw):
    f = lambda q, k, v, g, b, w: gdn2_jax.gdn2(q, k, v, g, b, w, use_qk_l2norm=True, output_final_state=True,
                                               backend=backend, **kw)
    return jax.jit(jax.vmap(f))(*(x[n][:, None] for n in "qkvgbw"))

  o, s = run("pallas", interpret=True)
  o2, s2 = run("chunk")
  np.testing.assert_allclose(o, o2, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(s, s2, rtol=2e-5, atol=2e-5)


def test_kernels_lower_to_triton():
  """Forward and backward (and the packed-sequence variant) lower to Triton IR for sm90, checked on the CPU."""
  from pallas_kernels import ChunkConfig, chunk_gdn2
  with lowering_for_sm90():
    S = jax.ShapeDtypeStruct
    B, T, H, HV, K, V = 1, 128, 1, 2, 64, 128
    args = [S((B, T, H, K), jnp.bfloat16)] * 2 + [S((B, T, HV, V), jnp.bfloat16), S((B, T, H, K), jnp.float32),
                                                  S((B, T, H, K), jnp.bfloat16), S((B, T, HV, V), jnp.bfloat16)]
    for layout, N in ((None, B), (tuple(S((T // 64,), jnp.int32) for _ in range(3)), 3)):
      def loss(*a, layout=layout):
        # The packed layout with chunk_fwd's early terms and its split in two kernels, the other as by default.
        cfg = ChunkConfig(native_tf32x3=True, state_segments=2, early_terms=layout is not None,
                          split_wy=layout is not None)
        o, s = chunk_gdn2(*a[:7], scale=0.1, layout=a[7] if layout is not None else None, config=cfg)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

      def triton_calls(f):
        lowered = jax.jit(f).trace(*args, S((N, HV, K, V), jnp.float32), layout).lower(lowering_platforms=("cuda",))
        return lowered.as_text().count("__gpu$xla.gpu.triton")

      # Every kernel is a Triton custom call: four in the forward, five more in the backward, and the segment maps
      # of the two passes over chunks (split in two segments here); one more with `split_wy`.
      fwd = triton_calls(loss)
      both = triton_calls(jax.grad(loss, argnums=tuple(range(7))))
      split = int(layout is not None)
      assert (fwd, both) == (5 + split, 11 + split), (layout is None, fwd, both)


def test_gradients_leave_the_kernels_in_the_input_dtype():
  """With bf16 inputs the kernels write dq, dk, db, dv, dw in bf16 themselves: the backward lowered for sm90 has no
  float32 -> bf16 conversion pass (each was a full read and write of a gradient; 0.33 ms of 6.8 at B8 T2048)."""
  from pallas_kernels import chunk_gdn2
  with lowering_for_sm90():
    S = jax.ShapeDtypeStruct
    B, T, H, HV, K, V = 1, 128, 1, 2, 64, 128
    bf = jnp.bfloat16
    args = [S((B, T, H, K), bf)] * 2 + [S((B, T, HV, V), bf), S((B, T, H, K), jnp.float32), S((B, T, H, K), bf),
                                        S((B, T, HV, V), bf), S((B, HV, K, V), jnp.float32)]

    def grads(*a):
      out, vjp = jax.vjp(lambda *x: chunk_gdn2(*x, scale=0.1), *a)
      return vjp((jnp.ones(out[0].shape, bf), jnp.ones(out[1].shape, jnp.float32)))

    text = jax.jit(grads).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    converts = [line.strip() for line in text.splitlines() if "stablehlo.convert" in line and "xbf16>" in line]
    assert not converts, converts


@pytest.mark.slow
@pytest.mark.parametrize("family", ["kda", "gated_delta_rule", "delta_rule"])
def test_family_collapses_match_chunk_path(family):
  x = _inputs(1, 67, 2, 2, 16, 16, seed=5)
  beta = jnp.asarray(np.random.default_rng(6).uniform(0, 1, (1, 67, 2)), jnp.float32)
  fn = getattr(gdn2_jax, family)
  args = {"kda": (x["q"], x["k"], x["v"], x["g"], beta),
          "gated_delta_rule": (x["q"], x["k"], x["v"], x["g"][..., 0], beta),
          "delta_rule": (x["q"], x["k"], x["v"], beta)}[family]

  def loss(backend, **kw):
    return lambda *a: jnp.sum(fn(*a, backend=backend, **kw)[0] ** 2)

  g1 = jax.grad(loss("pallas", interpret=True), argnums=tuple(range(len(args))))(*args)
  g2 = jax.grad(loss("chunk"), argnums=tuple(range(len(args))))(*args)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@slow
def test_grad_under_vmap_and_checkpoint_matches_chunk_path():
  x = _inputs(2, 40, 1, 1, 16, 16, seed=8)

  def loss(backend, **kw):
    def one(q, k, v, g, b, w):
      o, s = gdn2_jax.gdn2(q, k, v, g, b, w, output_final_state=True, backend=backend, **kw)
      return jnp.sum(o ** 2) + jnp.sum(s ** 2)
    per_row = jax.vmap(jax.checkpoint(one))
    return lambda *a: jnp.sum(per_row(*(t[:, None] for t in a)))

  args = tuple(x[n] for n in "qkvgbw")
  g1 = jax.jit(jax.grad(loss("pallas", interpret=True), argnums=tuple(range(6))))(*args)
  g2 = jax.jit(jax.grad(loss("chunk"), argnums=tuple(range(6))))(*args)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_tile_sizes_do_not_change_results():
  """Key and value tiles smaller than K and V (several loop steps in every kernel) give the same outputs and
  gradients as whole-dimension tiles."""
  from pallas_kernels import ChunkConfig, chunk_gdn2
  x = _inputs(1, 128, 1, 2, 64, 64, seed=9)
  h0 = jnp.asarray(np.random.default_rng(9).standard_normal((1, 2, 64, 64)), jnp.float32)

  def run(cfg):
    def f(*a):
      o, s = chunk_gdn2(*a, scale=0.125, config=cfg, interpret=True)
      return jnp.sum(o ** 2) + jnp.sum(s ** 2), (o, s)
    return jax.value_and_grad(f, argnums=tuple(range(7)), has_aux=True)(*(tuple(x[n] for n in "qkvgbw") + (h0,)))

  small = run(ChunkConfig(block_k=16, block_v=16, block_v_state=16))
  whole = run(ChunkConfig(block_k=64, block_v=64, block_v_state=64))
  for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("diag_pairs", ["rows", "levels"])
def test_tf32_rounding_stays_accurate_with_correlated_keys(diag_pairs):
  """The GPU's TF32 products, emulated (every operand cut to TF32), with strongly correlated keys (SiLU makes keys
  mostly positive once activations are large) and negative eigenvalues: within fla's error bars against float64. A 64 x 64 inverse by doubling
  (the first version of these kernels) gives relative errors of 1e8 to 1e22 here."""
  from pallas_kernels import ChunkConfig, chunk_gdn2
  rng = np.random.default_rng(11)
  B, T, H, K, V = 1, 128, 1, 64, 64

  def keys():
    x = 0.9 * rng.standard_normal(K) + np.sqrt(1 - 0.81) * rng.standard_normal((B, T, H, K))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  x = dict(q=keys(), k=keys(), v=rng.standard_normal((B, T, H, V)), g=-rng.uniform(1e-3, 0.05, (B, T, H, K)),
           b=rng.uniform(0, 2, (B, T, H, K)), w=rng.uniform(0, 1, (B, T, H, V)),
           h0=0.3 * rng.standard_normal((B, H, K, V)))
  do, dS = rng.standard_normal((B, T, H, V)), rng.standard_normal((B, H, K, V))
  args = [jnp.asarray(x[n], jnp.float32) for n in ("q", "k", "v", "g", "b", "w", "h0")]

  def loss(fn):
    def f(*a):
      o, s = fn(*a)
      return jnp.sum(o * do) + jnp.sum(s * dS), (o, s)
    return jax.value_and_grad(f, argnums=tuple(range(7)), has_aux=True)

  cfg = ChunkConfig(precision="tf32_emulated", diag_pairs=diag_pairs)
  (_, out), grads = loss(lambda *a: chunk_gdn2(*a, scale=K ** -0.5, config=cfg, interpret=True))(*args)
  with jax.enable_x64(True):
    a64 = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
    (_, out64), grads64 = loss(lambda *a: oracle.gdn2_oracle(*a[:6], initial_state=a[6], scale=K ** -0.5))(*a64)
  names = ["o", "final_state"] + ["d" + n for n in ("q", "k", "v", "g", "b", "w", "h0")]
  errors = {n: rel_err(a, b) for n, a, b in zip(names, list(out) + list(grads), list(out64) + list(grads64))}
  assert all(e < 5e-3 for e in errors.values()), errors


def test_diag_fwd_segment_sums_match_xla():
  """Stage test: the sub-block segment sums `diag_fwd` writes for the chunk-level kernels, by masked products, equal
  XLA's cumulative sums (`segments.sub_block_sums`) to float32 rounding, with g from -1e3 to
  -1e-4 next to each other."""
  from pallas_kernels import ChunkConfig
  from pallas_kernels.gdn2 import forward, segments
  from pallas_kernels.gdn2.common import ChunkShape
  rng = np.random.default_rng(12)
  B, T, H, K = 1, 64, 2, 32
  g = jnp.asarray(-np.exp(rng.uniform(np.log(1e-4), np.log(1e3), (B, T, H, K))), jnp.float32)
  q = k = b = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32)
  cfg = ChunkConfig(block_k=16)
  sums = forward.diag_fwd(ChunkShape.of(q, q), q, k, g, b, cfg=cfg, interpret=True).sums
  ref = segments.sub_block_sums(g)
  for name, x, y in zip(ref._fields, sums, ref):
    np.testing.assert_allclose(x, y, rtol=2e-6, atol=0, err_msg=name)
  # rev excludes the row itself: a row with g = -1e3 followed by small ones keeps the small sum exactly.
  assert float(jnp.max(jnp.abs(sums.rev[:, 15::16]))) == 0.0


@pytest.mark.parametrize("packed", [False, True], ids=["initial_state", "packed"])
def test_state_pass_in_segments_equals_sequential(packed):
  """The forward pass over chunks split into 4 parallel segments (maps, a scan, the pass from the entering states)
  gives the sequential pass's outputs, final states and gradients: with an initial state, and with packed sequences
  whose starts fall inside segments and which span segment boundaries (chunks 0-4 | 5-6 | 7; segments of 2)."""
  from pallas_kernels import ChunkConfig, chunk_gdn2
  x = _inputs(1, 512, 1, 2, 16, 16, seed=11)
  rng = np.random.default_rng(12)
  if packed:
    layout = tuple(jnp.asarray(a, jnp.int32) for a in ([0, 0, 0, 0, 0, 1, 1, 2], [1, 0, 0, 0, 0, 1, 0, 1],
                                                        [0, 0, 0, 0, 1, 0, 1, 1]))
    h0 = jnp.asarray(rng.standard_normal((3, 2, 16, 16)), jnp.float32)
  else:
    layout, h0 = None, jnp.asarray(rng.standard_normal((1, 2, 16, 16)), jnp.float32)
  args = [x[n] for n in "qkvgbw"] + [h0]

  def run(segments):
    def loss(*a):
      o, s = chunk_gdn2(*a, scale=0.25, layout=layout, config=ChunkConfig(state_segments=segments), interpret=True)
      return jnp.sum(o * o) + jnp.sum(s * s), (o, s)
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))(*args)
    return list(out) + list(grads)

  for name, a, b in zip(["o", "final"] + ["d" + n for n in "qkvgbw"] + ["dh0"], run(1), run(4)):
    assert np.all(np.isfinite(b)), name
    assert rel_err(b, a) < 1e-5, (name, rel_err(b, a))


def test_forward_variants_equal_default():
  """The untimed forward options give the default's outputs, final state and every gradient (three chunks, two key
  tiles per loop): `early_terms` alone (qg, the decayed keys and the chunk decay written in chunk_fwd's first key
  loop: the same sums in another loop, to 1e-6), then with `split_wy` (Y and U in a second kernel from the stored
  A) and `diag_pairs='levels'` (the in-sub-block pairs and their cotangents by levels of halves: the same factors
  multiplied and summed in another order, so to float32 rounding, 1e-5, the suite's bar against float64). Each
  option's own stage test names the kernel that breaks; one run of the op for the last two keeps the suite's
  time."""
  from pallas_kernels import ChunkConfig, chunk_gdn2
  x = _inputs(1, 192, 2, 2, 32, 16, seed=5)
  h0 = jnp.asarray(np.random.default_rng(6).standard_normal((1, 2, 32, 16)), jnp.float32)
  args = [x[n] for n in "qkvgbw"] + [h0]

  def run(variant):
    def loss(*a):
      o, s = chunk_gdn2(*a, scale=0.25, config=ChunkConfig(block_k=16, **variant), interpret=True)
      return jnp.sum(o * o) + jnp.sum(s * s), (o, s)
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))(*args)
    return list(out) + list(grads)

  default = run({})
  for variant, tol in ((dict(early_terms=True), 1e-6), (dict(early_terms=True, split_wy=True, diag_pairs="levels"),
                                                       1e-5)):
    for name, a, b in zip(["o", "final"] + ["d" + n for n in "qkvgbw"] + ["dh0"], default, run(variant)):
      assert np.all(np.isfinite(b)), (variant, name)
      assert rel_err(b, a) < tol, (variant, name, rel_err(b, a))
