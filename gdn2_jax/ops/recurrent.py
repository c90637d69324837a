"""The GDN-2 recurrence, token by token: the production reference (`backend="recurrent"`) and the decode step.

Per token, for one head with state `S` of shape `[K, V]`:

    S_bar = Diag(exp(g_t)) S_{t-1}
    r_t   = S_bar^T (b_t * k_t)
    S_t   = S_bar + k_t (w_t * v_t - r_t)^T
    o_t   = scale * S_t^T q_t

Computed in float32 (float64 when the inputs are float64) with IEEE-accurate contractions on every platform.
Autodiff through the `lax.scan` keeps one state per token: fine for tests and short sequences, not for training.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from gdn2_jax.ops import common, varlen

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(*xs) -> jnp.dtype:
  """float32, or float64 when an input is float64 (never lower than float32)."""
  return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def token_update(S: Array, q: Array, k: Array, v: Array, g: Array, b: Array, w: Array, scale: float):
  """One step of the recurrence on any leading batch axes.

  Args:
    S: `[..., K, V]` state.
    q, k, g, b: `[..., K]`.
    v, w: `[..., V]`.
  Returns:
    `(o [..., V], S_new [..., K, V])`, in the dtype of `S`.
  """
  dt = S.dtype
  q, k, v, g, b, w = (x.astype(dt) for x in (q, k, v, g, b, w))
  S = jnp.exp(g)[..., None] * S
  r = jnp.einsum("...kv,...k->...v", S, b * k, precision=_HIGHEST)
  S = S + k[..., :, None] * (w * v - r)[..., None, :]
  o = scale * jnp.einsum("...kv,...k->...v", S, q, precision=_HIGHEST)
  return o, S


def recurrent_fwd(q, k, v, g, b, w, *, scale: float, initial_state: Optional[Array] = None,
                  cu_seqlens: Optional[Array] = None):
  """Canonical-input backend: `q, k, g, b [B, T, H, K]`, `v, w [B, T, HV, V]` -> `(o [B, T, HV, V], S [N, HV, K, V])`.

  `o` is returned in the compute dtype (float32 or float64); the caller casts it.
  """
  B, T, H, K = q.shape
  HV, V = v.shape[2:]
  groups = HV // H
  dt = compute_dtype(q, k, v, g, b, w)
  q, k, g, b = (common.repeat_heads(x, groups) for x in (q, k, g, b))
  layout = None
  if cu_seqlens is not None:
    layout = varlen.chunk_layout(cu_seqlens, T, chunk_size=1)
    q, k, v, g, b, w = (varlen.pack(x, layout) for x in (q, k, v, g, b, w))
  N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
  if initial_state is None:
    initial_state = jnp.zeros((N, HV, K, V), dt)
  state0 = initial_state.astype(dt) if layout is None else jnp.zeros((1, HV, K, V), dt)

  def step(S, x):
    o, S = token_update(S, *x, scale=scale)
    return S, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, b, w))  # [T, B, H, D]
  final, o = varlen.scan_with_resets(step, state0, xs, layout, initial_state.astype(dt))
  o = jnp.moveaxis(o, 0, 1)
  if layout is not None:
    o = varlen.unpack(o, layout)
  return o, final
