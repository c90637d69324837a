import os

# Tests run on the CPU with 8 simulated devices, so the sharding tests see a mesh; compile caches stay per-process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
