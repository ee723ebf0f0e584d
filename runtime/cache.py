"""On-disk cache of generated kernel modules (and autotuning choices).

Location: ``$ATTNCC_CACHE_DIR`` if set, else the user cache dir from
:mod:`platformdirs`. Each kernel lives in ``kernels/<key>/kernel.py`` with a
``meta.json`` holding the source's sha256; an entry whose source is missing,
does not match its hash or does not parse is rebuilt (so a corrupt cache heals).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """The attncc cache directory (created on demand)."""
    d = Path(os.environ.get("ATTNCC_CACHE_DIR") or platformdirs.user_cache_dir("attncc"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def digest(*parts: str) -> str:
    """sha256 hex digest of the parts (joined with NUL)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_or_build(key: str, build) -> tuple[Path, str, bool]:
    """Return ``(path, source, rebuilt)`` of the cached kernel module ``key``.

    ``build()`` produces the source when the entry is absent or corrupt.
    """
    d = cache_dir() / "kernels" / key
    src_path, meta_path = d / "kernel.py", d / "meta.json"
    try:
        src = src_path.read_text()
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") == hashlib.sha256(src.encode()).hexdigest():
            compile(src, str(src_path), "exec")
            return src_path, src, False
    except (OSError, ValueError, SyntaxError):
        pass
    src = build()
    _atomic_write(src_path, src)
    _atomic_write(meta_path, json.dumps({"sha256": hashlib.sha256(src.encode()).hexdigest()}))
    return src_path, src, True


def interpreting() -> bool:
    """True when Triton runs kernels under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


#: ``backend=`` values of the stand-alone kernels (:mod:`.routing`, :mod:`.gather`, :mod:`.merge`):
#: ``None`` (the Triton kernel on CUDA, the torch path on CPU), ``"torch"``, ``"triton"``,
#: ``"interpret"`` (the Triton kernel on CPU tensors under the interpreter)
KERNEL_BACKENDS = (None, "torch", "triton", "interpret")


def runs_kernel(fn: str, backend, device) -> bool:
    """Whether stand-alone kernel function ``fn`` (its name, for errors) runs its Triton kernel
    for ``backend`` (one of :data:`KERNEL_BACKENDS`, checked by the caller) on tensors of
    ``device`` (a ``torch.device``); ``False``: its torch path.

    Raises:
        RuntimeError: a Triton backend on CPU tensors without the interpreter, or
            ``"interpret"`` on non-CPU tensors.
    """
    if backend is None:
        return device.type == "cuda"
    if backend == "torch":
        return False
    if (backend == "interpret" or device.type == "cpu") and not interpreting():
        raise RuntimeError(f"{fn}: backend={backend!r} on {device} tensors needs the Triton interpreter "
                           "(TRITON_INTERPRET=1 before triton is imported); use backend='torch' on CPU")
    if backend == "interpret" and device.type != "cpu":
        raise RuntimeError(f"{fn}: backend='interpret' runs on CPU tensors; move the inputs to the CPU")
    return True


def load_module(path: Path, name: str):
    """Import the generated module at ``path`` (its kernels are interpreted or compiled
    according to ``TRITON_INTERPRET``, fixed when triton was first imported)."""
    mod_name = f"attncc_generated.{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[mod_name] = mod
    return mod


def read_json(name: str) -> dict:
    """Read ``<cache>/<name>`` as JSON ({} if absent or corrupt)."""
    try:
        return json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}


def write_json(name: str, data: dict) -> None:
    """Atomically write ``<cache>/<name>`` as JSON."""
    _atomic_write(cache_dir() / name, json.dumps(data, indent=1, sort_keys=True))
