"""Public GDN-2 family ops and the backend registry.

`gdn2` is the one entry point; `kda`, `gated_delta_rule` and `delta_rule` are the same rule with collapsed gates
(docs/algorithm.md section 2). Backends register a function taking canonical inputs (validated, activated, normalised):

    fn(q, k, v, g, b, w, *, scale, initial_state, cu_seqlens, **options) -> (o, final_state)

with `q, k, g, b [B, T, H, K]`, `v, w [B, T, HV, V]`, `g` float32, `initial_state [N, HV, K, V]` or None, and return
`o [B, T, HV, V]` (any float dtype; cast here to `v.dtype`) and the float32 final states `[N, HV, K, V]`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from gdn2_jax import mesh as mesh_lib
from gdn2_jax.ops import chunk, common, recurrent, settings, varlen

Array = jax.Array
log = logging.getLogger("gdn2_jax")


@dataclasses.dataclass(frozen=True)
class Backend:
  """A registered backend.

  Attributes:
    name: what `gdn2(..., backend=name)` selects.
    fn: `fn(q, k, v, g, b, w, *, scale, initial_state, cu_seqlens, **options)` on canonical inputs.
    available: can it run on the default platform (without interpret mode)?
    description: one line for `available_backends` users.
    options: the settings it reads, of 'precision', 'chunk_size', 'config', 'interpret'. A `config` for a backend
      that reads none is an error when that backend is named (`auto` passes it to the backends that read it).
    reject: `reject(dims, choice) -> reason or None`: why it cannot take this call (head dims, chunk size, ...).
  """

  name: str
  fn: Callable
  available: Callable[[], bool]
  description: str
  options: tuple[str, ...] = ()
  reject: Optional[Callable[[common.Dims, settings.BackendChoice], Optional[str]]] = None


_BACKENDS: dict[str, Backend] = {}
_AUTO_ORDER: list[str] = []


def register_backend(backend: Backend, *, auto_priority: Optional[int] = None) -> None:
  """Adds a backend. `auto_priority` (lower first) puts it in the order `backend="auto"` tries."""
  _BACKENDS[backend.name] = backend
  if auto_priority is not None:
    _AUTO_ORDER.insert(min(auto_priority, len(_AUTO_ORDER)), backend.name)


def _always() -> bool:
  return True


def _recurrent_reject(dims: common.Dims, choice: settings.BackendChoice) -> Optional[str]:
  if choice.precision not in (None, "ieee"):
    return f"it computes in exact float32 only (precision={choice.precision!r}; use 'ieee' or None)"
  return None


def _chunk_reject(dims: common.Dims, choice: settings.BackendChoice) -> Optional[str]:
  if choice.precision == "tf32_emulated":
    return "precision 'tf32_emulated' exists for the Pallas kernels in interpret mode (use 'tf32' or 'ieee')"
  return None


def _chunk_backend(q, k, v, g, b, w, *, scale, initial_state=None, cu_seqlens=None, chunk_size=None,
                   precision=None):
  return chunk.chunk_fwd(q, k, v, g, b, w, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
                         chunk_size=chunk.DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
                         precision=settings.lax_precision(precision, default="ieee"))


def _recurrent_backend(q, k, v, g, b, w, *, scale, initial_state=None, cu_seqlens=None, precision=None):
  del precision  # exact float32 only (`_recurrent_reject` refuses anything else)
  return recurrent.recurrent_fwd(q, k, v, g, b, w, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)


register_backend(Backend("chunk", _chunk_backend, _always,
                         "pure-JAX chunkwise WY (chunk 64), autodiff backward; any platform",
                         options=("chunk_size", "precision"), reject=_chunk_reject), auto_priority=10)
register_backend(Backend("recurrent", _recurrent_backend, _always,
                         "lax.scan over tokens in float32; the production reference and decode path",
                         options=("precision",), reject=_recurrent_reject))


def _load_optional_backends() -> None:
  # The Pallas kernels live in their own package (jax only); `pallas_backend` adapts them to this registry.
  from gdn2_jax.ops import pallas_backend  # noqa: F401


@functools.cache
def _loaded() -> bool:
  _load_optional_backends()
  return True


def available_backends() -> list[str]:
  """Names of the backends that run natively on the default JAX platform, in `backend="auto"` order first."""
  _loaded()
  names = [n for n in _AUTO_ORDER if _BACKENDS[n].available()]
  return names + [n for n, b in _BACKENDS.items() if n not in names and b.available()]


def known_backends() -> list[str]:
  """Every name `backend=` accepts ('auto' and each registered backend, whether or not it runs here)."""
  _loaded()
  return ["auto"] + sorted(_BACKENDS)


def _why_not(b: Backend, dims: common.Dims, choice: settings.BackendChoice) -> Optional[str]:
  """Why backend `b` cannot take this call, in a few words, or None."""
  if not choice.interpret and not b.available():
    return (f"it does not run on platform {jax.default_backend()!r} (pass interpret=True to run its kernels in "
            f"interpret mode)")
  # A backend-specific `config` given to another backend is a mistake; a generic `chunk_size` means nothing to a
  # backend without chunks (the recurrence) and is ignored there.
  if choice.config is not None and "config" not in b.options:
    return f"it takes no `config` (got a {type(choice.config).__name__}, for another backend)"
  return None if b.reject is None else b.reject(dims, choice)


def _resolve_backend(choice: settings.BackendChoice, dims: common.Dims) -> Backend:
  """The backend for this call: the named one (one-line error if it cannot take the call), or `auto`'s pick."""
  _loaded()
  if choice.name == "auto":
    for n in _AUTO_ORDER:
      b = _BACKENDS[n]
      if not b.available():  # auto picks only what runs natively
        log.debug("gdn2: backend='auto' skips %r: not available on platform %s", n, jax.default_backend())
        continue
      # Settings this backend does not read (a ChunkConfig on the chunk path) are for the others: not a reason.
      mine = dataclasses.replace(choice, interpret=None,
                                 **{o: None for o in ("config", "chunk_size") if o not in b.options})
      why = _why_not(b, dims, mine)
      if why is None:
        log.debug("gdn2: backend='auto' picked %r on platform %s", n, jax.default_backend())
        return b
      log.info("gdn2: backend='auto' skips %r: %s", n, why)
    raise ValueError(f"backend='auto' found no backend for this call (settings {choice}); name one of "
                     f"{sorted(_BACKENDS)} to see why it cannot take it.")
  if choice.name not in _BACKENDS:
    raise ValueError(f"`backend` is {choice.name!r}; expected 'auto' or one of {sorted(_BACKENDS)}.")
  b = _BACKENDS[choice.name]
  why = _why_not(b, dims, choice)
  if why is not None:
    raise ValueError(f"backend {choice.name!r} cannot take this call: {why}; or use one of {available_backends()}.")
  return b


