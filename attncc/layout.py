"""Token layouts of box plans: grid tokens permuted so that every query / key box is contiguous.

A box plan (:mod:`attncc.passes`, ``path="box"``) tiles each grid axis ``i`` of size
``G<i>`` into ``d<i>`` dilation groups (tokens ``x = g + d * j``) and each group into
tiles of ``TM<i>`` query rows / ``TN<i>`` key rows. :class:`BoxLayout` reorders the
tokens of a ``(B, H, *grid, ...)`` tensor into ``(groups, tiles, rows of a tile)``
order on every axis — padding each group to a whole number of tiles — so the kernel
reads every tile with one contiguous load (the token permutation of NATTEN's fused
kernels, "Generalized Neighborhood Attention", Hassani et al. 2025), and
:meth:`BoxLayout.unpermute` undoes it on the outputs. When the order is already
row-major (no dilation, no padding, tiles that are whole rows) the permutation is the
identity and skipped.

:func:`choose_layout` picks the tile shape per axis for given axis sizes with a cost
model over the plan's closed-form key boxes: the number of (query tile, key tile)
pairs the kernel would visit, evaluated exactly from the same expressions the kernel
computes.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import sympy as sp
import torch

from . import ir as I
from .passes import BQ_HI, BQ_LO, GQ, LG, KernelPlan

#: ints in the layout list handed to the custom op: G0..2, DIL0..2, J0..2, TM0..2, TN0..2
LAYOUT_LEN = 15


@dataclass(frozen=True)
class BoxLayout:
    """The permuted token order of a box plan for one grid shape and tile shape.

    Attributes:
        grid: axis sizes ``(G0, ...)`` (1 to 3 axes).
        groups: dilation groups per axis (``d``; 1 = no dilation).
        tm / tn: query / key tile shape per axis (powers of two; products = BLOCK_M / BLOCK_N).
    """

    grid: tuple
    groups: tuple
    tm: tuple
    tn: tuple

    @property
    def n(self) -> int:
        return len(self.grid)

    @property
    def padded(self) -> tuple:
        """Per axis: the group length padded to whole tiles of both shapes (``J``)."""
        return tuple(_cdiv(_cdiv(g, d), max(a, b)) * max(a, b)
                     for g, d, a, b in zip(self.grid, self.groups, self.tm, self.tn))

    @property
    def length(self) -> int:
        """Tokens in the permuted layout (padding included)."""
        return math.prod(d * j for d, j in zip(self.groups, self.padded))

    @property
    def block_m(self) -> int:
        return math.prod(self.tm)

    @property
    def block_n(self) -> int:
        return math.prod(self.tn)

    def is_identity(self, side: str = "both") -> bool:
        """True when the permuted order of ``side`` (``"q"``, ``"kv"`` or both) is the
        row-major order itself (nothing to move). Computed once per layout (every call
        of a box plan asks)."""
        ident = self.__dict__.get("_identity")
        if ident is None:
            ident = {s: self._is_identity(s) for s in ("q", "kv", "both")}
            object.__setattr__(self, "_identity", ident)  # a cache, not a field (eq / hash unchanged)
        return ident[side]

    def _is_identity(self, side: str) -> bool:
        if any(d != 1 for d in self.groups) or self.padded != tuple(self.grid):
            return False
        shapes = {"q": [self.tm], "kv": [self.tn], "both": [self.tm, self.tn]}[side]
        return all(_rowmajor_tile(t, self.grid) for t in shapes)

    def as_list(self) -> list:
        """The 15 ints handed to the kernel op (see :data:`LAYOUT_LEN`)."""
        pad = lambda xs: list(xs) + [1] * (3 - len(xs))  # noqa: E731
        return pad(self.grid) + pad(self.groups) + pad(self.padded) + pad(self.tm) + pad(self.tn)

    # ------------------------------------------------------------------ permutations
    def permute(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """``(B, H, *grid, *rest)`` -> ``(B, H, length, *rest)`` in the tile order of
        ``side`` (``"q"`` uses ``tm``, ``"kv"`` uses ``tn``); padding tokens are 0."""
        if self.is_identity(side):
            return x.flatten(2, 1 + self.n)
        n, tile = self.n, (self.tm if side == "q" else self.tn)
        rest = list(x.shape[2 + n:])
        pad = []
        for _ in rest:
            pad += [0, 0]
        for i in reversed(range(n)):
            pad += [0, self.groups[i] * self.padded[i] - self.grid[i]]
        x = torch.nn.functional.pad(x, pad)
        shape = list(x.shape[:2])
        for i in range(n):  # axis i as (tiles, rows, groups): x = (tile * t + row) * d + g
            shape += [self.padded[i] // tile[i], tile[i], self.groups[i]]
        x = x.reshape(shape + rest)
        order = [0, 1] + [2 + 3 * i + 2 for i in range(n)] + [2 + 3 * i for i in range(n)] + \
            [2 + 3 * i + 1 for i in range(n)] + list(range(2 + 3 * n, 2 + 3 * n + len(rest)))
        return x.permute(order).reshape([x.shape[0], x.shape[1], self.length] + rest)

    def unpermute(self, y: torch.Tensor, side: str = "q") -> torch.Tensor:
        """Inverse of :meth:`permute`: ``(B, H, length, *rest)`` -> ``(B, H, *grid, *rest)``."""
        if self.is_identity(side):
            return y.unflatten(2, self.grid)
        n, tile = self.n, (self.tm if side == "q" else self.tn)
        rest = list(y.shape[3:])
        shape = list(y.shape[:2]) + list(self.groups) + [self.padded[i] // tile[i] for i in range(n)] + list(tile)
        y = y.reshape(shape + rest)
        order = [0, 1]
        for i in range(n):
            order += [2 + n + i, 2 + 2 * n + i, 2 + i]
        order += list(range(2 + 3 * n, 2 + 3 * n + len(rest)))
        y = y.permute(order).reshape(list(y.shape[:2]) + [self.groups[i] * self.padded[i] for i in range(n)] + rest)
        return y[(slice(None), slice(None)) + tuple(slice(0, g) for g in self.grid)]

    def permute_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A dense bool mask ``(B, H, L, L)`` over row-major grid tokens, reordered to the
        permuted layout: ``(B, H, length, length)`` (padding rows / columns False). Used to
        compare the kernel's tile iteration with the mask's non-empty tiles."""
        tq, tk = self.token_index("q").to(mask.device), self.token_index("kv").to(mask.device)
        m = mask[:, :, tq.clamp(min=0)][:, :, :, tk.clamp(min=0)]
        return m & (tq >= 0)[:, None] & (tk >= 0)[None, :]

    def token_index(self, side: str) -> torch.Tensor:
        """int64 ``(length,)``: the row-major grid token at each permuted position (-1: padding)."""
        idx = torch.arange(math.prod(self.grid), dtype=torch.int64).view(1, 1, *self.grid) + 1
        return self.permute(idx, side).view(-1) - 1


