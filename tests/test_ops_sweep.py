"""Exhaustive sweep (slow tier, `make test-all`): every T x K x V of the core-ops issue on the pure-JAX backends."""

import itertools

import pytest

from tests.op_suite import Case, OpsSuite

SWEEP = [Case(f"T{T}_K{K}_V{V}", T=T, H=1, HV=2, K=K, V=V)
         for T, K, V in itertools.product((1, 63, 64, 65, 300), (16, 64, 128, 256), (16, 64, 128, 256))]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["chunk", "recurrent"])
@pytest.mark.parametrize("case", SWEEP, ids=lambda c: c.name)
def test_sweep(backend, case):
  suite = OpsSuite()
  suite.backend = backend
  suite.run(case, suite.tol_f32)
