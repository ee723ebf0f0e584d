"""attncc run time (importable as ``attncc.runtime``): loading generated kernels,
the on-disk cache, block tables, autotuning and torch custom ops."""

from .configs import CPU_CONFIG, Config, backward_candidates, forward_candidates
from .kernel import CompiledAttention, Launch, capture

__all__ = ["CompiledAttention", "Config", "CPU_CONFIG", "Launch", "capture", "forward_candidates", "backward_candidates"]
