"""GPU kernels for the GDN-2 family (depends on jax alone). See README.md."""

from pallas_kernels.gdn2 import CHUNK, ChunkConfig, chunk_gdn2

__all__ = ["chunk_gdn2", "ChunkConfig", "CHUNK"]
