# Sourced by the GPU call scripts (run from the repository root with .whl carried): fla's wheels on the path,
# its autotuning records as Triton's cache, `step NAME` to log elapsed seconds.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/fla*.whl .whl/flash*.whl
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=/tmp/tcache
mkdir -p /tmp/tcache && cp -r benchmarks/fla_autotune/* /tmp/tcache/
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
T0=$(date +%s)
step() { echo "=== $1 at $(( $(date +%s) - T0 )) s"; }