def gdn2(q: Array, k: Array, v: Array, g: Array, b: Array, w: Array, *,
         scale: Optional[float] = None,
         initial_state: Optional[Array] = None,
         output_final_state: bool = False,
         use_qk_l2norm: bool = False,
         cu_seqlens: Optional[Array] = None,
         A_log: Optional[Array] = None,
         dt_bias: Optional[Array] = None,
         lower_bound: Optional[float] = None,
         precision: Union[None, str, jax.lax.Precision] = None,
         backend: Union[str, settings.BackendChoice] = "auto",
         interpret: bool = False,
         chunk_size: Optional[int] = None,
         check_values: bool = False,
         config: Any = None) -> tuple[Array, Optional[Array]]:
  """Gated DeltaNet-2: delta-rule memory with a channel-wise erase gate `b` (keys) and write gate `w` (values).

  Per value head, with state `S [K, V]` (float32) and `*` the elementwise product:

      S_t = (I - k_t (b_t * k_t)^T) Diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T
      o_t = scale * S_t^T q_t

  Args:
    q, k: `[B, T, H, K]` queries and keys (bf16 or float32). L2-normalise them first, or pass `use_qk_l2norm`.
    v: `[B, T, HV, V]` values; HV may be a multiple of H (grouped value heads: q, k, g, b are shared by HV // H
      value heads).
    g: `[B, T, H, K]` per-channel log-decay (<= 0, finite), usually float32. With `A_log` it is the raw
      pre-activation instead (see below).
    b: `[B, T, H, K]` erase gate in [0, 1] ([0, 2] allows negative eigenvalues; outside [0, 2] the state can grow
      without bound, which `gdn2_checked` reports).
    w: `[B, T, HV, V]` write gate in [0, 1].
    scale: output scale, default `K ** -0.5`.
    initial_state: `[B, HV, K, V]` (or `[N, HV, K, V]` with `cu_seqlens`), float32.
    output_final_state: also return the final state(s).
    use_qk_l2norm: L2-normalise q and k over K inside the op (eps 1e-6 inside the square root, float32).
    cu_seqlens: `[N + 1]` int offsets of N sequences packed along T (B must be 1): starting at 0, non-decreasing,
      ending at T. Works under `jax.jit`; pad a fixed-length array by repeating the last offset (the extra
      sequences are empty). Nothing crosses a boundary. Concrete offsets are checked here; traced ones (under
      `jit`) are assumed valid (offsets outside that rule give wrong outputs, not an error): `gdn2_checked` checks
      them.
    A_log: `[H]`; when given, `g <- -exp(A_log) * softplus(g + dt_bias)` inside the op (float32), or with
      `lower_bound` in [-5, 0), `g <- lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`.
    dt_bias: `[H * K]` bias of the gate activation (optional).
    lower_bound: see `A_log`.
    precision: matrix-product precision, one vocabulary for every backend (`gdn2_jax.ops.settings`): 'ieee'
      (exact float32) or 'tf32' (tensor cores on Ampere/Hopper, about 2e-4 relative error); None leaves the
      backend's default (chunk: 'ieee', Pallas: its `ChunkConfig`, 'tf32'). Replaces `config.precision`. Gate sums
      never use matrix units.
    backend: 'auto' (fastest that can take the call: Pallas on CUDA GPUs, the chunk path elsewhere; under
      `jax.set_mesh` with a 'context' axis, the sequence split over it, `gdn2_jax.ops.context`: 'auto', 'chunk'
      or 'pallas' only),
      'chunk',
      'recurrent', 'pallas', or a configured `gdn2_jax.backend(name, config=..., ...)`. A named backend that cannot
      take the call (platform, chunk size, head dims) raises saying why; 'auto' skips it and logs why (INFO; the
      pick at DEBUG on the `gdn2_jax` logger). `available_backends()` lists what runs here.
    interpret: run the Pallas kernels in interpret mode (on the CPU).
    chunk_size: chunk length (the chunk path: a multiple of 16, default 64; the Pallas kernels: 64 only). None:
      the backend's default.
    check_values: add `checkify` checks for what `jit` cannot raise on (g > 0 after activation, NaN/Inf inputs,
      `b` outside [0, 2], traced `cu_seqlens` that do not start at 0, decrease or end before or past T).
      They only fire under `jax.experimental.checkify.checkify`; `gdn2_checked` wraps that for you.
    config: backend-specific settings (`pallas_kernels.ChunkConfig` for 'pallas'); None leaves them to the backend.

  Returns:
    `(o, final_state)`: `o [B, T, HV, V]` in the dtype of `v`; `final_state [N, HV, K, V]` float32, or None
    unless `output_final_state`.
  """
  q, k, v, g, b, w, initial_state, cu_seqlens = _as_arrays(
      q=q, k=k, v=v, g=g, b=b, w=w, initial_state=initial_state, cu_seqlens=cu_seqlens)
  if mesh_lib.splits_sequence():  # under `jax.set_mesh` with a `context` axis: T is split (gdn2_jax/ops/context.py)
    from gdn2_jax.ops import context
    if check_values:
      raise ValueError("`check_values` is not supported with a context split; check the inputs without the mesh.")
    names = mesh_lib.current_axis_names()
    return context.call_split(gdn2, q, k, v, g, b, w, mesh=None, batch_axes=names.batch, head_axis=names.head,
                              context_axis=mesh_lib.CONTEXT_AXIS, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                              cu_seqlens=cu_seqlens, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound,
                              precision=precision, backend=backend, interpret=interpret, chunk_size=chunk_size,
                              config=config)
  dims = common.validate(q, k, v, g, b, w, initial_state=initial_state, cu_seqlens=cu_seqlens, A_log=A_log,
                         dt_bias=dt_bias, lower_bound=lower_bound)
  if chunk_size is not None:
    _check_chunk_size(chunk_size)
  if cu_seqlens is not None:
    _check_offsets(cu_seqlens, dims.T)
  choice = backend if isinstance(backend, settings.BackendChoice) else settings.BackendChoice(backend)
  choice = settings.merge(choice, config=config, precision=precision, chunk_size=chunk_size,
                          interpret=True if interpret else None)
  impl = _resolve_backend(choice, dims)
  if scale is None:
    scale = dims.K ** -0.5
  if A_log is not None:
    g = common.activate_log_decay(g, A_log, dt_bias, lower_bound)
  else:
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
  if check_values:
    common.check_values(g, q=q, k=k, v=v, b=b, w=w, initial_state=initial_state)
    _checkify_gates_and_offsets(b, cu_seqlens, dims.T)
  if use_qk_l2norm:
    q, k = common.l2_normalize(q), common.l2_normalize(k)
  if initial_state is not None:
    initial_state = initial_state.astype(jnp.promote_types(initial_state.dtype, jnp.float32))
  if cu_seqlens is not None and initial_state is None and not output_final_state:
    # Training case: no per-sequence states. A sequence start is a total forget (exp(g) = 0 on every channel),
    # so no layout change is needed and every backend runs the packed stream as one sequence.
    starts = varlen.sequence_starts(varlen.segment_ids_from_cu_seqlens(cu_seqlens, dims.T))
    g = varlen.forget_at_starts(g, starts[None])
    cu_seqlens = None
  # Each backend gets the settings it reads, None where the user left them unset (it fills its own defaults).
  options = {name: getattr(choice, name) for name in impl.options}
  if "interpret" in options:
    options["interpret"] = bool(options["interpret"])
  split = mesh_lib.plan(q, batch_size=dims.B, head_counts=(dims.H, dims.HV), split_batch=cu_seqlens is None)
  if split is None:
    o, final = impl.fn(q, k, v, g, b, w, scale=float(scale), initial_state=initial_state, cu_seqlens=cu_seqlens,
                       **options)
  else:  # under `jax.set_mesh`: the backend runs once per shard of batch rows and heads (gdn2_jax/mesh.py)
    o, final = mesh_lib.run_per_shard(impl.fn, split, q, k, v, g, b, w, initial_state=initial_state,
                                      cu_seqlens=cu_seqlens, want_state=output_final_state, scale=float(scale),
                                      **options)
  o = o.astype(v.dtype)
  if not output_final_state:
    return o, None
  return o, final.astype(jnp.promote_types(final.dtype, jnp.float32))


