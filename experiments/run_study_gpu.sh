#!/usr/bin/env bash
# The replication study (MQAR and MK-NIAH-1, `--preset full`) on one lent GPU, one mixer (or a few) per call:
#
#   bash experiments/run_study_gpu.sh TASK MIXERS     TASK = mqar | niah; MIXERS = gdn2 | kda | gdn2_b_only | ...
#   python -m evaluation.report experiments/study_full experiments/study_full/*/results.json    # merge (any CPU)
#
# The seven mixers: gdn2, kda, gdn2_b_only, gdn2_w_only, gdn, deltanet, attention. Every mixer trains its 3 lrs x
# 2 seeds as one vmapped program (lr is a traced input), so it compiles once per task. Every part of a task trains
# the same batches for STEPS steps (defaults: MQAR 5000, the preset's count, about 6.5 min per mixer on an H100 at
# 76 ms per step; MK-NIAH-1 3000); TRAIN_S is only a safety net that lowers the step count when a part would not
# fit its call: check `steps_done` (the merge warns).
# Results: ${OUT:-experiments/study_full}/TASK-MIXERS/ (results.json with device, date and command; log.txt;
# tables; plots; gdn2_params.npz where gdn2 trained, for evaluation.memory_viz). Compiled programs go to
# build/jax_cache (ignored by git, so it stays on a warm machine between calls): a rerun of a part after a killed
# call loads them instead of compiling.
# Environment: STEPS, TRAIN_S (default 470), DEADLINE_S (default 570, evaluation included), BACKEND (default chunk;
# pallas where it steps faster on the GPU), EXTRA (more replicate arguments). Give the call timeout_s=600 and
# carry=[".whl"] (the flax/optax wheels, as experiments/run_mqar_gpu.sh) when the machine lacks flax and optax.
set -uo pipefail
TASK_ARG=${1:?usage: run_study_gpu.sh mqar|niah MIXER[,MIXER...]}
MIXERS=${2:?usage: run_study_gpu.sh mqar|niah MIXER[,MIXER...]}
case "$TASK_ARG" in
  mqar) TASK=mqar; DEFAULT_STEPS=5000 ;;
  niah) TASK=mk_niah_1; DEFAULT_STEPS=3000 ;;  # a CPU probe (2026-12-08) left the plateau at 600-1100 steps
  *) echo "unknown task $TASK_ARG; use mqar or niah" >&2; exit 2 ;;
esac
PART=$TASK_ARG-${MIXERS//,/_}
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
  --backend "${BACKEND:-chunk}" --time-limit "${TRAIN_S:-470}" --deadline "${DEADLINE_S:-570}" \
  --compile-threads 1 --cache-dir build/jax_cache --out "$OUTDIR" ${EXTRA:-}
