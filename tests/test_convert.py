"""Weight import: fla/NVIDIA GDN-2 layer state dicts (against fla's own outputs and a float64 numpy reference);
NVIDIA's lit_gpt model against float64 references of its conventions (SwiGLU order, fused qkv per group, NeoX RoPE,
pre-norm RMSNorm, untied head), a round trip of our own model, and unread source keys rejected; the converter and
generate command lines."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn2_jax import generate as gen
from gdn2_jax.convert import layer_from_fla_state_dict, model_from_lit_gpt
from gdn2_jax.convert.__main__ import main as convert_main
from gdn2_jax.models import LanguageModel, ModelConfig

FIXTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "fla_*.npz")))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# -- an independent float64 reference of the PyTorch layer, straight from its state dict --------------------------


def _softplus(x):
  return np.logaddexp(0.0, x)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def reference_fla_layer(sd, x, *, allow_neg_eigval, output_gate, cu_seqlens=None, eps=1e-5):
  """fla/NVIDIA `GatedDeltaNet2.forward` in float64 numpy: x `[B, T, D]` -> `[B, T, D]`."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = np.asarray(x, np.float64)
  B, T, D = x.shape
  H = sd["A_log"].shape[0]
  K = sd["q_proj.weight"].shape[0] // H
  V = sd["g_proj.0.weight"].shape[0]
  HV = sd["v_proj.weight"].shape[0] // V
  starts = np.zeros(T, bool)
  starts[0] = True
  if cu_seqlens is not None:
    starts[np.asarray(cu_seqlens[:-1])] = True
  seq = np.cumsum(starts)

  def conv(name, u):  # depthwise causal conv (taps never cross a sequence start) + SiLU
    w = sd[name][:, 0, :]  # [C, W]
    W = w.shape[1]
    y = np.zeros_like(u)
    for t in range(T):
      for j in range(W):
        s = t - (W - 1) + j
        if s >= 0 and seq[s] == seq[t]:
          y[:, t] += w[:, j] * u[:, s]
    return y * _sigmoid(y)

  q = conv("q_conv1d.weight", x @ sd["q_proj.weight"].T).reshape(B, T, H, K)
  k = conv("k_conv1d.weight", x @ sd["k_proj.weight"].T).reshape(B, T, H, K)
  v = conv("v_conv1d.weight", x @ sd["v_proj.weight"].T).reshape(B, T, HV, V)
  f = (x @ sd["f_proj.0.weight"].T) @ sd["f_proj.1.weight"].T
  g = (-np.exp(sd["A_log"])[:, None] * _softplus(f + sd["dt_bias"]).reshape(B, T, H, K))
  b = _sigmoid(x @ sd["b_proj.weight"].T).reshape(B, T, H, K) * (2.0 if allow_neg_eigval else 1.0)
  w = _sigmoid(x @ sd["w_proj.weight"].T).reshape(B, T, HV, V)
  q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
  k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
  rep = lambda a: np.repeat(a, HV // H, axis=2)
  q, k, g, b = rep(q), rep(k), rep(g), rep(b)
  o = np.zeros((B, T, HV, V))
  S = np.zeros((B, HV, K, V))
  for t in range(T):
    if starts[t]:
      S[:] = 0
    S = np.exp(g[:, t])[..., None] * S
    r = np.einsum("bhkv,bhk->bhv", S, b[:, t] * k[:, t])
    S = S + k[:, t][..., None] * (w[:, t] * v[:, t] - r)[..., None, :]
    o[:, t] = K ** -0.5 * np.einsum("bhkv,bhk->bhv", S, q[:, t])
  gate = ((x @ sd["g_proj.0.weight"].T) @ sd["g_proj.1.weight"].T + sd["g_proj.1.bias"]).reshape(B, T, HV, V)
  act = gate * _sigmoid(gate) if output_gate == "silu" else _sigmoid(gate)
  y = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + eps) * sd["o_norm.weight"] * act
  return y.reshape(B, T, HV * V) @ sd["o_proj.weight"].T


