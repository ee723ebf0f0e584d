"""attncc run time (importable as ``attncc.runtime``): loading generated kernels,
the on-disk cache, block tables, autotuning and torch custom ops."""

from .kernel import CPU_CONFIG, CUDA_CONFIGS, CompiledAttention, Config

__all__ = ["CompiledAttention", "Config", "CPU_CONFIG", "CUDA_CONFIGS"]
