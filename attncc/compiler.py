"""The compile driver: spec -> IR -> plan -> source (cached on disk) -> CompiledAttention."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import sympy
import torch
import triton

from . import codegen
from .dsl import load
from .ir import lower
from .passes import KernelPlan, plan as make_plan

VERSION = "0.1.0"
TEMPLATE = "attention_fwd.py.j2"


@functools.lru_cache(maxsize=256)
def _plan_cached(ir_key: str, ir) -> KernelPlan:
    return make_plan(ir)


def compile(spec, pattern: str | None = None, *, block_m: int | None = None, block_n: int | None = None,
            num_warps: int = 4, num_stages: int = 2, **params):
    """Compile an attention pattern to a fused Triton kernel.

    Args:
        spec: ``.attn`` source text, a path to a ``.attn`` file, or a parsed
            :class:`~attncc.dsl.PatternSpec`.
        pattern: which ``pattern`` block to compile when the spec holds several.
        block_m / block_n: fix the query / key tile sizes (default: a fixed CPU
            config under the Triton interpreter, autotuned on CUDA). Powers of two >= 16.
        num_warps / num_stages: with a fixed tile size, the launch parameters.
        **params: values for the spec's ``param`` declarations (specialised into
            the kernel).

    Returns:
        An :class:`attncc.runtime.CompiledAttention`; call it like
        ``scaled_dot_product_attention``.

    Raises:
        SpecError: the spec has an error (message gives ``file:line:col``), or
            ``pattern`` is missing/ambiguous.
        TypeError: unknown params or a param without default left unset.
        ValueError: bad block sizes.
    """
    from attncc.runtime import CompiledAttention, Config
    from attncc.runtime import cache

    ir = lower(spec, pattern, **params)
    kp = _plan_cached(ir.key(), ir)
    tmpl = codegen.template_text(TEMPLATE)
    key = cache.digest(ir.key(), tmpl, VERSION, triton.__version__, torch.__version__, sympy.__version__)
    path, source, _ = cache.load_or_build(key, lambda: codegen.render_forward(kp, VERSION))
    config = None
    if block_m is not None or block_n is not None:
        bm, bn = block_m or 64, block_n or 64
        for name, val in (("block_m", bm), ("block_n", bn)):
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val}")
        config = Config(bm, bn, num_warps, num_stages)
    return CompiledAttention(kp, source, path, key, config)


def explain(spec, pattern: str | None = None, **params) -> str:
    """Text describing every stage for a pattern: IR, analysis path and kernel source."""
    ir = lower(spec, pattern, **params)
    kp = _plan_cached(ir.key(), ir)
    return "\n".join(["== IR", ir.pretty(), "", "== analysis", kp.describe()])


def _patterns_dir() -> Path:
    try:
        p = Path(str(resources.files("attncc.patterns")))
        if p.is_dir() and any(p.glob("*.attn")):
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "patterns"


def library_patterns() -> dict[str, Path]:
    """The pattern library: pattern name -> path of its ``.attn`` file."""
    out = {}
    for f in sorted(_patterns_dir().glob("*.attn")):
        from .dsl import parse

        for p in parse(f.read_text(), str(f)):
            out[p.name] = f
    return out


def pattern_path(name: str) -> Path:
    """Path of the library file holding pattern ``name``.

    Raises:
        KeyError: no library pattern of that name.
    """
    lib = library_patterns()
    if name not in lib:
        raise KeyError(f"no library pattern {name!r} (have: {', '.join(lib)})")
    return lib[name]
