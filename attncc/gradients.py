"""Gradients of the spec's float tensors: symbolic derivatives and their reduction.

The score of a pattern reads float tensors (ALiBi slopes ``slopes[h]``, a
relative-position table ``table[h, kv - q + Lq - 1]``, a bias ``bias[b, h, q, kv]``).
With ``dS = dL/dscore`` (FlashAttention-2's ``P * (dP - delta)``), the gradient of a
tensor ``T`` is, summed over every read ``T[idx(b, h, q, kv)]`` in the score::

    dL/dT[j] = sum over (b, h, q, kv) with idx(b, h, q, kv) = j of dS * d score / d T[idx]

The derivative is taken symbolically (sympy) on the IR, one per read (each read is
replaced by a fresh symbol first, so that two reads of one tensor are not merged by
sympy's ``KroneckerDelta`` rules). The backward dQ kernel, which visits every
allowed (query, key) pair once per (batch, query head), reduces ``dS * derivative``
to per-program partials whose layout depends on what the read's index uses:

- ``row``: the index does not use ``kv`` (``slopes[h]``, per-query tensors):
  row sums over the visited key tiles, ``(B, Hq, Lq)``.
- ``col``: the index uses ``kv`` but not ``q`` (per-key tensors): column sums of
  each (query tile, key tile), ``(B, Hq, n_query_tiles, Lk)``.
- ``full``: the index uses both (bias matrices, relative positions):
  ``dS * derivative`` itself, ``(B, Hq, Lq, Lk)`` (zero where the kernel skipped).

:func:`reduce_partials` then sums the partials into the tensor's gradient with a
fixed order (plain reductions when each index is a bare ``b``/``h``/``q``/``kv``,
otherwise a stable sort by target index and a float64 segmented sum): the default
path uses no floating-point atomics, so gradients are bitwise reproducible. The
opt-in ``atomic`` mode (``attncc.compile(..., deterministic=False)``) adds into the
gradient with ``tl.atomic_add`` from the kernel instead: no partial buffers, but the
order of the additions, hence the last bits, varies from run to run (as in
FlexAttention's captured-buffer gradients).

The epilogue clauses (``sink:``, ``gate:``) read tensors too (:func:`epilogue_reads`).
Their gradients come from the backward's preprocessing kernel (``attn_bwd_pre``),
which computes delta and, in the same pass over ``dO`` and the ungated output ``O``,
``dL/d gate * d gate / d read`` (per output element, or summed over ``dv`` per row)
and ``dL/d sink * d sink / d read`` per row with ``dL/d sink = -exp(sink - LSE) * delta``;
these ``out`` / ``row`` partials are reduced by :func:`reduce_partials` as well (also in
atomic mode: they are O(outputs) small).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
import torch

from . import ir as I
from .dense import eval_expr

#: partial-buffer layouts (see the module docstring)
KINDS = ("row", "col", "full")


@dataclass(frozen=True)
class GradRead:
    """One read of a float tensor in the score, and the derivative of the score in it.

    Attributes:
        tensor: the spec tensor's name.
        read: the read (``sympy.Indexed``) as it appears in the score.
        deriv: ``d score / d read`` (an IR expression in ``s``, the indices and reads).
        kind: ``"row"``, ``"col"`` or ``"full"``: the partial-buffer layout.
    """

    tensor: str
    read: sp.Indexed
    deriv: sp.Expr
    kind: str


def derivative(expr, var) -> sp.Expr:
    """``d expr / d var``; floor/ceil (piecewise constant) have derivative 0, as in torch."""
    d = sp.diff(expr, var)
    step = (sp.floor, sp.ceiling)
    d = d.replace(lambda e: isinstance(e, sp.Derivative) and isinstance(e.expr, step), lambda e: sp.S.Zero)
    d = d.replace(lambda e: isinstance(e, sp.Subs) and e.expr == 0, lambda e: sp.S.Zero)
    return d


def read_kind(read: sp.Indexed) -> str:
    """The partial layout of a read: by whether its index uses ``q`` and ``kv``."""
    syms = set()
    for ix in read.indices:
        syms |= sp.sympify(ix).atoms(sp.Symbol)
    if I.kv not in syms:
        return "row"
    if I.q not in syms:
        return "col"
    return "full"


def grad_reads(ir: I.AttentionIR, score=None) -> tuple[GradRead, ...]:
    """Every read of a float tensor in ``ir.score`` (or ``score``, e.g. the coordinate form
    of a grid pattern) with its symbolic derivative.

    Reads whose derivative is identically zero are left out. Reads of int/bool
    tensors (document ids, index tables) and tensors read only by the mask have no
    gradient (a mask is piecewise constant in its inputs).
    """
    score = ir.score if score is None else score
    floats = {t.name for t in ir.tensors if t.kind == "float"}
    reads = sorted((r for r in score.atoms(sp.Indexed) if str(r.base.label) in floats), key=sp.default_sort_key)
    if not reads:
        return ()
    dummies = {r: sp.Dummy(f"g{i}", real=True) for i, r in enumerate(reads)}
    back = {d: r for r, d in dummies.items()}
    sub = score.xreplace(dummies)
    out = []
    for r in reads:
        d = derivative(sub, dummies[r]).xreplace(back)
        if d == 0:
            continue
        out.append(GradRead(str(r.base.label), r, d, read_kind(r)))
    return tuple(out)


def grad_tensors(ir: I.AttentionIR) -> tuple[str, ...]:
    """Names of the spec tensors that get gradients (declaration order)."""
    names = {g.tensor for g in grad_reads(ir)}
    return tuple(t.name for t in ir.tensors if t.name in names)


def partial_shape(kind: str, sizes: dict, n_m: int) -> tuple[int, ...]:
    """Shape of the float32 partial buffer of a read of ``kind`` (see the module docstring;
    ``"out"``: per output element, the gate reads of :func:`epilogue_reads`); ``n_m``: the
    number of query tiles (programs) of the dQ kernel."""
    B, H, Lq, Lk = sizes["B"], sizes["H"], sizes["Lq"], sizes["Lk"]
    if kind == "row":
        return (B, H, Lq)
    if kind == "out":
        return (B, H, Lq, sizes["Dv"])
    if kind == "col":
        return (B, H, n_m, Lk)
    return (B, H, Lq, Lk)


def reduce_partials(g: GradRead, partial: torch.Tensor, target: torch.Tensor, sizes: dict, tensors: dict) -> None:
    """Add a read's partials into the float64 gradient ``target`` (shaped like the tensor).

    Deterministic: the order of every floating-point addition depends only on the
    shapes and the index values, never on scheduling.

    Args:
        g: the read.
        partial: float32, shaped :func:`partial_shape` of ``g.kind``.
        target: float64, the tensor's shape (accumulated in place).
        sizes: ``B, H, Hkv, Lq, Lk, D, Dv``.
        tensors: spec tensor name -> tensor (reads inside the index are evaluated).
    """
    if g.kind == "col":
        partial = partial.sum(dim=2)  # over query tiles: a fixed-order reduction
    axes = {"row": (I.b, I.h, I.q), "col": (I.b, I.h, I.kv), "full": (I.b, I.h, I.q, I.kv),
            "out": (I.b, I.h, I.q, I.dv)}[g.kind]
    extent = {I.b: sizes["B"], I.h: sizes["H"], I.q: sizes["Lq"], I.kv: sizes["Lk"], I.dv: sizes["Dv"]}
    # fast path: each index is a distinct bare b/h/q/kv spanning the dim: a sum over the other axes
    idx = [sp.sympify(i) for i in g.read.indices]
    if (all(i in axes for i in idx) and len(set(idx)) == len(idx)
            and all(int(target.shape[d]) == extent[i] for d, i in enumerate(idx))):
        keep = [axes.index(i) for i in idx]
        drop = [a for a in range(len(axes)) if a not in keep]
        red = partial.double().sum(dim=drop) if drop else partial.double()
        order = sorted(range(len(keep)), key=lambda j: keep[j])  # red's dims are in axis order
        perm = [order.index(d) for d in range(len(keep))]
        target += red.permute(*perm) if perm else red
        return
    dev = partial.device
    env = dict(zip(I.SIZES.values(), I.size_values(sizes)))
    for a, s in enumerate(axes):
        shp = [1] * len(axes)
        shp[a] = extent[s]
        env[s] = torch.arange(extent[s], device=dev, dtype=torch.int64).view(shp)
    flat = torch.zeros((), dtype=torch.int64, device=dev)
    ok = torch.ones((), dtype=torch.bool, device=dev)
    stride = 1
    for d in reversed(range(len(idx))):
        v = eval_expr(idx[d], env, tensors, device=dev).to(dev)
        if v.dtype.is_floating_point:
            v = v.floor()
        v = v.to(torch.int64)
        n = int(target.shape[d])
        ok = ok & (v >= 0) & (v < n)
        flat = flat + v.clamp(0, n - 1) * stride
        stride *= n
    flat, ok = torch.broadcast_tensors(flat, ok)
    flat = torch.broadcast_to(flat, partial.shape).reshape(-1)
    ok = torch.broadcast_to(ok, partial.shape).reshape(-1)
    target.view(-1).add_(segment_sum(partial.reshape(-1)[ok], flat[ok], target.numel()))


def segment_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``out[j] = sum of values[i] with index[i] == j``, float64, in a fixed order.

    A stable sort by index, a float64 running sum and differences at segment ends:
    reproducible on every device (unlike ``index_add_``/``scatter_add_`` on CUDA).

    Args:
        values: 1-D float; index: 1-D int64 in ``[0, size)``, same length.

    Returns:
        float64 ``(size,)``.
    """
    out = torch.zeros(size, dtype=torch.float64, device=values.device)
    if values.numel() == 0:
        return out
    order = torch.argsort(index, stable=True)
    ix = index[order]
    cs = torch.cumsum(values[order].double(), 0)
    last = torch.nonzero(ix[1:] != ix[:-1]).flatten()
    last = torch.cat([last, torch.tensor([ix.numel() - 1], device=ix.device)])
    tot = cs[last]
    tot = tot - torch.cat([tot.new_zeros(1), tot[:-1]])
    out[ix[last]] = tot
    return out


