"""attncc: a compiler for attention patterns.

``.attn`` spec -> :mod:`attncc.dsl` (parse) -> :mod:`attncc.ir` (sympy IR) ->
:mod:`attncc.passes` (tile analysis) -> :mod:`attncc.codegen` (Triton source from
Jinja templates) -> :mod:`attncc.runtime` (cached, autotuned, torch custom op).

Public API::

    kern = attncc.compile(spec, pattern=None, **params)
    out = kern(q, k, v, scale=None, **tensors)
    out, lse = kern(q, k, v, return_lse=True)
    out = kern(q, k, v, block_mask=attncc.BlockSparse(kv_num_blocks, kv_indices, (BQ, BK)))
    out = kern(q, k, v, block_mask=attncc.topk_blocks(q, k, block_size=64, topk=8))
    out = attncc.gather_attention(q, k, v, kv_index, causal=True)   # per-token top-k lists
    out, lse = attncc.merge_state(out_a, lse_a, out_b, lse_b)           # partial attentions over disjoint keys
    out = attncc.cascade(prefix_kern, suffix_kern, q, prefix_k, prefix_v, suffix_k, suffix_v)  # shared prefix
    ref = attncc.reference(spec, q, k, v, pattern=None, scale=None, return_lse=False, **params_and_tensors)
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"  # the one source of the version (pyproject reads it)


def _has_gpu_device_nodes() -> bool:
    """Whether this machine has NVIDIA or AMD GPU device nodes (cheap: no torch import)."""
    return any(_os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))


def _select_backend() -> None:
    """On a machine without a GPU, switch Triton to its CPU interpreter
    (``TRITON_INTERPRET=1``); it must happen before triton is first imported (triton.language's
    own ``@jit`` helpers are built at import time). Without GPU device nodes this needs no
    torch import (so ``attncc --help`` / ``attncc check`` stay fast); with them, torch decides
    (``torch.cuda.is_available()``: a CPU-only torch build on a GPU machine also gets the
    interpreter). An explicit ``TRITON_INTERPRET`` in the environment always wins."""
    if "TRITON_INTERPRET" in _os.environ or "triton" in _sys.modules:
        return
    if _has_gpu_device_nodes():
        import torch as _torch

        if _torch.cuda.is_available():
            return
    _os.environ["TRITON_INTERPRET"] = "1"


_select_backend()

from .dsl import PatternSpec, parse  # noqa: E402  (light: no torch, no sympy)
from .errors import SpecError  # noqa: E402

#: public names imported on first use (torch, triton and sympy are not imported by ``import attncc``)
_LAZY = {"compile": "compiler", "explain": "compiler", "library_patterns": "library", "pattern_path": "library",
         "reference": "dense", "AttentionIR": "ir", "lower": "ir", "BlockSparse": "runtime",
         "topk_blocks": "runtime", "gather_attention": "runtime", "gather_attention_reference": "runtime",
         "merge_state": "runtime", "merge_states": "runtime", "cascade": "runtime"}


def __getattr__(name):
    """PEP 562: the public API imported lazily (``attncc.compile`` etc.), so that the command
    line's fast paths do not import torch or triton."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attncc' has no attribute {name!r}")


__all__ = ["compile", "reference", "BlockSparse", "topk_blocks", "gather_attention", "gather_attention_reference", "merge_state", "merge_states", "cascade", "explain", "parse", "lower", "SpecError", "PatternSpec", "AttentionIR",
           "library_patterns", "pattern_path", "__version__"]
