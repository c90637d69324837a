"""The float64 oracle every backend is measured against, written independently of the library.

It uses the matrix form of the recurrence, `S_t = (I - k_t (b_t * k_t)^T) Diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T`,
one token at a time, in float64 under `jax.enable_x64` so that `jax.grad` gives float64 gradients. Packed sequences
are split on the host (the oracle takes `cu_seqlens` as a NumPy array). `numpy_loop` is a plain NumPy loop used to
check the oracle itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _f64(x):
  if x is None:
    return None
  if isinstance(x, jax.Array):  # possibly traced (the oracle is differentiated)
    return x.astype(jnp.float64)
  return jnp.asarray(np.asarray(x, dtype=np.float64))


def _one_sequence(q, k, v, g, b, w, S0, scale):
  """q, k, g, b: [T, HV, K]; v, w: [T, HV, V]; S0: [HV, K, V]."""
  K = q.shape[-1]
  eye = jnp.eye(K, dtype=jnp.float64)

  def step(S, x):
    qt, kt, vt, gt, bt, wt = x
    transition = eye - kt[:, :, None] * (bt * kt)[:, None, :]  # [H, K, K]
    S = jnp.einsum("hij,hjv->hiv", transition, jnp.exp(gt)[:, :, None] * S)
    S = S + kt[:, :, None] * (wt * vt)[:, None, :]
    return S, scale * jnp.einsum("hkv,hk->hv", S, qt)

  S, o = jax.lax.scan(step, S0, (q, k, v, g, b, w))
  return o, S


def gate(g, A_log, dt_bias=None, lower_bound=None):
  """float64 gate activation: `-exp(A_log) softplus(g + dt_bias)`, or the bounded sigmoid form."""
  H, K = g.shape[-2:]
  x = g + (0.0 if dt_bias is None else jnp.reshape(dt_bias, (H, K)))
  rate = jnp.exp(A_log)[:, None]
  if lower_bound is None:
    return -rate * jnp.logaddexp(0.0, x)
  return lower_bound / (1.0 + jnp.exp(-rate * x))


def l2norm(x, eps=1e-6):
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def gdn2_oracle(q, k, v, g, b, w, *, scale=None, initial_state=None, cu_seqlens=None, use_qk_l2norm=False,
                A_log=None, dt_bias=None, lower_bound=None):
  """float64 GDN-2 with the layout of `gdn2_jax.gdn2`. Call inside `jax.enable_x64(True)`.

  Returns `(o [B, T, HV, V], final [N, HV, K, V])`, both float64.
  """
  q, k, v, g, b, w = (_f64(x) for x in (q, k, v, g, b, w))
  B, T, H, K = q.shape
  HV, V = v.shape[2:]
  scale = K ** -0.5 if scale is None else scale
  if A_log is not None:
    g = gate(g, _f64(A_log), _f64(dt_bias), lower_bound)
  if use_qk_l2norm:
    q, k = l2norm(q), l2norm(k)
  rep = HV // H
  q, k, g, b = (jnp.repeat(x, rep, axis=2) for x in (q, k, g, b))
  if cu_seqlens is None:
    S0 = jnp.zeros((B, HV, K, V)) if initial_state is None else _f64(initial_state)
    return jax.vmap(_one_sequence, in_axes=(0, 0, 0, 0, 0, 0, 0, None))(q, k, v, g, b, w, S0, scale)
  # Packed sequences: one pass over the stream; the state restarts from h0[n] at the first token of sequence n,
  # and the state after its last token is its final state (empty sequences keep h0[n]).
  cu = np.asarray(cu_seqlens)
  N = len(cu) - 1
  S0 = jnp.zeros((N, HV, K, V)) if initial_state is None else _f64(initial_state)
  seq = np.clip(np.searchsorted(cu, np.arange(T), side="right") - 1, 0, N - 1)
  starts = np.zeros(T, bool)
  starts[[c for n, c in enumerate(cu[:-1]) if cu[n + 1] > c]] = True
  o, states = _one_sequence_with_resets(q[0], k[0], v[0], g[0], b[0], w[0], S0, scale, seq, starts)
  finals = []
  for n in range(N):
    s, e = int(cu[n]), int(cu[n + 1])
    finals.append(states[e - 1] if e > s else S0[n])
  return o[None], jnp.stack(finals)


def _one_sequence_with_resets(q, k, v, g, b, w, S0, scale, seq, starts):
  """Like `_one_sequence` over a packed stream, restarting from S0[seq[t]] where starts[t]; returns every state."""
  K = q.shape[-1]
  eye = jnp.eye(K, dtype=jnp.float64)

  def step(S, x):
    qt, kt, vt, gt, bt, wt, st, start = x
    S = jnp.where(start, S0[st], S)
    transition = eye - kt[:, :, None] * (bt * kt)[:, None, :]
    S = jnp.einsum("hij,hjv->hiv", transition, jnp.exp(gt)[:, :, None] * S)
    S = S + kt[:, :, None] * (wt * vt)[:, None, :]
    return S, (scale * jnp.einsum("hkv,hk->hv", S, qt), S)

  _, (o, states) = jax.lax.scan(step, jnp.zeros_like(S0[0]), (q, k, v, g, b, w, jnp.asarray(seq), jnp.asarray(starts)))
  return o, states


def numpy_loop(q, k, v, g, b, w, scale, S0=None):
  """Plain NumPy float64 recurrence for one batch row without grouping: q, k, g, b [T, H, K], v, w [T, H, V]."""
  q, k, v, g, b, w = (np.asarray(x, np.float64) for x in (q, k, v, g, b, w))
  T, H, K = q.shape
  V = v.shape[-1]
  S = np.zeros((H, K, V)) if S0 is None else np.array(S0, np.float64)
  o = np.zeros((T, H, V))
  for t in range(T):
    for h in range(H):
      Sb = np.exp(g[t, h])[:, None] * S[h]
      r = Sb.T @ (b[t, h] * k[t, h])
      S[h] = Sb + np.outer(k[t, h], w[t, h] * v[t, h] - r)
      o[t, h] = scale * S[h].T @ q[t, h]
  return o, S