def epilogue_reads(ir: I.AttentionIR) -> tuple[tuple[str, GradRead], ...]:
    """The reads of float tensors in the sink and gate clauses, with their derivatives, in the
    order of the backward preprocessing kernel's partial buffers (``PE<j>``).

    Returns:
        ``((clause, GradRead), ...)``: ``clause`` is ``"sink"`` or ``"gate"``; the read's kind is
        ``"out"`` (a gate read indexed by ``dv``: partials ``(B, Hq, Lq, Dv)``) or ``"row"``
        (partials ``(B, Hq, Lq)``: the kernel sums a gate read's terms over ``dv``).
        The kernel evaluates ``dL/d clause value * derivative`` per element: for the gate
        ``dL/d gate = dO * O_ungated``; for the sink ``dL/d sink = -exp(sink - LSE) * delta``
        with ``delta = rowsum(dO_ungated * O_ungated) - dLSE``.
    """
    out = []
    for clause, expr in (("sink", ir.sink), ("gate", ir.gate)):
        if expr is None:
            continue
        for g in grad_reads(ir, expr):
            uses_dv = any(I.dv in sp.sympify(ix).free_symbols for ix in g.read.indices)
            out.append((clause, GradRead(g.tensor, g.read, g.deriv, "out" if uses_dv else "row")))
    return tuple(out)


