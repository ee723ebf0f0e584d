"""Example inputs for a pattern: random q, k, v and plausible values for its tensors.

Used by the demo, the benchmarks and the tests. Float tensors get small random
values (positive for 1-D per-head tensors such as ALiBi slopes); integer tensors
get sorted segment ids (packed documents) with a padded tail of ``-1``; bool
tensors get a sparse random pattern.
"""

from __future__ import annotations

import math

import torch

from .checks import expected_shape, shape_functions
from .ir import AttentionIR, grid_sizes


#: the value given to free tensor dimensions (``ir.free_dims``) by :func:`example_tensors`
FREE_DIM_DEFAULT = 4


def example_tensors(ir: AttentionIR, sizes: dict, device="cpu", generator: torch.Generator | None = None,
                    free: dict | None = None) -> dict:
    """Plausible values for every ``tensor`` of ``ir``.

    Args:
        ir: the lowered pattern.
        sizes: ``{"B", "H", "Hkv", "Lq", "Lk", "D", "Dv"}``.
        device: where to put them.
        generator: a CPU ``torch.Generator`` for reproducibility.
        free: values of the free tensor dimensions by name (default
            :data:`FREE_DIM_DEFAULT` each).

    Returns:
        name -> tensor with the declared shape and dtype.
    """
    out = {}
    shapes = shape_functions(ir)
    fvals = tuple((free or {}).get(n, FREE_DIM_DEFAULT) for n in ir.free_dims)
    for t in ir.tensors:
        shape = expected_shape(shapes, t.name, sizes, fvals)
        dtype = getattr(torch, t.dtype)
        if t.kind == "float":
            if len(shape) == 1:
                x = torch.rand(shape, generator=generator) * 0.5 + 0.01
            else:
                x = torch.randn(shape, generator=generator) * 0.5
        elif t.kind == "int":
            n = shape[-1]
            n_docs = max(1, min(5, n // 8))
            cuts = torch.sort(torch.randint(0, n + 1, (n_docs - 1,), generator=generator)).values
            ids = torch.bucketize(torch.arange(n), cuts, right=True)
            pad = int(torch.randint(0, max(1, n // 10) + 1, (1,), generator=generator))
            if pad:
                ids[n - pad:] = -1
            x = ids.expand(shape).clone()
        else:
            x = torch.rand(shape, generator=generator) < 0.1
        out[t.name] = x.to(dtype).to(device)
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
