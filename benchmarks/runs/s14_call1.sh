#!/usr/bin/env bash
# Session 14, first kernel call (~6 min): chunk_fwd split in two kernels (`split_wy`), early_terms, and 8 warps,
# end to end at B8 T2048 against the default in one process; the fastest forward variant then at the two long
# shapes beside the default; fla in the same call; kernels alone; in-op trace of the fastest.
# Run from the repository root with .whl carried; writes under $OUT.
set -uo pipefail
source benchmarks/runs/fla_env.sh
W8='["chunk_fwd", {"block_k": 32, "num_warps": 8}]'
VARIANTS='[{"early_terms": true, "_e2e": true},
 {"split_wy": true, "early_terms": true, "_e2e": true},
 {"split_wy": true, "early_terms": true, "tilings": ['"$W8"'], "_e2e": true},
 {"split_wy": true, "tilings": ['"$W8"'], "_e2e": true},
 {"split_wy": true, "early_terms": true, "native_tf32x3": true, "tilings": ['"$W8"'], "_e2e": true},
 {"early_terms": true, "tilings": ['"$W8"'], "_e2e": true},
 {"split_wy": true, "early_terms": true, "tilings": ['"$W8"', ["wy_fwd", {"block_k": 64}]], "_e2e": true}]'
step "variants at B8 T2048, accuracy of the split"
mkdir -p $OUT/b8; OUT=$OUT/b8 timeout 200 python3 benchmarks/kernel_times.py --no-kernels --budget-s 180 --check \
  --check-configs '[{}, {"split_wy": true, "early_terms": true, "tilings": ['"$W8"']}]' --configs "$VARIANTS" \
  2>&1 | grep -v "^E12\|^W12\|^I12"
BEST=$(python3 - "$OUT/b8/kernel_times.json" "$VARIANTS" <<'PY'
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
  print(json.dumps(variants[1]))
PY
)
echo "fastest forward variant: $BEST"
step "default and the fastest at the three shapes"
mkdir -p $OUT/long; OUT=$OUT/long timeout 160 python3 benchmarks/kernel_times.py --no-kernels --budget-s 150 \
  --e2e-shapes --configs "[$BEST]" 2>&1 | grep -v "^E12\|^W12\|^I12"
step "fla, same machine"
timeout 100 python3 benchmarks/bench_ops.py --fla-only --fla-repeats 3 | tail -12
step "kernels alone, the fastest's chunk_fwd"
CFG=$(python3 -c "import json,sys; v=json.loads(sys.argv[1]); v.pop('_e2e'); print(json.dumps(v))" "$BEST")
KV=$(python3 -c "import json,sys; v=json.loads(sys.argv[1]); v['_kernels']=['chunk_fwd']; print(json.dumps([v]))" "$CFG")
mkdir -p $OUT/alone; OUT=$OUT/alone timeout 90 python3 benchmarks/kernel_times.py --budget-s 80 --configs "$KV" \
  2>&1 | grep -v "^E12\|^W12\|^I12"
step "in-op kernel times, the fastest"
timeout 70 python3 benchmarks/trace_kernels.py --shapes 8,2048 --no-fla --config "$CFG" 2>&1 | grep -v "^E12\|^W12"
step "done"
