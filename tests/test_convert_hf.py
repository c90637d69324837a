"""fla Hugging Face model directories (`gdn2_jax.convert.hf`): fla's KDA model imported against a float64 reference of
its forward pass and against fixtures made by fla 0.6.0 itself (`benchmarks/make_fla_hf_fixtures.py`, GPU); GDN-2
export checked against key names and shapes transcribed from fla's source (`tests/fixtures/fla_gdn2_hf_layout.json`)
and by an exact round trip; one-line refusals of what our model cannot express; sharded checkpoints; the CLI.
The single-layer imports (fla's GDN-2 layer, NVIDIA's lit_gpt) are tested in test_convert.py."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from gdn2_jax import generate as gen
from gdn2_jax.convert import fla_hf_config, load_fla_hf, save_fla_hf
from gdn2_jax.convert.__main__ import main as convert_main
from gdn2_jax.models import LanguageModel, ModelConfig
from tests.test_convert import _rel, _sigmoid, _softplus, reference_fla_layer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HF_FIXTURES = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(FIXTURES, "fla_hf", "*", "reference.npz")))
# GDN-2 models written by our exporter (benchmarks/make_fla_hf_fixtures.py --make-export-dirs); fla's logits for them,
# from fla 0.6.0's modules loading the file strictly, are in fla_hf_export/<case>/reference.npz once made on a GPU.
EXPORT_FIXTURES = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(FIXTURES, "fla_hf_export", "*",
                                                                            "config.json")))
_fwd = nnx.jit(lambda m, t: m(t))


# -- an independent float64 reference of fla's KDAForCausalLM, from config.json and the state dict ---------------


def _rms(x, weight, eps):
  return weight * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def reference_kda_layer(sd, x, *, allow_neg_eigval, lower_bound, eps):
  """fla's `KimiDeltaAttention.forward` (fla/layers/kda.py, 0.6.0) in float64: x `[B, T, D]` -> `[B, T, D]`."""
  B, T, D = x.shape
  H = sd["A_log"].shape[0]
  K = sd["q_proj.weight"].shape[0] // H
  V = sd["g_proj.0.weight"].shape[0]

  def conv(name, u):  # depthwise causal conv, tap W-1 on the current token, then SiLU
    w = sd[name][:, 0, :]
    W = w.shape[1]
    pad = np.concatenate([np.zeros((B, W - 1, u.shape[-1])), u], 1)
    y = sum(pad[:, j:j + T] * w[:, j] for j in range(W))
    return y * _sigmoid(y)

  q = conv("q_conv1d.weight", x @ sd["q_proj.weight"].T).reshape(B, T, H, K)
  k = conv("k_conv1d.weight", x @ sd["k_proj.weight"].T).reshape(B, T, H, K)
  v = conv("v_conv1d.weight", x @ sd["v_proj.weight"].T).reshape(B, T, H, V)
  f = ((x @ sd["f_proj.0.weight"].T) @ sd["f_proj.1.weight"].T + sd["dt_bias"]).reshape(B, T, H, K)
  rate = np.exp(sd["A_log"])[:, None]
  g = -rate * _softplus(f) if lower_bound is None else lower_bound * _sigmoid(rate * f)
  beta = _sigmoid(x @ sd["b_proj.weight"].T) * (2.0 if allow_neg_eigval else 1.0)  # [B, T, H]
  q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
  k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
  S = np.zeros((B, H, K, V))
  o = np.zeros((B, T, H, V))
  for t in range(T):
    S = np.exp(g[:, t])[..., None] * S
    err = v[:, t] - np.einsum("bhkv,bhk->bhv", S, k[:, t])
    S = S + np.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * err)
    o[:, t] = K ** -0.5 * np.einsum("bhkv,bhk->bhv", S, q[:, t])
  gate = ((x @ sd["g_proj.0.weight"].T) @ sd["g_proj.1.weight"].T + sd["g_proj.1.bias"]).reshape(B, T, H, V)
  y = _rms(o, sd["o_norm.weight"], eps) * _sigmoid(gate)
  return y.reshape(B, T, H * V) @ sd["o_proj.weight"].T


