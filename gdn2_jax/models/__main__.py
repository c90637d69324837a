"""Prints the parameter counts of the preset models without allocating them: `python -m gdn2_jax.models`."""

from gdn2_jax.models import ModelConfig, count_params


def main() -> None:
  presets = {"tiny": ModelConfig.tiny(), "paper_1p3b_recurrent": ModelConfig.paper_1p3b_recurrent(),
             "paper_1p3b_hybrid": ModelConfig.paper_1p3b_hybrid()}
  print(f"{'preset':<24}{'blocks':>16}{'non-embedding':>16}{'all':>16}")
  for name, cfg in presets.items():
    counts = [count_params(cfg, part=p) for p in ("blocks", "non_embedding", "all")]
    print(f"{name:<24}" + "".join(f"{c:>16,}" for c in counts))


if __name__ == "__main__":
  main()