def random_fla_state_dict(rng, D=40, H=2, K=8, V=12, HV=4, W=4):
  """Random fla GDN-2 layer weights, away from any special value."""
  shapes = {"q_proj.weight": (H * K, D), "k_proj.weight": (H * K, D), "v_proj.weight": (HV * V, D),
            "q_conv1d.weight": (H * K, 1, W), "k_conv1d.weight": (H * K, 1, W), "v_conv1d.weight": (HV * V, 1, W),
            "f_proj.0.weight": (V, D), "f_proj.1.weight": (H * K, V), "b_proj.weight": (H * K, D),
            "w_proj.weight": (HV * V, D), "g_proj.0.weight": (V, D), "g_proj.1.weight": (HV * V, V),
            "g_proj.1.bias": (HV * V,), "o_norm.weight": (V,), "o_proj.weight": (D, HV * V)}
  sd = {k: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32) for k, s in shapes.items()}
  sd["o_norm.weight"] = (1 + 0.3 * rng.standard_normal(V)).astype(np.float32)
  sd["A_log"] = np.log(rng.uniform(1, 16, H)).astype(np.float32)
  sd["dt_bias"] = rng.normal(-4, 1, H * K).astype(np.float32)
  return sd


@pytest.mark.parametrize("output_gate, neg, segments", [("sigmoid", True, False), ("silu", False, True)])
def test_layer_matches_float64_reference(output_gate, neg, segments):
  rng = np.random.default_rng(0)
  sd = random_fla_state_dict(rng)
  x = rng.standard_normal((1 if segments else 2, 37, 40)).astype(np.float32)
  cu = [0, 9, 25, 37] if segments else None
  ref = reference_fla_layer(sd, x, allow_neg_eigval=neg, output_gate=output_gate, cu_seqlens=cu)
  layer = layer_from_fla_state_dict(sd, allow_neg_eigval=neg, output_gate=output_gate, backend="chunk",
                                    chunk_size=16)
  seg = None if cu is None else jnp.asarray(np.repeat(np.arange(3), np.diff(cu))[None], jnp.int32)
  y = nnx.jit(lambda m, x, s: m(x, segment_ids=s))(layer, jnp.asarray(x), seg)
  assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("path", FIXTURES, ids=[os.path.basename(p) for p in FIXTURES])
def test_import_matches_fla_outputs(path):
  with np.load(path) as z:
    cfg = json.loads(str(z["config"]))
    sd = {k[3:]: z[k] for k in z.files if k.startswith("sd.")}
    x, y = z["x"], z["y"]
  layer = layer_from_fla_state_dict(sd, allow_neg_eigval=cfg["allow_neg_eigval"], output_gate=cfg["output_gate"],
                                    backend="recurrent")
  cu = cfg["cu_seqlens"]
  seg = None if cu is None else jnp.asarray(np.repeat(np.arange(len(cu) - 1), np.diff(cu))[None], jnp.int32)
  ours = nnx.jit(lambda m, x, s: m(x, segment_ids=s))(layer, jnp.asarray(x), seg)
  assert _rel(ours, y) < 1e-4, "the imported layer differs from fla's own output"
  # The float64 reference agrees with fla too (so both sides of the first check are what they claim).
  ref = reference_fla_layer(sd, x, allow_neg_eigval=cfg["allow_neg_eigval"], output_gate=cfg["output_gate"],
                            cu_seqlens=cu)
  assert _rel(ref, y) < 1e-4


def test_fixtures_exist_and_are_small():
  assert len(FIXTURES) >= 3, "run benchmarks/make_fla_fixtures.py on a GPU to make them"
  assert sum(os.path.getsize(p) for p in FIXTURES) < 1_000_000


# -- NVIDIA lit_gpt model layout -------------------------------------------------------------------------------


