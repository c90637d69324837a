"""The float64 oracle (`tests/oracle.py`) checked against its own plain NumPy loop, `numpy_loop`.

Every backend test trusts `gdn2_oracle`; this file is where the oracle itself is checked, against a second float64
implementation that shares no code with it (a per-token, per-head NumPy loop of the decay / read / write form).
"""

import jax
import jax.numpy as jnp
import numpy as np

from tests import oracle


def test_oracle_matches_numpy_loop_with_grouped_heads_state_and_gate_limits():
  rng = np.random.default_rng(0)
  B, T, H, HV, K, V = 2, 23, 1, 2, 8, 6
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = unit(rng.standard_normal((B, T, H, K))), unit(rng.standard_normal((B, T, H, K)))
  v = rng.standard_normal((B, T, HV, V))
  g = -np.exp(rng.uniform(np.log(1e-4), np.log(50.0), (B, T, H, K)))  # up to a total forget
  b = rng.uniform(0, 2, (B, T, H, K))  # negative eigenvalues included
  w = rng.uniform(0, 1, (B, T, HV, V))
  S0 = rng.standard_normal((B, HV, K, V))
  scale = 0.7
  with jax.enable_x64(True):
    o, S = oracle.gdn2_oracle(q, k, v, g, b, w, scale=scale, initial_state=S0)
  rep = lambda x: np.repeat(x, HV // H, axis=2)
  for i in range(B):
    o_ref, S_ref = oracle.numpy_loop(rep(q)[i], rep(k)[i], v[i], rep(g)[i], rep(b)[i], w[i], scale, S0[i])
    np.testing.assert_allclose(np.asarray(o[i]), o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(S[i]), S_ref, rtol=1e-12, atol=1e-12)


def test_oracle_packed_sequences_match_numpy_loop_per_sequence():
  rng = np.random.default_rng(1)
  T, H, K, V = 30, 2, 8, 8
  cu = np.array([0, 7, 7, 19, 30])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = unit(rng.standard_normal((1, T, H, K))), unit(rng.standard_normal((1, T, H, K)))
  v, w = rng.standard_normal((1, T, H, V)), rng.uniform(0, 1, (1, T, H, V))
  g, b = -rng.uniform(0, 2, (1, T, H, K)), rng.uniform(0, 1, (1, T, H, K))
  S0 = rng.standard_normal((len(cu) - 1, H, K, V))
  with jax.enable_x64(True):
    o, S = oracle.gdn2_oracle(*(jnp.asarray(x) for x in (q, k, v, g, b, w)), initial_state=S0, cu_seqlens=cu)
  for n in range(len(cu) - 1):
    s, e = cu[n], cu[n + 1]
    o_ref, S_ref = oracle.numpy_loop(*(x[0, s:e] for x in (q, k, v, g, b, w)), K ** -0.5, S0[n])
    np.testing.assert_allclose(np.asarray(o[0, s:e]), o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(S[n]), S_ref, rtol=1e-12, atol=1e-12)
