"""The Pallas backend on the paths users take, through public entry points only (so they survive kernel rewrites).

- `gdn2_jax.gdn2(..., backend="pallas", interpret=True)` on the training shape class: K = V = 128, T not a multiple
  of the kernels' chunk, bf16 inputs, the in-op gate activation and q/k L2 norm, packed sequences without states
  (the layer's training call), every gradient against the float64 oracle.
- `pallas_kernels.chunk_gdn2(..., config=ChunkConfig(precision="tf32_emulated"), interpret=True)`: the GPU's TF32
  rounding emulated on the CPU, over every gate regime at its limits (one row each) and over chunk-aligned packed
  sequences with states; and a check that the emulation is really on (its error differs from the exact run).

The kernel suite itself (every shape and gate case of `tests/op_suite.py`) is `tests/test_pallas.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ChunkConfig, chunk_gdn2
from tests import op_suite, oracle
from tests.op_suite import Case, OpsSuite, rel_err

# fla's own error bars against float64 (its tests: 5e-3 on o and states; our bf16 suite tolerance is the same).
TF32_TOL = 5e-3


class _PallasInterpret(OpsSuite):
  backend = "pallas"
  kwargs = {"interpret": True}


def test_training_shape_bf16_gate_activation_l2norm_varlen():
  """K = V = 128, T = 150 (not a multiple of 64), bf16, in-op gate activation and l2norm, packed documents
  without states: the configuration the model trains with."""
  case = Case("train_path", T=150, H=1, HV=2, K=128, V=128, cu_seqlens=(0, 37, 37, 101, 150),
              initial_state=False, final_state=False)
  rng = np.random.default_rng(4)
  A_log = np.log(rng.uniform(1, 16, (case.H,)))
  dt_bias = rng.standard_normal((case.H * case.K,))
  _PallasInterpret().run(case, OpsSuite.tol_bf16, dtype=jnp.bfloat16, A_log=A_log, dt_bias=dt_bias,
                         use_qk_l2norm=True)


def _loss_and_grads(fn, args, do, dS):
  def f(*a):
    o, s = fn(*a)
    return jnp.sum(o.astype(do.dtype) * do) + jnp.sum(s.astype(dS.dtype) * dS), (o, s)
  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(args))), has_aux=True))(*args)
  return list(out) + list(grads)


NAMES = ["o", "final_state"] + ["d" + n for n in ("q", "k", "v", "g", "b", "w", "h0")]


def _kernel_vs_oracle(case, precision, layout=None, cu=None):
  """chunk_gdn2 (interpret mode, `precision`) and the float64 oracle on `case`; returns both result lists."""
  x = op_suite.make_inputs(case, 7)
  do, dS = op_suite._cotangents(case, 7)
  args = [x[n] for n in ("q", "k", "v", "g", "b", "w", "initial_state")]
  scale = case.K ** -0.5
  cfg = ChunkConfig(precision=precision)
  ours = _loss_and_grads(lambda *a: chunk_gdn2(*a, scale=scale, layout=layout, config=cfg, interpret=True), args,
                         jnp.asarray(do, jnp.float32), jnp.asarray(dS, jnp.float32))
  with jax.enable_x64(True):
    a64 = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
    ref = _loss_and_grads(lambda *a: oracle.gdn2_oracle(*a[:6], initial_state=a[6], scale=scale, cu_seqlens=cu),
                          a64, jnp.asarray(do), jnp.asarray(dS))
    ref = [np.asarray(r) for r in ref]
  return ours, ref


# The gate regimes of the op suite, one per batch row, at a length the kernels take without padding.
GATE_ROWS_CASE = Case("tf32_gate_limits", B=len(op_suite.GATE_ROWS), T=128, H=1, HV=2, K=32, V=16, gates="rows")


@pytest.fixture(scope="module")
def gate_rows_emulated():
  return _kernel_vs_oracle(GATE_ROWS_CASE, "tf32_emulated")


def test_tf32_emulation_over_every_gate_regime(gate_rows_emulated):
  ours, ref = gate_rows_emulated
  for row, regime in enumerate(op_suite.GATE_ROWS):
    errors = {n: rel_err(a[row], r[row]) for n, a, r in zip(NAMES, ours, ref)}
    bad = {n: e for n, e in errors.items() if not e < TF32_TOL}
    assert not bad, f"gate regime {regime}: {bad}"


def test_tf32_emulation_is_on(gate_rows_emulated):
  """The emulated run's error is TF32-sized, unlike the exact float32 run of the same kernels (1e-6 or less)."""
  ours, ref = gate_rows_emulated
  exact, _ = _kernel_vs_oracle(GATE_ROWS_CASE, "ieee")
  emulated_err, exact_err = rel_err(ours[0], ref[0]), rel_err(exact[0], ref[0])
  assert exact_err < 1e-5 and emulated_err > 10 * exact_err, (emulated_err, exact_err)


def test_tf32_emulation_over_packed_sequences_with_states():
  """Three sequences in chunk-aligned layout (64, 128 and 64 tokens), each with its initial state."""
  case = Case("tf32_packed", T=256, H=1, HV=2, K=32, V=16, cu_seqlens=(0, 64, 192, 256))
  layout = (jnp.array([0, 1, 1, 2]), jnp.array([1, 1, 0, 1]), jnp.array([1, 0, 1, 1]))
  ours, ref = _kernel_vs_oracle(case, "tf32_emulated", layout=layout, cu=np.asarray(case.cu_seqlens))
  errors = {n: rel_err(a, r) for n, a, r in zip(NAMES, ours, ref)}
  assert all(e < TF32_TOL for e in errors.values()), errors
