"""A model that learns: the study's training and evaluation path (`evaluation.replicate`) takes a tiny GDN-2 model,
and the GDN-2 + attention hybrid, from chance to well above it on MQAR (T = 32, 4 pairs, vocabulary 64) on the CPU.

Chance is 1/64 over the vocabulary (1/32 once a model knows values come from the upper half); the bar is 50%. The
config is the study's preset `cpu_tiny` (d_model 32, 2 heads of 16, 600 steps x 64 sequences, lr 5e-3, fixed seed):
one [GDN-2, SwiGLU] block, which MQAR needs no more of (the short convolution puts each key beside its value), and
[GDN-2, SwiGLU] + [attention, SwiGLU] for the hybrid. At this size the recurrent backend runs a train step several
times faster than the chunk path on the CPU. Each test takes under a minute on the 2-core machine.
"""

import dataclasses

import pytest

from evaluation import replicate

CFG = replicate.PRESETS["cpu_tiny"]


@pytest.mark.parametrize("mixer,n_layers", [("gdn2", 1), ("gdn2+swa", 2)])
def test_tiny_model_learns_mqar(mixer, n_layers):
  cfg = dataclasses.replace(CFG, mixers=(mixer,), n_layers=n_layers)
  out = replicate.run_study(cfg, log=lambda msg: None, compile_threads=1)
  entry = out[mixer]
  assert "error" not in entry, entry.get("error")
  assert entry["steps_done"] == cfg.steps
  score = entry["settings"]["mqar T=32,pairs=4"]["per_run"][0]
  assert score["count"] == cfg.eval_examples * 4  # every query of every held-out sequence is scored
  print(f"{mixer}: {100 * score['accuracy']:.1f}% value accuracy after {cfg.steps} steps")
  assert score["accuracy"] >= 0.5, f"{mixer} reached only {100 * score['accuracy']:.1f}% value accuracy"