def reference_fla_model(raw, sd, tokens):
  """fla's `KDAForCausalLM` / GDN-2 model forward in float64 numpy: tokens `[B, T]` -> logits `[B, T, vocab]`."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  eps = raw["norm_eps"]
  x = sd["model.embeddings.weight"][np.asarray(tokens)]
  for i in range(raw["num_hidden_layers"]):
    pre = f"model.layers.{i}."
    h = _rms(x, sd[pre + "attn_norm.weight"], eps)
    layer = {k[len(pre + "attn."):]: v for k, v in sd.items() if k.startswith(pre + "attn.")}
    if raw["model_type"] == "kda":
      x = x + reference_kda_layer(layer, h, allow_neg_eigval=raw["allow_neg_eigval"], lower_bound=raw.get(
          "lower_bound"), eps=eps)
    else:
      x = x + reference_fla_layer(layer, h, allow_neg_eigval=raw["allow_neg_eigval"], output_gate="sigmoid", eps=eps)
    h = _rms(x, sd[pre + "mlp_norm.weight"], eps)
    a = h @ sd[pre + "mlp.gate_proj.weight"].T
    x = x + (a * _sigmoid(a) * (h @ sd[pre + "mlp.up_proj.weight"].T)) @ sd[pre + "mlp.down_proj.weight"].T
  head = sd["model.embeddings.weight"] if raw["tie_word_embeddings"] else sd["lm_head.weight"]
  return _rms(x, sd["model.norm.weight"], eps) @ head.T


def random_kda_dir(path, seed=0, *, vocab=37, D=24, H=2, K=8, expand_v=1.5, n_layers=2, inter=40, conv=3,
                   tie=False, **cfg_kw):
  """An fla KDA HF directory with random weights (norm weights, A_log, dt_bias away from their inits)."""
  rng = np.random.default_rng(seed)
  V = int(K * expand_v)
  r = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
  near1 = lambda n: (1 + 0.3 * rng.standard_normal(n)).astype(np.float32)
  sd = {"model.embeddings.weight": r(vocab, D), "model.norm.weight": near1(D)}
  if not tie:
    sd["lm_head.weight"] = r(vocab, D)
  for i in range(n_layers):
    pre = f"model.layers.{i}."
    sd.update({pre + "attn_norm.weight": near1(D), pre + "mlp_norm.weight": near1(D),
               pre + "mlp.gate_proj.weight": r(inter, D), pre + "mlp.up_proj.weight": r(inter, D),
               pre + "mlp.down_proj.weight": r(D, inter)})
    a = pre + "attn."
    sd.update({a + "q_proj.weight": r(H * K, D), a + "k_proj.weight": r(H * K, D), a + "v_proj.weight": r(H * V, D),
               a + "q_conv1d.weight": r(H * K, 1, conv), a + "k_conv1d.weight": r(H * K, 1, conv),
               a + "v_conv1d.weight": r(H * V, 1, conv), a + "f_proj.0.weight": r(V, D),
               a + "f_proj.1.weight": r(H * K, V), a + "b_proj.weight": r(H, D),
               a + "A_log": np.log(rng.uniform(0.5, 4, H)).astype(np.float32),
               a + "dt_bias": rng.uniform(-2, 1, H * K).astype(np.float32), a + "g_proj.0.weight": r(V, D),
               a + "g_proj.1.weight": r(H * V, V), a + "g_proj.1.bias": (0.5 * rng.standard_normal(H * V)).astype(
                   np.float32), a + "o_norm.weight": near1(V), a + "o_proj.weight": r(D, H * V)})
  with open(os.path.join(FIXTURES, "fla_hf_kda_config.json")) as f:
    raw = json.load(f)  # written by transformers 5.6.2 from fla 0.6.0's KDAConfig
  raw.update(vocab_size=vocab, hidden_size=D, num_heads=H, head_dim=K, expand_v=expand_v, num_hidden_layers=n_layers,
             intermediate_size=inter, conv_size=conv, tie_word_embeddings=tie, norm_eps=1e-5, **cfg_kw)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(raw, f)
  save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  return raw, sd


def _tokens(vocab, shape=(2, 11), seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


# -- import ---------------------------------------------------------------------------------------------------


def test_fla_kda_config_json_reads_as_our_kda_model():
  with open(os.path.join(FIXTURES, "fla_hf_kda_config.json")) as f:
    cfg = fla_hf_config(json.load(f))
  # fla's defaults: MLP width 2/3 * 4 * 48 rounded up to 256, norm_eps 1e-6, sigmoid output gate, no decay bound.
  assert cfg.pattern == ("kda",) and cfg.mlp_hidden == 256 and cfg.norm_eps == 1e-6
  assert (cfg.d_model, cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.v_heads) == (48, 2, 16, 16, 2)
  assert cfg.output_gate == "sigmoid" and cfg.gate_lower_bound is None and not cfg.tie_embeddings


@pytest.mark.parametrize("kw", [dict(), dict(allow_neg_eigval=True, tie=True),
                                dict(safe_gate=True, lower_bound=-4.0, expand_v=1.0)],
                         ids=["plain", "negeig_tied", "lower_bound"])
def test_kda_import_matches_float64_reference(tmp_path, kw):
  raw, sd = random_kda_dir(tmp_path / "kda", seed=len(kw), **kw)
  model, cfg = load_fla_hf(str(tmp_path / "kda"), backend="recurrent")
  toks = _tokens(raw["vocab_size"])
  assert _rel(_fwd(model, toks), reference_fla_model(raw, sd, toks)) < 1e-5


_NO_HF_FIXTURES = ("no fla HF fixtures under tests/fixtures/fla_hf/: run benchmarks/make_fla_hf_fixtures.py on a GPU "
                   "(fla 0.6.0, transformers 5.6.2) and commit its output there")


@pytest.mark.parametrize("case", HF_FIXTURES or [None], ids=[os.path.basename(p) for p in HF_FIXTURES] or ["absent"])
def test_fla_kda_model_fixtures_match_fla_logits(case):
  """Directories written by fla 0.6.0's own KDAForCausalLM (float32, fused_recurrent) with its logits."""
  if case is None:
    pytest.skip(_NO_HF_FIXTURES)
  ref = np.load(os.path.join(case, "reference.npz"))
  model, _ = load_fla_hf(case, backend="recurrent")
  assert _rel(_fwd(model, jnp.asarray(ref["tokens"], jnp.int32)), ref["logits"]) < 1e-4


