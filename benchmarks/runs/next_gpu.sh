#!/usr/bin/env bash
# The op measured as committed, in one call of about 6 minutes (re-run it after any kernel change; first used
# 2026-12-07, session 13: benchmarks/results_ops.md, first section):
#   1. ours at the three shapes with GPU accuracy against float64, and fla in the same call (#11);
#   2. every kernel alone (bytes moved, fraction of the copy rate) and chunk_fwd's stage ablation (#11);
#   3. per-kernel in-op times, ours and fla's (#11);
#   4. the context-parallel split's extra work (#16).
# Variants: E2E_VARIANTS (the op at the three shapes, `kernel_times.py --configs` JSON with `_e2e: true`) and
# VARIANTS (kernels alone); both default to `early_terms` (chunk_fwd's second loop without the `rev` gate sums).
# Run from the repository root with .whl carried; writes under $OUT.
set -uo pipefail
source benchmarks/runs/fla_env.sh
E2E_VARIANTS=${E2E_VARIANTS:-'[{"early_terms": true, "_e2e": true}]'}
VARIANTS=${VARIANTS:-'[{"early_terms": true, "_kernels": ["chunk_fwd"]}]'}
step "ours at three shapes, accuracy"
timeout 150 python3 benchmarks/kernel_times.py --no-kernels --budget-s 130 --e2e-shapes --check \
  --check-configs '[{}, {"early_terms": true}]' --configs "$E2E_VARIANTS"
step "fla, same machine"
timeout 100 python3 benchmarks/bench_ops.py --fla-only --fla-repeats 3 | tail -12
step "chunk_fwd and diag_fwd stages"
timeout 60 python3 benchmarks/ablate_kernels.py --reps 10 2>&1 | grep -E "ms$"
step "every kernel alone; variants"
mkdir -p $OUT/alone; OUT=$OUT/alone timeout 110 python3 benchmarks/kernel_times.py --budget-s 100 \
  --configs "$VARIANTS" 2>&1 | grep -v "^E12\|^W12\|^I12"
step "in-op kernel times"
timeout 70 python3 benchmarks/trace_kernels.py --shapes 8,2048 2>&1 | grep -v "^E12\|^W12"
step "context split"
timeout 130 python3 benchmarks/bench_context.py --budget-s 100
step "done"
