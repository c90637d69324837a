"""The op suite (`tests/op_suite.py`) on the pure-JAX backends, `chunk` and `recurrent`.

The rest of the op API (family collapses, jit/vmap/grad composition, the decode step, `backend="auto"`, sequence
starts, errors, checked mode) is `tests/test_ops_api.py`; the Pallas backend is `tests/test_pallas.py` and
`tests/test_pallas_paths.py`; the slow exhaustive sweep is `tests/test_ops_sweep.py`.
"""

from tests.op_suite import OpsSuite


class TestChunk(OpsSuite):
  backend = "chunk"


class TestRecurrent(OpsSuite):
  backend = "recurrent"
