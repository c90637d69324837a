"""The paper's 1.3B recipe (docs/algorithm.md section 7) on GPUs: 4K context, 0.5M tokens per step, AdamW 4e-4.

    python -m train.main --config configs/paper_1p3b.py data.path=/data/fineweb-edu/*.jsonl \
        data.tokenizer=/data/tokenizer.json mesh.fsdp=-1 mesh.data=1

The hybrid model: `--config configs/paper_1p3b_hybrid.py`. 128 x 4096 tokens per step = 0.5M; raise
`optim.grad_accum` to fit fewer GPUs (the global batch stays 128).
"""

from gdn2_jax.models import ModelConfig
from train.config import CheckpointConfig, DataConfig, MeshConfig, OptimConfig, TrainConfig

TOTAL_TOKENS = 100e9
TOKENS_PER_STEP = 128 * 4096


def get_config(model: ModelConfig = None) -> TrainConfig:
  steps = int(TOTAL_TOKENS // TOKENS_PER_STEP)
  return TrainConfig(
      model=model or ModelConfig.paper_1p3b_recurrent(remat="full", backend="auto"),
      # streaming: the corpus is tokenised shard by shard into a memory-mapped token store (train/token_store.py);
      # or data.path=STORE after `python -m train.token_store` (multi-host runs: write the store once, first).
      data=DataConfig(path=None, vocab_size=32000, seq_len=4096, max_corpus_mb=1e9, heldout_fraction=0.001,
                      cache_dir="runs/cache", streaming=True),
      optim=OptimConfig(lr=4e-4, warmup_fraction=0.01, weight_decay=0.1, clip_norm=1.0, grad_accum=1),
      checkpoint=CheckpointConfig(every=1000, keep=3),
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
      run_dir="runs/paper_1p3b",
      steps=steps, batch_size=128, eval_every=1000, eval_batches=16, log_every=10, progress=True)
