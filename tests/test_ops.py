"""The op suite on the pure-JAX backends, plus family collapses, composition, decode step and errors."""

from tests.op_suite import OpsSuite


class TestChunk(OpsSuite):
  backend = "chunk"


class TestRecurrent(OpsSuite):
  backend = "recurrent"