# -- input validation ---------------------------------------------------------------------------------------------


def _as_arrays(**inputs):
  """Python lists/tuples become arrays (else their shape reads as `()` in the errors); arrays pass through."""
  return tuple(jnp.asarray(x) if isinstance(x, (list, tuple)) else x for x in inputs.values())


def _check_chunk_size(chunk_size) -> None:
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"`chunk_size` is {chunk_size!r}; expected a positive integer (a multiple of 16, e.g. 64).")


def _check_offsets(cu_seqlens, T: int) -> None:
  """Checks concrete `cu_seqlens` (start 0, non-decreasing, end T); traced offsets are left to `gdn2_checked`."""
  try:
    cu = np.asarray(cu_seqlens)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  if cu[0] != 0 or cu[-1] != T or np.any(np.diff(cu) < 0):
    shown = np.array2string(cu, threshold=8, separator=", ")
    raise ValueError(f"`cu_seqlens` is {shown}; expected offsets that start at 0, never decrease and end at T={T} "
                     "(repeat the last offset to pad).")


def _checkify_gates_and_offsets(b: Array, cu_seqlens: Optional[Array], T: int) -> None:
  """`checkify` checks of the erase gate range and of (traced) offsets, for `gdn2_checked`."""
  from jax.experimental import checkify

  checkify.check(jnp.all((b >= 0) & (b <= 2)), "`b` has values outside [0, 2] (min {lo}, max {hi}); the erase gate "
                 "must be in [0, 1] ([0, 2] for negative eigenvalues)", lo=jnp.min(b), hi=jnp.max(b))
  if cu_seqlens is not None:
    cu = jnp.asarray(cu_seqlens)
    checkify.check((cu[0] == 0) & (cu[-1] == T) & jnp.all(jnp.diff(cu) >= 0),
                   f"`cu_seqlens` must start at 0, never decrease and end at T={T}; it starts at {{a}} and ends at "
                   "{z}", a=cu[0], z=cu[-1])


