"""The paper's 1.3B hybrid (GDN-2 / SWA alternating) with the same recipe as `configs/paper_1p3b.py`."""

import dataclasses
import importlib.util
import os

from gdn2_jax.models import ModelConfig

_spec = importlib.util.spec_from_file_location("_paper_1p3b", os.path.join(os.path.dirname(__file__), "paper_1p3b.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  cfg = _base.get_config(ModelConfig.paper_1p3b_hybrid(remat="full", backend="auto"))
  return dataclasses.replace(cfg, run_dir="runs/paper_1p3b_hybrid")
