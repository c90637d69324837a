"""The GDN-2 chunk kernels, forward and backward in one namespace (the kernels live in `forward` and `backward`)."""

from pallas_kernels.gdn2.backward import (ContractCotangents, QkGrads, StateCotangents, SubBlockCotangents,
                                          WyCotangents, contract, diag_bwd, pairs_bwd, state_bwd, wy_bwd)
from pallas_kernels.gdn2.common import ChunkShape, Layout, segment_scan
from pallas_kernels.gdn2.forward import (ChunkTerms, StatePass, SubBlockPairs, chunk_fwd, diag_fwd, out_fwd,
                                         segment_maps, state_fwd)

__all__ = ["ChunkShape", "Layout", "segment_scan", "SubBlockPairs", "ChunkTerms", "StatePass", "diag_fwd", "chunk_fwd",
           "state_fwd", "segment_maps", "out_fwd", "StateCotangents", "ContractCotangents", "WyCotangents",
           "SubBlockCotangents", "QkGrads", "state_bwd", "contract", "wy_bwd", "diag_bwd", "pairs_bwd"]
