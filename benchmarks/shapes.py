"""The benchmark shapes, one home: `(B, T, H, K, V)` of the op benchmarks (docs/algorithm.md section 10).

bf16 inputs, H = 16 heads of K = V = 128 (the paper's layer) at three batch x length splits of 16K-32K tokens.
"""

# The op benchmark (`bench_ops.py`): every implementation at each of these.
OP_SHAPES = ((8, 2048, 16, 128, 128), (2, 8192, 16, 128, 128), (1, 32768, 16, 128, 128))
# The shape single-shape timings use (`kernel_times.py`, `bench_chunk.py`, `bench_ops.py --probe`).
HEADLINE_SHAPE = OP_SHAPES[0]
# A tiny shape for checking on a CPU (interpret mode) that a GPU script runs.
SMOKE_SHAPE = (1, 128, 2, 32, 32)
