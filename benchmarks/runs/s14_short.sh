#!/usr/bin/env bash
# Session 14, the short call (~4 min; what was left of the device time after failed starts): the forward's new
# variants end to end at B8 T2048 against the default in one process, accuracy against float64 of all of them
# together, the fastest forward at the two long shapes beside the default. No fla (its figures: the same script's
# big sibling s14_call1.sh). Run from the repository root with .whl carried; writes under $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
T0=$(date +%s)
step() { echo "=== $1 at $(( $(date +%s) - T0 )) s"; }
W8='["chunk_fwd", {"block_k": 32, "num_warps": 8}]'
ALL='"split_wy": true, "early_terms": true, "diag_pairs": "levels", "tilings": ['"$W8"']'
VARIANTS='[{"early_terms": true, "_e2e": true},
 {"split_wy": true, "early_terms": true, "tilings": ['"$W8"'], "_e2e": true},
 {"diag_pairs": "levels", "_e2e": true},
 {"diag_pairs": "levels", "early_terms": true, "_e2e": true},
 {'"$ALL"', "_e2e": true}]'
step "variants at B8 T2048; accuracy"
mkdir -p $OUT/b8; OUT=$OUT/b8 timeout 150 python3 benchmarks/kernel_times.py --no-kernels --budget-s 140 --check \
  --check-configs '[{'"$ALL"'}]' --configs "$VARIANTS" 2>&1 | grep -v "^E12\|^W12\|^I12"
step "levels, early_terms at the long shapes"
mkdir -p $OUT/long; OUT=$OUT/long timeout 70 python3 benchmarks/kernel_times.py --no-kernels --budget-s 60 \
  --e2e-shapes --configs '[{"diag_pairs": "levels", "early_terms": true, "_e2e": true}]' 2>&1 | grep -v "^E12\|^W12\|^I12"
step "done"
