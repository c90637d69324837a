"""The GDN-2 token mixer (docs/algorithm.md section 3) and its family (KDA, Gated DeltaNet, DeltaNet, ablations).

    q, k, v = silu(shortconv(Linear(x)))                  q, k: [B, T, H, K]; v: [B, T, HV, V]
    g       = -exp(A_log) * softplus(f_up(f_down(x)) + dt_bias)       log-decay, float32, [B, T, H, K]
    b       = sigmoid(b_proj(x))  (x 2 with negative eigenvalues)     erase gate on the key axis
    w       = sigmoid(w_proj(x))                                      write gate on the value axis
    o       = gdn2(q, k, v, g, b, w, use_qk_l2norm=True)              [B, T, HV, V]
    y       = o_proj(rmsnorm(o) * weight * act(g_up(g_down(x))))      act = silu (NVIDIA) or sigmoid (fla)

The family differ only in the gate layout (`GATE_LAYOUTS`): an erase or write gate is per channel or one scalar
per head; "tied" means `w = b = beta` (KDA and earlier); the decay is per channel, per head, or absent.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn2_jax.layers.conv import ShortConv
from gdn2_jax.layers.init import linear, partitioned
from gdn2_jax.layers.norm import ACTIVATIONS, GatedRMSNorm
from gdn2_jax.ops import api, common, varlen
from gdn2_jax.parallel import call_mixer_op

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GateLayout:
  """Structure of the three gates: erase b ("channel" | "head"), write w ("channel" | "head" | "tied"),
  decay g ("channel" | "head" | "none")."""

  erase: str
  write: str
  decay: str


GATE_LAYOUTS: dict[str, GateLayout] = {
    "gdn2": GateLayout("channel", "channel", "channel"),
    "gdn2_b_only": GateLayout("channel", "head", "channel"),  # paper Table 5: channel structure only in b
    "gdn2_w_only": GateLayout("head", "channel", "channel"),  # ... only in w
    "kda": GateLayout("head", "tied", "channel"),
    "gdn": GateLayout("head", "tied", "head"),  # Gated DeltaNet
    "deltanet": GateLayout("head", "tied", "none"),
}


def _dt_bias_init(key, shape, dtype=jnp.float32):
  """`softplus^-1(dt)`, `dt = exp(U(log 1e-3, log 1e-1))` clamped >= 1e-4 (Mamba/NVIDIA init)."""
  u = jax.random.uniform(key, shape, jnp.float32)
  dt = jnp.maximum(jnp.exp(u * (np.log(0.1) - np.log(1e-3)) + np.log(1e-3)), 1e-4)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _A_log_init(key, shape, dtype=jnp.float32):
  """`log(U(1, 16))` per head."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


