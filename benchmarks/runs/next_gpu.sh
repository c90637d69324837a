#!/usr/bin/env bash
# The measurements waiting for a GPU (written 2026-12-07, session 12), in one call of about 6 minutes:
#   1. the op as committed at the three shapes (ours) with its GPU accuracy, and fla in the same call (#11);
#   2. diag_fwd's product form against the exp of sums it replaced, in one run, and its segment sums by prefix sums
#      (`gate_sums='scan'`) against the masked products (#11);
#   3. per-kernel in-op times, ours and fla's (#11);
#   4. the context-parallel split's extra work with the transition from the kernels (#16).
# Run from the repository root with .whl carried; writes under $OUT.
set -uo pipefail
source benchmarks/runs/fla_env.sh
step "ours at three shapes, accuracy"
timeout 200 python3 benchmarks/kernel_times.py --no-kernels --budget-s 180 --e2e-shapes --check \
  --check-configs '[{}, {"gate_sums": "scan"}]' --configs '[{"gate_sums": "scan", "_e2e": true}]'
step "fla, same machine"
timeout 100 python3 benchmarks/bench_ops.py --fla-only --fla-repeats 3 | tail -12
step "diag_fwd product form vs exp of sums; chunk_fwd stages"
timeout 60 python3 benchmarks/ablate_kernels.py --reps 10 2>&1 | grep -E "ms$"
step "in-op kernel times"
timeout 70 python3 benchmarks/trace_kernels.py --shapes 8,2048 2>&1 | grep -v "^E12\|^W12"
step "context split"
timeout 150 python3 benchmarks/bench_context.py --budget-s 120
step "done"
