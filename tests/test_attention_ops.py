"""`gdn2_jax.ops.attention` against a float64 dense reference (softmax with an explicit mask), forward and gradients.

Every implementation that runs on the CPU: 'xla' (blockwise for windows shorter than T, dense otherwise) and 'pallas'
in interpret mode; plus the sm90 Triton lowering of the Pallas kernels (forward and backward), checked on the CPU.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn2_jax.ops.attention import attention
from pallas_kernels.tools.sm90 import lowering_for_sm90

slow = pytest.mark.slow


def reference(q, k, v, seg, window):
  """float64: token i sees j with `i - window < j <= i` and `seg[i] == seg[j]`; grouped KV heads repeated."""
  q, k, v = (x.astype(jnp.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  T = q.shape[1]
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  mask = (j <= i) & ((i - j < window) if window is not None else True)
  mask = jnp.asarray(mask)[None] & (seg[:, :, None] == seg[:, None, :])
  s = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(mask[:, None], s, -jnp.inf)
  return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(s, axis=-1), v)


def _segments(B, T, lengths):
  """Documents of the given lengths, repeated to fill T (the last one cut); ids from -1 (any int is an id)."""
  ids = np.concatenate([np.full(n, d - 1) for d, n in enumerate(lengths * T)])[:T]
  return jnp.asarray(np.tile(ids, (B, 1)), jnp.int32)


# name: (B, T, N, NKV, D, window, document lengths, Pallas block)
CASES = {
  # T not a multiple of the block or the window; grouped heads; documents straddling block boundaries; a 1-token doc
  "T37_w5_docs_gqa": (2, 37, 4, 2, 8, 5, [7, 1, 11, 3], 16),
  "window_1": (1, 21, 2, 1, 8, 1, [4, 1, 9], 16),
  "window_over_T": (1, 19, 2, 2, 8, 64, [6, 1, 13], 16),
  "full_no_docs": (1, 23, 4, 1, 8, None, None, 16),
  "T70_w33_docs": (2, 70, 2, 1, 16, 33, [17, 1, 40, 2], 32),
  "D24_w16_docs": (1, 50, 6, 2, 24, 16, [15, 20, 1, 14], 16),
}
SLOW = {"T70_w33_docs", "D24_w16_docs"}


def _run(name, impl):
  B, T, N, NKV, D, window, lengths, blk = CASES[name]
  rng = np.random.default_rng(hash(name) % 2**32)
  q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, D)), jnp.float32) for n in (N, NKV, NKV))
  do = rng.normal(size=(B, T, N, D))
  seg = None if lengths is None else _segments(B, T, lengths)
  kw = dict(interpret=True, block=blk) if impl == "pallas" else {}
  f = lambda q, k, v: attention(q, k, v, segment_ids=seg, window=window, implementation=impl, **kw)
  o, vjp = jax.vjp(f, q, k, v)
  grads = vjp(jnp.asarray(do, jnp.float32))
  with jax.enable_x64(True):
    segr = jnp.zeros((B, T), jnp.int32) if seg is None else seg
    ro, rvjp = jax.vjp(lambda *a: reference(*a, segr, window), *(np.asarray(x, np.float64) for x in (q, k, v)))
    rgrads = rvjp(jnp.asarray(do))
    for what, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads), (ro, *rgrads)):
      err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
      assert err < 1e-5, (name, impl, what, err)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("name", [n if n not in SLOW else pytest.param(n, marks=slow) for n in CASES])
def test_matches_float64_reference(name, impl):
  _run(name, impl)


def test_blockwise_builds_no_full_mask():
  """The windowed 'xla' path holds no `[T, T]` array: its largest intermediate is linear in T."""
  B, T, N, D, W = 1, 4096, 1, 8, 64
  q = jax.ShapeDtypeStruct((B, T, N, D), jnp.float32)
  seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda q, s: attention(q, q, q, segment_ids=s, window=W))(q, seg)
  sizes = [int(np.prod(v.aval.shape)) for e in jaxpr.eqns for v in e.outvars]
  assert max(sizes) <= 4 * T * W, max(sizes)


def test_errors_name_the_argument():
  q = jnp.zeros((1, 8, 4, 8))
  with pytest.raises(ValueError, match="`k`"):
    attention(q, jnp.zeros((1, 8, 3, 8)), jnp.zeros((1, 8, 3, 8)))
  with pytest.raises(ValueError, match="`segment_ids`"):
    attention(q, q, q, segment_ids=jnp.zeros((1, 8)), implementation="cudnn")
  with pytest.raises(ValueError, match="`window`"):
    attention(q, q, q, window=0)


def test_pallas_lowers_to_triton():
  """Forward (one kernel) and backward (dq and dk/dv kernels) lower to Triton IR for sm90, checked on the CPU."""
  with lowering_for_sm90():
    S = jax.ShapeDtypeStruct
    q, kv, seg = S((1, 200, 4, 64), jnp.bfloat16), S((1, 200, 2, 64), jnp.bfloat16), S((1, 200), jnp.int32)
    loss = lambda q, k, v, s: jnp.sum(attention(q, k, v, segment_ids=s, window=128, implementation="pallas")
                                      .astype(jnp.float32))
    calls = lambda f: jax.jit(f).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text().count(
        "__gpu$xla.gpu.triton")
    assert (calls(loss), calls(jax.grad(loss, argnums=(0, 1, 2)))) == (1, 3)
