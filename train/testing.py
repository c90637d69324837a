"""Small corpora and configs for the training tests (fast on a 2-core CPU)."""

from __future__ import annotations

import json
import os
import random

from train.config import CheckpointConfig, DataConfig, MeshConfig, OptimConfig, TrainConfig

WORDS = ("the state decays every channel while the erase gate reads keys and the write gate scales values so "
         "memory forgets slowly or quickly depending on context tokens arrive in chunks of sixty four and each "
         "head keeps a matrix of keys by values in float32 precision the model learns which facts to keep").split()


def write_corpus(path: str, n_docs: int = 240, seed: int = 0, words_per_doc: tuple[int, int] = (20, 80)) -> str:
  """Writes `n_docs` pseudo-text documents as jsonl rows `{"text": ...}` (deterministic in `seed`)."""
  rng = random.Random(seed)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    for i in range(n_docs):
      n = rng.randint(*words_per_doc)
      text = f"document {i}: " + " ".join(rng.choice(WORDS) for _ in range(n)) + "."
      f.write(json.dumps({"text": text, "id": i}) + "\n")
  return path


def tiny_model(**kw):
  from gdn2_jax.models import ModelConfig
  base = dict(vocab_size=300, d_model=64, n_layers=1, mlp_hidden=128, num_heads=2, head_k_dim=32, head_v_dim=32,
              swa_heads=2, window=16, max_seq_len=32, chunk_size=16, backend="recurrent")
  base.update(kw)
  return ModelConfig.tiny(**base)


def tiny_config(tmp: str, corpus: str, **kw) -> TrainConfig:
  """A TrainConfig that trains `tiny_model()` on `corpus` in `tmp` (float32, CPU, seconds per run)."""
  cfg = TrainConfig(
      model=kw.pop("model", tiny_model()),
      data=DataConfig(path=corpus, vocab_size=300, seq_len=32, cache_dir=os.path.join(tmp, "cache"),
                      heldout_fraction=0.1),
      optim=OptimConfig(lr=3e-3, warmup_steps=2),
      checkpoint=CheckpointConfig(dir=os.path.join(tmp, "ckpt"), every=3, keep=2),
      mesh=MeshConfig(data=1),
      run_dir=os.path.join(tmp, "run"),
      steps=6, batch_size=4, eval_every=0, eval_batches=0, log_every=1, progress=False)
  import dataclasses
  return dataclasses.replace(cfg, **kw)
