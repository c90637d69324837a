#!/usr/bin/env bash
# 2026-12-07 (session 12), third GPU call: the fixtures again as one archive (a call returns few files), the
# chunk_fwd ablation, and our in-op kernel times at B1 T32768.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site2 .whl/*.whl
export PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo "=== $1 at $(( $(date +%s) - T0 )) s"; }
step "fla HF fixtures"
mkdir -p /tmp/fx
PYTHONPATH=/tmp/site2:. timeout 240 python3 benchmarks/make_fla_hf_fixtures.py --out /tmp/fx 2>&1 | grep -E "^(kda|gdn2|done)"
tar -C /tmp/fx -czf $OUT/fla_hf_fixtures.tgz . && ls -la $OUT
export PYTHONPATH=. 
step "chunk_fwd stage ablation"
timeout 80 python3 benchmarks/ablate_kernels.py --reps 10 2>&1 | grep -E "ms$"
step "in-op kernel times, B1 T32768"
timeout 60 python3 benchmarks/trace_kernels.py --shapes 1,32768 --no-fla 2>&1 | grep -v "^E1207\|^W1207"
step "done"
