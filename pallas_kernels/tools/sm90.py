"""Lowering the Triton kernels for an H100 (sm90) on a machine without a GPU."""

from __future__ import annotations

import contextlib
import types


@contextlib.contextmanager
def lowering_for_sm90():
  """Within it, the Pallas Triton lowering takes the GPU to be compute capability 9.0, so that
  `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` emits the sm90 kernels on a CPU-only machine."""
  from jax._src.pallas.triton import pallas_call_registration as reg
  saved = reg.gpu_info_lib.get_gpu_info
  reg.gpu_info_lib.get_gpu_info = lambda: types.SimpleNamespace(compute_capability="90")
  try:
    yield
  finally:
    reg.gpu_info_lib.get_gpu_info = saved