def gdn2_checked(*args, **kwargs) -> tuple[Array, Optional[Array]]:
  """`gdn2` with value checks: raises `JaxRuntimeError` naming the problem (g > 0, NaN or Inf inputs).

  Same arguments as `gdn2`. Slower (the checks are functionalised by `checkify`); use it while debugging. Inside
  your own jitted code, use `checkify.checkify(functools.partial(gdn2, check_values=True))` instead.
  """
  from jax.experimental import checkify

  err, out = checkify.checkify(functools.partial(gdn2, **kwargs, check_values=True))(*args)
  err.throw()
  return out


def _broadcast_gate(x: Array, size: int, name: str, lead: tuple[int, ...]) -> Array:
  if x.shape != lead:
    raise ValueError(f"`{name}` has shape {x.shape}; expected {lead} ([B, T, H], one value per head).")
  return jnp.broadcast_to(x[..., None], lead + (size,))


def kda(q: Array, k: Array, v: Array, g: Array, beta: Array, **kwargs) -> tuple[Array, Optional[Array]]:
  """Kimi Delta Attention: `gdn2` with `b = w = beta` (one scalar per head and token) and a channel-wise decay.

  Args:
    q, k, g: `[B, T, H, K]`; v: `[B, T, H, V]`; beta: `[B, T, H]` in [0, 1]. Keyword arguments as `gdn2`.
  Returns:
    `(o [B, T, H, V], final_state or None)`.
  """
  common.check_rank("q", q, 4, "[B, T, H, K]")
  common.check_rank("v", v, 4, "[B, T, H, V]")
  lead = v.shape[:3]
  return gdn2(q, k, v, g, _broadcast_gate(beta, q.shape[-1], "beta", lead),
              _broadcast_gate(beta, v.shape[-1], "beta", lead), **kwargs)


