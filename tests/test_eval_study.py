"""The study's plumbing: the needle task as a trained task, merging parts of two tasks, and `--preset smoke`."""

import json
import os

import numpy as np
import pytest

from evaluation import replicate, report


def test_niah_study_batches_and_scored_positions():
  cfg = replicate.PRESETS["full"].for_task("mk_niah_1")
  assert cfg.mixers == replicate.PRESETS["full"].mixers and cfg.runs == replicate.PRESETS["full"].runs
  assert cfg.vocab_size >= replicate.tasks.WORD_VOCAB.vocab_size
  small = replicate.dataclasses.replace(cfg, batch_size=3, seeds=(0, 1), train_mix=((128, 4), (256, 4)))
  tok, tgt, msk = replicate.train_batch(small, 0)
  assert tok.shape == (2, 3, 256) and msk.shape == (2, 3, 256)
  # Every row scores exactly the 7 answer digits, right before its padding; the seeds draw different data.
  assert (msk.sum(-1) == replicate.NIAH_ANSWER_TOKENS).all()
  assert msk[0, 0, 127 - 6:128].all() and not msk[0, 0, 128:].any() and tok[0, 0, 128:].max() == 0
  assert not np.array_equal(tok[0], tok[1])
  setting, batches = next(replicate.eval_batches(replicate.dataclasses.replace(small, eval_examples=4,
                                                                               eval_batch_size=2)))
  assert setting.task == "mk_niah_1" and len(batches) == 2 and batches[0][0].shape == (2, 1024)


def test_study_config_rejects_an_unknown_task_and_a_small_vocabulary():
  with pytest.raises(ValueError, match="`task`"):
    replicate.StudyConfig(task="s_niah_9")
  with pytest.raises(ValueError, match="vocab_size"):
    replicate.StudyConfig(task="mk_niah_1", vocab_size=64)
  # An MQAR vocabulary too small for the test grid's 256 distinct keys fails when configured, not after training.
  with pytest.raises(ValueError, match="too small for 128 distinct keys"):
    replicate.config_from_args(replicate._parse(["--vocab-size", "256"]))
  assert replicate.config_from_args(replicate._parse(["--vocab-size", "1024"])).vocab_size == 1024
  with pytest.raises(SystemExit, match="MQAR"):
    replicate.config_from_args(replicate._parse(["--task", "mk_niah_1", "--vocab-size", "1024"]))


def test_merge_keeps_both_tasks_of_a_model_with_their_own_best_lr(tmp_path):
  runs = [{"label": f"lr={lr},seed=0", "lr": lr, "seed": 0} for lr in (1e-3, 1e-2)]

  def part(task, accs):
    name = "mqar T=64,pairs=4" if task == "mqar" else "mk_niah_1 T=128"
    s = {"task": task, "seq_len": 64 if task == "mqar" else 128, "num_pairs": 4,
         "per_run": [{"accuracy": a, "exact_match": a} for a in accs]}
    return {"meta": {"task": task, "device": "cpu:x"}, "models": {"gdn2": {"runs": runs, "steps_done": 5,
                                                                            "settings": {name: s}}}}

  paths = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
  json.dump(part("mqar", [0.9, 0.1]), open(paths[0], "w"))
  json.dump(part("mk_niah_1", [0.2, 0.6]), open(paths[1], "w"))
  merged = report.merge(paths)
  assert set(merged["models"]["gdn2"]["settings"]) == {"mqar T=64,pairs=4", "mk_niah_1 T=128"}
  row = report.summary(merged)["gdn2"]
  assert row["best_runs_by_task"] == {"mqar": ["lr=0.001,seed=0"], "mk_niah_1": ["lr=0.01,seed=0"]}
  assert row["settings"]["mk_niah_1 T=128"]["exact_match"]["mean"] == pytest.approx(0.6)
  assert "different step counts" not in merged["meta"]["note"]


@pytest.mark.slow
def test_smoke_preset_runs_the_whole_pipeline(tmp_path):
  out, cache = tmp_path / "out", tmp_path / "cache"
  assert replicate.main(["--preset", "smoke", "--task", "all", "--out", str(out), "--cache-dir", str(cache)]) == 0
  for task in replicate.TASKS:
    part = json.load(open(out / task / "results.json"))
    assert {"device", "date", "command"} <= set(part["meta"]) and part["meta"]["task"] == task
    assert set(part["models"]) == {"gdn2", "attention"} and not part["failed"]
  merged = json.load(open(out / "results.json"))
  assert {"device", "date", "command"} <= set(merged["meta"])
  tasks_seen = {s["task"] for s in merged["models"]["gdn2"]["settings"].values()}
  assert tasks_seen == set(replicate.TASKS)
  assert os.listdir(cache)  # the compiled programs were stored for the next call
  assert "mk_niah_1" in open(out / "results.md").read()
