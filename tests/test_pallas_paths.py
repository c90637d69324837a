"""The Pallas backend on the paths users take, through public entry points only (so they survive kernel rewrites).

- `gdn2_jax.gdn2(..., backend="pallas", interpret=True)` on the training shape class: K = V = 128, T not a multiple
  of the kernels' chunk, bf16 inputs, the in-op gate activation and q/k L2 norm, packed sequences without states
  (the layer's training call), every gradient against the float64 oracle.
- `pallas_kernels.chunk_gdn2(..., config=ChunkConfig(precision="tf32_emulated"), interpret=True)`: the GPU's TF32
  rounding emulated on the CPU, over every gate regime at its limits, each its own packed sequence with its own
  initial state (chunk-aligned layout), checked one regime at a time; and a check that the emulation is really on
  (its error differs from the exact run's).

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
PER_TOKEN = {"o", "dq", "dk", "dv", "dg", "db", "dw"}  # the rest are per sequence

# Every gate regime of the op suite as its own packed sequence, each with its initial state, in chunk-aligned
# layout; two of them span two chunks (the state is carried across a chunk inside a sequence).
LENGTHS = (64, 128, 64, 64, 128, 64, 64, 64)
CU = np.concatenate([[0], np.cumsum(LENGTHS)])
REGIMES_CASE = Case("tf32_regimes", B=len(op_suite.GATE_ROWS), T=max(LENGTHS), H=1, HV=2, K=32, V=16, gates="rows")


def _packed_regimes():
  """Inputs of REGIMES_CASE with row n cut to LENGTHS[n] and packed: `[1, sum(LENGTHS), ...]`, states `[8, ...]`."""
  x = op_suite.make_inputs(REGIMES_CASE, 7)
  pack = lambda a: jnp.concatenate([a[n, :L] for n, L in enumerate(LENGTHS)])[None]
  args = [pack(x[n]) for n in ("q", "k", "v", "g", "b", "w")] + [x["initial_state"]]
  seq = np.repeat(np.arange(len(LENGTHS)), np.array(LENGTHS) // 64)
  first = np.r_[True, seq[1:] != seq[:-1]]
  last = np.r_[seq[1:] != seq[:-1], True]
  layout = tuple(jnp.asarray(a, jnp.int32) for a in (seq, first, last))
  rng = np.random.default_rng(8)
  do = jnp.asarray(rng.standard_normal((1, CU[-1], REGIMES_CASE.HV, REGIMES_CASE.V)), jnp.float32)
  dS = jnp.asarray(rng.standard_normal(x["initial_state"].shape), jnp.float32)
  return args, layout, do, dS


def _kernels(args, layout, precision):
  cfg = ChunkConfig(precision=precision)
  return lambda *a: chunk_gdn2(*a, scale=REGIMES_CASE.K ** -0.5, layout=layout, config=cfg, interpret=True)


@pytest.fixture(scope="module")
def regimes():
  """(inputs, emulated-TF32 results, float64 results) over the packed gate regimes."""
  args, layout, do, dS = _packed_regimes()
  ours = _loss_and_grads(_kernels(args, layout, "tf32_emulated"), args, do, dS)
  with jax.enable_x64(True):
    a64 = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
    fn = lambda *a: oracle.gdn2_oracle(*a[:6], initial_state=a[6], scale=REGIMES_CASE.K ** -0.5, cu_seqlens=CU)
    ref = [np.asarray(r) for r in _loss_and_grads(fn, a64, jnp.asarray(do, jnp.float64), jnp.asarray(dS, jnp.float64))]
  return (args, layout), ours, ref


def test_tf32_emulation_over_every_gate_regime_as_packed_sequences(regimes):
  """Output, final state and every gradient per gate regime (one packed sequence each), within fla's error bars."""
  _, ours, ref = regimes
  for n, regime in enumerate(op_suite.GATE_ROWS):
    part = lambda a, name: a[0, CU[n]:CU[n + 1]] if name in PER_TOKEN else a[n]
    errors = {name: rel_err(part(a, name), part(r, name)) for name, a, r in zip(NAMES, ours, ref)}
    bad = {name: e for name, e in errors.items() if not e < TF32_TOL}
    assert not bad, f"gate regime {regime}: {bad}"


def test_tf32_emulation_is_on(regimes):
  """The emulated run's error is TF32-sized, unlike the exact float32 run of the same kernels (forward only)."""
  (args, layout), ours, ref = regimes
  exact_o, _ = jax.jit(_kernels(args, layout, "ieee"))(*args)
  emulated_err, exact_err = rel_err(ours[0], ref[0]), rel_err(exact_o, ref[0])
  assert exact_err < 1e-5 and emulated_err > 10 * exact_err, (emulated_err, exact_err)
