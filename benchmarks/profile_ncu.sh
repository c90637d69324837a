#!/usr/bin/env bash
# Nsight Compute per-kernel figures of one forward+backward, ours and fla's, at the headline shape (GPU machine).
#   bash benchmarks/profile_ncu.sh [CONFIG_JSON]      -> $OUT/ncu_pallas.csv, $OUT/ncu_fla.csv and two tables
set -uo pipefail
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
OUT=${OUT:-/tmp}
M=$(python3 benchmarks/profile_kernels.py --metrics)
CFG=${1:-'{}'}
N=$(JAX_PLATFORMS=cpu python3 benchmarks/profile_kernels.py --count-kernels --config "$CFG" 2>/dev/null | tail -1)
echo "Pallas kernels per step: $N"
timeout ${NCU_S:-180} "$NCU" --clock-control none --csv --page raw --metrics "$M" -k regex:gdn2_ --launch-skip $((3 * N)) --launch-count "$N" \
  python3 benchmarks/profile_kernels.py --impl pallas --config "$CFG" > "$OUT/ncu_pallas.csv" 2> "$OUT/ncu_pallas.err"
python3 benchmarks/profile_kernels.py --summarize "$OUT/ncu_pallas.csv" || tail -20 "$OUT/ncu_pallas.err"
if python3 -c "import fla" 2>/dev/null; then
  timeout ${NCU_S:-180} "$NCU" --clock-control none --csv --page raw --metrics "$M" --nvtx --nvtx-include "profile/" \
    python3 benchmarks/profile_kernels.py --impl fla > "$OUT/ncu_fla.csv" 2> "$OUT/ncu_fla.err"
  python3 benchmarks/profile_kernels.py --summarize "$OUT/ncu_fla.csv" || tail -20 "$OUT/ncu_fla.err"
fi
