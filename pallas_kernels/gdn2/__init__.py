"""GDN-2 chunkwise WY kernels (Pallas, Triton lowering): `tiles` (in-kernel math), `forward` and `backward`
(kernels), `common` (shapes, launch, block specs), `api` (the differentiable `chunk_gdn2`)."""

from pallas_kernels.gdn2.api import chunk_gdn2
from pallas_kernels.gdn2.config import CHUNK, ChunkConfig

__all__ = ["chunk_gdn2", "ChunkConfig", "CHUNK"]
