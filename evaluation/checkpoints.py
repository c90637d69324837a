"""Restoring a `train/` run for evaluation: its model, model config, tokenizer and held-out tokens.

Model, config and tokenizer come from the checkpoint step itself through the one loader, `gdn2_jax.restore.restore`
(parameters only, onto the default device, so a run trained on a mesh of many devices restores on one). The
held-out tokens are the sample the training loop writes to `RUN_DIR/heldout_tokens.npy`. Neither the training
config's data section nor the corpus (or its cache) is read.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np

log = logging.getLogger("evaluation")

HELDOUT_SAMPLE = "heldout_tokens.npy"  # as train/loop.py writes it


def load_run(run_dir: str, step: Optional[int] = None, with_data: bool = True,
             tokenizer: Optional[str] = None) -> tuple[Any, Any, Any, Any]:
  """`(model, model_config, tokenizer or None, held-out token stream [N] or None)` of a `train/` run.

  `run_dir` may also be the run's checkpoint directory or one step directory. `tokenizer`: a tokenizer.json that
  replaces the saved one. The held-out stream is None when the run has no `heldout_tokens.npy` (one logged line).
  """
  from evaluation.evaluate import HFTokenizer
  from gdn2_jax import restore as restore_lib

  r = restore_lib.restore(run_dir, step=step, tokenizer=tokenizer)
  tok = HFTokenizer(r.tokenizer) if r.tokenizer is not None else None
  if tok is None:
    log.warning("%s; needle tasks use the built-in word vocabulary", restore_lib.missing_tokenizer_message(r.step_dir))
  stream = None
  if with_data:
    path = os.path.join(r.run_dir or os.path.abspath(run_dir), HELDOUT_SAMPLE)
    if os.path.isfile(path):
      stream = np.load(path).astype(np.int32)
    else:
      log.warning("no %s in the run directory (a run without a held-out split, or written before it was saved); "
                  "held-out perplexity is skipped: pass --ppl-tokens FILE.npy to score one", HELDOUT_SAMPLE)
  return r.model, r.config, tok, stream
