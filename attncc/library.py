"""The pattern library shipped with attncc (``patterns/*.attn``, installed as
``attncc.patterns``): names, files and one-line descriptions. Light: parses specs only
(no torch, triton or sympy), so ``attncc list`` answers at once."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .dsl import PatternSpec, parse


def _patterns_dir() -> Path:
    try:
        p = Path(str(resources.files("attncc.patterns")))
        if p.is_dir() and any(p.glob("*.attn")):
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "patterns"


def _library(grid: bool | None):
    """(spec, file) of every library pattern, files in name order."""
    for f in sorted(_patterns_dir().glob("*.attn")):
        for p in parse(f.read_text(), str(f)):
            if grid is None or ("grid" in p.clauses) == grid:
                yield p, f


def library_patterns(grid: bool | None = None) -> dict[str, Path]:
    """The pattern library: pattern name -> path of its ``.attn`` file.

    Args:
        grid: ``True``: only grid (N-D) patterns; ``False``: only 1-D sequence patterns;
            ``None``: all.
    """
    return {p.name: f for p, f in _library(grid)}


def pattern_path(name: str) -> Path:
    """Path of the library file holding pattern ``name``.

    Raises:
        KeyError: no library pattern of that name.
    """
    lib = library_patterns()
    if name not in lib:
        raise KeyError(f"no library pattern {name!r} (have: {', '.join(lib)})")
    return lib[name]


def library_specs(grid: bool | None = None) -> dict[str, PatternSpec]:
    """The pattern library as parsed specs: pattern name -> :class:`~attncc.dsl.PatternSpec`
    (``grid`` as in :func:`library_patterns`)."""
    return {p.name: p for p, _ in _library(grid)}
