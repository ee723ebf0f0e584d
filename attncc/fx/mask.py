"""Symbolic recovery of masks built inside an FX graph.

A mask built from ``arange`` / comparisons / ``where`` / ``&`` / ``|`` / ``~`` and size
arithmetic (transformers' ``sdpa_mask``, hand-written causal and sliding-window masks)
is evaluated on symbols instead of numbers: every value is an :class:`Index` — one
sympy expression of per-axis symbols, with the axis each tensor dim runs along. The
result, mapped onto ``(b, h, q, kv)`` and with the graph's size symbols rewritten in
terms of ``Lq`` and ``Lk``, becomes the site's ``mask:`` clause, so the kernel skips
tiles instead of reading a materialised mask.

Anything else (a producer that reads an input tensor, an op not listed in
:data:`RULES`) raises :class:`Opaque` with the reason; the caller then passes the mask
as a tensor instead (still exact).
"""

from __future__ import annotations

import itertools
import math
import operator
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
    (``pos[None, :] <= pos[:, None]`` from one ``arange``: two axes, not one)."""
    n = max(len(x.axes), len(y.axes))
    xa, ya = (None,) * (n - len(x.axes)) + x.axes, (None,) * (n - len(y.axes)) + y.axes
    where = {a[0]: i for i, a in enumerate(xa) if a is not None}
    subs, axes = {}, list(y.axes)
    for i, a in enumerate(ya):
        if a is not None and a[0] in where and where[a[0]] != i:
            fresh = sympy.Symbol(f"i{next(_counter)}", integer=True)
            subs[a[0]] = fresh
            axes[i - (n - len(y.axes))] = (fresh, a[1])
    return Index(y.expr.subs(subs), tuple(axes)) if subs else y


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
    x = ev.arg(x)
    idx = idx if isinstance(idx, tuple) else (idx,)
    axes, src = [], list(x.axes)
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
        else:
            raise Opaque(f"indexing with {i!r}")
    return Index(x.expr, tuple(axes + src))


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


def _view(ev, node, x, *shape, **kw):
    """view / reshape / expand: only dims of size 1 may appear, vanish or broadcast."""
    x = ev.arg(x)
    out = value_of(node)
    if not isinstance(out, torch.Tensor):
        raise Opaque("a view without an example value")
    real = [a for a in x.axes if a is not None]
    sizes = [_sym(s) for s in out.shape]
    axes, it = [], iter(real)
    pending = next(it, None)
    for s in sizes:
        if pending is not None and sympy.simplify(s - pending[1]) == 0:
            axes.append(pending)
            pending = next(it, None)
        else:
            axes.append(None)
    if pending is not None:
        raise Opaque("a reshape that merges or splits index axes")
    if op_of(node) == "expand":
        pass
    return Index(x.expr, tuple(axes))


def _where(ev, node, c, a, b):
    c, a, b = ev.arg(c), ev.arg(a), ev.arg(b)
    a = _distinct(c, a)
    b = _distinct(Index(c.expr, _broadcast(c.axes, a.axes)), b)
    return Index(sympy.Piecewise((a.expr, _bool(c.expr)), (b.expr, True)),
                 _broadcast(_broadcast(c.axes, a.axes), b.axes))


def _const_tensor(ev, node, *args, **kw):
    out = value_of(node)
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


#: op name -> evaluation rule on symbolic values (see :func:`attncc.fx.ops.op_of`)
RULES = {
    "arange": _arange,
    "add": _binary(operator.add), "sub": _binary(operator.sub), "mul": _binary(operator.mul),
    "floordiv": _binary(lambda a, b: sympy.floor(a / b)), "mod": _binary(sympy.Mod),
    "neg": lambda ev, node, x: Index(-ev.arg(x).expr, ev.arg(x).axes),
    "le": _binary(sympy.Le), "lt": _binary(sympy.Lt), "ge": _binary(sympy.Ge), "gt": _binary(sympy.Gt),
    "eq": _binary(sympy.Eq), "ne": _binary(sympy.Ne),
    "and": _binary(lambda a, b: sympy.And(_bool(a), _bool(b))),
    "or": _binary(lambda a, b: sympy.Or(_bool(a), _bool(b))),
    "not": lambda ev, node, x: Index(sympy.Not(_bool(ev.arg(x).expr)), ev.arg(x).axes),
    "abs": lambda ev, node, x: Index(sympy.Abs(ev.arg(x).expr), ev.arg(x).axes),
    "maximum": _max_min(sympy.Max), "minimum": _max_min(sympy.Min),
    "where": _where, "getitem": _getitem, "unsqueeze": _unsqueeze,
    "view": _view, "reshape": _view, "expand": _view,
    "to": _to, "contiguous": _same, "clone": _same,
    "tensor": _const_tensor, "new_ones": _const_tensor, "new_zeros": _const_tensor, "zeros": _const_tensor,
    "ones": _const_tensor, "full": _const_tensor,
}


class Evaluator:
    """Evaluates mask producers symbolically (memoised per node)."""

    def __init__(self):
        self.memo: dict = {}

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
        elif n.op == "placeholder" or n.op == "get_attr":
            raise Opaque(f"it reads the input tensor {n.target!r} (values unknown at compile time)")
        else:
            rule = RULES.get(op_of(n))
            if rule is None:
                raise Opaque(f"it is built with {op_of(n) or n.target!r}, which the mask recovery does not model")
            res = rule(self, n, *n.args, **n.kwargs)
        self.memo[n] = res
        return res


def recover(node: fx.Node, sizes: dict, additive: Optional[bool] = None):
    """The mask a node computes, as a sympy boolean over ``q, kv, b, h, Lq, Lk``.

    Args:
        node: the mask (bool: True = keep; float: additive, ``0`` keep and
            ``-inf`` / a value ``<= -1e30`` drop).
        sizes: ``{"B", "H", "Lq", "Lk"}`` -> the site's sizes (ints or SymInts).

    Returns:
        The boolean mask expression.

    Raises:
        Opaque: the mask is not a function of the indices alone, or its values are not
            exactly keep / drop.
    """
    v = Evaluator().node(node)
    e = v.expr
    if isinstance(e, sympy.Piecewise):  # additive: where(keep, 0, -big)
        pieces = e.args
        if len(pieces) != 2 or not pieces[0].expr.is_zero or pieces[1].cond is not sympy.true:
            raise Opaque("an additive mask with values other than 0 and a large negative number")
        big = pieces[1].expr
        if not (big == -sympy.oo or (big.is_number and float(big) <= -1e30)):
            raise Opaque(f"an additive mask whose masked value {big} is not <= -1e30")
        e = pieces[0].cond
    elif not isinstance(e, (sympy.logic.boolalg.Boolean, sympy.Rel)) and e not in (sympy.true, sympy.false):
        raise Opaque("a float mask that is not where(condition, 0, -inf)")
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
    e = e.subs(subs)
    # the graph's size symbols (dynamic shapes), rewritten in Lq and Lk where possible
    lq, lk = _sym(sizes["Lq"]), _sym(sizes["Lk"])
    free = e.free_symbols - {q_idx, kv_idx, b_idx, h_idx}
    if free:
        unknowns = sorted((lq.free_symbols | lk.free_symbols) & free, key=str)
        sol = sympy.solve([sympy.Eq(Lq, lq), sympy.Eq(Lk, lk)], unknowns, dict=True) if unknowns else []
        if sol:
            e = e.subs(sol[0])
        left = e.free_symbols - {q_idx, kv_idx, b_idx, h_idx, Lq, Lk}
        if left:
            raise Opaque(f"it depends on the sizes {sorted(map(str, left))}, not expressible in Lq, Lk")
    e = sympy.simplify_logic(e) if isinstance(e, sympy.logic.boolalg.BooleanFunction) else e
    if e is sympy.false:
        raise Opaque("the mask drops every pair")
    return e
