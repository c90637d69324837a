#!/usr/bin/env bash
# 2026-12-07 (session 12), first GPU call: where the forward's time goes, and two forward levers.
# (The settings it times, pass_products, split_chunk_fwd and output_in_pass, lost and were removed afterwards:
# benchmarks/results_ops.md, section of 2026-12-07 18:48.)
# Run from the repository root on the GPU machine, with .whl carried. Writes under $OUT.
set -uo pipefail
source benchmarks/runs/fla_env.sh
step "e2e variants + accuracy"
timeout 280 python3 benchmarks/kernel_times.py --no-kernels --budget-s 250 --check \
  --check-configs '[{}, {"pass_products": "input"}, {"split_chunk_fwd": true, "pass_products": "input"}]' \
  --configs '[{"pass_products": "input", "_e2e": true}, {"split_chunk_fwd": true, "_e2e": true},
              {"output_in_pass": true, "pass_products": "input", "_e2e": true},
              {"tiling": {"chunk_fwd": {"num_warps": 8}}, "_e2e": true}]'
mv $OUT/kernel_times.json $OUT/kernel_times_e2e.json 2>/dev/null
step "in-op kernel times (profiler traces), ours and fla"
timeout 140 python3 benchmarks/trace_kernels.py --shapes 8,2048 1,32768
step "chunk_fwd stage ablation"
timeout 110 python3 benchmarks/ablate_kernels.py --reps 10
step "done"
