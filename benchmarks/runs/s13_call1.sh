#!/usr/bin/env bash
# Session 13's first call (H100, 2026-12-07 21:50 UTC, commit 6117c51; its variants were removed after it):
#   1. the op as committed at the three shapes (ours) with its GPU accuracy, and fla in the same call (#11);
#   2. diag_fwd's product form against the exp of sums it replaced, in one run, and its segment sums by prefix sums
#      (`gate_sums='scan'`) against the masked products (#11);
#   3. per-kernel in-op times, ours and fla's (#11);
#   4. the context-parallel split's extra work with the transition from the kernels (#16).
# Run from the repository root with .whl carried; writes under $OUT.
set -uo pipefail
source benchmarks/runs/fla_env.sh
step "ours at three shapes, accuracy"
timeout 180 python3 benchmarks/kernel_times.py --no-kernels --budget-s 160 --e2e-shapes --check \
  --check-configs '[{}, {"gate_sums": "scan"}]' --configs '[{"gate_sums": "scan", "_e2e": true}]'
step "fla, same machine"
timeout 100 python3 benchmarks/bench_ops.py --fla-only --fla-repeats 3 | tail -12
step "diag_fwd product form vs exp of sums; chunk_fwd stages"
timeout 60 python3 benchmarks/ablate_kernels.py --reps 10 2>&1 | grep -E "ms$"
step "every kernel alone (bytes, fraction of copy rate); diag_fwd with 2 or 4 sub-blocks per program"
mkdir -p $OUT/alone; OUT=$OUT/alone timeout 110 python3 benchmarks/kernel_times.py --budget-s 100 --configs "$(cat benchmarks/runs/s13_diag_variants.json)" \
  2>&1 | grep -v "^E12\|^W12\|^I12"
step "in-op kernel times"
timeout 70 python3 benchmarks/trace_kernels.py --shapes 8,2048 2>&1 | grep -v "^E12\|^W12"
step "context split"
timeout 130 python3 benchmarks/bench_context.py --budget-s 100
step "done"
