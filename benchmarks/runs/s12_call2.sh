#!/usr/bin/env bash
# 2026-12-07 (session 12), second GPU call: fla's own HF model fixtures (#12) and the context-parallel split's
# overhead (#16). Run from the repository root with .whl carried. Writes under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site2 .whl/*.whl
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
T0=$(date +%s)
step() { echo "=== $1 at $(( $(date +%s) - T0 )) s"; }
step "fla HF fixtures"
PYTHONPATH=/tmp/site2:. timeout ${FIX_S:-300} python3 benchmarks/make_fla_hf_fixtures.py --out $OUT 2>&1 \
  | grep -v -i "warn" | tail -30
step "context split overhead"
PYTHONPATH=. timeout ${CTX_S:-270} python3 benchmarks/bench_context.py --budget-s $(( ${CTX_S:-270} - 30 ))
step "done"
