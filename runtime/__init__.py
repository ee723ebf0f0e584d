"""attncc run time (importable as ``attncc.runtime``): loading generated kernels,
the on-disk cache, block tables, autotuning and torch custom ops."""

from .configs import CPU_CONFIG, Config, backward_candidates, forward_candidates
from .kernel import CompiledAttention, Launch, capture
from .routing import topk_blocks, topk_blocks_reference
from .sparse import BlockSparse

__all__ = ["BlockSparse", "topk_blocks", "topk_blocks_reference", "CompiledAttention", "Config", "CPU_CONFIG", "Launch", "capture", "forward_candidates", "backward_candidates"]