class GatedDeltaNet2(nnx.Module):
  """GDN-2 mixer: `[B, T, hidden] -> [B, T, hidden]`, or any family member through `gates`.

  Args:
    hidden_size: model width D.
    num_heads: qk heads H; head_k_dim: K; head_v_dim: V; num_v_heads: HV (multiple of H; default H).
    gates: a key of `GATE_LAYOUTS` ("gdn2", "gdn2_b_only", "gdn2_w_only", "kda", "gdn", "deltanet").
    conv_size: short-conv kernel (4). output_gate: "silu" (NVIDIA) or "sigmoid" (fla).
    allow_neg_eigval: erase gate in [0, 2] (with tied gates, beta in [0, 2] as in KDA/GDN).
    gate_lower_bound: None (unbounded decay) or a value in [-5, 0) for fla's bounded "safe gate".
    norm_eps: eps of the output RMSNorm. backend, chunk_size, precision, config: passed to `gdn2_jax.gdn2` (config:
      the backend's settings, e.g. a `pallas_kernels.ChunkConfig`; None leaves them to the backend).
    dtype: compute dtype of activations; param_dtype: parameter dtype.
  """

  def __init__(self, hidden_size: int, *, num_heads: int = 16, head_k_dim: int = 128, head_v_dim: int = 128,
               num_v_heads: Optional[int] = None, gates: str = "gdn2", conv_size: int = 4,
               output_gate: str = "silu", allow_neg_eigval: bool = False, gate_lower_bound: Optional[float] = None,
               norm_eps: float = 1e-5, backend: Any = "auto", chunk_size: Optional[int] = 64, precision: Any = None,
               config: Any = None, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    num_v_heads = num_heads if num_v_heads is None else num_v_heads
    if gates not in GATE_LAYOUTS:
      raise ValueError(f"`gates` is {gates!r}; expected one of {sorted(GATE_LAYOUTS)}.")
    if num_v_heads % num_heads:
      raise ValueError(f"`num_v_heads` is {num_v_heads} and `num_heads` {num_heads}; num_v_heads must be a multiple "
                       "of num_heads (grouped value heads).")
    if output_gate not in ACTIVATIONS:
      raise ValueError(f"`output_gate` is {output_gate!r}; expected one of {sorted(ACTIVATIONS)}.")
    if common.lower_bound_error("gate_lower_bound", gate_lower_bound):
      raise ValueError(common.lower_bound_error("gate_lower_bound", gate_lower_bound))
    if conv_size < 1:
      raise ValueError(f"`conv_size` is {conv_size}; expected >= 1 (4 in the paper).")
    self.hidden_size = hidden_size
    self.num_heads, self.num_v_heads = num_heads, num_v_heads
    self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
    self.key_dim, self.value_dim = num_heads * head_k_dim, num_v_heads * head_v_dim
    self.gates = gates
    self.layout = GATE_LAYOUTS[gates]
    self.conv_size = conv_size
    self.allow_neg_eigval = allow_neg_eigval
    self.gate_lower_bound = gate_lower_bound
    self.backend, self.chunk_size, self.precision, self.op_config = backend, chunk_size, precision, config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    D, KD, VD, H, HV = hidden_size, self.key_dim, self.value_dim, num_heads, num_v_heads

    self.q_proj = linear(D, KD, ("embed", "heads"), **kw)
    self.k_proj = linear(D, KD, ("embed", "heads"), **kw)
    self.v_proj = linear(D, VD, ("embed", "heads"), **kw)
    self.q_conv1d = ShortConv(KD, conv_size, **kw)
    self.k_conv1d = ShortConv(KD, conv_size, **kw)
    self.v_conv1d = ShortConv(VD, conv_size, **kw)
    lay = self.layout
    if lay.decay == "channel":  # low-rank decay through head_v_dim, as NVIDIA and fla
      self.f_down = linear(D, head_v_dim, ("embed", "kv"), **kw)
      self.f_up = linear(head_v_dim, KD, ("kv", "heads"), **kw)
    elif lay.decay == "head":
      self.a_proj = linear(D, H, ("embed", "heads"), **kw)
    if lay.decay != "none":
      n_dt = KD if lay.decay == "channel" else H
      self.A_log = nnx.Param(partitioned(_A_log_init, ("heads",))(rngs.params(), (H,), param_dtype))
      self.dt_bias = nnx.Param(partitioned(_dt_bias_init, ("heads",))(rngs.params(), (n_dt,), param_dtype))
    self.b_proj = linear(D, KD if lay.erase == "channel" else H, ("embed", "heads"), **kw)
    if lay.write != "tied":
      self.w_proj = linear(D, VD if lay.write == "channel" else HV, ("embed", "heads"), **kw)
    self.g_down = linear(D, head_v_dim, ("embed", "kv"), **kw)
    self.g_up = linear(head_v_dim, VD, ("kv", "heads"), use_bias=True, **kw)
    self.o_norm = GatedRMSNorm(head_v_dim, activation=output_gate, eps=norm_eps, **kw)
    self.o_proj = linear(VD, D, ("heads", "embed"), **kw)

  # -- gates ---------------------------------------------------------------------------------------------------

  def _gates(self, x: Array) -> tuple[Array, Array, Array]:
    """`(g [B, T, H, K]` float32 log-decay, `b [B, T, H, K]`, `w [B, T, HV, V])`."""
    B, T, _ = x.shape
    H, HV, K, V = self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
    lay = self.layout
    if lay.decay == "channel":
      f = self.f_up(self.f_down(x)).astype(jnp.float32).reshape(B, T, H, K)
      g = common.activate_log_decay(f, self.A_log[...], self.dt_bias[...], self.gate_lower_bound)
    elif lay.decay == "head":
      a = self.a_proj(x).astype(jnp.float32)[..., None]  # [B, T, H, 1]
      g = common.activate_log_decay(a, self.A_log[...], self.dt_bias[...], self.gate_lower_bound)
      g = jnp.broadcast_to(g, (B, T, H, K))
    else:
      g = jnp.zeros((B, T, H, K), jnp.float32)
    scale = 2.0 if self.allow_neg_eigval else 1.0
    beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
    if lay.erase == "channel":
      b = beta.reshape(B, T, H, K)
    else:
      b = jnp.broadcast_to(beta[..., None], (B, T, H, K))
    b = b * scale
    if lay.write == "tied":  # w = beta: one scalar per qk head, shared by its value heads
      w = jnp.broadcast_to(common.repeat_heads(beta * scale, HV // H)[..., None], (B, T, HV, V))
    else:
      wv = jax.nn.sigmoid(self.w_proj(x).astype(jnp.float32))
      w = wv.reshape(B, T, HV, V) if lay.write == "channel" else jnp.broadcast_to(wv[..., None], (B, T, HV, V))
    return g, b.astype(self.dtype), w.astype(self.dtype)

  def _inputs(self, x, conv_tails, segment_ids):
    B, T, _ = x.shape
    tails = (None, None, None) if conv_tails is None else conv_tails
    q, tq = self.q_conv1d(self.q_proj(x), tail=tails[0], segment_ids=segment_ids)
    k, tk = self.k_conv1d(self.k_proj(x), tail=tails[1], segment_ids=segment_ids)
    v, tv = self.v_conv1d(self.v_proj(x), tail=tails[2], segment_ids=segment_ids)
    H, HV, K, V = self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
    g, b, w = self._gates(x)
    if segment_ids is not None:
      # A document start is a total forget (exp(g) = 0): nothing crosses the boundary, in any backend.
      g = varlen.forget_at_starts(g, varlen.sequence_starts(segment_ids))
    return (q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, HV, V), g, b, w), (tq, tk, tv)

  def _output(self, x: Array, o: Array) -> Array:
    B, T, _ = x.shape
    gate = self.g_up(self.g_down(x)).reshape(B, T, self.num_v_heads, self.head_v_dim)
    y = self.o_norm(o, gate).reshape(B, T, self.value_dim)
    return self.o_proj(y)

  def _op_kwargs(self):
    return dict(use_qk_l2norm=True, backend=self.backend, chunk_size=self.chunk_size, precision=self.precision,
                config=self.op_config)

  # -- public ----------------------------------------------------------------------------------------------------

  def __call__(self, x: Array, *, segment_ids: Optional[Array] = None) -> Array:
    """`x [B, T, D]` (optional `segment_ids [B, T]` int: packed documents) -> `[B, T, D]` in `dtype`."""
    (q, k, v, g, b, w), _ = self._inputs(x, None, segment_ids)
    o, _ = call_mixer_op(api.gdn2, q, k, v, g, b, w, **self._op_kwargs())
    return self._output(x, o)

  def init_cache(self, batch: int, max_len: int) -> dict:
    """Decoding cache, independent of `max_len`: the float32 state `[B, HV, K, V]` and three conv tails."""
    del max_len
    W = self.conv_size - 1
    return {
        "state": jnp.zeros((batch, self.num_v_heads, self.head_k_dim, self.head_v_dim), jnp.float32),
        "conv_q": jnp.zeros((batch, W, self.key_dim), self.dtype),
        "conv_k": jnp.zeros((batch, W, self.key_dim), self.dtype),
        "conv_v": jnp.zeros((batch, W, self.value_dim), self.dtype),
    }

  def apply_cached(self, x: Array, cache: dict, pos: Array, *, fresh: bool = False) -> tuple[Array, dict]:
    """Continues from `cache`: `x [B, T, D]` -> (`[B, T, D]`, new cache). T > 1 runs the chunk op (prefill), T = 1
    the recurrent step `gdn2_step`. `pos` and `fresh` are unused (the state carries everything)."""
    del pos, fresh
    tails = (cache["conv_q"], cache["conv_k"], cache["conv_v"])
    (q, k, v, g, b, w), (tq, tk, tv) = self._inputs(x, tails, None)
    if x.shape[1] == 1:
      # The one-token step is called directly: the mesh hook shards [B, T, H, K] training inputs, and a decode
      # step's state layout differs.
      o, state = api.gdn2_step(cache["state"], q[:, 0], k[:, 0], v[:, 0], g[:, 0], b[:, 0], w[:, 0],
                               use_qk_l2norm=True)
      o = o[:, None]
    else:
      o, state = call_mixer_op(api.gdn2, q, k, v, g, b, w, initial_state=cache["state"], output_final_state=True,
                               **self._op_kwargs())
    new = {"state": state, "conv_q": tq.astype(self.dtype), "conv_k": tk.astype(self.dtype),
           "conv_v": tv.astype(self.dtype)}
    return self._output(x, o), new