@pytest.mark.parametrize("case", EXPORT_FIXTURES, ids=[os.path.basename(p) for p in EXPORT_FIXTURES])
def test_our_gdn2_export_runs_in_fla_as_in_ours(case, tmp_path):
  """The committed export is what save_fla_hf writes today; fla's GatedDeltaNet2 model, loading it strictly, gives
  our logits (when its reference.npz, made on a GPU, is present)."""
  model, _ = load_fla_hf(case, backend="recurrent")
  save_fla_hf(model, str(tmp_path / "again"))
  with open(os.path.join(case, "config.json")) as f, open(tmp_path / "again" / "config.json") as g:
    assert json.load(f) == json.load(g)
  a, b = load_file(os.path.join(case, "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  # What the fla names mean, without our importer: the float64 reference of fla's forward reads the file itself.
  with open(os.path.join(case, "config.json")) as f:
    raw = json.load(f)
  fla_ref = os.path.join(case, "reference.npz")
  ref = dict(np.load(fla_ref)) if os.path.isfile(fla_ref) else {"tokens": _tokens(raw["vocab_size"], (2, 48))}
  ours = _fwd(model, jnp.asarray(ref["tokens"], jnp.int32))
  assert _rel(ours, reference_fla_model(raw, a, ref["tokens"])) < 1e-5
  if "logits" not in ref:
    pytest.skip(f"no fla logits for {os.path.basename(case)} yet: run benchmarks/make_fla_hf_fixtures.py on a GPU")
  assert _rel(ours, ref["logits"]) < 1e-4


def test_fla_hf_fixtures_are_small():
  if not HF_FIXTURES:
    pytest.skip(_NO_HF_FIXTURES)
  assert sum(os.path.getsize(f) for c in HF_FIXTURES for f in glob.glob(os.path.join(c, "*"))) < 2_000_000


def _one_line_error(exc_info, *words):
  msg = str(exc_info.value)
  assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("edit,words", [
    (dict(attn={"layers": [1], "num_heads": 4}), ["attn="]),
    (dict(use_short_conv=False), ["use_short_conv=False"]),
    (dict(conv_bias=True), ["conv_bias=True"]),
    (dict(num_v_heads=4), ["num_v_heads=4"]),
    (dict(hidden_act="powlu"), ["hidden_act='powlu'"]),
    (dict(attnres_block_size=4), ["attnres_block_size=4"]),
    (dict(rope_scaling=None), ["'rope_scaling'", "unknown"]),
    (dict(model_type="gated_deltanet"), ["model_type='gated_deltanet'"]),
])
def test_fla_settings_we_cannot_express_are_refused_in_one_line(edit, words):
  with open(os.path.join(FIXTURES, "fla_hf_kda_config.json")) as f:
    raw = json.load(f)
  raw.update(edit)
  with pytest.raises(ValueError) as e:
    fla_hf_config(raw)
  _one_line_error(e, *words)


def test_bad_directories_and_weights_are_one_line_errors(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    load_fla_hf(str(tmp_path / "nowhere"))
  _one_line_error(e, "config.json")
  raw, sd = random_kda_dir(tmp_path / "kda")
  os.remove(tmp_path / "kda" / "model.safetensors")
  with pytest.raises(FileNotFoundError) as e:
    load_fla_hf(str(tmp_path / "kda"))
  _one_line_error(e, "model.safetensors")
  bad = dict(sd)
  bad["model.layers.1.attn.b_proj.weight"] = np.zeros((16, 24), np.float32)  # GDN-2's shape in a KDA model
  save_file(bad, str(tmp_path / "kda" / "model.safetensors"))
  with pytest.raises(ValueError) as e:
    load_fla_hf(str(tmp_path / "kda"))
  _one_line_error(e, "model.layers.1.attn.b_proj.weight", "[16, 24]", "[2, 24]")
  bad = dict(sd, **{"model.layers.0.attn.q_conv1d.bias": np.zeros(16, np.float32)})
  save_file(bad, str(tmp_path / "kda" / "model.safetensors"))
  with pytest.raises(ValueError) as e:
    load_fla_hf(str(tmp_path / "kda"))
  _one_line_error(e, "q_conv1d.bias")


# -- export ---------------------------------------------------------------------------------------------------


def _gdn2_cfg(**kw):
  base = dict(vocab_size=37, d_model=32, n_layers=2, mlp_hidden=40, num_heads=2, head_k_dim=8, head_v_dim=12,
              num_v_heads=4, conv_size=3, output_gate="sigmoid", allow_neg_eigval=True, norm_eps=1e-6,
              backend="recurrent")
  base.update(kw)
  return ModelConfig.tiny(**base)


def _perturbed(cfg, seed=0):
  """A model with random parameters, none at its init value (norm weights, biases included). Built abstractly and
  filled from numpy: eager init compiles an op per parameter shape, which costs seconds here."""
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(seed)))
  rng = np.random.default_rng(seed)

  def fill(path, p):
    x = rng.standard_normal(p.shape)
    if p.ndim >= 2:
      x = x / np.sqrt(p.shape[-2])
    elif str(path[-1].key if hasattr(path[-1], "key") else path[-1]) == "weight":  # norm scales around 1
      x = 1 + 0.3 * x
    return jnp.asarray(x, p.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model, nnx.Param)))
  return model


