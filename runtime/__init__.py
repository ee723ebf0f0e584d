"""attncc run time (importable as ``attncc.runtime``): loading generated kernels,
the on-disk cache, block tables, autotuning and torch custom ops."""

from .configs import CPU_CONFIG, Config, backward_candidates, forward_candidates
from .kernel import CompiledAttention, Launch, capture
from .sparse import BlockSparse

__all__ = ["BlockSparse", "topk_blocks", "topk_blocks_reference", "gather_attention", "gather_attention_reference", "merge_state", "merge_states", "merge_states_reference", "cascade", "CompiledAttention", "Config", "CPU_CONFIG", "Launch", "capture", "forward_candidates", "backward_candidates"]


def __getattr__(name):
    """``topk_blocks`` / ``topk_blocks_reference`` (:mod:`.routing`) and ``gather_attention`` /
    ``gather_attention_reference`` (:mod:`.gather`) and ``merge_state`` / ``merge_states`` /
    ``merge_states_reference`` / ``cascade`` (:mod:`.merge`) imported on first use (those modules import
    triton at import time; the rest of the package imports it lazily)."""
    if name in ("topk_blocks", "topk_blocks_reference"):
        from . import routing

        return getattr(routing, name)
    if name in ("gather_attention", "gather_attention_reference"):
        from . import gather

        return getattr(gather, name)
    if name in ("merge_state", "merge_states", "merge_states_reference", "cascade"):
        from . import merge

        return getattr(merge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
