#!/usr/bin/env bash
# The replication study (MQAR and MK-NIAH-1, `--preset full`) on one lent GPU, one part per call:
#
#   bash experiments/run_study_gpu.sh PART      PART = mqar_1 | mqar_2 | mqar_3 | niah_1 | niah_2 | niah_3
#   python -m evaluation.report experiments/study_full experiments/study_full/*/results.json    # merge (any CPU)
#
# Parts: *_1 = gdn2, kda; *_2 = gdn2_b_only, gdn2_w_only; *_3 = gdn, deltanet, attention. Every mixer trains its
# 3 lrs x 2 seeds as one vmapped program (lr is a traced input), so it compiles once per task. Every part of a task
# trains the same batches for STEPS steps (defaults: MQAR 2000 as specified, MK-NIAH-1 1000); TRAIN_S is only a
# safety net that lowers the step count when a part would not fit its call: check `steps_done` (the merge warns).
# Results: ${OUT:-experiments/study_full}/PART/ (results.json with device, date and command; log.txt; tables; plots;
# gdn2_params.npz in *_1 for evaluation.memory_viz). Compiled programs go to build/jax_cache (ignored by git, so it
# stays on a warm machine between calls): a rerun of a part after a killed call loads them instead of compiling.
# Estimate (benchmarks/results_eval.md): about 6-8 min per MQAR part and 5-7 min per MK-NIAH-1 part on an H100.
# Environment: STEPS, TRAIN_S (default 450), DEADLINE_S (default 570, evaluation included), BACKEND (default chunk;
# pallas where it compiles faster on the GPU), EXTRA (more replicate arguments). Give the call timeout_s=600 and
# carry=[".whl"] (the flax/optax wheels, as experiments/run_mqar_gpu.sh) when the machine lacks flax and optax.
set -uo pipefail
PART=${1:?usage: run_study_gpu.sh mqar_1|mqar_2|mqar_3|niah_1|niah_2|niah_3}
case "$PART" in
  mqar_*) TASK=mqar; DEFAULT_STEPS=2000 ;;
  niah_*) TASK=mk_niah_1; DEFAULT_STEPS=1000 ;;
esac
case "$PART" in
  *_1) MIXERS=gdn2,kda ;;
  *_2) MIXERS=gdn2_b_only,gdn2_w_only ;;
  *_3) MIXERS=gdn,deltanet,attention ;;
  *) echo "unknown part $PART; use mqar_1..3 or niah_1..3" >&2; exit 2 ;;
esac
if ! python3 -c "import flax, optax" 2>/dev/null; then
  W=.whl
  ls $W/flax-0.12.10-*.whl >/dev/null 2>&1 || { echo "flax/optax missing here and no flax wheel in .whl" >&2; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $W/flax-0.12.10-*.whl $W/optax-0.2.8-*.whl $W/treescope-*.whl $W/etils-*.whl $W/msgpack-*.whl $W/rich-*.whl \
    $W/markdown_it_py-*.whl $W/mdurl-*.whl $W/pygments-*.whl $W/absl_py-*.whl $W/pyyaml-*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
OUTDIR=${OUT:-experiments/study_full}/$PART
python3 -m evaluation.replicate --preset full --task "$TASK" --mixers "$MIXERS" --steps "${STEPS:-$DEFAULT_STEPS}" \
  --backend "${BACKEND:-chunk}" --time-limit "${TRAIN_S:-450}" --deadline "${DEADLINE_S:-570}" \
  --compile-threads 1 --cache-dir build/jax_cache --out "$OUTDIR" ${EXTRA:-}
