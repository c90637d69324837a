"""The evaluation entry point, the replication's pieces and the memory picture, on tiny models on the CPU."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evaluation import evaluate, memory_viz, metrics, replicate, report, tasks
from gdn2_jax.models import LanguageModel, ModelConfig

TINY = dict(vocab_size=384, d_model=32, num_heads=2, head_k_dim=16, head_v_dim=16, mlp_hidden=64,
            backend="recurrent")  # the recurrent backend compiles fastest on the CPU; same maths as the chunk path


@pytest.fixture(scope="module")
def tiny_model():
  return LanguageModel(ModelConfig.tiny(**TINY), rngs=nnx.Rngs(0))


def test_evaluate_entry_on_a_tiny_model(tmp_path):
  stream = np.random.default_rng(0).integers(0, 384, 4 * 128 + 1).astype(np.int32)
  np.save(tmp_path / "heldout.npy", stream)
  args = ["--fresh", "gdn2", "--suite", "quick", "--out", str(tmp_path / "out"), "--ppl-tokens",
          str(tmp_path / "heldout.npy"), "--ppl-seq-len", "128"]
  for k, v in TINY.items():
    args += ["--set", f"{k}={v}"]
  assert evaluate.main(args) == 0
  res = json.load(open(tmp_path / "out" / "results.json"))
  settings = res["models"]["gdn2"]["settings"]
  suite = evaluate.SUITES["quick"]
  assert set(settings) == {s.name for s in suite.settings()}
  # Scored positions: every MQAR pair of every example, every answer token of every needle.
  assert settings["mqar T=128,pairs=8"]["per_run"][0]["count"] == suite.examples * 8
  assert settings["mqar T=128,pairs=16"]["per_run"][0]["count"] == suite.examples * 16
  assert settings["s_niah_3 T=128"]["per_run"][0]["count"] == suite.examples * 36
  for s in settings.values():
    r = s["per_run"][0]
    assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["loss"]) and r["rows"] == suite.examples
  ppl = res["models"]["gdn2"]["perplexity"]["per_run"][0]
  assert ppl["count"] == 4 * 128 and 100 < ppl["perplexity"] < 2000  # untrained: about the vocabulary size
  md = open(tmp_path / "out" / "results.md").read()
  assert "mqar" in md and "s_niah_1" in md
  assert os.path.exists(tmp_path / "out" / "mqar_acc_vs_pairs.png")


def test_evaluation_is_deterministic(tiny_model):
  fn = evaluate.sums_fn_for(evaluate.apply_fn_for(tiny_model))
  suite = evaluate.SUITES["quick"]
  st = evaluate.Setting("mqar", 128, 16)
  a = evaluate.score_setting(fn, st, suite, vocab_size=384)
  b = evaluate.score_setting(fn, st, suite, vocab_size=384)
  assert a == b


def test_gathered_metrics_equal_full_logits(tiny_model):
  b = tasks.mqar_mixture([tasks.MQARConfig(64, 4, 384), tasks.MQARConfig(128, 16, 384)], 4, seed=3)
  tok, tgt, msk = (jnp.asarray(x) for x in (b.tokens, b.targets, b.mask))
  full = metrics.masked_metrics(tiny_model(tok), tgt, msk)
  part = replicate.gathered_metrics(tiny_model, tok, tgt, msk, num_scored=16)
  for k in full:
    np.testing.assert_allclose(float(part[k]), float(full[k]), rtol=2e-5)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
  f = lambda s, n: float(replicate.lr_factor(jnp.int32(s), jnp.int32(n), 0.1))
  assert f(0, 100) == pytest.approx(0.1) and f(9, 100) == pytest.approx(1.0)
  assert f(10, 100) == pytest.approx(1.0) and f(99, 100) == pytest.approx(0.1, abs=2e-3)
  assert f(50, 100) < f(20, 100)


def test_params_round_trip(tmp_path, tiny_model):
  path = str(tmp_path / "p.npz")
  replicate.save_params(path, nnx.state(tiny_model, nnx.Param))
  other = LanguageModel(ModelConfig.tiny(**TINY), rngs=nnx.Rngs(1))
  tok = jnp.asarray(np.random.default_rng(0).integers(0, 384, (1, 16)), jnp.int32)
  assert not np.allclose(other(tok), tiny_model(tok))
  replicate.load_params(path, other)
  np.testing.assert_array_equal(np.asarray(other(tok)), np.asarray(tiny_model(tok)))


def test_best_lr_and_spread():
  run = lambda acc: {"accuracy": acc, "exact_match": acc}
  model = {"runs": [{"label": "a", "lr": 1e-3, "seed": 0}, {"label": "b", "lr": 1e-3, "seed": 1},
                    {"label": "c", "lr": 1e-2, "seed": 0}, {"label": "d", "lr": 1e-2, "seed": 1}],
           "settings": {"mqar T=64,pairs=4": {"task": "mqar", "seq_len": 64, "num_pairs": 4,
                                              "per_run": [run(0.5), run(0.7), run(0.9), run(0.1)]}}}
  assert report.best_runs(model) == [0, 1]  # seed-mean 0.6 beats 0.5
  s = report.summary({"models": {"m": model}})["m"]["settings"]["mqar T=64,pairs=4"]["accuracy"]
  assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1) and s["n"] == 2


def test_merge_parts_and_write(tmp_path):
  def part(name, steps, acc):
    return {"meta": {}, "models": {name: {"runs": [{"label": "x"}], "steps_done": steps, "settings": {
        f"mqar T={T},pairs=4": {"task": "mqar", "seq_len": T, "num_pairs": 4,
                                "per_run": [{"accuracy": acc, "exact_match": acc}]} for T in (128, 64)}}}}
  paths = []
  for i, (name, steps) in enumerate([("gdn2", 10), ("kda", 20)]):
    paths.append(str(tmp_path / f"{i}.json"))
    json.dump(part(name, steps, 0.5 + i / 4), open(paths[-1], "w"))
  merged = report.merge(paths)
  assert set(merged["models"]) == {"gdn2", "kda"} and "different step counts" in merged["meta"]["note"]
  md = report.markdown(merged)
  assert md.index("T=64,pairs=4") < md.index("T=128,pairs=4")  # columns by context length
  assert "| kda | x | 75.0 | 75.0 |" in md
  assert "did not learn" not in md
  # A model whose runs all stayed at chance is named above the tables (the first GPU study run: 0.0-0.2%).
  stuck = part("kda", 20, 0.002)
  stuck["models"]["kda"]["settings"]["mqar T=64,pairs=4"]["per_run"][0]["accuracy"] = 0.01
  assert report.not_learned(stuck) == {"kda": 0.01}
  assert "WARNING: no run of kda (1.0%) reached 5% value accuracy" in report.markdown(stuck)
  assert report.main([str(tmp_path / "out")] + paths) == 0 and os.path.exists(tmp_path / "out" / "results.md")


def test_memory_trace_matches_the_layer(tmp_path, tiny_model):
  b = tasks.mqar(tasks.MQARConfig(64, 8, 384), 1, seed=0)
  tr = memory_viz.gate_trace(tiny_model, jnp.asarray(b.tokens[0]), layer=0)
  T = 64
  assert tr["b"].shape == (T, 2, 16) and tr["w"].shape == (T, 2, 16) and tr["state_norm"].shape == (T, 2)
  assert (tr["b"] >= 0).all() and (tr["b"] <= 1).all() and (tr["decay"] > 0).all() and (tr["decay"] <= 1).all()
  # The token-by-token state norm ends at the norm of the op's final state on the same inputs.
  blk = tiny_model.layers[0]
  x = blk.norm1(tiny_model.embed(jnp.asarray(b.tokens)))
  (q, k, v, g, bb, w), _ = blk.mixer._inputs(x, None, None)
  _, final = jax.jit(lambda *a: __import__("gdn2_jax").gdn2(*a, use_qk_l2norm=True, output_final_state=True,
                                                             backend="recurrent"))(q, k, v, g, bb, w)
  np.testing.assert_allclose(tr["state_norm"][-1], np.linalg.norm(np.asarray(final[0]), axis=(-2, -1)), rtol=1e-4)
  path = memory_viz.plot_trace(tr, str(tmp_path / "m.png"),
                               marks=memory_viz.mqar_marks(b.tokens[0], b.mask[0], 8))
  assert os.path.getsize(path) > 10_000


@pytest.mark.slow
def test_replication_smoke(tmp_path):
  assert replicate.main(["--preset", "cpu_smoke", "--out", str(tmp_path)]) == 0
  res = json.load(open(tmp_path / "results.json"))
  assert set(res["models"]) == {"gdn2", "attention"}
  assert os.path.exists(tmp_path / "gdn2_params.npz")


@pytest.mark.slow
def test_scores_a_train_checkpoint(tmp_path):
  from train.main import main as train_main
  run = tmp_path / "run"
  assert train_main(["steps=2", "model.n_layers=1", "model.d_model=32", "model.num_heads=2", "model.head_k_dim=16",
                     "model.head_v_dim=16", "model.mlp_hidden=64", "model.backend=recurrent", "data.seq_len=64",
                     "data.max_corpus_mb=0.2", "data.vocab_size=384", f"data.cache_dir={tmp_path / 'cache'}",
                     f"run_dir={run}", "checkpoint.every=2", "checkpoint.async_save=False", "eval_every=0",
                     "batch_size=8", "progress=False"]) == 0
  assert evaluate.main(["--checkpoint", f"tiny={run}", "--suite", "quick", "--ppl-seq-len", "64",
                        "--out", str(tmp_path / "eval")]) == 0
  res = json.load(open(tmp_path / "eval" / "results.json"))
  assert res["models"]["tiny"]["perplexity"]["per_run"][0]["count"] > 0


def test_bench_train_runs_on_the_cpu_with_packed_documents(tmp_path, monkeypatch):
  # The training-throughput benchmark's own code path (GPU-only otherwise), tiny: the hybrid on packed documents
  # (segment ids into the recurrent and the attention layers), recorded with its settings.
  import json

  from benchmarks import bench_train
  monkeypatch.setenv("OUT", str(tmp_path))
  bench_train.main(["--tiny", "--runs", "hybrid:128x2@32", "--steps", "1"])
  [row] = [json.loads(line) for line in open(tmp_path / "bench_train.jsonl")]
  assert row.get("mean_doc_len") == 32 and "step_ms_median" in row and row["documents"] > 2, row
