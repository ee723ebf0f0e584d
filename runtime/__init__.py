"""attncc run time (importable as ``attncc.runtime``): loading generated kernels,
the on-disk cache, block tables, autotuning and torch custom ops."""

from .configs import CPU_CONFIG, Config, backward_candidates, forward_candidates
from .kernel import CompiledAttention, Launch, capture
from .sparse import BlockSparse

__all__ = ["BlockSparse", "topk_blocks", "topk_blocks_reference", "gather_attention", "gather_attention_reference", "CompiledAttention", "Config", "CPU_CONFIG", "Launch", "capture", "forward_candidates", "backward_candidates"]


def __getattr__(name):
    """``topk_blocks`` / ``topk_blocks_reference`` (:mod:`.routing`) and ``gather_attention`` /
    ``gather_attention_reference`` (:mod:`.gather`) imported on first use (those modules import
    triton at import time; the rest of the package imports it lazily)."""
    if name in ("topk_blocks", "topk_blocks_reference"):
        from . import routing

        return getattr(routing, name)
    if name in ("gather_attention", "gather_attention_reference"):
        from . import gather

        return getattr(gather, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
