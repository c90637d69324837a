#!/usr/bin/env bash
# Session 14, second kernel call (~3 min): diag_fwd's pairs by levels alone under three tilings, chunk_fwd of the
# fastest variant alone (BEST: its JSON from the first call's best.json), and the in-op kernel times of BEST.
set -uo pipefail
source benchmarks/runs/fla_env.sh
BEST=${BEST:?the fastest variant of s14_call1.sh, as JSON}
CFG=$(python3 -c "import json,sys; v=json.loads(sys.argv[1]); v.pop('_e2e', None); print(json.dumps(v))" "$BEST")
LV='{"diag_pairs": "levels", "_kernels": ["diag_fwd"]'
KV='[{"diag_pairs": "levels", "_kernels": ["diag_fwd"]},
 '"$LV"', "tilings": [["diag_fwd", {"block_k": 32, "num_warps": 4}]]},
 '"$LV"', "tilings": [["diag_fwd", {"block_k": 16, "num_warps": 1}]]},
 '"$LV"', "tilings": [["diag_fwd", {"block_k": 64, "num_warps": 4}]]},
 '"$(python3 -c "import json,sys; v=json.loads(sys.argv[1]); v['_kernels']=['chunk_fwd']; print(json.dumps(v))" "$CFG")"']'
step "kernels alone"
mkdir -p $OUT/alone; OUT=$OUT/alone timeout 120 python3 benchmarks/kernel_times.py --budget-s 110 --configs "$KV" \
  2>&1 | grep -v "^E12\|^W12\|^I12"
step "in-op kernel times of the fastest"
timeout 80 python3 benchmarks/trace_kernels.py --shapes 8,2048 --no-fla --config "$CFG" 2>&1 | grep -v "^E12\|^W12"
step "done"
