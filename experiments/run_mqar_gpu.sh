#!/usr/bin/env bash
# The MQAR replication on one lent GPU, in one call (see benchmarks/results_eval.md for what happened so far).
#   TRAIN_S: training budget in seconds for all mixers together (the step count is fixed from it after 6 timed
#     rounds, the same for every mixer); DEADLINE_S: wall seconds by which evaluation must be done;
#   COMPILE_S: compile budget (mixers not started by then are skipped and listed); OUTDIR: results.
#   Extra arguments go to `python -m evaluation.replicate` (e.g. --mixers gdn2,kda to split the study over calls).
# 2026-11-23: compiling all 7 mixers (train + eval programs, 8 threads) did not finish in ~150 s on the H100, so the
# default is now one mixer after another with a compile budget; XLA's GEMM autotuning is off to cut compile time
# (the models are tiny; untested on the GPU so far).
# The full study: TRAIN_S=1000 DEADLINE_S=1190 COMPILE_S=150, over several calls/sessions with --mixers subsets.
set -uo pipefail
W=.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $W/flax-0.12.10-*.whl $W/optax-0.2.8-*.whl $W/treescope-*.whl $W/etils-*.whl $W/msgpack-*.whl $W/rich-*.whl \
  $W/markdown_it_py-*.whl $W/mdurl-*.whl $W/pygments-*.whl $W/absl_py-*.whl $W/pyyaml-*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m evaluation.replicate --preset full --eval-examples 64 --time-limit "${TRAIN_S:-60}" \
  --deadline "${DEADLINE_S:-170}" --compile-threads 1 --compile-budget "${COMPILE_S:-60}" \
  --out "${OUTDIR:-experiments/mqar_gpu}" --no-plots "$@"
