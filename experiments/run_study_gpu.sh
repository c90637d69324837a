#!/usr/bin/env bash
# The replication study (MQAR and MK-NIAH-1, `--preset full`) on one lent GPU, one part per call:
#
#   bash experiments/run_study_gpu.sh PART            PART = mqar_a | mqar_b | niah_a | niah_b
#   python -m evaluation.report experiments/study_full \
#     experiments/study_full/mqar_a/results.json experiments/study_full/mqar_b/results.json \
#     experiments/study_full/niah_a/results.json experiments/study_full/niah_b/results.json   # merge (CPU)
#
# Parts: *_a = gdn2, gdn2_b_only, gdn2_w_only, kda; *_b = gdn, deltanet, attention (every mixer: 3 lrs x 2 seeds as
# one vmapped program, so each mixer compiles once per task). Every part trains the same batches for the same number
# of steps (STEPS, default the preset's 2000; check `steps_done` before comparing parts). Results go to
# ${OUT:-experiments/study_full}/PART/ (results.json with device, date and command; log.txt; tables; plots).
# Compiled programs are kept in build/jax_cache (ignored by git, so it stays on a warm machine between calls): a
# rerun of a part, or a part after a killed call, loads them instead of compiling again.
# Environment: TRAIN_S (training budget of the call, default 420 s: the step count is lowered to fit, the same for
# every mixer of the part), DEADLINE_S (default 560 s, evaluation included), BACKEND (default chunk; pallas where it
# compiles faster on the GPU), EXTRA (more replicate arguments). Run with the call's timeout at 600 s.
# Needs the flax/optax wheels in .whl/ (carry=[".whl"]) as experiments/run_mqar_gpu.sh.
set -uo pipefail
PART=${1:?usage: run_study_gpu.sh mqar_a|mqar_b|niah_a|niah_b}
case "$PART" in
  mqar_a) TASK=mqar; MIXERS=gdn2,gdn2_b_only,gdn2_w_only,kda ;;
  mqar_b) TASK=mqar; MIXERS=gdn,deltanet,attention ;;
  niah_a) TASK=mk_niah_1; MIXERS=gdn2,gdn2_b_only,gdn2_w_only,kda ;;
  niah_b) TASK=mk_niah_1; MIXERS=gdn,deltanet,attention ;;
  *) echo "unknown part $PART; use mqar_a, mqar_b, niah_a or niah_b" >&2; exit 2 ;;
esac
if [ -d .whl ]; then
  W=.whl
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
python3 -m evaluation.replicate --preset full --task "$TASK" --mixers "$MIXERS" --steps "${STEPS:-2000}" \
  --backend "${BACKEND:-chunk}" --time-limit "${TRAIN_S:-420}" --deadline "${DEADLINE_S:-560}" \
  --compile-threads 1 --cache-dir build/jax_cache --out "$OUTDIR" ${EXTRA:-}
