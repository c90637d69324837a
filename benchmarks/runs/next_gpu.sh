#!/usr/bin/env bash
# The next kernel call (~9 min; every step has its own timeout, the least needed last; written in session 14, which
# got no machine for it): the forward's new variants end to end at B8 T2048 against the default in one process: chunk_fwd split in two kernels (`split_wy`), `early_terms`, 8 warps, diag_fwd's pairs by levels of
# halves (`diag_pairs=levels`, diag_fwd and diag_bwd); accuracy against float64 of the default and of all of them together; the fastest
# forward then at the two long shapes beside the default; fla in the same call; diag_fwd by levels alone under
# three tilings and the fastest variant's chunk_fwd alone; the study's gdn2 stepped by the chunk and Pallas backends.
# Run from the repository root with .whl carried; writes under $OUT (fastest variant in $OUT/best.json).
set -uo pipefail
source benchmarks/runs/fla_env.sh
W8='["chunk_fwd", {"block_k": 32, "num_warps": 8}]'
ALL='"split_wy": true, "early_terms": true, "diag_pairs": "levels", "tilings": ['"$W8"']'
VARIANTS='[{"early_terms": true, "_e2e": true},
 {"split_wy": true, "early_terms": true, "tilings": ['"$W8"'], "_e2e": true},
 {"diag_pairs": "levels", "_e2e": true},
 {"diag_pairs": "levels", "early_terms": true, "_e2e": true},
 {'"$ALL"', "_e2e": true}]'
step "variants at B8 T2048; accuracy"
mkdir -p $OUT/b8; OUT=$OUT/b8 timeout 200 python3 benchmarks/kernel_times.py --no-kernels --budget-s 185 --check \
  --check-configs '[{}, {'"$ALL"'}]' --configs "$VARIANTS" 2>&1 | grep -v "^E12\|^W12\|^I12"
python3 - "$OUT/b8/kernel_times.json" "$VARIANTS" > $OUT/best.json <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))["e2e"]
variants = json.loads(sys.argv[2])
fw = [(v["ms"], k) for k, v in res.items() if k.startswith("fwd[") and "ms" in v and k != "fwd[default]"]
best = min(fw)[1][4:-1] if fw else ""
for v in variants:
  label = ",".join(f"{a}={x}" for a, x in v.items() if a not in ("_e2e", "_kernels", "tiling"))
  if label == best:
    print(json.dumps(v)); break
else:
  print(json.dumps(variants[3]))
PY
BEST=$(cat $OUT/best.json)
echo "fastest forward variant: $BEST"
step "default and the fastest at the three shapes"
mkdir -p $OUT/long; OUT=$OUT/long timeout 90 python3 benchmarks/kernel_times.py --no-kernels --budget-s 80 \
  --e2e-shapes --configs "[$BEST]" 2>&1 | grep -v "^E12\|^W12\|^I12"
step "fla, same machine"
timeout 90 python3 benchmarks/bench_ops.py --fla-only --fla-repeats 3 | tail -12
step "kernels alone"
CFG=$(python3 -c "import json,sys; v=json.loads(sys.argv[1]); v.pop('_e2e', None); print(json.dumps(v))" "$BEST")
LV='{"diag_pairs": "levels", "_kernels": ["diag_fwd"]'
KV='[{"diag_pairs": "levels", "_kernels": ["diag_fwd", "diag_bwd"]},
 '"$LV"', "tilings": [["diag_fwd", {"block_k": 32, "num_warps": 4}]]},
 '"$LV"', "tilings": [["diag_fwd", {"block_k": 16, "num_warps": 1}]]},
 '"$(python3 -c "import json,sys; v=json.loads(sys.argv[1]); v['_kernels']=['chunk_fwd']; print(json.dumps(v))" "$CFG")"']'
mkdir -p $OUT/alone; OUT=$OUT/alone timeout 75 python3 benchmarks/kernel_times.py --budget-s 65 --configs "$KV" \
  2>&1 | grep -v "^E12\|^W12\|^I12"
step "the study's gdn2: ms per step, chunk and Pallas backends"
for B in chunk pallas; do
  BACKEND=$B STEPS=150 TRAIN_S=50 DEADLINE_S=70 OUT=$OUT/study_$B timeout 80 bash experiments/run_study_gpu.sh \
    mqar gdn2 2>&1 | grep -E "compiled|timing|trained|rror" | head -8
done
step "done"
