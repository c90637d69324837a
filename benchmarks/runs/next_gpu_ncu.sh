#!/usr/bin/env bash
# Nsight Compute counters of every kernel of one forward+backward, ours and fla's (DRAM bytes, occupancy, SM and
# tensor-core use): why chunk_fwd and diag_fwd take 2.2x fla's matching kernels (#11). About 3 minutes; the
# kernel names were checked in the 2026-12-07 traces (ours: gdn2_<kernel>). Run with .whl carried.
set -uo pipefail
source benchmarks/runs/fla_env.sh
step "ncu, ours then fla"
OUT=$OUT timeout 400 bash benchmarks/profile_ncu.sh
step "done"