@dataclass(frozen=True)
class BackwardPlan:
    """The backward's analysis of a pattern, carried by the kernel plan (codegen prints it).

    Attributes:
        dscore: ``d score / d s`` of the score form the kernels evaluate (``None`` when it
            cannot be taken: see ``error``).
        error: ``""`` or why the score's derivative in ``s`` cannot be taken.
        reads: per :class:`GradRead` of ``ir.score`` (whose partials the runtime reduces), in
            kernel argument order, ``(read, counterpart)``: the same read in the kernel's score
            form (itself, or for box plans the coordinate form's read; ``None`` when it has
            none there).
        epilogue: :func:`epilogue_reads` (sink / gate reads, ``PE<j>`` order).
    """

    dscore: sp.Expr | None
    error: str
    reads: tuple
    epilogue: tuple


def backward_analysis(ir: I.AttentionIR, score=None) -> BackwardPlan:
    """The :class:`BackwardPlan` of ``ir`` for the kernels' score form ``score`` (default
    ``ir.score``; box plans: the coordinate form, whose reads are paired with those of
    ``ir.score`` by flattening coordinates)."""
    score = ir.score if score is None else score
    try:
        dscore, error = derivative(score, I.s), ""
    except NotImplementedError as e:
        dscore, error = None, f"the derivative of the score in s cannot be generated: {e}"
    if score is ir.score:
        reads = tuple((g, g) for g in grad_reads(ir))
    else:
        own = {I.flatten_coords(c.read, len(ir.grid)): c for c in grad_reads(ir, score)}
        reads = tuple((g, own.get(g.read)) for g in grad_reads(ir))
    return BackwardPlan(dscore, error, reads, epilogue_reads(ir))
