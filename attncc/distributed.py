"""``attncc.distributed``: context-parallel attention on ``torch.distributed`` (issue 17).

The implementation lives in ``runtime/distributed.py`` (``attncc.runtime.distributed``);
this module is that module under its public name (the same object), so
``import attncc.distributed`` and ``from attncc.distributed import context_parallel`` work.
"""

import sys as _sys

from .runtime import distributed as _impl

_sys.modules[__name__] = _impl
