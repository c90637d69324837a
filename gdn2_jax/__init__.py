"""gdn2-jax: Gated DeltaNet-2 in JAX.

The op API (`gdn2`, its family `kda`, `gated_delta_rule`, `delta_rule`, and the decode step `gdn2_step`) dispatches to
a backend: `recurrent` (lax.scan reference), `chunk` (pure-JAX chunkwise WY) or `pallas` (GPU kernels).
"""

from gdn2_jax.ops.api import (
    available_backends,
    delta_rule,
    gated_delta_rule,
    gdn2,
    gdn2_checked,
    gdn2_step,
    kda,
    register_backend,
)
from gdn2_jax.ops.settings import BackendChoice, backend

__version__ = "0.1.0"

__all__ = [
    "BackendChoice",
    "available_backends",
    "backend",
    "delta_rule",
    "gated_delta_rule",
    "gdn2",
    "gdn2_checked",
    "gdn2_step",
    "kda",
    "register_backend",
]
