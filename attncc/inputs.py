"""Example inputs for a pattern: random q, k, v and plausible values for its tensors.

Used by the demo, the benchmarks, the tests and :mod:`attncc.testing`. By default float
tensors get small random values (positive for 1-D per-head tensors such as ALiBi slopes);
integer tensors get sorted segment ids (packed documents) with a padded tail of ``-1``
(per-head scalars of the mask, such as windows ``win[h]``: key counts in ``1..Lk``);
bool tensors get a sparse random pattern. :func:`tensor_values` also knows the edge-case
value modes :mod:`attncc.testing` draws (:data:`VALUE_MODES`) and index tensors kept within
bounds.
"""

from __future__ import annotations

import math

import torch

from .checks import expected_shape, shape_functions
from .ir import AttentionIR, grid_sizes


#: the value given to free tensor dimensions (``ir.free_dims``) by :func:`example_tensors`
FREE_DIM_DEFAULT = 4


#: the value modes :func:`tensor_values` knows, per tensor kind; the first is the default
#: (the values :func:`example_tensors` gives)
VALUE_MODES = {
    "float": ("normal", "large", "zero"),
    "int": ("segments", "singletons", "one_segment", "padding"),
    "index": ("uniform", "low", "high"),
    "bool": ("sparse", "dense", "none", "all", "one_per_row"),
}


