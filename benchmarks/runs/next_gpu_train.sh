#!/usr/bin/env bash
# The 1.3B configs' training throughput with packed documents (#11's last item), on nvidia-h100-x1 (the paper's
# one-H100 figures: hybrid 38.0 Kt/s at 2K x 8, 36.1 at 16K x 1). One call per attention implementation:
#   IMPL=pallas bash benchmarks/runs/next_gpu_train.sh     (then IMPL=xla; cudnn only without segment ids)
# Each run: the hybrid at 16K x 1 and 2K x 8, with and without documents of mean length 1K (segment ids); the
# bar: with segment ids the 16K x 1 step stays within 5% of the run without them. Writes $OUT/bench_train.jsonl.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 560 python3 benchmarks/bench_train.py --attention-impl "${IMPL:-pallas}" --budget-s 450 --steps 3 \
  --runs "${RUNS:-hybrid:16384x1,hybrid:16384x1@1024,hybrid:2048x8,hybrid:2048x8@1024}"
