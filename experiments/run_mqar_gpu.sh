#!/usr/bin/env bash
# The MQAR replication on one lent GPU, in one call (see benchmarks/results_eval.md).
#   TRAIN_S: training budget in seconds for all mixers together (the step count is fixed from it after 6 timed
#   rounds, the same for every mixer); DEADLINE_S: wall seconds by which evaluation must be done; OUTDIR: results.
# The full study: TRAIN_S=1100 DEADLINE_S=1190 (about 20 minutes of H100 time, several calls' worth).
set -uo pipefail
W=.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $W/flax-0.12.10-*.whl $W/optax-0.2.8-*.whl $W/treescope-*.whl $W/etils-*.whl $W/msgpack-*.whl $W/rich-*.whl \
  $W/markdown_it_py-*.whl $W/mdurl-*.whl $W/pygments-*.whl $W/absl_py-*.whl $W/pyyaml-*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m evaluation.replicate --preset full --eval-examples 64 --time-limit "${TRAIN_S:-60}" \
  --deadline "${DEADLINE_S:-170}" --out "${OUTDIR:-experiments/mqar_gpu}" --no-plots "$@"