def tensor_values(t, shape: tuple, generator: torch.Generator | None = None, mode: str | None = None,
                  bounds: tuple[int, int] | None = None) -> torch.Tensor:
    """Values for one spec tensor declaration ``t`` (an :class:`attncc.ir.TensorSpec`).

    Args:
        t: the declaration (its ``kind`` ``float`` / ``int`` / ``bool`` and ``dtype``).
        shape: the concrete shape.
        generator: a CPU ``torch.Generator`` for reproducibility.
        mode: one of :data:`VALUE_MODES` for the kind (default: the first):

            * float: ``normal`` (``N(0, 0.25)``; 1-D tensors such as ALiBi slopes
              positive in ``[0.01, 0.51)``), ``large`` (the same times 8), ``zero``.
            * int segment ids (last axis = tokens): ``segments`` (sorted ids of up to 5
              packed documents, a padded tail of ``-1``), ``singletons`` (every token its
              own document: one allowed key per row), ``one_segment`` (all ``0``),
              ``padding`` (all ``-1``: fully masked rows).
            * int index tensors (``bounds`` given): ``uniform`` in ``[lo, hi]``, ``low``
              (all ``lo``), ``high`` (all ``hi``).
            * bool: ``sparse`` (``P(True) = 0.1``), ``dense`` (0.9), ``none`` (all
              ``False``), ``all``, ``one_per_row`` (one ``True`` per last-axis row).
        bounds: ``(lo, hi)``: the tensor is used as an index and must hold values in
            ``[lo, hi]`` (see :func:`attncc.testing.index_bounds`).

    Returns:
        A CPU tensor of ``shape`` and the declared dtype.

    Raises:
        ValueError: an unknown mode for the kind.
    """
    kind = "index" if t.kind == "int" and bounds is not None else t.kind
    mode = VALUE_MODES[kind][0] if mode is None else mode
    if mode not in VALUE_MODES[kind]:
        raise ValueError(f"tensor {t.name!r} ({kind}): unknown value mode {mode!r} (have: {', '.join(VALUE_MODES[kind])})")
    if kind == "float":
        if len(shape) == 1:
            x = torch.rand(shape, generator=generator) * 0.5 + 0.01
        else:
            x = torch.randn(shape, generator=generator) * 0.5
        x = x * {"normal": 1.0, "large": 8.0, "zero": 0.0}[mode]
    elif kind == "index":
        lo, hi = bounds
        if mode == "uniform":
            x = torch.randint(lo, hi + 1, shape, generator=generator)
        else:
            x = torch.full(shape, lo if mode == "low" else hi)
    elif kind == "int":
        n = shape[-1] if shape else 1
        if mode == "segments":
            n_docs = max(1, min(5, n // 8))
            cuts = torch.sort(torch.randint(0, n + 1, (n_docs - 1,), generator=generator)).values
            ids = torch.bucketize(torch.arange(n), cuts, right=True)
            pad = int(torch.randint(0, max(1, n // 10) + 1, (1,), generator=generator))
            if pad:
                ids[n - pad:] = -1
        else:
            ids = {"singletons": torch.arange(n), "one_segment": torch.zeros(n, dtype=torch.int64),
                   "padding": torch.full((n,), -1)}[mode]
        x = ids.expand(shape).clone()
    else:
        if mode in ("sparse", "dense"):
            x = torch.rand(shape, generator=generator) < (0.1 if mode == "sparse" else 0.9)
        elif mode == "one_per_row":
            n = shape[-1] if shape else 1
            pick = torch.randint(0, n, (*shape[:-1], 1), generator=generator)
            x = torch.zeros(shape, dtype=torch.bool).scatter_(-1, pick, True) if shape else torch.ones((), dtype=torch.bool)
        else:
            x = torch.full(shape, mode == "all", dtype=torch.bool)
    return x.to(getattr(torch, t.dtype))


def _mask_scalars(ir: AttentionIR) -> set:
    """Names of the int tensors the mask reads as run-time scalars of a (batch, head): every dim
    a batch / head size or a constant, not read inside another read's index (per-head windows,
    sink counts; see :func:`attncc.passes.scalar_reads`). Their example values are key counts
    ``1..Lk`` (segment ids would make every window empty)."""
    import sympy as sp

    from . import ir as I

    reads = ir.mask.atoms(sp.Indexed)
    inner = {str(r.base.label) for x in reads for ix in x.indices for r in sp.sympify(ix).atoms(sp.Indexed)}
    heads = {I.B, I.H, I.Hkv}
    return {t.name for t in ir.tensors if t.kind == "int" and t.name not in inner
            and t.name in {str(r.base.label) for r in reads}
            and all(sp.sympify(d).free_symbols <= heads for d in t.shape)}


def example_tensors(ir: AttentionIR, sizes: dict, device="cpu", generator: torch.Generator | None = None,
                    free: dict | None = None, modes: dict | None = None, bounds: dict | None = None) -> dict:
    """Plausible values for every ``tensor`` of ``ir`` (see :func:`tensor_values`).

    Args:
        ir: the lowered pattern.
        sizes: ``{"B", "H", "Hkv", "Lq", "Lk", "D", "Dv"}``.
        device: where to put them.
        generator: a CPU ``torch.Generator`` for reproducibility.
        free: values of the free tensor dimensions by name (default
            :data:`FREE_DIM_DEFAULT` each).
        modes: tensor name -> value mode of :func:`tensor_values` (default: each kind's first).
        bounds: tensor name -> ``(lo, hi)`` value bounds of int tensors used as indices.

    Returns:
        name -> tensor with the declared shape and dtype.
    """
    out = {}
    shapes = shape_functions(ir)
    fvals = tuple((free or {}).get(n, FREE_DIM_DEFAULT) for n in ir.free_dims)
    spans = _mask_scalars(ir)
    for t in ir.tensors:
        shape = expected_shape(shapes, t.name, sizes, fvals)
        bd, mode = (bounds or {}).get(t.name), (modes or {}).get(t.name)
        if t.name in spans and bd is None and mode is None:  # per-head windows / sink counts: 1..Lk
            bd = (1, max(1, sizes["Lk"]))
        x = tensor_values(t, shape, generator, mode, bd)
        out[t.name] = x.to(device)
    return out


def example_inputs(ir: AttentionIR, B=1, H=4, Hkv=2, Lq=128, Lk=None, D=64, Dv=None, dtype=torch.float32,
                   device="cpu", seed: int = 0, grid=None):
    """Random ``q (B,H,Lq,D)``, ``k (B,Hkv,Lk,D)``, ``v (B,Hkv,Lk,Dv)`` and the pattern's tensors.

    Grid patterns: ``q (B,H,*grid,D)`` etc. for the grid shape ``grid`` (one size per
    axis; default: each axis ``round(Lq ** (1/n))``), and ``Lq = Lk`` = the grid's size.

    Returns:
        ``(q, k, v, tensors, sizes)``; ``sizes`` holds the grid sizes ``G0..G2`` too.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(ir.grid)
    if n:
        grid = list(grid) if grid is not None else [max(1, round(Lq ** (1.0 / n)))] * n
        Lq = Lk = math.prod(grid)
        lead_q, lead_k = (B, H, *grid), (B, Hkv, *grid)
    else:
        Lk = Lq if Lk is None else Lk
        lead_q, lead_k = (B, H, Lq), (B, Hkv, Lk)
    Dv = D if Dv is None else Dv
    q = torch.randn(*lead_q, D, generator=g).to(dtype).to(device)
    k = torch.randn(*lead_k, D, generator=g).to(dtype).to(device)
    v = torch.randn(*lead_k, Dv, generator=g).to(dtype).to(device)
    sizes = {"B": B, "H": H, "Hkv": Hkv, "Lq": Lq, "Lk": Lk, "D": D, "Dv": Dv, **grid_sizes(grid if n else None)}
    return q, k, v, example_tensors(ir, sizes, device, g), sizes