def to_lit_gpt(model: LanguageModel) -> dict:
  """Our (unscanned) model in lit_gpt names, written independently of the converter (fused qkv per group)."""
  cfg = model.cfg
  sd = {"transformer.wte.weight": np.asarray(model.embed.embedding[...]),
        "transformer.ln_f.weight": np.asarray(model.final_norm.weight[...]),
        "lm_head.weight": np.asarray(model.lm_head[...]).T}
  for i, blk in enumerate(model.layers):
    pre = f"transformer.h.{i}."
    sd[pre + "norm_1.weight"] = np.asarray(blk.norm1.weight[...])
    sd[pre + "norm_2.weight"] = np.asarray(blk.norm2.weight[...])
    for j in (1, 2, 3):
      sd[f"{pre}mlp.swiglu.w{j}.weight"] = np.asarray(getattr(blk.mlp, f"w{j}").kernel[...]).T
    m = blk.mixer
    if blk.kind == "gdn2":
      lin = lambda mod: np.asarray(mod.kernel[...]).T
      sd.update({pre + "attn." + k: v for k, v in {
          "q_proj.weight": lin(m.q_proj), "k_proj.weight": lin(m.k_proj), "v_proj.weight": lin(m.v_proj),
          "q_conv1d.weight": np.asarray(m.q_conv1d.weight[...])[:, None],
          "k_conv1d.weight": np.asarray(m.k_conv1d.weight[...])[:, None],
          "v_conv1d.weight": np.asarray(m.v_conv1d.weight[...])[:, None],
          "f_proj.0.weight": lin(m.f_down), "f_proj.1.weight": lin(m.f_up), "b_proj.weight": lin(m.b_proj),
          "w_proj.weight": lin(m.w_proj), "A_log": np.asarray(m.A_log[...]), "dt_bias": np.asarray(m.dt_bias[...]),
          "g_proj.0.weight": lin(m.g_down), "g_proj.1.weight": lin(m.g_up), "g_proj.1.bias": np.asarray(
              m.g_up.bias[...]), "o_norm.weight": np.asarray(m.o_norm.weight[...]), "o_proj.weight": lin(m.o_proj),
      }.items()})
    else:
      hs, nq, nkv = m.head_dim, m.num_heads, m.num_kv_heads
      q = np.asarray(m.q_proj.kernel[...]).T.reshape(nkv, nq // nkv, hs, -1)
      k = np.asarray(m.k_proj.kernel[...]).T.reshape(nkv, 1, hs, -1)
      v = np.asarray(m.v_proj.kernel[...]).T.reshape(nkv, 1, hs, -1)
      sd[pre + "attn.attn.weight"] = np.concatenate([q, k, v], axis=1).reshape((nq + 2 * nkv) * hs, -1)
      sd[pre + "attn.proj.weight"] = np.asarray(m.o_proj.kernel[...]).T
  return sd


# Hand-written float64 references of lit_gpt's conventions, read off NVIDIA's code (lit_gpt/model.py, config.py of
# the GatedDeltaNet-2 release; the RoPE helper lit_gpt/fused_rotary_embedding.py):
# - SwiGLU: `w3(silu(w1 x) * w2 x)`: w1 is the SiLU gate, w2 the linear "up" branch, w3 the down projection.
# - fused attention projection `attn.attn.weight`, rows viewed as `[n_query_groups, q_per_kv + 2, head_size]`: the
#   group's queries, then its key, then its value; query head j reads key/value group j // q_per_kv.
# - RoPE over the whole head (rotary_percentage 1.0), base 10000, positions 0..T-1, NeoX layout (interleaved=False):
#   channel i pairs with i + hs/2, `theta_i = base^(-2i / hs)`.
# - RMSNorm `weight * x / sqrt(mean(x^2) + 1e-5)`, pre-norm blocks (parallel_residual False), separate lm_head.
# - sliding window `window_size=(local_window - 1, 0)`: a query sees itself and the local_window - 1 tokens before.


def _lit_rmsnorm(x, weight, eps=1e-5):
  return weight * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _lit_swiglu(sd, pre, x):
  a = x @ sd[pre + "mlp.swiglu.w1.weight"].T
  return (a * _sigmoid(a) * (x @ sd[pre + "mlp.swiglu.w2.weight"].T)) @ sd[pre + "mlp.swiglu.w3.weight"].T


def _lit_attention(sd, pre, x, n_head, n_groups, window, base=10000.0):
  B, T, D = x.shape
  hs = D // n_head
  qkv = (x @ sd[pre + "attn.attn.weight"].T).reshape(B, T, n_groups, n_head // n_groups + 2, hs)
  q = qkv[:, :, :, :-2].reshape(B, T, n_head, hs)
  k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # [B, T, n_groups, hs]
  theta = np.arange(T)[:, None] * base ** (-np.arange(0, hs, 2) / hs)  # [T, hs/2]
  cos, sin = np.cos(theta)[None, :, None], np.sin(theta)[None, :, None]

  def rot(a):
    a1, a2 = a[..., :hs // 2], a[..., hs // 2:]
    return np.concatenate([a1 * cos - a2 * sin, a1 * sin + a2 * cos], -1)

  q, k = rot(q), rot(k)
  group = np.arange(n_head) // (n_head // n_groups)
  s = np.einsum("bihd,bjhd->bhij", q, k[:, :, group]) / np.sqrt(hs)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  s = np.where((j <= i) & (i - j < window), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("bhij,bjhd->bihd", p, v[:, :, group]).reshape(B, T, D)
  return o @ sd[pre + "attn.proj.weight"].T


def reference_lit_gpt(sd, tokens, *, gdn2_per_layer, n_head, n_groups, window):
  """NVIDIA lit_gpt `GPT.forward` in float64 numpy, straight from its state dict: tokens `[B, T]` -> logits."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = sd["transformer.wte.weight"][np.asarray(tokens)]
  n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
  for i in range(n_layers):
    pre = f"transformer.h.{i}."
    h = _lit_rmsnorm(x, sd[pre + "norm_1.weight"])
    if i % gdn2_per_layer == 0:
      layer_sd = {k[len(pre + "attn."):]: v for k, v in sd.items() if k.startswith(pre + "attn.")}
      x = x + reference_fla_layer(layer_sd, h, allow_neg_eigval=False, output_gate="silu")
    else:
      x = x + _lit_attention(sd, pre, h, n_head, n_groups, window)
    x = x + _lit_swiglu(sd, pre, _lit_rmsnorm(x, sd[pre + "norm_2.weight"]))
  return _lit_rmsnorm(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


def random_lit_gpt_state_dict(seed, *, vocab=40, D=32, n_layers=2, n_head=4, n_groups=2, mlp=48, H=2, K=8, V=8):
  """Random lit_gpt weights of a hybrid model (GDN-2 on even layers, attention on odd ones), norms away from 1."""
  rng = np.random.default_rng(seed)
  hs = D // n_head
  r = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
  sd = {"transformer.wte.weight": r(vocab, D), "lm_head.weight": r(vocab, D),
        "transformer.ln_f.weight": (1 + 0.3 * rng.standard_normal(D)).astype(np.float32)}
  for i in range(n_layers):
    pre = f"transformer.h.{i}."
    sd[pre + "norm_1.weight"] = (1 + 0.3 * rng.standard_normal(D)).astype(np.float32)
    sd[pre + "norm_2.weight"] = (1 + 0.3 * rng.standard_normal(D)).astype(np.float32)
    sd[pre + "mlp.swiglu.w1.weight"], sd[pre + "mlp.swiglu.w2.weight"] = r(mlp, D), r(mlp, D)
    sd[pre + "mlp.swiglu.w3.weight"] = r(D, mlp)
    if i % 2 == 0:
      sd.update({pre + "attn." + k: v for k, v in random_fla_state_dict(rng, D=D, H=H, K=K, V=V, HV=H).items()})
    else:
      sd[pre + "attn.attn.weight"] = r((n_head + 2 * n_groups) * hs, D)
      sd[pre + "attn.proj.weight"] = r(D, D)
  return sd


_LIT = dict(gdn2_per_layer=2, n_head=4, n_query_groups=2, local_window=6)


def _imported(sd):
  return model_from_lit_gpt(sd, **_LIT, backend="recurrent")


def test_lit_gpt_swiglu_is_w3_of_silu_w1_times_w2():
  sd = random_lit_gpt_state_dict(1)
  model = _imported(sd)
  x = np.random.default_rng(2).standard_normal((2, 5, 32)).astype(np.float32)
  ref = _lit_swiglu({k: np.asarray(v, np.float64) for k, v in sd.items()}, "transformer.h.0.", x.astype(np.float64))
  assert _rel(model.layers[0].mlp(jnp.asarray(x)), ref) < 1e-6


def test_lit_gpt_attention_fused_qkv_groups_and_neox_rope():
  sd = random_lit_gpt_state_dict(3)
  model = _imported(sd)
  x = np.random.default_rng(4).standard_normal((2, 11, 32)).astype(np.float32)
  ref = _lit_attention({k: np.asarray(v, np.float64) for k, v in sd.items()}, "transformer.h.1.",
                       x.astype(np.float64), n_head=4, n_groups=2, window=6)
  assert _rel(model.layers[1].mixer(jnp.asarray(x)), ref) < 1e-5


def test_lit_gpt_model_matches_float64_reference():
  """Norms, residuals, the GDN-2 layer, attention, SwiGLU and the untied head together."""
  sd = random_lit_gpt_state_dict(5)
  model = _imported(sd)
  toks = np.random.default_rng(6).integers(0, 40, (2, 13))
  ref = reference_lit_gpt(sd, toks, gdn2_per_layer=2, n_head=4, n_groups=2, window=6)
  assert _rel(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(toks, jnp.int32)), ref) < 1e-5


@pytest.mark.parametrize("extra", ["transformer.h.1.attn.attn.bias", "transformer.h.0.mlp.swiglu.w1.bias",
                                   "transformer.h.0.attn.o_norm.bias"])
def test_lit_gpt_to_flat_rejects_keys_it_does_not_read(extra):
  from gdn2_jax.convert import lit_gpt_config, lit_gpt_to_flat
  sd = random_lit_gpt_state_dict(7)
  cfg = lit_gpt_config(sd, **_LIT)
  sd[extra] = np.zeros((4,), np.float32)
  with pytest.raises(ValueError, match=extra.replace(".", r"\.")):
    lit_gpt_to_flat(sd, cfg)


def _hybrid_cfg(**kw):
  return ModelConfig.tiny(pattern=("gdn2", "swa"), n_layers=4, d_model=32, num_heads=2, head_k_dim=16, head_v_dim=16,
                          swa_heads=4, swa_kv_heads=2, window=8, mlp_hidden=48, vocab_size=40, backend="recurrent",
                          **kw)


def test_lit_gpt_import_reproduces_the_model():
  src = LanguageModel(_hybrid_cfg(), rngs=nnx.Rngs(7))
  sd = to_lit_gpt(src)
  # Into a scanned model (layer i -> cell i // 2, position i % 2); the unscanned layout is checked below.
  dst = model_from_lit_gpt(sd, gdn2_per_layer=2, n_head=4, n_query_groups=2, local_window=8, scan_layers=True,
                           backend="recurrent")
  assert dst.cfg.pattern == ("gdn2", "swa") and dst.cfg.swa_kv_heads == 2 and dst.cfg.output_gate == "silu"
  toks = jax.random.randint(jax.random.key(0), (2, 19), 0, 40, dtype=jnp.int32)
  fwd = nnx.jit(lambda m, t: m(t))
  assert _rel(fwd(dst, toks), fwd(src, toks)) < 1e-6


def test_convert_then_generate_cli(tmp_path, capsys):
  from safetensors.numpy import save_file
  src = LanguageModel(_hybrid_cfg(), rngs=nnx.Rngs(3))
  # safetensors writes the buffer of a strided array as is: store contiguous copies.
  save_file({k: np.ascontiguousarray(v) for k, v in to_lit_gpt(src).items()}, str(tmp_path / "model.safetensors"))
  out = tmp_path / "converted"
  assert convert_main([str(tmp_path / "model.safetensors"), str(out), "--format", "lit_gpt", "--gdn2-per-layer", "2",
                       "--n-head", "4", "--n-query-groups", "2", "--local-window", "8"]) == 0
  model, step = gen.load_model(str(out), backend="recurrent")
  assert step == 0 and model.cfg.pattern == src.cfg.pattern and model.cfg.swa_kv_heads == 2
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(src, nnx.Param))):
    np.testing.assert_array_equal(a, b)
  capsys.readouterr()
  assert gen.main([str(out), "--ids", "1 2 3", "--max-new-tokens", "4", "--backend", "recurrent"]) == 0
  printed = capsys.readouterr().out.split()
  assert printed[:3] == ["1", "2", "3"] and len(printed) == 7