def _symbols(raw):
  HV = raw["num_v_heads"] or raw["num_heads"]
  head_v = int(raw["head_dim"] * raw["expand_v"])
  return dict(raw, key_dim=raw["num_heads"] * raw["head_dim"], head_v_dim=head_v, value_dim=HV * head_v)


@pytest.mark.parametrize("tie", [False, True])
def test_gdn2_export_has_fla_key_names_and_shapes(tmp_path, tie):
  """Against the layout transcribed from fla's modeling_gdn2.py / layers/gdn2.py, not against our importer."""
  with open(os.path.join(FIXTURES, "fla_gdn2_hf_layout.json")) as f:
    layout = json.load(f)
  save_fla_hf(_perturbed(_gdn2_cfg(tie_embeddings=tie)), str(tmp_path / "hf"))
  with open(tmp_path / "hf" / "config.json") as f:
    raw = json.load(f)
  assert raw["model_type"] == layout["model_type"]
  assert set(layout["config_fields"]) <= set(raw) <= set(layout["config_fields"]) | {"architectures", "model_type",
                                                                                      "dtype"}
  sym = _symbols(raw)
  expected = {k: v for k, v in layout["model"].items() if not (tie and k in layout["untied_only"])}
  for i in range(raw["num_hidden_layers"]):
    expected.update({layout["layer_prefix"].format(i=i) + k: v for k, v in layout["layer"].items()})
  expected = {k: [d if isinstance(d, int) else sym[d] for d in v] for k, v in expected.items()}
  got = {k: list(v.shape) for k, v in load_file(str(tmp_path / "hf" / "model.safetensors")).items()}
  assert got == expected


