"""Argument checks and the input transforms every backend shares.

Everything here runs before a backend sees its inputs: shape validation (with errors that name the argument),
the in-op gate activation, the q/k L2 normalisation and the gate collapse used by the family wrappers. Backends
receive canonical inputs (see `Canonical`) and never re-validate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

L2NORM_EPS = 1e-6
MAX_HEAD_DIM = 256  # the state K x V lives in one kernel program's registers/shared memory
# fla's bounded decay ("safe gate"): `g = lower_bound * sigmoid(...)` with lower_bound in [LOWER_BOUND_MIN, 0). With
# 16-token sub-blocks every exponent then stays above -80 (docs/algorithm.md section 6).
LOWER_BOUND_MIN = -5.0


def lower_bound_error(name: str, value: Any) -> Optional[str]:
  """The one-line error for a decay lower bound outside [-5, 0) (`name` is the argument), or None if it is valid."""
  if value is None or LOWER_BOUND_MIN <= float(value) < 0.0:
    return None
  return f"`{name}` is {value}; expected None or a value in [{LOWER_BOUND_MIN:g}, 0) (fla's bounded decay)."


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", ()))


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
  if x is None:
    raise ValueError(f"`{name}` is required; expected an array of shape {layout}.")
  if len(_shape(x)) != rank:
    raise ValueError(f"`{name}` has shape {_shape(x)}; expected rank {rank}, {layout}.")


def check_floating(name: str, x: Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"`{name}` has dtype {x.dtype}; expected a floating dtype (float32, bfloat16, float16).")


@dataclasses.dataclass(frozen=True)
class Dims:
  """Static sizes of one call: batch, tokens, qk heads, value heads, key dim, value dim, sequences."""

  B: int
  T: int
  H: int
  HV: int
  K: int
  V: int
  N: int  # number of independent sequences: B, or len(cu_seqlens) - 1

  @property
  def groups(self) -> int:
    return self.HV // self.H


def validate(q, k, v, g, b, w, *, initial_state=None, cu_seqlens=None, A_log=None, dt_bias=None,
             lower_bound=None) -> Dims:
  """Checks the layout `q, k, g, b: [B, T, H, K]`, `v, w: [B, T, HV, V]` and returns the static sizes."""
  for name, x in (("q", q), ("k", k), ("g", g), ("b", b)):
    check_rank(name, x, 4, "[B, T, H, K]")
  for name, x in (("v", v), ("w", w)):
    check_rank(name, x, 4, "[B, T, HV, V]")
  for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("b", b), ("w", w)):
    check_floating(name, x)
  B, T, H, K = q.shape
  for name, x in (("k", k), ("g", g), ("b", b)):
    if x.shape != q.shape:
      raise ValueError(f"`{name}` has shape {x.shape}; expected {q.shape} ([B, T, H, K], the shape of `q`).")
  if v.shape[:2] != (B, T):
    raise ValueError(f"`v` has shape {v.shape}; expected [B={B}, T={T}, HV, V] to match `q` {q.shape}.")
  HV, V = v.shape[2], v.shape[3]
  if w.shape != v.shape:
    raise ValueError(f"`w` has shape {w.shape}; expected {v.shape} ([B, T, HV, V], the shape of `v`).")
  if HV % H:
    raise ValueError(f"`v` has {HV} heads and `q` has {H}; the value heads must be a multiple of the qk heads "
                     "(grouped value heads).")
  if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
    raise ValueError(f"head dims K={K} (`q` {q.shape}) and V={V} (`v` {v.shape}) must be at most {MAX_HEAD_DIM}.")
  if T == 0 or K == 0 or V == 0:
    raise ValueError(f"empty input: q {q.shape}, v {v.shape}; T, K and V must be positive.")
  if cu_seqlens is not None:
    check_rank("cu_seqlens", cu_seqlens, 1, "[N + 1]")
    if B != 1:
      raise ValueError(f"`cu_seqlens` packs sequences along T, so the batch must be 1; got q {q.shape}.")
    if not jnp.issubdtype(jnp.asarray(cu_seqlens).dtype, jnp.integer):
      raise TypeError(f"`cu_seqlens` has dtype {jnp.asarray(cu_seqlens).dtype}; expected integer offsets.")
    N = cu_seqlens.shape[0] - 1
    if N < 1:
      raise ValueError(f"`cu_seqlens` has shape {cu_seqlens.shape}; expected at least 2 offsets [0, ..., T].")
  else:
    N = B
  if initial_state is not None:
    expected = (N, HV, K, V)
    if _shape(initial_state) != expected:
      what = "[N, HV, K, V] (one state per packed sequence)" if cu_seqlens is not None else "[B, HV, K, V]"
      raise ValueError(f"`initial_state` has shape {_shape(initial_state)}; expected {expected}, {what}.")
  if A_log is not None and _shape(A_log) != (H,):
    raise ValueError(f"`A_log` has shape {_shape(A_log)}; expected ({H},), one value per qk head.")
  if dt_bias is not None:
    if A_log is None:
      raise ValueError("`dt_bias` is only used with the in-op gate activation; pass `A_log` too.")
    if _shape(dt_bias) not in ((H * K,), (H, K)):
      raise ValueError(f"`dt_bias` has shape {_shape(dt_bias)}; expected ({H * K},) ([H * K]) or ({H}, {K}).")
  if lower_bound is not None:
    if A_log is None:
      raise ValueError("`lower_bound` selects the bounded gate activation; pass `A_log` too.")
    if lower_bound_error("lower_bound", lower_bound):
      raise ValueError(lower_bound_error("lower_bound", lower_bound))
  return Dims(B=B, T=T, H=H, HV=HV, K=K, V=V, N=N)


def activate_log_decay(g: Array, A_log: Array, dt_bias: Optional[Array] = None,
                       lower_bound: Optional[float] = None) -> Array:
  """Turns a raw decay pre-activation into the log-decay, in float32.

  Args:
    g: `[..., H, K]` pre-activation.
    A_log: `[H]` per-head log rate.
    dt_bias: optional `[H * K]` or `[H, K]` bias added to `g` first.
    lower_bound: None for `-exp(A_log) * softplus(g + dt_bias)` (unbounded, <= 0); a value in [-5, 0) for
      `lower_bound * sigmoid(exp(A_log) * (g + dt_bias))` (in [lower_bound, 0]).
  Returns:
    `[..., H, K]` float32 log-decay, <= 0.
  """
  H, K = g.shape[-2:]
  x = g.astype(jnp.float32)
  if dt_bias is not None:
    x = x + dt_bias.astype(jnp.float32).reshape(H, K)
  rate = jnp.exp(A_log.astype(jnp.float32))[:, None]
  if lower_bound is None:
    return -rate * jax.nn.softplus(x)
  return lower_bound * jax.nn.sigmoid(rate * x)


def l2_normalize(x: Array, eps: float = L2NORM_EPS) -> Array:
  """`x / sqrt(sum(x^2) + eps)` over the last axis, computed in float32, returned in `x.dtype`."""
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def repeat_heads(x: Array, groups: int, axis: int = 2) -> Array:
  """Repeats qk heads over the value-head groups: head h serves value heads h*groups .. h*groups+groups-1."""
  return x if groups == 1 else jnp.repeat(x, groups, axis=axis)


def check_values(g: Array, **arrays: Array) -> None:
  """Value checks `jit` cannot raise on, as `checkify` checks: finite inputs and a log-decay `g <= 0`.

  Only active inside `jax.experimental.checkify.checkify` (see `gdn2_jax.gdn2_checked`).
  """
  from jax.experimental import checkify

  checkify.check(jnp.all(jnp.isfinite(g)), "`g` has non-finite values; the log-decay must be finite (use -1e3 "
                 "for a total forget)")
  checkify.check(jnp.all(g <= 0), "`g` has positive values (max {m}); the log-decay must be <= 0", m=jnp.max(g))
  for name, x in arrays.items():
    if x is not None:
      checkify.check(jnp.all(jnp.isfinite(x)), f"`{name}` has non-finite values (NaN or Inf)")
