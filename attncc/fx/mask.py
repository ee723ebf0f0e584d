"""Symbolic recovery of masks built inside an FX graph.

A mask built from ``arange`` / comparisons / ``where`` / ``&`` / ``|`` / ``~`` and size
arithmetic (transformers' ``sdpa_mask``, hand-written causal and sliding-window masks)
is evaluated on symbols instead of numbers: every value is an :class:`Index` — one
sympy expression of per-axis symbols, with the axis each tensor dim runs along. The
result, mapped onto ``(b, h, q, kv)`` and with the graph's size symbols rewritten in
terms of ``Lq`` and ``Lk``, becomes the site's ``mask:`` clause, so the kernel skips
tiles instead of reading a materialised mask.

An integer / bool input tensor read at plain indices (a key-validity
``attention_mask``) stays in the expression as a read ``pad0[b, kv]``. An additive mask
is split by :func:`recover_score` into a mask and a closed-form score term, whose float
tensors (ALiBi slopes: inputs, parameters, constants or values the graph computes with
ops outside :data:`RULES`) are read at batch / head indices (``slope0[h]``).

Reshapes that merge or split dims (window partitions, batch folded with windows) become
``floor`` / ``mod`` of the flat index; a float tensor gathered by an integer buffer
(Swin's ``table[index].view(N, N, -1)``) becomes ``tableN[indexM[N*q + kv], h]``, and a
bias whose pieces differ by constants (Swin's 0 / -100 shifted-window mask) a ``where``.

Anything else (a producer that reads a tensor at every (q, kv) pair, an op not listed
in :data:`RULES`) raises :class:`Opaque` with the reason; the caller then passes the
mask as a tensor instead (still exact).
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from dataclasses import dataclass
from typing import Optional

import sympy
import torch
import torch.fx as fx

from .ops import op_of, value_of
from .site import Lk, Lq, b_idx, h_idx, kv_idx, q_idx


class Opaque(Exception):
    """The mask cannot be recovered symbolically; the message says why."""


@dataclass(frozen=True)
class Index:
    """A tensor whose element values are ``expr`` of its axes' symbols.

    ``axes[i]`` is ``None`` for a dim along which the value does not vary (size 1 or
    broadcast), else ``(symbol, extent)`` with ``extent`` a sympy size expression.
    Scalars have ``axes == ()``.
    """

    expr: sympy.Basic
    axes: tuple = ()


_counter = itertools.count()


def _sym(x):
    """A Python / torch scalar or SymInt as a sympy expression."""
    if isinstance(x, bool):
        return sympy.true if x else sympy.false
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, float):
        if math.isinf(x):
            return -sympy.oo if x < 0 else sympy.oo
        return sympy.Float(x)
    raise Opaque(f"unsupported constant {x!r}")


def _broadcast(a: tuple, b: tuple) -> tuple:
    n = max(len(a), len(b))
    a, b = (None,) * (n - len(a)) + a, (None,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x is not None and y is not None and x[0] != y[0]:
            raise Opaque("two different index axes meet in one dim")
        out.append(x if x is not None else y)
    return tuple(out)


def _distinct(x: Index, y: Index) -> Index:
    """``y`` with a fresh symbol for each index axis it shares with ``x`` in another dim
    (``pos[None, :] <= pos[:, None]`` from one ``arange``: two axes, not one), and with
    ``x``'s symbol for an axis of its own along a dim where ``x`` has one (broadcasting
    pairs elements by position: ``mask[:, None, None, :] & (j[None, :] <= i[:, None])``)."""
    n = max(len(x.axes), len(y.axes))
    xa, ya = (None,) * (n - len(x.axes)) + x.axes, (None,) * (n - len(y.axes)) + y.axes
    where = {a[0]: i for i, a in enumerate(xa) if a is not None}
    subs, axes = {}, list(y.axes)
    for i, a in enumerate(ya):
        if a is not None and xa[i] is not None and xa[i][0] != a[0] and a[0] not in where:
            # two index axes along one dim (an input read and an arange): one index
            subs[a[0]] = xa[i][0]
            axes[i - (n - len(y.axes))] = xa[i]
        elif a is not None and a[0] in where and where[a[0]] != i:
            fresh = sympy.Symbol(f"i{next(_counter)}", integer=True)
            subs[a[0]] = fresh
            axes[i - (n - len(y.axes))] = (fresh, a[1])
    return Index(y.expr.subs(subs, simultaneous=True), tuple(axes)) if subs else y


def _binary(f):
    def rule(ev, node, a, b):
        x, y = ev.arg(a), ev.arg(b)
        y = _distinct(x, y)
        return Index(f(x.expr, y.expr), _broadcast(x.axes, y.axes))
    return rule


def _bool(e):
    if e in (sympy.true, sympy.false) or isinstance(e, (sympy.logic.boolalg.Boolean, sympy.Rel)):
        return e
    raise Opaque("a logical op on a non-boolean value")


def _arange(ev, node, *args, **kw):
    if kw.get("step", 1) != 1 or len(args) > 2:
        raise Opaque("arange with a step")
    start, end = (0, args[0]) if len(args) == 1 else args
    start, end = ev.arg(start).expr, ev.arg(end).expr
    s = sympy.Symbol(f"i{next(_counter)}", integer=True)
    return Index(s + start, ((s, end - start),))


def _getitem(ev, node, x, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, fx.Node) for i in idx):
        return _gather(ev, x, idx)
    before, out = value_of(x), value_of(node)
    x = ev.arg(x)
    axes, src, subs = [], list(x.axes), {}
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    for i in idx:
        if i is None:
            axes.append(None)
        elif i is Ellipsis:
            take = len(src) - n_real
            axes += src[:take]
            src = src[take:]
        elif isinstance(i, slice) and i == slice(None):
            axes.append(src.pop(0))
        elif isinstance(i, slice) and i.step in (None, 1):
            dim = len(x.axes) - len(src)
            axes.append(_slice(src.pop(0), i, before, out, dim, len(axes), subs))
        else:
            raise Opaque(f"indexing with {i!r}")
    return Index(x.expr.subs(subs, simultaneous=True) if subs else x.expr, tuple(axes + src))


def _slice(ax, sl: slice, before, out, dim: int, out_dim: int, subs: dict):
    """The axis of ``t[..., start:stop]`` (MPT's ``position_bias[:, :, Lmax - Lk:]``): a fresh
    symbol ``j`` with ``i = j + start`` in ``subs``; the extent checked against the
    recorded output shape."""
    if not isinstance(before, torch.Tensor) or not isinstance(out, torch.Tensor):
        raise Opaque("a slice without example values")
    n = _sym(before.shape[dim])
    start = sympy.Integer(0) if sl.start is None else _sym(sl.start)
    stop = n if sl.stop is None else _sym(sl.stop)
    start, stop = (start + n if start.is_number and start < 0 else start), (stop + n if stop.is_number and stop < 0 else stop)
    if n.is_number:
        start, stop = (sympy.Min(sympy.Max(v, 0), n) for v in (start, stop))
    extent = sympy.Max(stop - start, 0) if (stop - start).is_number else stop - start
    if sympy.simplify(extent - _sym(out.shape[out_dim])) != 0:
        raise Opaque(f"a slice {sl} whose length is not {out.shape[out_dim]}")
    if ax is None:  # a broadcast dim: the slice keeps it
        return None
    j = sympy.Symbol(f"i{next(_counter)}", integer=True)
    subs[ax[0]] = j + start
    return (j, extent)


def _gather(ev, x, idx):
    """``t[i0, i1, ...]`` with index tensors (transformers' ``padding_mask[batch_idx, kv_idx]``):
    each indexed axis's symbol replaced by the index's value, axes broadcast. Fewer
    indices than dims index the leading dims (Swin's ``table[index]``: the rows of a
    ``(T, H)`` table at an index buffer), the other dims follow the indices' dims."""
    x = ev.arg(x)
    if len(idx) > len(x.axes) or not all(isinstance(i, fx.Node) for i in idx):
        raise Opaque("advanced indexing that is not one index tensor per leading dim")
    subs, axes = {}, ()
    for ax, i in zip(x.axes, idx):
        iv = ev.node(i)
        if ax is not None:
            subs[ax[0]] = iv.expr
        axes = _broadcast(axes, iv.axes)
    return Index(x.expr.subs(subs, simultaneous=True), axes + x.axes[len(idx):])


def _input_read(n: fx.Node, val, floats: bool = False) -> Index:
    """An integer / bool input tensor (a key-validity ``attention_mask``) as a symbolic
    read ``t(i0, i1, ...)`` of its dims of size != 1; bool reads are ``t(...) != 0``.
    With ``floats``, a float tensor (ALiBi slopes: a constant, buffer, parameter or any
    value the graph computes) is read the same way."""
    if not isinstance(val, torch.Tensor) or val.is_complex() or val.dim() > 4 \
            or (val.is_floating_point() and not floats):
        raise Opaque(f"it reads the input tensor {n.target!r} (values unknown at compile time)")
    axes, args = [], []
    for d in val.shape:
        if not isinstance(d, torch.SymInt) and d == 1:
            axes.append(None)
        else:
            s = sympy.Symbol(f"i{next(_counter)}", integer=True)
            axes.append((s, _sym(d)))
            args.append(s)
    if not args:
        raise Opaque(f"it reads the one-element input tensor {n.target!r}")
    e = sympy.Function(f"read_{n.name}")(*args)
    return Index(sympy.Ne(e, 0) if val.dtype == torch.bool else e, tuple(axes))


def _same(ev, node, x, *a, **k):
    return ev.arg(x)


def _nonzero(e):
    """``e != 0`` as a boolean (a number cast to bool): a where(c, 0, -inf) mask cast to
    bool is ``not c``."""
    if isinstance(e, (sympy.logic.boolalg.Boolean, sympy.Rel)) or e in (sympy.true, sympy.false):
        return e
    if isinstance(e, sympy.Piecewise):
        parts, before = [], sympy.true
        for piece in e.args:
            parts.append(sympy.And(before, piece.cond, _nonzero(piece.expr)))
            before = sympy.And(before, sympy.Not(piece.cond))
        return sympy.Or(*parts)
    if e.is_number:
        return sympy.false if e.is_zero else sympy.true
    return sympy.Ne(e, 0)


def _to(ev, node, x, *a, **k):
    x = ev.arg(x)
    dt = value_of(node)
    if isinstance(dt, torch.Tensor) and dt.dtype == torch.bool:
        return Index(_nonzero(x.expr), x.axes)
    if isinstance(dt, torch.Tensor) and dt.dtype != torch.bool and isinstance(x.expr, sympy.logic.boolalg.Boolean) \
            and not isinstance(x.expr, sympy.Piecewise):
        raise Opaque("a boolean cast to a number")
    return x


def _unsqueeze(ev, node, x, dim):
    x = ev.arg(x)
    axes = list(x.axes)
    dim = dim if dim >= 0 else dim + len(axes) + 1
    axes.insert(dim, None)
    return Index(x.expr, tuple(axes))


def _squeeze(ev, node, x, dim=None):
    """``squeeze([dim])``: the size-1 dims go (an index axis of extent 1 reads at 0)."""
    before = value_of(x)
    x = ev.arg(x)
    if not isinstance(before, torch.Tensor) or before.dim() != len(x.axes):
        raise Opaque("a squeeze without an example value")
    dims = range(before.dim()) if dim is None else [d % before.dim() for d in (dim if isinstance(dim, (tuple, list))
                                                                            else (dim,))]
    gone = {d for d in dims if not isinstance(before.shape[d], torch.SymInt) and before.shape[d] == 1}
    subs = {x.axes[d][0]: 0 for d in gone if x.axes[d] is not None}
    return Index(x.expr.subs(subs) if subs else x.expr, tuple(a for d, a in enumerate(x.axes) if d not in gone))


def _view(ev, node, x, *shape, **kw):
    """view / reshape / flatten / unflatten / expand, read off the recorded shapes.

    ``expand`` keeps every dim in place (right-aligned). The others group the dims of
    size != 1 of both shapes into runs of equal size products, in row-major order
    (:func:`_runs`): a run of one dim on each side carries its axis over unchanged (so
    equal sizes, ``Lq == Lk``, never move an axis to the wrong dim); a run that merges or
    splits dims gets a fresh axis per output dim, each input axis symbol rewritten as
    ``floor(flat / stride) mod size`` of the run's flat index (:func:`_regroup`) and
    simplified with the fresh axes' ranges (:func:`_in_range`). Such runs: BLOOM's
    ``(B*H, 1, Lk)`` alibi seen as ``(B, H, 1, Lk)`` (symbolic sizes), Swin's window
    partition ``view(B, H // P, P, W // P, P, C)``, the flat relative-position index
    ``table[index].view(N, N, -1)``, ``expand(B, nW, ...).reshape(B * nW, ...)``."""
    src = x
    x = ev.arg(x)
    out, before = value_of(node), value_of(src)
    if not isinstance(out, torch.Tensor) or not isinstance(before, torch.Tensor) or before.dim() != len(x.axes):
        raise Opaque("a view without an example value")
    if op_of(node) == "expand":
        return Index(x.expr, (None,) * (out.dim() - len(x.axes)) + x.axes)

    def big(shape):
        return [i for i, d in enumerate(shape) if isinstance(d, torch.SymInt) or d != 1]

    src_dims, out_dims = big(before.shape), big(out.shape)
    subs = {x.axes[i][0]: 0 for i in range(before.dim()) if i not in src_dims and x.axes[i] is not None}
    axes, ranges = [None] * out.dim(), {}
    for run_src, run_out in _runs([_sym(before.shape[i]) for i in src_dims], [_sym(out.shape[j]) for j in out_dims]):
        if len(run_src) == 1 and len(run_out) == 1:
            axes[out_dims[run_out[0]]] = x.axes[src_dims[run_src[0]]]
            continue
        got = _regroup([x.axes[src_dims[i]] for i in run_src], [_sym(before.shape[src_dims[i]]) for i in run_src],
                       [_sym(out.shape[out_dims[j]]) for j in run_out])
        if got is None:  # the run does not vary: its output dims broadcast
            continue
        run_subs, run_axes = got
        subs.update(run_subs)
        for j, ax in zip(run_out, run_axes):
            axes[out_dims[j]] = ax
            ranges[ax[0]] = ax[1]
    e = x.expr.subs(subs, simultaneous=True) if subs else x.expr
    return Index(_in_range(e, ranges) if ranges else e, tuple(axes))


def _runs(src: list, out: list):
    """The dims of two shapes (sizes != 1, sympy) grouped into runs of equal products:
    ``[([src dims], [out dims]), ...]`` in order. Numeric runs grow the side with the
    smaller product; symbolic ones the side whose product divides the other's
    (``B*H`` against ``B, H``).

    Raises:
        Opaque: the shapes do not regroup (symbolic sizes whose products cannot be
            matched, or different element counts)."""
    runs, i, j = [], 0, 0
    while i < len(src) or j < len(out):
        if i == len(src) or j == len(out):
            raise Opaque("a reshape between shapes of different sizes")
        a, b, ra, rb = src[i], out[j], [i], [j]
        i, j = i + 1, j + 1
        while sympy.simplify(a - b) != 0:
            if a.is_number and b.is_number:
                grow_src, grow_out = bool(a < b), bool(b < a)
            else:
                grow_src = sympy.fraction(sympy.simplify(b / a))[1] == 1
                grow_out = sympy.fraction(sympy.simplify(a / b))[1] == 1
            if grow_src and i < len(src):
                a, ra, i = a * src[i], ra + [i], i + 1
            elif grow_out and j < len(out):
                b, rb, j = b * out[j], rb + [j], j + 1
            else:
                raise Opaque("a reshape whose sizes do not pair up")
        runs.append((ra, rb))
    return runs


def _regroup(src_axes: list, src_sizes: list, out_sizes: list):
    """One run of a merging / splitting reshape: ``({input symbol: its value}, output
    axes)``, or None when no input axis varies. The run's flat (row-major) index is
    ``sum(t_k * stride_k)`` over fresh output symbols ``t_k``; input dim ``i`` (size
    ``n_i``, stride ``s_i``) is ``floor(flat / s_i) mod n_i`` (no ``floor`` for the last
    dim, no ``mod`` for the first); a broadcast input dim (axis None) only takes its
    place in the strides (``expand(B, nW, ..).reshape(B * nW, ..)``: ``w = b' mod nW``)."""
    if all(a is None for a in src_axes):
        return None
    fresh = [sympy.Symbol(f"i{next(_counter)}", integer=True) for _ in out_sizes]
    flat, stride = sympy.Integer(0), sympy.Integer(1)
    for t, n in zip(reversed(fresh), reversed(out_sizes)):
        flat, stride = flat + t * stride, stride * n
    subs, stride = {}, sympy.Integer(1)
    for k in range(len(src_axes) - 1, -1, -1):
        if src_axes[k] is not None:
            v = flat if k == len(src_axes) - 1 else sympy.floor(flat / stride)
            subs[src_axes[k][0]] = v if k == 0 else sympy.Mod(v, src_sizes[k])
        stride = stride * src_sizes[k]
    return subs, [(t, n) for t, n in zip(fresh, out_sizes)]


def _in_range(e, ranges: dict):
    """``e`` with ``floor(a + r/n)`` -> ``a`` and ``Mod(a*n + r, n)`` -> ``r`` for each index
    ``r`` whose range is ``0 <= r < n`` (``ranges``: symbol -> ``n``) and integer ``a``."""
    def floor(x):
        for r, n in ranges.items():
            rest = sympy.simplify(x.args[0] - r / n)
            if rest.is_integer and not rest.has(r):
                return rest
        return x

    def mod(x):
        v, m = x.args
        for r, n in ranges.items():
            if sympy.simplify(n - m) == 0 and sympy.simplify((v - r) / m).is_integer:
                return r
        return x

    for _ in range(3):
        e = e.replace(lambda x: isinstance(x, sympy.floor), floor).replace(lambda x: isinstance(x, sympy.Mod), mod)
    return e


def _repeat(ev, node, x, *reps):
    """``x.repeat(r0, r1, ...)`` (BLOOM's ``alibi.repeat(B, 1, 1)``): a repeated dim reads
    the source at ``Mod(i, n)``; new leading dims and dims of size 1 are constant."""
    src = x
    x = ev.arg(x)
    reps = tuple(reps[0]) if len(reps) == 1 and isinstance(reps[0], (tuple, list)) else reps
    out, before = value_of(node), value_of(src)
    if not isinstance(out, torch.Tensor) or not isinstance(before, torch.Tensor) or len(reps) != out.dim() \
            or before.dim() != len(x.axes):
        raise Opaque("a repeat without example values")
    axes, subs = list((None,) * (out.dim() - len(x.axes)) + x.axes), {}
    for i, r in enumerate(reps):
        a = axes[i]
        if a is None or (not isinstance(r, torch.SymInt) and r == 1):
            continue
        t = sympy.Symbol(f"i{next(_counter)}", integer=True)
        subs[a[0]] = sympy.Mod(t, a[1])
        axes[i] = (t, _sym(out.shape[i]))
    return Index(x.expr.subs(subs, simultaneous=True), tuple(axes))


def _cumsum(ev, node, x, dim, **kw):
    """``x.cumsum(dim)`` of a value constant along ``dim`` (Falcon's and BLOOM's
    ``ones(B, L).cumsum(-1)`` positions): ``x * (i + 1)``. A cumulative sum of a value that
    varies along ``dim`` (a padding mask's positions) is opaque."""
    src = x
    x = ev.arg(x)
    out = value_of(node)
    if not isinstance(out, torch.Tensor) or out.dim() != len(x.axes):
        raise Opaque("a cumsum without an example value")
    d = kw.get("dim", dim) % out.dim()
    if x.axes[d] is not None:
        raise Opaque(f"a cumulative sum along a dim where {src.name} varies (a position that depends on the "
                     "values of a mask)")
    i = sympy.Symbol(f"i{next(_counter)}", integer=True)
    axes = list(x.axes)
    axes[d] = (i, _sym(out.shape[d]))
    return Index(x.expr * (i + 1), tuple(axes))


def _div(ev, node, a, b):
    """``a / c`` with ``c`` a number (Falcon's ``alibi / sqrt(d)``). A division by a tensor
    is opaque: in a score term the quotient is then read as one tensor (MPT's slopes
    ``1 / 2 ** x`` stay ``slope0[h]``, not ``1 / slope0[h]``)."""
    if isinstance(b, fx.Node):
        raise Opaque("a division by a tensor")
    return _binary(operator.truediv)(ev, node, a, b)


def _compare(f):
    """A comparison; a Piecewise operand (Falcon's ``causal_mask < -1`` on a ``0 / finfo.min``
    mask) is compared branch by branch and the result written as a boolean."""
    def cmp(a, b):
        e = f(a, b)
        if isinstance(e, sympy.Rel) and e.has(sympy.Piecewise):
            e = _nonzero(sympy.piecewise_fold(e))
        return e
    return _binary(cmp)


def _where(ev, node, c, a, b):
    c, a, b = ev.arg(c), ev.arg(a), ev.arg(b)
    a = _distinct(c, a)
    b = _distinct(Index(c.expr, _broadcast(c.axes, a.axes)), b)
    return Index(sympy.Piecewise((a.expr, _bool(c.expr)), (b.expr, True)),
                 _broadcast(_broadcast(c.axes, a.axes), b.axes))


def _masked_fill(ev, node, x, cond, value):
    """``x.masked_fill(cond, value)``: ``where(cond, value, x)``."""
    return _where(ev, node, cond, value, x)


def _swap(axes: tuple, d0: int, d1: int) -> tuple:
    axes = list(axes)
    d0, d1 = d0 % len(axes), d1 % len(axes)
    axes[d0], axes[d1] = axes[d1], axes[d0]
    return tuple(axes)


def _transpose(ev, node, x, d0, d1):
    x = ev.arg(x)
    return Index(x.expr, _swap(x.axes, d0, d1))


def _getattr(ev, node, x, name):
    """``x.T`` (a 2-D transpose, ModernBERT's ``rows - rows.T``) and ``x.mT``."""
    x = ev.arg(x)
    if name == "T" and len(x.axes) <= 2:
        return Index(x.expr, tuple(reversed(x.axes)))
    if name == "mT" and len(x.axes) >= 2:
        return Index(x.expr, _swap(x.axes, -1, -2))
    raise Opaque(f"the attribute {name!r}")


def _const_tensor(ev, node, *args, **kw):
    """A tensor constant: ``tensor(c)`` ..., and ``full(size, c)`` / ``zeros`` / ``ones``
    of any shape (T5's cross-attention ``position_bias = zeros(1, H, Lq, Lk)``)."""
    out = value_of(node)
    fill = kw.get("fill_value", args[1] if len(args) > 1 else None)
    if isinstance(out, torch.Tensor) and op_of(node) == "full" and isinstance(fill, (int, float, bool)):
        return Index(_sym(fill), (None,) * out.dim())  # full(size, c) of any shape
    if isinstance(out, torch.Tensor) and op_of(node) in ("zeros", "ones", "new_zeros", "new_ones") \
            and not out.is_complex():
        val = 1 if op_of(node) in ("ones", "new_ones") else 0
        return Index(_sym(bool(val) if out.dtype == torch.bool else val), (None,) * out.dim())
    if isinstance(out, torch.Tensor) and out.numel() == 1 and all(s == 1 for s in out.shape) and args:
        val = args[0]
        if op_of(node) in ("new_ones", "new_zeros", "ones", "zeros"):
            val = 1 if op_of(node) in ("new_ones", "ones") else 0
            if out.dtype == torch.bool:
                val = bool(val)
        if isinstance(val, (int, float, bool)):
            return Index(_sym(val), (None,) * out.dim())
    raise Opaque(f"a tensor constant built by {op_of(node)}")


def _max_min(f):
    def rule(ev, node, a, b):
        x, y = ev.arg(a), ev.arg(b)
        y = _distinct(x, y)
        return Index(f(x.expr, y.expr), _broadcast(x.axes, y.axes))
    return rule


def _permute(ev, node, x, *dims):
    """``x.permute(dims)`` (T5's ``values.permute([2, 0, 1])``)."""
    x = ev.arg(x)
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    if sorted(d % len(x.axes) for d in dims) != list(range(len(x.axes))):
        raise Opaque(f"a permute {dims}")
    return Index(x.expr, tuple(x.axes[d % len(x.axes)] for d in dims))


#: elementwise ops a bucket function may apply to the relative position (besides the
#: :data:`RULES` ops it is built with): ``torch.log``, ``torch.min(a, b)``, casts ...
_ELEMENTWISE_FUNCS = {torch.log, torch.log2, torch.log1p, torch.exp, torch.sqrt, torch.floor, torch.ceil,
                      torch.trunc, torch.round, torch.clamp, torch.min, torch.max, torch.minimum, torch.maximum,
                      torch.where, torch.abs, torch.sign}
_ELEMENTWISE_METHODS = {"log", "log2", "log1p", "exp", "sqrt", "floor", "ceil", "trunc", "round", "clamp",
                        "clamp_min", "clamp_max", "float", "long", "int", "double", "to", "type_as", "min", "max",
                        "abs", "sign", "contiguous", "clone"}
_ELEMENTWISE_OPS = {"add", "iadd", "sub", "mul", "div", "floordiv", "mod", "neg", "abs", "le", "lt", "ge", "gt",
                    "eq", "ne", "and", "or", "not", "where", "maximum", "minimum", "to", "contiguous", "clone"}
_CONST_LIKE = {torch.full_like, torch.zeros_like, torch.ones_like}


def relative_bucket(node: fx.Node) -> sympy.Basic:
    """Check that a 2-D integer tensor ``bucket[i, j]`` (T5's ``relative_position_bucket``)
    is a function of ``j - i`` alone, and return the offset-free form of its argument.

    The check is symbolic on the graph: ``node`` must be built by elementwise ops
    (comparisons, ``abs``, ``log``, ``min``, ``where``, casts, arithmetic with constants,
    ``full_like`` / ``zeros_like``) from values the mask recovery evaluates to a function
    of ``j - i`` (``arange(Lk)[None, :] - arange(Lq)[:, None]`` plus a constant), each
    broadcast onto ``node``'s ``(i, j)`` dims. Then ``bucket[i, j] = f(j - i)`` for one
    function ``f``, and the bucket of every pair is the bucket of its distance.

    Raises:
        Opaque: ``node`` is not 2-D, or some value it is built from is not a function of
            ``j - i`` (it reads a tensor, varies along ``i`` or ``j`` alone, or is built
            with an op that is not elementwise).
    """
    val = value_of(node)
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or val.is_floating_point() or val.is_complex():
        raise Opaque("the embedding index is not a 2-D integer tensor")
    u = sympy.symbols("u0 u1", integer=True)
    d = sympy.Symbol("d", integer=True)
    seen: set = set()
    found = [False]

    def leaf(n: fx.Node) -> bool:
        ev = Evaluator()
        try:
            v = ev.node(n)
        except Opaque:
            return False
        if ev.reads:
            raise Opaque(f"the bucket index reads the tensor {next(iter(ev.reads.values())).target!r}")
        if len(v.axes) > 2:
            raise Opaque("a bucket index value with more than 2 dims")
        axes = (None,) * (2 - len(v.axes)) + v.axes
        subs = {ax[0]: u[i] for i, ax in enumerate(axes) if ax is not None}
        e = v.expr.subs(subs, simultaneous=True)
        e = e.subs(u[1], u[0] + d)
        if e.has(u[0]):
            raise Opaque(f"the bucket index value {n.name} is not a function of the relative position kv - q")
        found[0] = found[0] or e.has(d)
        return True

    def walk(n):
        if not isinstance(n, fx.Node) or n in seen:
            return
        seen.add(n)
        v = value_of(n)
        if not isinstance(v, torch.Tensor):
            if isinstance(v, (int, float, bool, torch.SymInt)) or v is None:
                return  # a size or a number: constant
            raise Opaque(f"the bucket index uses {n.name}")
        if n.op == "call_function" and n.target in _CONST_LIKE:
            if all(not isinstance(a, fx.Node) for a in list(n.args[1:]) + list(n.kwargs.values())):
                return  # full_like(x, c): constant, whatever x holds
            raise Opaque("a full_like with a tensor fill value")
        if leaf(n):
            return
        ok = (n.op == "call_function" and (n.target in _ELEMENTWISE_FUNCS or op_of(n) in _ELEMENTWISE_OPS)) or \
            (n.op == "call_method" and (n.target in _ELEMENTWISE_METHODS or op_of(n) in _ELEMENTWISE_OPS))
        if n.op == "call_method" and n.target in ("min", "max") and (len(n.args) != 2 or n.kwargs
                                                                    or not isinstance(n.args[1], fx.Node)):
            ok = False  # x.min(dim): a reduction
        if n.op == "call_function" and n.target in (torch.min, torch.max) and (len(n.args) != 2 or n.kwargs
                                                                                or not isinstance(n.args[1], fx.Node)):
            ok = False
        if not ok:
            raise Opaque(f"the bucket index is built with {op_of(n) or n.target!r}, which is not elementwise")
        for a in n.all_input_nodes:
            walk(a)

    walk(node)
    if not found[0]:
        raise Opaque("the embedding index does not vary with the relative position kv - q")


def _embedding(ev, node, idx, weight, padding_idx=None, max_norm=None, *rest, **kw):
    """``embedding(bucket, weight)`` of a relative-position bucket (T5): the read
    ``read_weight(bucket_B(j - i), h)``, ``bucket_B`` an undefined function of the
    distance (checked by :func:`relative_bucket`), ``B`` the index node."""
    if not ev.floats:
        raise Opaque("an embedding lookup")
    max_norm = kw.get("max_norm", max_norm)
    w = value_of(weight)
    if max_norm is not None or not isinstance(weight, fx.Node) or not isinstance(idx, fx.Node) \
            or not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point() \
            or isinstance(w.shape[0], torch.SymInt):
        raise Opaque("an embedding that is not a lookup of a 2-D float table with a fixed number of rows")
    try:
        relative_bucket(idx)
    except Opaque as e:
        ev.why.append(str(e))
        raise
    bv = value_of(idx)
    i, j, c = (sympy.Symbol(f"i{next(_counter)}", integer=True) for _ in range(3))
    bucket = sympy.Function(f"bucket_{idx.name}")(j - i)
    ev.buckets[f"bucket_{idx.name}"] = idx
    ev.reads[f"read_{weight.name}"] = weight
    read = sympy.Function(f"read_{weight.name}")(bucket, c)
    return Index(read, ((i, _sym(bv.shape[0])), (j, _sym(bv.shape[1])), (c, _sym(w.shape[1]))))


#: op name -> evaluation rule on symbolic values (see :func:`attncc.fx.ops.op_of`)
RULES = {
    "arange": _arange,
    "add": _binary(operator.add), "sub": _binary(operator.sub), "mul": _binary(operator.mul),
    "div": lambda ev, node, a, b: _div(ev, node, a, b),
    "floordiv": _binary(lambda a, b: sympy.floor(a / b)), "mod": _binary(sympy.Mod),
    "neg": lambda ev, node, x: Index(-ev.arg(x).expr, ev.arg(x).axes),
    "le": _compare(sympy.Le), "lt": _compare(sympy.Lt), "ge": _compare(sympy.Ge), "gt": _compare(sympy.Gt),
    "eq": _compare(sympy.Eq), "ne": _compare(sympy.Ne),
    "and": _binary(lambda a, b: sympy.And(_bool(a), _bool(b))),
    "or": _binary(lambda a, b: sympy.Or(_bool(a), _bool(b))),
    "not": lambda ev, node, x: Index(sympy.Not(_bool(ev.arg(x).expr)), ev.arg(x).axes),
    "abs": lambda ev, node, x: Index(sympy.Abs(ev.arg(x).expr), ev.arg(x).axes),
    "maximum": _max_min(sympy.Max), "minimum": _max_min(sympy.Min),
    "where": _where, "masked_fill": _masked_fill, "getitem": _getitem, "unsqueeze": _unsqueeze,
    "squeeze": _squeeze, "transpose": _transpose, "getattr": _getattr,
    "view": _view, "reshape": _view, "expand": _view, "flatten": _view, "unflatten": _view, "repeat": _repeat,
    "cumsum": _cumsum,
    "to": _to, "contiguous": _same, "clone": _same,
    "tensor": _const_tensor, "new_ones": _const_tensor, "new_zeros": _const_tensor, "zeros": _const_tensor,
    "ones": _const_tensor, "full": _const_tensor, "permute": _permute, "embedding": _embedding,
}


class Evaluator:
    """Evaluates mask producers symbolically (memoised per node)."""

    def __init__(self, floats: bool = False):
        self.memo: dict = {}
        self.reads: dict = {}  # function name -> the input node it reads
        #: float tensors that are not modelled (inputs, parameters, constants, values of
        #: ops outside :data:`RULES`) become reads of their values (score terms only)
        self.floats = floats
        #: ``bucket_<name>`` -> a relative-position bucket index node (see :func:`_embedding`)
        self.buckets: dict = {}
        #: why an embedding was not recovered as a bucketed table read (for the report)
        self.why: list = []
        #: computed float values read as tensors -> why they were not modelled
        self.opaque: dict = {}
        #: size symbol -> the graph input it came from (a KV cache's ``cumulative_length``)
        self.size_names: dict = {}
        #: size symbol -> the graph node holding it (passed to the call of a site whose
        #: mask is aligned at run time, :mod:`attncc.fx.positions`)
        self.size_nodes: dict = {}

    def arg(self, a) -> Index:
        """An FX argument (node or constant) as an :class:`Index`."""
        if isinstance(a, fx.Node):
            return self.node(a)
        if isinstance(a, (int, float, bool, torch.SymInt)):
            return Index(_sym(a))
        raise Opaque(f"unsupported argument {a!r}")

    def node(self, n: fx.Node) -> Index:
        """The symbolic value of node ``n``.

        Raises:
            Opaque: ``n`` reads an input tensor or uses an op outside :data:`RULES`.
        """
        if n in self.memo:
            return self.memo[n]
        val = value_of(n)
        if isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool):
            res = Index(_sym(val))  # sizes and size arithmetic: their symbolic value
            if n.op == "placeholder" and isinstance(val, torch.SymInt):  # for the report
                for sym in _sym(val).free_symbols:
                    self.size_names.setdefault(str(sym), str(n.target))
            if isinstance(val, torch.SymInt) and isinstance(_sym(val), sympy.Symbol):
                self.size_nodes.setdefault(str(_sym(val)), n)
        elif n.op == "placeholder" or n.op == "get_attr":
            res = _input_read(n, val, self.floats)
            self.reads[f"read_{n.name}"] = n
        else:
            rule = RULES.get(op_of(n))
            try:
                if rule is None:
                    raise Opaque(f"it is built with {op_of(n) or n.target!r}, which the mask recovery does not model")
                res = rule(self, n, *n.args, **n.kwargs)
            except Opaque as e:
                # score terms: a float value, or an integer one from a cumulative sum (BLOOM's
                # positions cumsum(attention_mask) - 1 with padding), is read as a tensor
                if not (self.floats and isinstance(val, torch.Tensor) and not val.is_complex()
                        and (val.is_floating_point() or (op_of(n) == "cumsum" and val.dtype != torch.bool))):
                    raise
                self.opaque[n] = str(e)
                res = _input_read(n, val, True)
                self.reads[f"read_{n.name}"] = n
        self.memo[n] = res
        return res


def recover(node: fx.Node, sizes: dict, additive: Optional[bool] = None, reads: Optional[list] = None,
            align: Optional[list] = None):
    """The mask a node computes, as a sympy boolean over ``q, kv, b, h, Lq, Lk``.

    Args:
        node: the mask (bool: True = keep; float: additive, ``0`` keep and
            ``-inf`` / a value ``<= -1e30`` drop).
        sizes: ``{"B", "H", "Lq", "Lk"}`` -> the site's sizes (ints or SymInts).

        reads: when given, an integer / bool input tensor the mask reads (a padding
            ``attention_mask`` of key validity, ``(B, Lk)`` or ``(B, 1, 1, Lk)``) is kept as
            a tensor read ``padN[b, kv]`` in the expression (an undefined sympy function
            ``padN``) and ``(name, dims, node)`` is appended here, ``dims`` the spec's
            dim names of the read (``("B", "Lk")``); without it such masks are opaque.
        align: when given, a mask whose positions are offset by a run-time size the graph
            does not tie to ``Lq`` / ``Lk`` (a KV cache's length in decode steps) is written
            bottom-right (:func:`attncc.fx.positions.align`) and ``(Alignment, {symbol name:
            node})`` appended here; the call must check the alignment at run time.

    Returns:
        The boolean mask expression.

    Raises:
        Opaque: the mask is not a function of the indices alone, or its values are not
            exactly keep / drop.
    """
    ev = Evaluator()
    v = ev.node(node)
    if ev.reads and reads is None:
        raise Opaque(f"it reads the input tensor {next(iter(ev.reads.values())).target!r}")
    e = v.expr
    if isinstance(e, sympy.Piecewise):  # additive: where(keep, 0, -big)
        pieces = e.args
        if len(pieces) != 2 or not pieces[0].expr.is_zero or pieces[1].cond is not sympy.true:
            raise Opaque("an additive mask with values other than 0 and a large negative number")
        if not _drops(pieces[1].expr):
            raise Opaque(f"an additive mask whose masked value {pieces[1].expr} is not <= -1e30")
        e = pieces[0].cond
    elif not _is_bool(e):
        raise Opaque("a float mask that is not where(condition, 0, -inf)")
    e = _to_site(Index(e, v.axes), sizes, ev.size_names, align, ev.size_nodes)
    if ev.reads:
        e = _name_reads(e, ev.reads, reads)
    e = sympy.simplify_logic(e) if isinstance(e, sympy.logic.boolalg.BooleanFunction) else e
    if e is sympy.false:
        raise Opaque("the mask drops every pair")
    return e


def _is_bool(e) -> bool:
    return isinstance(e, (sympy.logic.boolalg.Boolean, sympy.Rel)) or e in (sympy.true, sympy.false)


def _drops(v) -> bool:
    """``v`` is a fill value that removes a pair: -inf, a number <= -1e30, or such a number
    plus a finite term (an ALiBi bias plus a ``0 / finfo.min`` mask: ``finfo.min`` in float32)."""
    c = v.as_coeff_Add()[0] if isinstance(v, sympy.Add) else v
    return c == -sympy.oo or (c.is_number and c.is_real is not False and float(c) <= -1e30)


def _to_site(v: Index, sizes: dict, names: Optional[dict] = None, align: Optional[list] = None,
             nodes: Optional[dict] = None):
    """``v`` mapped onto ``(b, h, q, kv)`` (right-aligned dims), with the graph's size
    symbols rewritten in ``Lq`` / ``Lk`` (``names``: size symbol -> the graph input it came
    from, for the message when one cannot be). A size left over (a KV cache's length) is
    aligned bottom-right when ``align`` is a list (see :func:`recover`; ``nodes``: size
    symbol -> its graph node)."""
    if len(v.axes) > 4:
        raise Opaque("a mask with more than 4 dims")
    axes = (None,) * (4 - len(v.axes)) + v.axes
    subs = {}
    for ax, (name, idx) in zip(axes, (("B", b_idx), ("H", h_idx), ("Lq", q_idx), ("Lk", kv_idx))):
        if ax is None:
            continue
        sym, extent = ax
        if sympy.simplify(extent - _sym(sizes[name])) != 0:
            raise Opaque(f"its {name} axis has extent {extent}, not the attention's {sizes[name]}")
        subs[sym] = idx
    e = v.expr.subs(subs, simultaneous=True)
    # the graph's size symbols (dynamic shapes), rewritten in Lq and Lk where possible
    lq, lk = _sym(sizes["Lq"]), _sym(sizes["Lk"])
    free = e.free_symbols - {q_idx, kv_idx, b_idx, h_idx, Lq, Lk}
    if free:
        unknowns = sorted((lq.free_symbols | lk.free_symbols) & free, key=str)
        sol = sympy.solve([sympy.Eq(Lq, lq), sympy.Eq(Lk, lk)], unknowns, dict=True) if unknowns else []
        if sol:
            e = e.subs(sol[0])
        left = e.free_symbols - {q_idx, kv_idx, b_idx, h_idx, Lq, Lk}
        if left and align is not None and all(str(s) in (nodes or {}) for s in left):
            from .positions import NotAligned, align as align_positions

            lq_, lk_ = (x.subs(sol[0]) if sol else x for x in (lq, lk))
            try:
                e, how = align_positions(e, left, names or {}, (lq_ if lq_.is_number else Lq,
                                                                 lk_ if lk_.is_number else Lk))
            except NotAligned as why:
                raise Opaque(f"it depends on the run-time size {', '.join(map(str, sorted(left, key=str)))}, "
                             f"which the graph does not tie to Lq, Lk, and is not a bottom-right offset ({why})")
            align.append((how, {str(s): nodes[str(s)] for s in left}))
            left = set()
        if left:
            said = [f"{s} = {(names or {}).get(str(s), 'a size')}" for s in sorted(left, key=str)]
            raise Opaque(f"it depends on the run-time size {', '.join(said)}, which the graph does not tie to Lq, "
                         "Lk (positions offset by a KV cache's length: the query position is not Lk - Lq + q "
                         "in the graph)")
    return e


def _pieces(e, before=sympy.true):
    """``(value, condition)`` of each branch of a (nested) Piecewise, the conditions made
    exclusive (each includes the negation of the earlier ones)."""
    if not isinstance(e, sympy.Piecewise):
        yield e, before
        return
    for piece in e.args:
        yield from _pieces(piece.expr, sympy.And(before, piece.cond))
        before = sympy.And(before, sympy.Not(piece.cond))


def _read_rel(r):
    """A comparison of one tensor read with numbers (``1.0 - pad[b, kv] != 0``), solved for
    the read (``pad[b, kv] != 1``); other comparisons unchanged."""
    from sympy.core.function import AppliedUndef

    reads = r.atoms(AppliedUndef)
    if not isinstance(r, (sympy.Eq, sympy.Ne)) or len(reads) != 1:
        return r
    f = next(iter(reads))
    sol = sympy.solve(r.lhs - r.rhs, f)
    if len(sol) != 1 or not sol[0].is_number:
        return r
    x = sol[0]
    x = sympy.Integer(int(x)) if x.is_real and float(x) == int(float(x)) else x
    return type(r)(f, x)


def _refine(value, cond):
    """``value`` where ``cond`` holds: reads fixed by an equality in ``cond`` substituted
    (``1.0 - pad[b, kv]`` is 0 where ``pad[b, kv] == 1``)."""
    conj = cond.args if isinstance(cond, sympy.And) else (cond,)
    for c in conj:
        if isinstance(c, sympy.Eq) and c.lhs.is_Function and c.rhs.is_number:
            value = value.subs(c.lhs, c.rhs)
    return sympy.expand(value)


def recover_score(node: fx.Node, sizes: dict, reads: list, float_reads: list, index_reads: Optional[list] = None,
                  align: Optional[list] = None):
    """An additive mask / bias split into a mask and a score term: ``where(keep, term, -inf)``
    (or ``term.masked_fill(~keep, finfo.min)``) -> ``(keep, term)``.

    The term is a closed form in ``q, kv, b, h, Lq, Lk`` and float tensors read at batch /
    head indices only (ALiBi ``slopes[:, None, None] * (j - i)`` -> ``slope0[h]*(kv - q)``,
    the slopes a constant, a buffer, a parameter or computed in the graph).

    Args:
        node: the float tensor added to the scores.
        sizes: ``{"B", "H", "Lq", "Lk"}`` -> the site's sizes.
        reads: integer reads of the mask part are appended here (see :func:`recover`).
        float_reads: float reads of the term are appended here as ``(name, dims, node)``
            (``("slope0", ("H",), node)``; T5's table ``("table0", ("32", "H"), weight)``).
        index_reads: the int32 bucket vectors of relative-position tables are appended
            here as ``(name, ("Lq + Lk - 1",), Diagonals(bucket_node))`` (T5:
            ``table0[bucket1[kv - q + Lq - 1], h]``); without it such tables stay tensors.
        align: as :func:`recover` (a ``0 / finfo.min`` decode mask offset by the cache length).

    Returns:
        ``(mask or None, term or None)``: ``None`` for all pairs kept / a zero term.

    Raises:
        Opaque: the values are not ``term`` or a large negative number, or the term reads
            a tensor at a query or key index (a dense bias stays a tensor).
    """
    ev = Evaluator(floats=True)
    v = ev.node(node)
    if _is_bool(v.expr):
        raise Opaque("a boolean added to the scores")
    e = sympy.piecewise_fold(_to_site(v, sizes, ev.size_names, align, ev.size_nodes))  # bias + where(c, 0, min): one Piecewise
    floats = {k: n for k, n in ev.reads.items() if value_of(n).is_floating_point()}
    ints = {k: n for k, n in ev.reads.items() if k not in floats}
    keep, terms, conds = sympy.false, [], []
    for value, cond in _pieces(e):
        cond = cond.replace(lambda x: isinstance(x, (sympy.Eq, sympy.Ne)), _read_rel)
        if _drops(value):
            continue
        if value.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
            raise Opaque(f"an additive mask with the value {value}")
        cond = sympy.simplify_logic(cond)
        if cond is sympy.false:
            continue
        keep = sympy.Or(keep, cond)
        terms.append(_refine(value, cond))
        conds.append(cond)
    if not terms:
        raise Opaque("the mask drops every pair")
    term = terms[0]
    if _is_bool(term) or term.has(sympy.Piecewise):
        raise Opaque("a bias with a condition in its values")
    term += _steps(terms, conds)
    keep = sympy.simplify_logic(keep) if isinstance(keep, sympy.logic.boolalg.BooleanFunction) else keep
    if keep is sympy.false:
        raise Opaque("the mask drops every pair")
    if any(f.__name__ in floats for f in (a.func for a in keep.atoms(sympy.core.function.AppliedUndef))):
        raise Opaque("a mask that depends on a float tensor's values")
    got, fgot, igot = list(reads), list(float_reads), list(index_reads or [])
    keep = _name_reads(keep, ints, got)
    term = _name_reads(term, ints, got)
    try:
        term = _name_reads(term, floats, fgot, floats=True,
                           buckets=ev.buckets if index_reads is not None else None,
                           index_reads=igot if index_reads is not None else None, index_inputs=ints, opaque=ev.opaque)
    except Opaque as e:
        if ev.why:
            raise Opaque(f"{e}; the embedding's index is not a relative-position bucket: {ev.why[0]}") from None
        raise
    reads[:], float_reads[:] = got, fgot
    if index_reads is not None:
        index_reads[:] = igot
    return (None if keep is sympy.true else keep), (None if term.is_zero else sympy.factor_terms(term))


def _steps(terms: list, conds: list):
    """The part of a piecewise bias that is not ``terms[0]``: 0 when every piece has the
    same closed form, else ``where(cond_0, 0, where(cond_1, c_1, ...))`` with ``c_i = terms[i]
    - terms[0]`` constants (Swin's shifted-window mask: 0 inside a region, -100 across
    regions, added to the relative-position table read).

    Raises:
        Opaque: the pieces differ by more than constants."""
    diffs = [sympy.simplify(t - terms[0]) for t in terms]
    if all(d == 0 for d in diffs):
        return sympy.Integer(0)
    if not all(d.is_number for d in diffs):
        raise Opaque("a bias with different closed forms on different pairs")
    return sympy.Piecewise(*[(d, c) for d, c in zip(diffs[:-1], conds[:-1])], (diffs[-1], True))


_DIM_OF = {b_idx: "B", h_idx: "H", q_idx: "Lq", kv_idx: "Lk"}


@dataclass(frozen=True)
class Diagonals:
    """A run-time tensor derived from a graph node: the bucket of each relative distance
    ``kv - q`` from ``-(Lq - 1)`` to ``Lk - 1``, read off a ``(Lq, Lk)`` bucket matrix
    along its first column and row (:func:`bucket_diagonals`)."""

    node: fx.Node


def bucket_diagonals(bucket: torch.Tensor) -> torch.Tensor:
    """``bucket[Lq + Lk - 1]`` (int32) from a ``(Lq, Lk)`` matrix that depends on ``kv - q``
    only: entry ``d + Lq - 1`` is the bucket of distance ``d``."""
    return torch.cat([bucket[:, 0].flip(0), bucket[0, 1:]]).to(torch.int32)


def _table_read(app, node, buckets: dict, reads: list, index_reads: list):
    """T5's ``read_W(bucket_B(kv - q), h)`` as ``tableN[bucketM[kv - q + Lq - 1], h]``."""
    from sympy.core.function import AppliedUndef

    if buckets is None or len(app.args) != 2 or not isinstance(app.args[0], AppliedUndef) \
            or app.args[0].func.__name__ not in buckets or app.args[1] != h_idx:
        return None
    dist = app.args[0].args[0]
    if sympy.simplify(dist - (kv_idx - q_idx)) != 0:
        raise Opaque(f"the relative-position bucket is read at {dist}, not at kv - q")
    bname, tname = f"bucket{len(index_reads)}", f"table{len(reads)}"
    index_reads.append((bname, ("Lq + Lk - 1",), Diagonals(buckets[app.args[0].func.__name__])))
    reads.append((tname, (str(int(value_of(node).shape[0])), "H"), node))
    return sympy.Function(tname)(sympy.Function(bname)(kv_idx - q_idx + Lq - 1), h_idx)


def _label(node: fx.Node) -> str:
    """An input's name (its target) or a computed value's node name."""
    return node.name if node.op == "call_function" or node.op == "call_method" else str(node.target)


def _read_name(reads: list, node, dims: tuple, prefix: str) -> str:
    """The spec name of ``node`` read with ``dims``: the name it got in ``reads`` before
    (a tensor read twice is one tensor), else ``prefixN``, appended as ``(name, dims, node)``."""
    name = next((nm for nm, d, n in reads if n is node and d == dims), None)
    if name is None:
        name = f"{prefix}{len(reads)}"
        reads.append((name, dims, node))
    return name


def _index_expr(e, what: str) -> None:
    """Check that ``e`` is an integer expression of ``b, h, q, kv, Lq, Lk`` (and named reads)."""
    from sympy.core.function import AppliedUndef

    if e.free_symbols - {b_idx, h_idx, q_idx, kv_idx, Lq, Lk}:
        raise Opaque(f"{what} is read at {e}, which is not a function of b, h, q, kv")
    if e.has(sympy.Float) or any(not a.func.__name__.startswith(("index", "table"))
                                 for a in e.atoms(AppliedUndef)):
        raise Opaque(f"{what} is read at {e}")


def _tensor_name(node, reads: list, prefix: str) -> str:
    """The spec name of ``node`` in ``reads`` (:func:`_read_name`); the tensor's dims are
    its sizes != 1, as numbers."""
    val = value_of(node)
    if any(isinstance(d, torch.SymInt) for d in val.shape):
        raise Opaque(f"{_label(node)} has a symbolic size")
    return _read_name(reads, node, tuple(str(int(d)) for d in val.shape if d != 1), prefix)


def _gathered_read(app, node, index_inputs: dict, reads: list, index_reads: list):
    """A float tensor read at index expressions instead of plain ``b, h, q, kv``, each
    possibly reading an integer tensor: Swin's relative-position bias
    ``table[index[4*q + kv], h]`` (a ``(T, H)`` table gathered by a flat index buffer,
    then viewed as ``(N, N, H)``), or its region map read at window coordinates
    (``regions[2*floor(b mod 4 / 2) + floor(q / 2), ...]``). The float tensor is named
    ``tableN`` (appended to ``reads``), the integer ones ``indexM`` (appended to
    ``index_reads``, passed as int32); every read is exact (the graph computes the same
    values). Returns the renamed read."""
    from sympy.core.function import AppliedUndef

    args = []
    for a in app.args:
        subs = {}
        for r in a.atoms(AppliedUndef):
            n = index_inputs.get(r.func.__name__)
            if n is None:
                raise Opaque(f"the float tensor {_label(node)!r} is read at {r.func.__name__}")
            for x in r.args:
                _index_expr(x, f"the index tensor {_label(n)!r}")
            subs[r] = sympy.Function(_tensor_name(n, index_reads, "index"))(*r.args)
        a = a.subs(subs, simultaneous=True)
        _index_expr(a, f"the float tensor {_label(node)!r}")
        args.append(a)
    return sympy.Function(_tensor_name(node, reads, "table"))(*args)


def _name_reads(e, inputs: dict, reads: list, floats: bool = False, buckets: Optional[dict] = None,
                index_reads: Optional[list] = None, index_inputs: Optional[dict] = None,
                opaque: Optional[dict] = None):
    """The input-tensor reads of ``e`` renamed ``pad0, pad1, ...`` (appended to ``reads``
    as ``(name, dims, node)``); each must be read at distinct plain indices ``b/h/q/kv``,
    not at both ``q`` and ``kv`` (a dense mask stays a bool mask tensor). ``floats``:
    float tensors of a score term, named ``slope0, ...`` and read at ``b`` / ``h`` only,
    or (with ``buckets``) an embedding table read at a relative-position bucket and the
    head, named ``tableN`` with its bucket vector ``bucketM`` appended to ``index_reads``, or
    (with ``index_reads``) a float tensor read at index expressions, possibly through the
    integer tensors of ``index_inputs`` (:func:`_gathered_read`). ``opaque``: computed
    float values read as tensors -> why they were not modelled (for the message when such
    a read is not at ``b`` / ``h``)."""
    from sympy.core.function import AppliedUndef

    subs = {}
    apps = e.atoms(AppliedUndef)
    nested = {r for a in apps for x in a.args for r in x.atoms(AppliedUndef)}
    for app in sorted(apps, key=str):
        if app.func.__name__.startswith("bucket_"):  # read inside a table read
            if floats and not buckets:
                raise Opaque("a table read at a relative-position bucket (not recovered at this site)")
            continue
        if app in nested:  # an index read: named with the read it indexes
            continue
        node = inputs.get(app.func.__name__)
        if node is not None and floats:
            got = _table_read(app, node, buckets, reads, index_reads)
            if got is None and index_reads is not None and not all(a in _DIM_OF for a in app.args):
                got = _gathered_read(app, node, index_inputs or {}, reads, index_reads)
            if got is not None:
                subs[app] = got
                continue
        if node is None:
            if (not floats and app.func.__name__.startswith("read_")) or \
                    (floats and re.fullmatch(r"pad\d+", app.func.__name__)):
                continue  # another kind's read (named by the other call)
            raise Opaque(f"an unknown function {app.func.__name__}")
        if not all(a in _DIM_OF for a in app.args) or len(set(app.args)) != len(app.args):
            raise Opaque(f"it reads {node.target!r} at {app.args}, not at plain (b, h, q, kv) indices")
        if q_idx in app.args and kv_idx in app.args:  # a dense mask: the mask tensor path reads it as bool
            raise Opaque(f"it reads the input tensor {node.target!r} at every (q, kv) pair (values unknown at "
                         "compile time)")
        if floats and not set(app.args) <= {b_idx, h_idx}:
            why = f", {opaque[node]}" if node in (opaque or {}) else ""
            raise Opaque(f"it reads the float tensor {_label(node)!r}{why} at {app.args} (a bias along the query / "
                         "key axes stays a tensor)")
        name = _read_name(reads, node, tuple(_DIM_OF[a] for a in app.args), "slope" if floats else "pad")
        subs[app] = sympy.Function(name)(*app.args)
    return e.subs(subs)
