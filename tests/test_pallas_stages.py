"""Stage tests of the Pallas kernels in interpret mode: each kernel alone, fed the chunk path's intermediates.

Forward kernels are checked against the matching intermediates of the pure-JAX chunk path
(`gdn2_jax.ops.chunk.chunk_intermediates`: qg, P, U, Y, the decayed keys, the chunk decays, the entering states),
backward kernels against `jax.vjp` of the forward stage they differentiate. Every kernel reads the references'
values (not another kernel's outputs), so a bug in one kernel fails its own named test. References run in float64
on the float32 values the kernels read; the kernels run with exact float32 products (`precision='ieee'`), so the
tolerance is tight (relative Frobenius error 1e-5).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn2_jax.ops import chunk as chunk_path
from pallas_kernels import ChunkConfig
from pallas_kernels.gdn2 import backward, forward, segments
from pallas_kernels.gdn2.common import ChunkShape, Layout
from tests.op_suite import rel_err

B, T, H, HV, K, V = 1, 128, 1, 2, 32, 16
GROUPS, C, NC, SUB = HV // H, 64, T // 64, 16
SCALE = K ** -0.5
SHAPE = ChunkShape(B, T, H, HV, K, V, GROUPS, NC)
CFG = ChunkConfig(precision="ieee", block_k=16)  # two key tiles per loop
KW = dict(cfg=CFG, interpret=True)
TOL = 1e-5
f32 = lambda x: jnp.asarray(np.asarray(x), jnp.float32)
f64 = lambda x: np.asarray(x, np.float64)


def _check(got: dict, want: dict):
  errors = {n: rel_err(got[n], want[n]) for n in want}
  assert all(e < TOL for e in errors.values()), errors


# Layouts: the chunk path's `[NC, B, heads, C, D]`, the kernels' `[B, T, heads, D]` and head-major `[B, heads, T, D]`.

def _chunks(x):
  """`[B, T, h, D]` -> `[NC, B, h, C, D]`."""
  return x.reshape(B, NC, C, x.shape[2], x.shape[-1]).transpose(1, 0, 3, 2, 4)


def _tokens(x):
  """`[NC, B, h, C, D]` -> `[B, T, h, D]`."""
  return x.transpose(1, 0, 3, 2, 4).reshape(B, T, x.shape[2], x.shape[-1])


def _head_major(x, qk=False):
  """`[NC, B, h, C, D]` -> `[B, h, T, D]`; `qk`: keep one value head per qk head (the group's heads are equal)."""
  x = x[:, :, ::GROUPS] if qk else x
  return x.transpose(1, 2, 0, 3, 4).reshape(B, x.shape[2], T, x.shape[-1])


def _per_chunk(x, qk=False):
  """`[NC, B, h, ...]` -> `[B, h, NC, ...]`."""
  x = x[:, :, ::GROUPS] if qk else x
  return np.moveaxis(np.asarray(x), 0, 2)


def _compact(x):
  """`[B, H, T, 64]` -> the diagonal sub-blocks `[B, H, T, 16]` (row i, column `i // 16 * 16 + jl` at jl)."""
  x = np.asarray(x)
  blocks = x.reshape(x.shape[0], x.shape[1], NC, 4, SUB, 4, SUB)
  return np.moveaxis(np.diagonal(blocks, axis1=3, axis2=5), -1, 3).reshape(x.shape[0], x.shape[1], T, SUB)


def _in_sub_block(strict: bool):
  """`[64, 64]` bool: pairs (i, j) of one sub-block with j < i (or j <= i)."""
  i, j = np.arange(C)[:, None], np.arange(C)[None, :]
  return (i // SUB == j // SUB) & ((j < i) if strict else (j <= i))


_intermediates = jax.jit(functools.partial(chunk_path.chunk_intermediates, scale=SCALE))


def _log_decay(rng, shape):
  """g log-uniform in [-0.1, -1e-3]: chunk decays exp(G_C) about 0.1 to 1, so that no term through them vanishes."""
  return -np.exp(rng.uniform(np.log(1e-3), np.log(0.1), shape))


@pytest.fixture(scope="module")
def data():
  """Fresh random inputs and the chunk path's intermediates (float64) from their float32 values."""
  rng = np.random.default_rng(2026)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  x = dict(q=unit(rng.standard_normal((B, T, H, K))), k=unit(rng.standard_normal((B, T, H, K))),
           v=rng.standard_normal((B, T, HV, V)), g=_log_decay(rng, (B, T, H, K)),
           b=rng.uniform(0, 1, (B, T, H, K)), w=rng.uniform(0, 1, (B, T, HV, V)),
           h0=0.5 * rng.standard_normal((B, HV, K, V)))
  x = {n: np.asarray(a, np.float32) for n, a in x.items()}
  with jax.enable_x64(True):
    ref = _intermediates(*(f64(x[n]) for n in "qkvgbw"), f64(x["h0"]))
    ref = jax.tree.map(np.asarray, ref)
  # The forward's outputs in the kernels' layouts, as float32 (what the next stage reads).
  terms = forward.ChunkTerms(
      p=f32(_head_major(ref.P, qk=True)), a=f32(_rows(np.linalg.inv(np.eye(C) + _head_major_blocks(ref.T)))),
      y=f32(_head_major(ref.Y, qk=True)), qg=f32(_head_major(ref.qg, qk=True)),
      k_state=f32(_head_major(ref.k_state, qk=True)), decay=f32(_per_chunk(ref.decay, qk=True)),
      u=f32(_head_major(ref.U)))
  state = forward.StatePass(r=f32(_head_major(ref.R)), final=f32(ref.final), states=f32(_per_chunk(ref.states)))
  return dict(x={n: f32(a) for n, a in x.items()}, ref=ref, terms=terms, state=state, rng=rng)


def _head_major_blocks(x):
  """`[NC, B, HV, C, C]` (one matrix per chunk) -> `[B, H, NC, C, C]` (numpy, one per qk head)."""
  return np.moveaxis(np.asarray(x)[:, :, ::GROUPS], 0, 2)


def _rows(x):
  """`[B, H, NC, C, D]` -> `[B, H, T, D]`."""
  return x.reshape(x.shape[0], x.shape[1], T, x.shape[-1])


# ------------------------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("diag_pairs", ["rows", "levels"])
def test_stage_diag_fwd(data, diag_pairs):
  """The in-sub-block pairs: the diagonal sub-blocks of the chunk path's T and P (unscaled, diagonal included),
  by the row loop and by the levels of halves."""
  x, ref = data["x"], data["ref"]
  cfg = dataclasses.replace(CFG, diag_pairs=diag_pairs)
  out = jax.jit(lambda *a: forward.diag_fwd(SHAPE, *a, cfg=cfg, interpret=True))(x["q"], x["k"], x["g"], x["b"])
  _check({"t_diag": out.t_diag, "p_diag": out.p_diag},
         {"t_diag": _compact(_head_major(ref.T, qk=True)), "p_diag": _compact(_head_major(ref.P, qk=True)) / SCALE})


@pytest.mark.parametrize("early_terms,split_wy,with_a", [(False, False, True), (False, False, False),
                                                         (True, False, True), (False, True, True), (True, True, False)],
                         ids=["default", "without_a", "early_terms", "split_wy", "split_wy+early_terms"])
def test_stage_chunk_fwd(data, early_terms, split_wy, with_a):
  """P, A = (I + T)^-1, Y, qg, the decayed keys, the chunk decay and U, from the reference in-sub-block pairs; with
  `early_terms` qg, the decayed keys and the decay are written in the first key loop; with `split_wy` Y and U
  come from a second kernel reading the stored A; without `a` (the forward alone) the same terms, A not stored."""
  x, ref = data["x"], data["ref"]
  Tm = _head_major(ref.T, qk=True)
  diag = forward.SubBlockPairs(f32(_compact(Tm)), f32(_compact(_head_major(ref.P, qk=True)) / SCALE),
                               segments.sub_block_sums(x["g"]))
  cfg = dataclasses.replace(CFG, early_terms=early_terms, split_wy=split_wy)
  out = jax.jit(lambda *a: forward.chunk_fwd(SHAPE, *a, scale=SCALE, rdt=jnp.float32, cfg=cfg, interpret=True,
                                             with_a=with_a))(x["q"], x["k"], x["b"], x["v"], x["w"], diag)
  A = _rows(np.linalg.inv(np.eye(C) + _head_major_blocks(ref.T)))
  assert (out.a is None) == (not with_a and not split_wy)
  if out.a is None:
    out = out._replace(a=A)
  _check(out._asdict(), {"p": _head_major(ref.P, qk=True), "a": A, "y": _head_major(ref.Y, qk=True),
                         "qg": _head_major(ref.qg, qk=True), "k_state": _head_major(ref.k_state, qk=True),
                         "decay": _per_chunk(ref.decay, qk=True), "u": _head_major(ref.U)})


@pytest.mark.parametrize("segments_", [1, 2], ids=["sequential", "segments"])
def test_stage_state_fwd(data, segments_):
  """The pass over chunks (and its split into segment maps and a scan): R, the entering states, the final state."""
  x, ref = data["x"], data["ref"]
  cfg = ChunkConfig(precision="ieee", block_k=16, state_segments=segments_)
  out = jax.jit(lambda t, h0: forward.state_fwd(SHAPE, t, h0, None, rdt=jnp.float32, cfg=cfg, interpret=True))(
      data["terms"], x["h0"])
  _check(out._asdict(), {"r": _head_major(ref.R), "final": ref.final, "states": _per_chunk(ref.states)})


def test_stage_out_fwd(data):
  """`o = qg S + P R` per chunk, from the reference qg, P, entering states and R."""
  o = jax.jit(lambda t, s: forward.out_fwd(SHAPE, t, s, o_dtype=jnp.float32, **KW))(data["terms"], data["state"])
  _check({"o": o}, {"o": _tokens(data["ref"].o)})


# ----------------------------------------------------------------------------------------------------- backward

def _random(rng, shape, lower=None):
  x = rng.standard_normal(shape)
  if lower is not None:  # keep the (strictly) lower triangle of each chunk's [64, 64] block
    x = x * np.tril(np.ones((C, C)), lower)[np.arange(x.shape[-2]) % C]
  return np.asarray(x, np.float32)


@pytest.mark.parametrize("segments_", [1, 2], ids=["sequential", "segments"])
def test_stage_state_bwd(data, segments_):
  """The reverse pass: dR (the cotangent of U), the cotangent of the state leaving each chunk and dh0, against
  `jax.vjp` of the pass over chunks with the output (a bump added to each chunk's exit state exposes its
  cotangent)."""
  x, terms, rng = data["x"], data["terms"], data["rng"]
  do, dfinal = _random(rng, (B, T, HV, V)), _random(rng, (B, HV, K, V))
  cfg = ChunkConfig(precision="ieee", block_k=16, state_segments=segments_)
  out = jax.jit(lambda t, do, df: backward.state_bwd(SHAPE, t, do, df, None, cfg=cfg, interpret=True))(
      terms, f32(do), f32(dfinal))

  rep = lambda a: np.repeat(f64(a), GROUPS, axis=1)  # per qk head -> per value head `[B, HV, ...]`
  split = lambda a: np.moveaxis(a.reshape(B, HV, NC, C, a.shape[-1]), 2, 0)  # `[B, HV, T, D]` -> chunks
  with jax.enable_x64(True):
    def state_pass(u, h0, bumps):
      def step(S, xs):
        u_c, y_c, k_c, decay_c, p_c, qg_c, bump = xs
        R = u_c - y_c @ S
        o = qg_c @ S + p_c @ R
        return decay_c[..., None] * S + jnp.swapaxes(k_c, -1, -2) @ R + bump, o
      xs = (u, split(rep(terms.y)), split(rep(terms.k_state)), np.moveaxis(rep(terms.decay), 2, 0),
            split(rep(terms.p)), split(rep(terms.qg)), bumps)
      final, o = jax.lax.scan(step, h0, xs)
      return o, final

    bumps = np.zeros((NC, B, HV, K, V))
    _, vjp = jax.vjp(state_pass, split(f64(terms.u)), f64(x["h0"]), bumps)
    du, dh0, dbumps = map(np.asarray, vjp((_chunks(f64(do)), f64(dfinal))))
  _check(out._asdict(), {"dr": _head_major(du), "dh0": dh0, "dstate_next": _per_chunk(dbumps)})


def test_stage_contract(data):
  """The contractions over V, against `jax.vjp` of each chunk's `o = qg S + P R`, `S' = exp(G_C) S + k_state^T R`
  and `R = A (w v) - Y S` with S and R held at their stored values."""
  x, terms, state, rng = data["x"], data["terms"], data["state"], data["rng"]
  do = _random(rng, (B, T, HV, V))
  state_ct = backward.StateCotangents(dr=f32(_random(rng, (B, HV, T, V))),
                                      dstate_next=f32(_random(rng, (B, HV, NC, K, V))), dh0=None)
  out = jax.jit(lambda *a: backward.contract(SHAPE, *a, **KW))(terms, state, state_ct, f32(do), x["v"], x["w"])

  rep = lambda a: np.repeat(f64(a), GROUPS, axis=1)
  blocks = lambda a: a.reshape(B, a.shape[1], NC, C, a.shape[-1])  # `[B, h, T, D]` -> `[B, h, NC, C, D]`
  heads = lambda a: np.swapaxes(f64(a), 1, 2)  # `[B, T, HV, V]` -> `[B, HV, T, V]`
  S, R = f64(state.states), blocks(f64(state.r))
  with jax.enable_x64(True):
    def stage(qg, p, k_state, decay, y, a, v, w):
      o = qg @ S + p @ R
      s_next = decay[..., None] * S + jnp.swapaxes(k_state, -1, -2) @ R
      r = a @ (w * v) - y @ S
      return o, s_next, r

    primals = [blocks(rep(terms.qg)), blocks(rep(terms.p)), blocks(rep(terms.k_state)), rep(terms.decay),
               blocks(rep(terms.y)), blocks(rep(terms.a)), blocks(heads(x["v"])), blocks(heads(x["w"]))]
    _, vjp = jax.vjp(stage, *primals)
    dqg, dp, dk_state, ddecay, dy, da, dv, dw = map(np.asarray, vjp(
        (blocks(heads(do)), f64(state_ct.dstate_next), blocks(f64(state_ct.dr)))))
  lower = np.tril(np.ones((C, C)))
  to_tokens = lambda a: np.swapaxes(_rows(a), 1, 2)
  _check(out._asdict(), {"dqg": _rows(dqg), "dk_state": _rows(dk_state), "dy": _rows(dy), "ddecay": ddecay,
                         "dp_full": _rows(dp * lower), "da_from_u": _rows(da), "dv": to_tokens(dv),
                         "dw": to_tokens(dw)})


def _qk_chunks(x):
  """The qk-side inputs in chunk layout, float64: `q, k, g, b [NC, B, H, C, K]`."""
  return [_chunks(f64(x[n])) for n in "qkgb"]


def test_stage_wy_bwd(data):
  """dT and dE against `jax.vjp` of `A = (I + T)^-1, Y = A E` (E = exp(G) b k), the cotangent of A through U
  added."""
  x, terms, rng = data["x"], data["terms"], data["rng"]
  da, dy = _random(rng, (B, H, T, C)), _random(rng, (B, H, T, K))
  ct = backward.ContractCotangents(None, None, f32(dy), None, None, f32(da), None, None)
  out = jax.jit(lambda *a: backward.wy_bwd(SHAPE, *a, **KW))(x["k"], segments.sub_block_sums(x["g"]), x["b"],
                                                             terms, ct)
  with jax.enable_x64(True):
    q, k, g, b = _qk_chunks(x)
    Tm, _, E, _, _, _ = chunk_path._qk_terms(q, k, g, b, scale=SCALE, sub=SUB, precision=jax.lax.Precision.HIGHEST)

    def stage(Tm, E):
      A = jnp.linalg.inv(jnp.eye(C) + Tm)
      return A, A @ E

    _, vjp = jax.vjp(stage, Tm, E)
    dT, dE = map(np.asarray, vjp((_chunks(np.swapaxes(f64(da), 1, 2)), _chunks(np.swapaxes(f64(dy), 1, 2)))))
  _check(out._asdict(), {"dt": _head_major(dT * np.tril(np.ones((C, C)), -1)), "de": _head_major(dE)})


def _diag_pairs_vjp(x, dt, dp_full):
  """`jax.vjp` of the in-sub-block pairs `T_ij = sum_k (b k)_ik k_jk exp(G_ik - G_jk)` and `P_ij` (q for b k,
  scaled; j < i in one sub-block) in `b k`, q and k, the decay factors held fixed. -> `dbk, dq, dk [B, H, T, K]`."""
  q, k, g, b = _qk_chunks(x)
  G = np.cumsum(g, axis=-2)
  decay = np.exp(G[..., :, None, :] - G[..., None, :, :])  # [..., i, j, K]; only the pairs j < i are kept
  mask = _in_sub_block(strict=True)

  def stage(bk, q, k):
    pairs = lambda left: jnp.where(mask, jnp.einsum("...ik,...jk,...ijk->...ij", left, k, decay), 0.0)
    return pairs(bk), SCALE * pairs(q)

  _, vjp = jax.vjp(stage, b * k, q, k)
  cts = [_chunks(np.swapaxes(f64(a), 1, 2)) for a in (dt, dp_full)]
  return [_head_major(np.asarray(a)) for a in vjp(tuple(cts))]


@pytest.mark.parametrize("diag_pairs", ["rows", "levels"])
def test_stage_diag_bwd(data, diag_pairs):
  """The in-sub-block pairs' cotangents of b k, q and k, against `jax.vjp` (decay factors not differentiated:
  `pairs_bwd` adds their gate gradient), by the row loop and by the levels of halves."""
  x, rng = data["x"], data["rng"]
  dt, dp_full = _random(rng, (B, H, T, C), lower=-1), _random(rng, (B, H, T, C), lower=0)
  wy_ct = backward.WyCotangents(dt=f32(dt), de=None)
  cfg = dataclasses.replace(CFG, diag_pairs=diag_pairs)
  out = jax.jit(lambda *a: backward.diag_bwd(SHAPE, *a, scale=SCALE, cfg=cfg, interpret=True))(x["q"], x["k"], x["g"], x["b"], wy_ct,
                                                                            f32(dp_full))
  with jax.enable_x64(True):
    dbk, dq, dk = _diag_pairs_vjp(x, dt, dp_full)
  _check(out._asdict(), {"dbk_diag": dbk, "dq_diag": dq, "dk_diag": dk})


def test_stage_pairs_bwd(data):
  """dq, dk, db, dg against `jax.vjp` of everything the chunk path computes from q, k, g, b (T, P, E, qg, the
  decayed keys, the chunk decay), given the reference in-sub-block cotangents of `diag_bwd`."""
  x, rng = data["x"], data["rng"]
  dt, dp_full = _random(rng, (B, H, T, C), lower=-1), _random(rng, (B, H, T, C), lower=0)
  de, dqg, dk_state = (_random(rng, (B, H, T, K)) for _ in range(3))
  ddecay = _random(rng, (B, H, NC, K))
  with jax.enable_x64(True):
    diag_ct = backward.SubBlockCotangents(*(f32(a) for a in _diag_pairs_vjp(x, dt, dp_full)))
    q, k, g, b = _qk_chunks(x)
    stage = lambda *a: chunk_path._qk_terms(*a, scale=SCALE, sub=SUB, precision=jax.lax.Precision.HIGHEST)
    _, vjp = jax.vjp(lambda q, k, g, b: stage(q, k, g, b), q, k, g, b)
    to_chunks = lambda a: _chunks(np.swapaxes(f64(a), 1, 2))
    grads = map(np.asarray, vjp((to_chunks(dt), to_chunks(dp_full), to_chunks(de), to_chunks(dqg), to_chunks(dk_state),
                 np.moveaxis(f64(ddecay), 2, 0))))
  wy_ct = backward.WyCotangents(dt=f32(dt), de=f32(de))
  contract_ct = backward.ContractCotangents(dqg=f32(dqg), dk_state=f32(dk_state), dy=None, ddecay=f32(ddecay),
                                            dp_full=f32(dp_full), da_from_u=None, dv=None, dw=None)
  out = jax.jit(lambda *a: backward.pairs_bwd(SHAPE, *a, scale=SCALE, **KW))(
      x["q"], x["k"], segments.sub_block_sums(x["g"]), x["b"], wy_ct, contract_ct, diag_ct)
  _check(out._asdict(), dict(zip(("dq", "dk", "dg", "db"), (_tokens(a) for a in grads))))


# ------------------------------------------------------------------------------------------- packed sequences

# Three sequences over four chunks (B = 1): chunk 0, chunks 1-2, chunk 3. With two segments of two chunks, the
# second segment holds the end of one sequence and the whole of the next.
LAYOUT = dict(seq=[0, 1, 1, 2], reset=[1, 1, 0, 1], last=[1, 0, 1, 1])
NC_PACKED, N_PACKED = 4, 3


def _packed_pass(u, y, k_state, decay, p, qg, h0, bumps):
  """The pass over chunks with per-sequence states, as the kernels define it (float64, chunk layout `[NC, B, HV,
  C, D]`, h0 `[N, HV, K, V]`; `bumps` added to each chunk's exit state). -> `o`, `final [N, ...]`, `R`, `states`."""
  S = jnp.zeros(h0.shape[1:])[None]
  final = [None] * N_PACKED
  o, R, states = [], [], []
  for c in range(NC_PACKED):
    n = LAYOUT["seq"][c]
    if LAYOUT["reset"][c]:
      S = h0[n][None]
    states.append(S)
    R.append(u[c] - y[c] @ S)
    o.append(qg[c] @ S + p[c] @ R[c])
    S = decay[c][..., None] * S + jnp.swapaxes(k_state[c], -1, -2) @ R[c] + bumps[c]
    if LAYOUT["last"][c]:
      final[n] = S[0]
  return jnp.stack(o), jnp.stack(final), jnp.stack(R), jnp.stack(states)


@pytest.fixture(scope="module")
def packed():
  """Inputs over 4 chunks, the chunk path's per-chunk terms of them, and the packed layout."""
  rng = np.random.default_rng(2027)
  Tp = NC_PACKED * C
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  x = dict(q=unit(rng.standard_normal((B, Tp, H, K))), k=unit(rng.standard_normal((B, Tp, H, K))),
           v=rng.standard_normal((B, Tp, HV, V)), g=_log_decay(rng, (B, Tp, H, K)),
           b=rng.uniform(0, 1, (B, Tp, H, K)), w=rng.uniform(0, 1, (B, Tp, HV, V)))
  x = {n: np.asarray(a, np.float32) for n, a in x.items()}
  h0 = np.asarray(0.5 * rng.standard_normal((N_PACKED, HV, K, V)), np.float32)
  with jax.enable_x64(True):
    ref = _intermediates(*(f64(x[n]) for n in "qkvgbw"), np.zeros((B, HV, K, V)))
    ref = jax.tree.map(np.asarray, ref)
  hm = lambda a: f32(a.transpose(1, 2, 0, 3, 4).reshape(B, a.shape[2], Tp, a.shape[-1]))
  per_chunk = lambda a: f32(np.moveaxis(a, 0, 2))
  terms = forward.ChunkTerms(p=hm(ref.P[:, :, ::GROUPS]), a=None, y=hm(ref.Y[:, :, ::GROUPS]),
                             qg=hm(ref.qg[:, :, ::GROUPS]), k_state=hm(ref.k_state[:, :, ::GROUPS]),
                             decay=per_chunk(ref.decay[:, :, ::GROUPS]), u=hm(ref.U))
  layout = Layout(*(jnp.asarray(LAYOUT[n], jnp.int32) for n in Layout._fields))
  # The pass's inputs as float64 chunk-layout arrays per value head (what the reference reads).
  rep = lambda a: np.repeat(f64(a), GROUPS, axis=1)
  split = lambda a: np.moveaxis(a.reshape(B, HV, NC_PACKED, C, a.shape[-1]), 2, 0)
  inputs = dict(u=split(f64(terms.u)), y=split(rep(terms.y)), k_state=split(rep(terms.k_state)),
                decay=np.moveaxis(rep(terms.decay), 2, 0), p=split(rep(terms.p)), qg=split(rep(terms.qg)))
  shape = ChunkShape(B, Tp, H, HV, K, V, GROUPS, NC_PACKED)
  return dict(shape=shape, terms=terms, layout=layout, h0=h0, inputs=inputs, rng=rng)


def _packed_head_major(a):
  """`[NC, B, HV, C, D]` -> `[B, HV, T, D]`."""
  return a.transpose(1, 2, 0, 3, 4).reshape(B, HV, NC_PACKED * C, a.shape[-1])


@pytest.mark.parametrize("segments_", [1, 2], ids=["sequential", "segments"])
def test_stage_state_fwd_packed(packed, segments_):
  """The pass over chunks with packed sequences (resets, per-sequence initial and final states), in one pass and in
  two segments (a sequence starting inside the second)."""
  cfg = ChunkConfig(precision="ieee", block_k=16, state_segments=segments_)
  out = jax.jit(lambda t, h0, lay: forward.state_fwd(packed["shape"], t, h0, lay, rdt=jnp.float32, cfg=cfg,
                                                     interpret=True))(packed["terms"], f32(packed["h0"]),
                                                                      packed["layout"])
  with jax.enable_x64(True):
    bumps = np.zeros((NC_PACKED, B, HV, K, V))
    _, final, R, states = map(np.asarray, _packed_pass(**packed["inputs"], h0=f64(packed["h0"]), bumps=bumps))
  _check(out._asdict(), {"r": _packed_head_major(R), "final": final, "states": np.moveaxis(states, 0, 2)})


@pytest.mark.parametrize("segments_", [1, 2], ids=["sequential", "segments"])
def test_stage_state_bwd_packed(packed, segments_):
  """The reverse pass with packed sequences: dR, the exit states' cotangents and every sequence's dh0, against
  `jax.vjp` of the packed pass."""
  rng = packed["rng"]
  Tp = NC_PACKED * C
  do, dfinal = _random(rng, (B, Tp, HV, V)), _random(rng, (N_PACKED, HV, K, V))
  cfg = ChunkConfig(precision="ieee", block_k=16, state_segments=segments_)
  out = jax.jit(lambda t, do, df, lay: backward.state_bwd(packed["shape"], t, do, df, lay, cfg=cfg, interpret=True))(
      packed["terms"], f32(do), f32(dfinal), packed["layout"])
  inputs = packed["inputs"]
  with jax.enable_x64(True):
    def loss_parts(u, h0, bumps):
      o, final, _, _ = _packed_pass(u, inputs["y"], inputs["k_state"], inputs["decay"], inputs["p"], inputs["qg"],
                                    h0, bumps)
      return o, final

    _, vjp = jax.vjp(loss_parts, inputs["u"], f64(packed["h0"]), np.zeros((NC_PACKED, B, HV, K, V)))
    do_chunks = np.moveaxis(f64(do).reshape(B, NC_PACKED, C, HV, V), 1, 0).transpose(0, 1, 3, 2, 4)
    du, dh0, dbumps = map(np.asarray, vjp((do_chunks, f64(dfinal))))
  _check(out._asdict(), {"dr": _packed_head_major(du), "dh0": dh0, "dstate_next": np.moveaxis(dbumps, 0, 2)})
