"""One test suite for the GDN-2 op, written once against the float64 oracle; every backend subclasses it.

A backend's test file does `class TestMyBackend(OpsSuite): backend = "name"; kwargs = {...}` and inherits every
case: awkward shapes, grouped heads, initial states, packed sequences, gates at their limits, the in-op gate
activation, bf16 inputs. Each case checks the output, the final state and the gradient of every input (cotangents
on both outputs) in one compiled call, and that nothing is NaN or Inf; the gate regimes are checked one row each.
Backends: `tests/test_ops.py` (chunk, recurrent), `tests/test_pallas.py` (Pallas, interpret mode).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdn2_jax
from tests import oracle

ARG_NAMES = ("q", "k", "v", "g", "b", "w", "initial_state")


def rel_err(x, ref, floor: float = 1e-3) -> float:
  """`||x - ref|| / max(||ref||, floor * sqrt(size))`: relative Frobenius error, absolute where ref is ~0."""
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  assert x.shape == ref.shape, (x.shape, ref.shape)
  assert np.all(np.isfinite(x)), "non-finite values in the result"
  denom = max(np.linalg.norm(ref), floor * np.sqrt(max(ref.size, 1)))
  return float(np.linalg.norm(x - ref) / denom)


@dataclasses.dataclass(frozen=True)
class Case:
  """Shapes and gate regime of one test case. `gates` names a regime of `make_inputs`."""

  name: str
  B: int = 1
  T: int = 70
  H: int = 2
  HV: int = 2
  K: int = 16
  V: int = 32
  gates: str = "random"
  initial_state: bool = True
  cu_seqlens: Optional[tuple[int, ...]] = None
  final_state: bool = True


# Shape cases: T in {1, 63, 64, 65, 300}, K != V, K and V in {16, 64, 128, 256}, grouped value heads, states.
SHAPE_CASES = [
    Case("one_token", B=2, T=1, K=16, V=64),
    Case("T63_K16_V64", B=2, T=63, K=16, V=64, initial_state=False),
    Case("T64_K64_V16", T=64, H=1, HV=1, K=64, V=16),
    Case("T65_grouped", T=65, H=1, HV=3, K=32, V=16),
    Case("T300_K128_V64", T=300, H=1, HV=1, K=128, V=64),
    Case("K256_V16", T=40, H=1, HV=1, K=256, V=16),
    Case("K16_V256_grouped", T=33, H=1, HV=2, K=16, V=256),
]

# Gate regimes, one per batch row, so a single compile covers them all (see `make_inputs`).
GATE_ROWS = ("b0_w0", "b1_w1", "binary", "b_in_0_2", "g_tiny", "g_-1e3", "g_loguniform", "g_alternating")
GATE_CASE = Case("gate_limits", B=len(GATE_ROWS), T=97, H=1, HV=2, K=32, V=16, gates="rows")

VARLEN_CASES = [
    # uneven lengths, an empty sequence in the middle and trailing repeats of the last offset (fixed-length array)
    Case("varlen_states", T=140, H=1, HV=2, K=16, V=32, cu_seqlens=(0, 5, 70, 70, 133, 140, 140)),
    Case("varlen_no_states", T=150, H=2, HV=2, K=32, V=16, cu_seqlens=(0, 1, 64, 66, 150),
         initial_state=False, final_state=False),
]


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(case: Case, seed: int, dtype=np.float32):
  """Fresh random inputs for `case`: q, k unit-norm, v normal, g <= 0, b, w in [0, 1], optional state."""
  rng = np.random.default_rng(seed)
  B, T, H, HV, K, V = case.B, case.T, case.H, case.HV, case.K, case.V
  q = _unit(rng.standard_normal((B, T, H, K)))
  k = _unit(rng.standard_normal((B, T, H, K)))
  v = rng.standard_normal((B, T, HV, V))
  g = -np.exp(rng.uniform(np.log(1e-3), np.log(2.0), (B, T, H, K)))
  b = rng.uniform(0, 1, (B, T, H, K))
  w = rng.uniform(0, 1, (B, T, HV, V))
  if case.gates == "rows":
    for row, regime in enumerate(GATE_ROWS):
      if regime == "b0_w0":
        b[row], w[row] = 0.0, 0.0
      elif regime == "b1_w1":
        b[row], w[row] = 1.0, 1.0
      elif regime == "binary":
        b[row] = rng.integers(0, 2, b[row].shape)
        w[row] = rng.integers(0, 2, w[row].shape)
      elif regime == "b_in_0_2":  # negative eigenvalues
        b[row] = rng.uniform(0, 2, b[row].shape)
      elif regime == "g_tiny":
        g[row] = -1e-4
      elif regime == "g_-1e3":
        g[row] = -1e3
      elif regime == "g_loguniform":
        g[row] = -np.exp(rng.uniform(np.log(1e-4), np.log(1e3), g[row].shape))
      elif regime == "g_alternating":  # total forget next to almost none, per token and channel
        g[row] = np.where(rng.uniform(size=g[row].shape) < 0.3, -1e3, -1e-4)
  N = B if case.cu_seqlens is None else len(case.cu_seqlens) - 1
  h0 = rng.standard_normal((N, HV, K, V)) * 0.5 if case.initial_state else None
  cast = lambda x: None if x is None else jnp.asarray(x.astype(np.float32)).astype(dtype)
  return dict(q=cast(q), k=cast(k), v=cast(v), g=jnp.asarray(g.astype(np.float32)), b=cast(b), w=cast(w),
              initial_state=None if h0 is None else jnp.asarray(h0.astype(np.float32)))


def _cotangents(case: Case, seed: int):
  rng = np.random.default_rng(seed + 1000)
  N = case.B if case.cu_seqlens is None else len(case.cu_seqlens) - 1
  do = rng.standard_normal((case.B, case.T, case.HV, case.V))
  dS = rng.standard_normal((N, case.HV, case.K, case.V))
  return do, dS


def value_and_grads(fn, inputs: dict, names, do, dS, *, final_state: bool, float64: bool = False):
  present = [n for n in names if inputs.get(n) is not None]
  ft = jnp.float64 if float64 else jnp.float32

  def loss(*arrays):
    o, s = fn(**dict(zip(present, arrays)))
    total = jnp.sum(o.astype(ft) * do.astype(ft))
    if final_state:
      total = total + jnp.sum(s.astype(ft) * dS.astype(ft))
    return total, (o, s)

  (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(present))), has_aux=True))(
      *[inputs[n] for n in present])
  return o, s, dict(zip(present, grads))


def oracle_results(case: Case, inputs: dict, names, do, dS, **op_kwargs):
  with jax.enable_x64(True):
    inputs64 = {n: jnp.asarray(np.asarray(x, np.float64)) for n, x in inputs.items() if x is not None}
    cu = None if case.cu_seqlens is None else np.asarray(case.cu_seqlens)

    def fn(**kw):
      return oracle.gdn2_oracle(**kw, cu_seqlens=cu, **op_kwargs)

    o, s, grads = value_and_grads(fn, inputs64, names, jnp.asarray(do), jnp.asarray(dS),
                                        final_state=case.final_state, float64=True)
    return np.asarray(o), np.asarray(s), {n: np.asarray(x) for n, x in grads.items()}


class OpsSuite:
  """Subclass with `backend` (and `kwargs`) set. Tolerances are relative Frobenius errors against float64."""

  backend: str = "chunk"
  kwargs: dict = {}
  tol_f32: float = 1e-5
  tol_bf16: float = 5e-3
  shape_cases = SHAPE_CASES
  seed: int = 0

  def run(self, case: Case, tol: float, dtype=np.float32, return_arrays: bool = False, **op_kwargs):
    # A seed per case that is the same in every process (str hash() is salted per process).
    inputs = make_inputs(case, self.seed + zlib.crc32(case.name.encode()) % 1000, dtype)
    raw = dict(op_kwargs)
    extra = {}
    for name in ("A_log", "dt_bias"):
      if name in raw:
        extra[name] = raw.pop(name)
    do, dS = _cotangents(case, self.seed)
    cu = None if case.cu_seqlens is None else jnp.asarray(case.cu_seqlens, jnp.int32)

    def fn(**kw):
      return gdn2_jax.gdn2(**kw, cu_seqlens=cu, output_final_state=case.final_state, backend=self.backend,
                           **raw, **self.kwargs)

    all_inputs = {**inputs, **{n: jnp.asarray(x, jnp.float32) for n, x in extra.items()}}
    names = ARG_NAMES + tuple(extra)
    o, s, grads = value_and_grads(fn, all_inputs, names, jnp.asarray(do, jnp.float32),
                                        jnp.asarray(dS, jnp.float32), final_state=case.final_state)
    ref_o, ref_s, ref_grads = oracle_results(case, all_inputs, names, do, dS, **raw)
    assert o.dtype == inputs["v"].dtype, (o.dtype, inputs["v"].dtype)
    errors = {"o": rel_err(o, ref_o)}
    if case.final_state:
      assert s.shape == ref_s.shape and s.dtype == jnp.float32
      errors["final_state"] = rel_err(s, ref_s)
    for n, gr in grads.items():
      errors["d" + n] = rel_err(gr, ref_grads[n])
    bad = {n: e for n, e in errors.items() if not e < tol}
    assert not bad, f"{self.backend} {case.name}: errors over {tol}: {bad} (all: {errors})"
    if return_arrays:
      return errors, (o, s, grads), (ref_o, ref_s, ref_grads)
    return errors

  @pytest.mark.parametrize("case", SHAPE_CASES, ids=lambda c: c.name)
  def test_shapes(self, case):
    if case not in self.shape_cases:
      pytest.skip("shape not in this backend's list")
    self.run(case, self.tol_f32)

  def test_gates_at_their_limits(self):
    errors, (o, s, grads), (ref_o, ref_s, ref_grads) = self.run(GATE_CASE, self.tol_f32, return_arrays=True)
    assert set(errors) >= {"o", "final_state", "dq", "dk", "dv", "dg", "db", "dw", "dinitial_state"}
    # Each regime on its own row, outputs and every gradient: a small error in one row must not hide behind the
    # others (pooled errors are dominated by the rows with the largest values).
    for row, regime in enumerate(GATE_ROWS):
      per_row = {"o": rel_err(o[row], ref_o[row]), "final_state": rel_err(s[row], ref_s[row])}
      per_row.update({"d" + n: rel_err(gr[row], ref_grads[n][row]) for n, gr in grads.items()})
      bad = {n: e for n, e in per_row.items() if not e < self.tol_f32}
      assert not bad, f"{self.backend} gate regime {regime}: errors over {self.tol_f32}: {bad}"

  @pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: c.name)
  def test_varlen(self, case):
    self.run(case, self.tol_f32)

  @pytest.mark.parametrize("lower_bound", [None, -5.0], ids=["softplus", "lower_bound"])
  def test_gate_activation_in_op(self, lower_bound):
    case = Case("gate_activation", T=67, H=2, HV=2, K=16, V=16)
    rng = np.random.default_rng(3)
    A_log = np.log(rng.uniform(1, 16, (case.H,)))
    dt_bias = rng.standard_normal((case.H * case.K,))
    self.run(case, self.tol_f32, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound)

  def test_bf16_inputs(self):
    case = Case("bf16", B=2, T=130, H=2, HV=2, K=64, V=32)
    self.run(case, self.tol_bf16, dtype=jnp.bfloat16)

  def test_qk_l2norm_in_op(self):
    case = Case("l2norm", T=50, H=1, HV=1, K=16, V=16)
    self.run(case, self.tol_f32, use_qk_l2norm=True)
