"""fla-compatible entry points: the names, argument order and defaults of fla 0.6.0's ops, thin over `gdn2_jax`.

Code written against `fla.ops` (PyTorch) ports by changing the import:

    from gdn2_jax.fla import chunk_gdn2          # was: from fla.ops.gdn2 import chunk_gdn2
    o, ht = chunk_gdn2(q, k, v, g, b, w, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                       dt_bias=dt_bias, output_final_state=True)

Layouts are fla's (and this library's): `[B, T, H, D]` time-major, packed sequences through `cu_seqlens` with B = 1,
states `[N, HV, K, V]` float32. fla's conventions kept here:
  - `scale` defaults to `K ** -0.5`;
  - `use_gate_in_kernel=True`: `g` is the raw pre-activation and the log-decay is `-exp(A_log) * softplus(g + dt_bias)`,
    or with `lower_bound` `lower_bound * sigmoid(exp(A_log) * (g + dt_bias))` (`A_log` may then be None: rate 1).
    Without it, `A_log`, `dt_bias` and `lower_bound` are ignored, as in fla;
  - `use_beta_sigmoid_in_kernel=True`: `beta` holds logits, `sigmoid(beta)` (x2 with `allow_neg_eigval`) is used;
  - grouped value heads (HV > H): the gates are per value head, `A_log [HV]`; q and k are shared by HV / H heads.
fla's keyword-only extras that it reads from `**kwargs` (`A_log`, `dt_bias`, `chunk_size`) are named parameters
here. Speed hints without a meaning here (`cu_seqlens_cpu`, `chunk_indices`, `safe_gate`, `disable_recompute`,
`use_graph`, `max_num_seqs`) are accepted and change nothing. What this library does not do (`cp_context`,
`state_v_first`, `return_intermediate_states`, per-value decays `gv`, per-channel `beta`) raises
NotImplementedError. `backend` (keyword-only, not fla's) picks the `gdn2_jax` backend: the `chunk_*` ops default
to 'auto', the `fused_recurrent_*` ops to 'recurrent' (the token-by-token recurrence).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from gdn2_jax.ops import api, common

Array = jax.Array

__all__ = ["chunk_gdn2", "fused_recurrent_gdn2", "chunk_kda", "fused_recurrent_kda", "chunk_gated_delta_rule",
           "fused_recurrent_gated_delta_rule", "chunk_delta_rule", "fused_recurrent_delta_rule"]


def _refuse(op: str, **settings: Any) -> None:
  """NotImplementedError for the first fla setting given a value this library cannot honour (None/False pass)."""
  for name, value in settings.items():
    if value is not None and value is not False:
      raise NotImplementedError(f"{op}: `{name}={value!r}` is not supported by gdn2_jax; leave it at its default "
                                "(None / False).")


def _heads_like_values(q: Array, k: Array, v: Array) -> tuple[Array, Array]:
  """fla's grouped value heads keep gates per value head: give each value head its q, k (H -> HV)."""
  H, HV = q.shape[2], v.shape[2]
  if HV == H:
    return q, k
  if HV % H:
    raise ValueError(f"`v` has {HV} heads and `q` {H}; the value heads must be a multiple of the qk heads.")
  return jnp.repeat(q, HV // H, axis=2), jnp.repeat(k, HV // H, axis=2)


def _beta(beta: Array, use_sigmoid: bool, allow_neg_eigval: bool) -> Array:
  if allow_neg_eigval and not use_sigmoid:
    raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True` (as in fla).")
  if not use_sigmoid:
    return beta
  s = jax.nn.sigmoid(beta.astype(jnp.float32))
  return 2.0 * s if allow_neg_eigval else s


def _gate(op: str, use_gate_in_kernel: bool, A_log, dt_bias, lower_bound, heads: int, safe_gate: bool = False):
  """The in-op gate activation arguments of the main API (empty without `use_gate_in_kernel`)."""
  if safe_gate and use_gate_in_kernel and lower_bound is None:
    raise ValueError(f"{op}: `lower_bound` must be set when `safe_gate=True` and `use_gate_in_kernel=True`.")
  if not use_gate_in_kernel:
    return {}
  if A_log is None:
    if lower_bound is None:
      raise ValueError(f"{op}: `A_log` is required when `use_gate_in_kernel=True` and `lower_bound` is not set.")
    A_log = jnp.zeros((heads,), jnp.float32)  # exp(0) = 1: `lower_bound * sigmoid(g + dt_bias)`, fla's A_log=None
  return dict(A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound)


def _unset_if_default(chunk_size: int) -> Optional[int]:
  return None if chunk_size == 64 else chunk_size  # fla's default is every backend's own: leave it unset


def _common(initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, scale, backend):
  return dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              use_qk_l2norm=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens, backend=backend)


def chunk_gdn2(
    q: Array, k: Array, v: Array, g: Array, b: Array, w: Array,
    scale: Optional[float] = None,
    initial_state: Optional[Array] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    cu_seqlens: Optional[Array] = None,
    cu_seqlens_cpu: Optional[Array] = None,
    safe_gate: bool = False,
    lower_bound: Optional[float] = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cp_context: Any = None,
    *, A_log: Optional[Array] = None, dt_bias: Optional[Array] = None, chunk_size: int = 64,
    backend: Any = "auto",
) -> tuple[Array, Optional[Array]]:
  """fla's `chunk_gdn2`: `q, k, g, b [B, T, H, K]`, `v, w [B, T, H, V]` -> `(o [B, T, H, V], final [N, H, K, V])`.

  `gdn2_jax.gdn2` with fla's argument names (see the module docstring). `chunk_size` must be 64, as in fla.
  """
  del cu_seqlens_cpu, disable_recompute
  _refuse("chunk_gdn2", return_intermediate_states=return_intermediate_states, state_v_first=state_v_first,
          cp_context=cp_context)
  if chunk_size != 64:
    raise ValueError(f"chunk_gdn2: `chunk_size` is {chunk_size}; GDN-2's chunk kernels use 64 (as in fla).")
  q, k = _heads_like_values(q, k, v)
  return api.gdn2(q, k, v, g, b, w, chunk_size=_unset_if_default(chunk_size),
                  **_common(initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, scale, backend),
                  **_gate("chunk_gdn2", use_gate_in_kernel, A_log, dt_bias, lower_bound, v.shape[2], safe_gate))


def fused_recurrent_gdn2(
    q: Array, k: Array, v: Array, g: Array, b: Array, w: Array,
    A_log: Optional[Array] = None,
    dt_bias: Optional[Array] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Array] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    lower_bound: Optional[float] = None,
    state_v_first: bool = False,
    cu_seqlens: Optional[Array] = None,
    *, backend: Any = "recurrent",
) -> tuple[Array, Optional[Array]]:
  """fla's `fused_recurrent_gdn2` (shapes as `chunk_gdn2`): the token-by-token recurrence by default."""
  _refuse("fused_recurrent_gdn2", state_v_first=state_v_first)
  q, k = _heads_like_values(q, k, v)
  return api.gdn2(q, k, v, g, b, w,
                  **_common(initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, scale, backend),
                  **_gate("fused_recurrent_gdn2", use_gate_in_kernel, A_log, dt_bias, lower_bound, v.shape[2]))


def chunk_kda(
    q: Array, k: Array, v: Array, g: Array, beta: Array,
    scale: Optional[float] = None,
    initial_state: Optional[Array] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: Optional[float] = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Optional[Array] = None,
    cu_seqlens_cpu: Optional[Array] = None,
    cp_context: Any = None,
    use_graph: bool = False,
    max_num_seqs: Optional[int] = None,
    *, A_log: Optional[Array] = None, dt_bias: Optional[Array] = None, chunk_size: int = 64,
    backend: Any = "auto",
) -> tuple[Array, Optional[Array]]:
  """fla's `chunk_kda`: `q, k [B, T, H, K]`, `g [B, T, HV, K]`, `beta [B, T, HV]`, `v [B, T, HV, V]`.

  `gdn2_jax.kda` with fla's argument names (see the module docstring).
  """
  del cu_seqlens_cpu, disable_recompute, use_graph, max_num_seqs
  _refuse("chunk_kda", return_intermediate_states=return_intermediate_states, state_v_first=state_v_first,
          cp_context=cp_context)
  q, k = _heads_like_values(q, k, v)
  return api.kda(q, k, v, g, _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval),
                 chunk_size=_unset_if_default(chunk_size),
                 **_common(initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, scale, backend),
                 **_gate("chunk_kda", use_gate_in_kernel, A_log, dt_bias, lower_bound, v.shape[2], safe_gate))


def fused_recurrent_kda(
    q: Array, k: Array, v: Array, g: Array, beta: Array,
    A_log: Optional[Array] = None,
    dt_bias: Optional[Array] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Array] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: Optional[float] = None,
    state_v_first: bool = False,
    cu_seqlens: Optional[Array] = None,
    *, backend: Any = "recurrent",
) -> tuple[Array, Optional[Array]]:
  """fla's `fused_recurrent_kda` (shapes as `chunk_kda`): the token-by-token recurrence by default."""
  _refuse("fused_recurrent_kda", state_v_first=state_v_first)
  q, k = _heads_like_values(q, k, v)
  return api.kda(q, k, v, g, _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval),
                 **_common(initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, scale, backend),
                 **_gate("fused_recurrent_kda", use_gate_in_kernel, A_log, dt_bias, lower_bound, v.shape[2]))


def chunk_gated_delta_rule(
    q: Array, k: Array, v: Array, g: Array, beta: Array,
    scale: Optional[float] = None,
    initial_state: Optional[Array] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Optional[Array] = None,
    cu_seqlens_cpu: Optional[Array] = None,
    chunk_indices: Optional[Array] = None,
    cp_context: Any = None,
    *, use_gate_in_kernel: bool = False, A_log: Optional[Array] = None, dt_bias: Optional[Array] = None,
    chunk_size: int = 64, backend: Any = "auto",
) -> tuple[Array, Optional[Array]]:
  """fla's `chunk_gated_delta_rule`: `q, k [B, T, H, K]`, `g, beta [B, T, HV]`, `v [B, T, HV, V]`.

  `gdn2_jax.gated_delta_rule` with fla's argument names; `A_log`, `dt_bias` `[HV]` (see the module docstring).
  """
  del cu_seqlens_cpu, chunk_indices
  _refuse("chunk_gated_delta_rule", state_v_first=state_v_first, cp_context=cp_context)
  if chunk_size not in (16, 32, 64):
    raise ValueError(f"chunk_gated_delta_rule: `chunk_size` is {chunk_size}; expected 16, 32 or 64 (as in fla).")
  q, k = _heads_like_values(q, k, v)
  return api.gated_delta_rule(
      q, k, v, g, _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval), chunk_size=_unset_if_default(chunk_size),
      **_common(initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, scale, backend),
      **_gate("chunk_gated_delta_rule", use_gate_in_kernel, A_log, dt_bias, None, v.shape[2]))


def fused_recurrent_gated_delta_rule(
    q: Array, k: Array, v: Array,
    g: Optional[Array] = None,
    gk: Optional[Array] = None,
    gv: Optional[Array] = None,
    beta: Optional[Array] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Array] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Optional[Array] = None,
    dt_bias: Optional[Array] = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Optional[Array] = None,
    *, backend: Any = "recurrent",
) -> tuple[Array, Optional[Array]]:
  """fla's `fused_recurrent_gated_delta_rule`: `g [B, T, HV]` (per head) and/or `gk [B, T, HV, K]` (per key channel)
  log-decays, `beta [B, T, HV]` (None: ones). With `use_gate_in_kernel`, `g` is activated with `A_log`, `dt_bias`
  `[HV]`; `gk` is always a log-decay. Per-value decays (`gv`) and per-channel `beta [B, T, HV, V]` are not supported.
  """
  op = "fused_recurrent_gated_delta_rule"
  _refuse(op, gv=None if gv is None else f"array {tuple(gv.shape)}", state_v_first=state_v_first)
  if beta is not None and beta.ndim == 4:
    raise NotImplementedError(f"{op}: `beta` has shape {tuple(beta.shape)}; per-value-channel beta is not supported "
                              "by gdn2_jax, pass one value per head [B, T, HV].")
  if use_gate_in_kernel and A_log is None:
    raise ValueError(f"{op}: `A_log` is required when `use_gate_in_kernel=True`.")
  q, k = _heads_like_values(q, k, v)
  B, T, HV = v.shape[:3]
  beta = jnp.ones((B, T, HV), q.dtype) if beta is None else _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)
  common_kw = _common(initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, scale, backend)
  if gk is None:
    if g is None:  # no decay: the delta rule
      return api.delta_rule(q, k, v, beta, **common_kw)
    return api.gated_delta_rule(q, k, v, g, beta, **common_kw,
                                **_gate(op, use_gate_in_kernel, A_log, dt_bias, None, HV))
  log_decay = gk.astype(jnp.float32)
  if g is not None:  # both decays apply: their logs add (the head's gate activated first, as fla does)
    if use_gate_in_kernel:
      dt = None if dt_bias is None else dt_bias.reshape(-1, 1)
      g = common.activate_log_decay(g[..., None], A_log, dt)[..., 0]
    log_decay = log_decay + g.astype(jnp.float32)[..., None]
  return api.kda(q, k, v, log_decay, beta, **common_kw)


def chunk_delta_rule(
    q: Array, k: Array, v: Array, beta: Array,
    scale: Optional[float] = None,
    initial_state: Optional[Array] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[Array] = None,
    cu_seqlens_cpu: Optional[Array] = None,
    *, chunk_size: int = 64, backend: Any = "auto",
) -> tuple[Array, Optional[Array]]:
  """fla's `chunk_delta_rule`: `q, k [B, T, H, K]`, `v [B, T, H, V]`, `beta [B, T, H]` (`gdn2_jax.delta_rule`)."""
  del cu_seqlens_cpu
  return api.delta_rule(q, k, v, beta, chunk_size=_unset_if_default(chunk_size),
                        **_common(initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, scale,
                                  backend))


def fused_recurrent_delta_rule(
    q: Array, k: Array, v: Array,
    beta: Optional[Array] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Array] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[Array] = None,
    *, backend: Any = "recurrent",
) -> tuple[Array, Optional[Array]]:
  """fla's `fused_recurrent_delta_rule` (shapes as `chunk_delta_rule`; `beta` None: ones)."""
  if beta is not None and beta.ndim == 4:
    raise NotImplementedError(f"fused_recurrent_delta_rule: `beta` has shape {tuple(beta.shape)}; per-value-channel "
                              "beta is not supported by gdn2_jax, pass one value per head [B, T, H].")
  beta = jnp.ones(q.shape[:3], q.dtype) if beta is None else beta
  return api.delta_rule(q, k, v, beta,
                        **_common(initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, scale,
                                  backend))