def _rowmajor_tile(tile, grid) -> bool:
    """A tile of this shape covers consecutive row-major tokens: ones, then one partial
    axis, then whole axes."""
    i = 0
    while i < len(tile) and tile[i] == 1:
        i += 1
    return all(tile[j] == grid[j] for j in range(i + 1, len(tile)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def identity_layout(grid) -> list:
    """The layout list of a plan without boxes (1-D kernels ignore all but the grid)."""
    g = list(grid or ())
    g += [1] * (3 - len(g))
    return g + [1] * 12


def layout_from_list(layout: list, n: int) -> BoxLayout:
    """The :class:`BoxLayout` of an ``n``-axis layout list (inverse of :meth:`BoxLayout.as_list`)."""
    return BoxLayout(tuple(layout[:n]), tuple(layout[3:3 + n]), tuple(layout[9:9 + n]), tuple(layout[12:12 + n]))


def layout_sizes(layout: list) -> dict:
    """Kernel size arguments of a layout list: ``G0..2, DIL0..2, J0..2``."""
    names = [f"G{i}" for i in range(3)] + [f"DIL{i}" for i in range(3)] + [f"J{i}" for i in range(3)]
    return dict(zip(names, layout[:9]))


def layout_constexprs(layout: list) -> dict:
    """Kernel tile-shape constexprs of a layout list: ``TM0..2, TN0..2``."""
    return {**{f"TM{i}": layout[9 + i] for i in range(3)}, **{f"TN{i}": layout[12 + i] for i in range(3)}}


# ----------------------------------------------------------------------------- choice
def group_counts(plan: KernelPlan, sizes: dict) -> tuple:
    """Dilation groups per axis at these sizes.

    Raises:
        ValueError: a group count below 1 (e.g. MaxViT's ``Y // G`` with ``Y < G``), naming the axis.
    """
    vals = I.size_values(sizes)
    out = []
    for i, (d, f) in enumerate(zip(plan.groups, _group_fns(plan))):
        v = int(f(*vals))
        if v < 1:
            raise ValueError(f"pattern {plan.ir.name!r}: axis {plan.ir.grid[i]!r} (size {sizes[f'G{i}']}) has "
                             f"{d} = {v} dilation groups at this size; it needs at least 1")
        out.append(v)
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _group_fns(plan: KernelPlan) -> tuple:
    """Per axis: the dilation group count as a plain Python function of the sizes
    (:data:`attncc.ir.SIZES` order; sympy is too slow to evaluate on every call)."""
    syms = list(I.SIZES.values())
    return tuple(sp.lambdify(syms, sp.sympify(d), modules="math") for d in plan.groups)


@functools.lru_cache(maxsize=64)
def _interval_fns(plan: KernelPlan):
    """Per box and axis: numeric functions (lo_c, hi_c) of (q_lo, q_hi, g, lg, *sizes)."""
    size_syms = list(I.SIZES.values())
    out = []
    for bx in plan.boxes:
        axes = []
        for i, iv in enumerate(bx.axes):
            args = [BQ_LO[i], BQ_HI[i], GQ[i], LG[i], I.h, I.b] + size_syms
            lo = sp.Max(iv.lo, 0)
            hi = sp.Min(iv.hi, LG[i])
            axes.append((sp.lambdify(args, lo, modules=["math", {"Min": min, "Max": max}]),
                         sp.lambdify(args, hi, modules=["math", {"Min": min, "Max": max}])))
        out.append(axes)
    return out


def _axis_work(plan, fns, i: int, sizes: dict, d: int, tm: int, tn: int) -> list:
    """Per box: key tiles visited on axis ``i``, summed over the axis' query tiles of every group."""
    G = sizes[f"G{i}"]
    J = _cdiv(_cdiv(G, d), max(tm, tn)) * max(tm, tn)
    svals = [sizes.get(n, 1) for n in I.SIZES]
    tot = []
    for box in fns:
        lo_f, hi_f = box[i]
        s = 0
        for g in range(d):
            lg = _cdiv(G - g, d)
            for qt in range(J // tm):
                q_lo, q_hi = qt * tm, min(qt * tm + tm, lg) - 1
                if q_lo > q_hi:
                    continue
                lo, hi = int(lo_f(q_lo, q_hi, g, lg, 0, 0, *svals)), int(hi_f(q_lo, q_hi, g, lg, 0, 0, *svals))
                if hi > lo:
                    s += _cdiv(hi, tn) - lo // tn
        tot.append(s)
    return tot


def choose_layout(plan: KernelPlan, sizes: dict, block_m: int, block_n: int) -> BoxLayout:
    """The tile shape per axis (powers of two, products ``block_m`` / ``block_n``) that
    visits the fewest (query tile, key tile) pairs at these sizes; ties go to the shape
    that needs no permutation, then to longer tiles along the last (contiguous) axis.

    Raises:
        ValueError: see :func:`group_counts`.
    """
    n = len(plan.ir.grid)
    grid = tuple(sizes[f"G{i}"] for i in range(n))
    groups = group_counts(plan, sizes)
    return _choose(plan, grid, groups, tuple(sorted(sizes.items())), block_m, block_n)


@functools.lru_cache(maxsize=256)
def _choose(plan, grid, groups, size_items, block_m, block_n) -> BoxLayout:
    sizes = dict(size_items)
    n = len(grid)
    fns = _interval_fns(plan)
    pm, pn = block_m.bit_length() - 1, block_n.bit_length() - 1
    work = {}  # (axis, tm, tn) -> per-box visited key tiles summed over the axis
    best, best_key = None, None
    for em in _splits(pm, n):
        tm = tuple(1 << e for e in em)
        for en in _splits(pn, n):
            tn = tuple(1 << e for e in en)
            per_axis = []
            for i in range(n):
                k = (i, tm[i], tn[i])
                if k not in work:
                    work[k] = _axis_work(plan, fns, i, sizes, groups[i], tm[i], tn[i])
                per_axis.append(work[k])
            cost = sum(math.prod(per_axis[i][j] for i in range(n)) for j in range(len(fns)))
            lay = BoxLayout(grid, groups, tm, tn)
            key = (cost, not lay.is_identity(), tuple(-t for t in reversed(tm)), tuple(-t for t in reversed(tn)))
            if best_key is None or key < best_key:
                best, best_key = lay, key
    return best


def _splits(total: int, n: int):
    """Every way to write ``total`` as an ordered sum of ``n`` non-negative ints."""
    for cut in itertools.product(range(total + 1), repeat=n - 1):
        if sum(cut) <= total:
            yield tuple(cut) + (total - sum(cut),)
