"""What the user asked of a backend: the one precision vocabulary, and settings that stay None when left unset.

Precision names say what the matrix units do, the same for every backend:
  'ieee'  exact float32 products (chunk path default: about 1e-7 relative error; the recurrent path always)
  'tf32'  TF32 tensor cores with float32 accumulation on Ampere/Hopper GPUs (about 2e-4 relative error; the Pallas
          kernels' default). Elsewhere products stay float32.
  'tf32_emulated'  Pallas in interpret mode only: operands cut to TF32 first, so CPU tests see the GPU's rounding.
jax's names are accepted as aliases: 'default' / `Precision.DEFAULT` is 'tf32', 'highest' / `Precision.HIGHEST`
is 'ieee'.

Unset is None everywhere (`precision`, `chunk_size`, `config`): a backend, and later a per-shape heuristic, fills only
what the user left unset.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

PRECISIONS = ("ieee", "tf32", "tf32_emulated")
_ALIASES = {"default": "tf32", "highest": "ieee"}


def canonical_precision(precision: Any) -> Optional[str]:
  """None, or one of `PRECISIONS` (jax's names mapped onto them); raises a one-line ValueError otherwise."""
  if precision is None:
    return None
  if isinstance(precision, jax.lax.Precision):
    if precision == jax.lax.Precision.DEFAULT:
      return "tf32"
    if precision == jax.lax.Precision.HIGHEST:
      return "ieee"
  elif isinstance(precision, str):
    name = _ALIASES.get(precision.lower(), precision.lower())
    if name in PRECISIONS:
      return name
  raise ValueError(f"`precision` is {precision!r}; expected None, 'ieee' (exact float32 products) or 'tf32' "
                   "(tensor cores; aliases 'highest' and 'default').")


def lax_precision(precision: Optional[str], default: str = "ieee") -> jax.lax.Precision:
  """The `jax.lax.Precision` of a canonical name for XLA's matrix products."""
  name = default if precision is None else precision
  return jax.lax.Precision.DEFAULT if name == "tf32" else jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BackendChoice:
  """A backend with its settings, for `gdn2(..., backend=...)`: see `gdn2_jax.backend`.

  Attributes:
    name: 'auto', 'chunk', 'recurrent', 'pallas' (or a registered name).
    config: backend-specific settings object (`pallas_kernels.ChunkConfig` for 'pallas'), None when unset.
    precision: one of `PRECISIONS`, None when unset.
    chunk_size: chunk length (the chunk path: a multiple of 16; the Pallas kernels: 64 only), None when unset.
    interpret: run Pallas kernels in interpret mode (None: not set here).
  """

  name: str = "auto"
  config: Any = None
  precision: Optional[str] = None
  chunk_size: Optional[int] = None
  interpret: Optional[bool] = None

  def __post_init__(self):
    object.__setattr__(self, "precision", canonical_precision(self.precision))


def backend(name: str = "auto", *, config: Any = None, precision: Any = None, chunk_size: Optional[int] = None,
            interpret: Optional[bool] = None) -> BackendChoice:
  """A configured backend: `gdn2(..., backend=gdn2_jax.backend("pallas", config=ChunkConfig(block_v=32)))`.

  Settings given here and again as `gdn2` arguments must agree. See `gdn2` for what each means.
  """
  return BackendChoice(name, config, precision, chunk_size, interpret)


def merge(choice: BackendChoice, *, config: Any, precision: Any, chunk_size: Optional[int],
          interpret: Optional[bool]) -> BackendChoice:
  """`choice` with the `gdn2` arguments filled in; a setting given in both places must agree (one-line error)."""
  given = dict(config=config, precision=canonical_precision(precision), chunk_size=chunk_size, interpret=interpret)
  out = {}
  for field, value in given.items():
    mine = getattr(choice, field)
    if value is not None and mine is not None and value != mine:
      raise ValueError(f"`{field}` is {value!r} but backend={choice.name!r} was configured with {mine!r}; set it "
                       "in one place.")
    out[field] = mine if value is None else value
  return dataclasses.replace(choice, **out)
