"""attncc: a compiler for attention patterns.

``.attn`` spec -> :mod:`attncc.dsl` (parse) -> :mod:`attncc.ir` (sympy IR) ->
:mod:`attncc.passes` (tile analysis) -> :mod:`attncc.codegen` (Triton source from
Jinja templates) -> :mod:`attncc.runtime` (cached, autotuned, torch custom op).

Public API::

    kern = attncc.compile(spec, pattern=None, **params)
    out = kern(q, k, v, scale=None, **tensors)
    out, lse = kern(q, k, v, return_lse=True)
    ref = attncc.reference(spec, q, k, v, pattern=None, scale=None, return_lse=False, **params_and_tensors)
"""

import os as _os
import sys as _sys

# On a machine without a GPU the kernels run under the Triton interpreter, which
# must be switched on before triton is first imported (triton.language's own
# @jit helpers are built at import time).
if "TRITON_INTERPRET" not in _os.environ and "triton" not in _sys.modules:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"

from .compiler import compile, explain, library_patterns, pattern_path
from .dense import reference
from .dsl import PatternSpec, parse
from .errors import SpecError
from .ir import AttentionIR, lower

__version__ = "0.1.0"

__all__ = ["compile", "reference", "explain", "parse", "lower", "SpecError", "PatternSpec", "AttentionIR",
           "library_patterns", "pattern_path", "__version__"]