@pytest.mark.parametrize("scan", [False, True])
def test_gdn2_export_then_import_is_exact(tmp_path, scan):
  src = _perturbed(_gdn2_cfg(scan_layers=scan, n_layers=2 + 2 * scan))
  save_fla_hf(src, str(tmp_path / "hf"))
  dst, cfg = load_fla_hf(str(tmp_path / "hf"), backend="recurrent", scan_layers=scan)
  fields = ("vocab_size", "d_model", "n_layers", "pattern", "mlp_hidden", "num_heads", "head_k_dim", "head_v_dim",
            "num_v_heads", "conv_size", "output_gate", "allow_neg_eigval", "gate_lower_bound", "norm_eps",
            "tie_embeddings", "max_seq_len", "embed_init_std")
  assert [getattr(cfg, f) for f in fields] == [getattr(src.cfg, f) for f in fields]
  for a, b in zip(jax.tree.leaves(nnx.state(dst, nnx.Param)), jax.tree.leaves(nnx.state(src, nnx.Param))):
    np.testing.assert_array_equal(a, b)
  if not scan:  # equal parameters give equal logits; the scanned model's compile is not worth its time here
    toks = _tokens(37)
    np.testing.assert_array_equal(_fwd(dst, toks), _fwd(src, toks))


def test_kda_export_then_import_is_exact_and_matches_reference(tmp_path):
  src = _perturbed(_gdn2_cfg(pattern=("kda",), num_v_heads=None, gate_lower_bound=-3.0))
  save_fla_hf(src, str(tmp_path / "hf"))
  dst, _ = load_fla_hf(str(tmp_path / "hf"), backend="recurrent")
  toks = _tokens(37)
  np.testing.assert_array_equal(_fwd(dst, toks), _fwd(src, toks))
  with open(tmp_path / "hf" / "config.json") as f:
    raw = json.load(f)
  assert _rel(_fwd(src, toks), reference_fla_model(raw, load_file(str(tmp_path / "hf" / "model.safetensors")),
                                                   toks)) < 1e-5


@pytest.mark.parametrize("kw,words", [
    (dict(output_gate="silu"), ["output_gate", "'silu'", "sigmoid"]),
    (dict(gate_lower_bound=-5.0), ["gate_lower_bound"]),
    (dict(pattern=("gdn2", "swa"), n_layers=2, swa_heads=4), ["pattern"]),
])
def test_export_refuses_what_fla_cannot_express_in_one_line(tmp_path, kw, words):
  model = nnx.eval_shape(lambda: LanguageModel(_gdn2_cfg(**kw), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError) as e:
    save_fla_hf(model, str(tmp_path / "hf"))
  _one_line_error(e, *words)
  assert not os.path.exists(tmp_path / "hf")


def test_sharded_checkpoint_reads_as_one(tmp_path):
  raw, sd = random_kda_dir(tmp_path / "kda")
  keys = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  os.remove(tmp_path / "kda" / "model.safetensors")
  for name, ks in shards.items():
    save_file({k: sd[k] for k in ks}, str(tmp_path / "kda" / name), metadata={"format": "pt"})
  with open(tmp_path / "kda" / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
  model, _ = load_fla_hf(str(tmp_path / "kda"), backend="recurrent")
  toks = _tokens(raw["vocab_size"])
  assert _rel(_fwd(model, toks), reference_fla_model(raw, sd, toks)) < 1e-5


def test_convert_cli_imports_and_exports(tmp_path, capsys):
  random_kda_dir(tmp_path / "kda", tie=True)
  assert convert_main([str(tmp_path / "kda"), str(tmp_path / "ours"), "--format", "fla-hf"]) == 0
  model, step = gen.load_model(str(tmp_path / "ours"), backend="recurrent")
  assert step == 0 and model.cfg.pattern == ("kda",) and model.cfg.tie_embeddings
  assert convert_main([str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "fla-hf"]) == 0
  a, b = load_file(str(tmp_path / "kda" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  capsys.readouterr()
  assert convert_main([str(tmp_path / "nowhere"), str(tmp_path / "x"), "--format", "fla-hf"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "config.json" in err, err