def gated_delta_rule(q: Array, k: Array, v: Array, g: Array, beta: Array, **kwargs) -> tuple[Array, Optional[Array]]:
  """Gated DeltaNet: `gdn2` with `b = w = beta` and one scalar log-decay `g` per head and token.

  Args:
    q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; g, beta: `[B, T, H]`. Keyword arguments as `gdn2` (with `A_log`,
      `dt_bias` is `[H]`).
  Returns:
    `(o [B, T, H, V], final_state or None)`.
  """
  common.check_rank("q", q, 4, "[B, T, H, K]")
  common.check_rank("v", v, 4, "[B, T, H, V]")
  lead = v.shape[:3]
  K = q.shape[-1]
  if kwargs.get("dt_bias") is not None:
    kwargs["dt_bias"] = jnp.repeat(jnp.asarray(kwargs["dt_bias"]).reshape(-1), K)
  return gdn2(q, k, v, _broadcast_gate(g, K, "g", lead), _broadcast_gate(beta, K, "beta", lead),
              _broadcast_gate(beta, v.shape[-1], "beta", lead), **kwargs)


def delta_rule(q: Array, k: Array, v: Array, beta: Array, **kwargs) -> tuple[Array, Optional[Array]]:
  """DeltaNet: `gdn2` with `b = w = beta` and no decay (`g = 0`).

  Args:
    q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; beta: `[B, T, H]`. Keyword arguments as `gdn2`.
  Returns:
    `(o [B, T, H, V], final_state or None)`.
  """
  common.check_rank("q", q, 4, "[B, T, H, K]")
  common.check_rank("v", v, 4, "[B, T, H, V]")
  lead = v.shape[:3]
  g = jnp.zeros(q.shape, jnp.float32)
  return gdn2(q, k, v, g, _broadcast_gate(beta, q.shape[-1], "beta", lead),
              _broadcast_gate(beta, v.shape[-1], "beta", lead), **kwargs)


def gdn2_step(state: Array, q: Array, k: Array, v: Array, g: Array, b: Array, w: Array, *,
              scale: Optional[float] = None, use_qk_l2norm: bool = False, A_log: Optional[Array] = None,
              dt_bias: Optional[Array] = None, lower_bound: Optional[float] = None) -> tuple[Array, Array]:
  """One decoding step of the recurrence (equal to one token of `gdn2`).

  Args:
    state: `[B, HV, K, V]` float32.
    q, k, g, b: `[B, H, K]`; v, w: `[B, HV, V]` (H divides HV). `g`, `use_qk_l2norm`, `A_log`, `dt_bias`,
      `lower_bound` as in `gdn2`.
  Returns:
    `(o [B, HV, V]` in the dtype of `v`, `new_state [B, HV, K, V]` float32).
  """
  for name, x in (("q", q), ("k", k), ("g", g), ("b", b)):
    common.check_rank(name, x, 3, "[B, H, K]")
  for name, x in (("v", v), ("w", w)):
    common.check_rank(name, x, 3, "[B, HV, V]")
  dims = common.validate(*(x[:, None] for x in (q, k, v, g, b, w)), initial_state=state, A_log=A_log,
                         dt_bias=dt_bias, lower_bound=lower_bound)
  if scale is None:
    scale = dims.K ** -0.5
  if A_log is not None:
    g = common.activate_log_decay(g, A_log, dt_bias, lower_bound)
  if use_qk_l2norm:
    q, k = common.l2_normalize(q), common.l2_normalize(k)
  q, k, g, b = (common.repeat_heads(x, dims.groups, axis=1) for x in (q, k, g, b))
  S = state.astype(jnp.promote_types(state.dtype, jnp.float32))
  o, S = recurrent.token_update(S, q, k, v, g, b, w, scale=float(scale))
  return o.astype(v.dtype), S
