"""Masks whose positions are offset by a run-time size: KV-cache decode steps.

In a decode step of a model with a KV cache (transformers' ``DynamicCache``: Mistral,
Qwen2, Gemma 3, ...), the mask's query position is the cache's ``cumulative_length``
(a size symbol ``s`` of the graph) plus ``q``, and the key position ``kv`` plus an offset
that is also a function of ``s`` (a sliding-window layer keeps the last ``window - 1``
keys: offset ``max(s - window + 1, 0)``). The graph does not tie ``s`` to ``Lq`` / ``Lk``,
so the mask is not a closed form in ``q, kv, Lq, Lk`` alone.

The caches keep one invariant: the last key is the last query (bottom-right alignment,
FlashAttention 2's convention for ``Lq != Lk``). :func:`align` therefore writes the mask
at ``s = Lk - Lq`` (the query position ``Lk - Lq + q``): Mistral's decode mask
``kv + max(s - 3, 0) <= s + q and kv + max(s - 3, 0) > s + q - 4`` becomes
``kv <= q + Lk - Lq and q + Lk - Lq - kv < 4`` (sliding_window_bottom_right(window=4)).
That is exact whenever every comparison of the mask keeps its index part and its
``s``-part unchanged: each comparison ``idx(q, kv, b, h) + rest(s, Lq, Lk) REL 0`` (the
index part free of ``s``) has the same truth value at ``s`` and at ``Lk - Lq`` when
``rest(s) == rest(Lk - Lq)``. :class:`Alignment` holds those conditions;
:func:`aligned_attention` (the call the rewritten graph makes) checks them on the sizes
of each call (integer arithmetic on the host, a few operations) and, when one fails,
computes the mask the graph wrote (from its expression at the call's ``s``) and runs the
site's fallback kernel with it as a mask tensor. Nothing is assumed: a call whose sizes
break the alignment gets the graph's mask.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import List, Optional

import sympy
import torch

from .site import Lk, Lq, attention, b_idx, h_idx, kv_idx, q_idx

_INDEX = {q_idx, kv_idx, b_idx, h_idx}


class NotAligned(Exception):
    """The mask's dependence on the run-time size is not a bottom-right offset (the
    message says why)."""


@dataclass(frozen=True)
class Alignment:
    """A mask written at ``s = Lk - Lq`` and the conditions under which that is exact.

    Attributes:
        symbols: the run-time size symbols (one: the cache length ``s``).
        names: for the report, ``str(symbol)`` -> the graph input it came from.
        conditions: sympy integer expressions in ``symbols``, ``Lq``, ``Lk`` that must all
            be 0 at a call for the aligned mask to equal the graph's.
        keep: the graph's mask (a boolean in ``q, kv``, ``symbols``, ``Lq``, ``Lk``), for
            the fallback; None when it reads tensors or ``b`` / ``h`` (no fallback: a call
            that breaks the alignment raises).
    """

    symbols: tuple
    names: tuple
    conditions: tuple
    keep: Optional[sympy.Basic]
    #: ``((read function name, argument position, offset), ...)``: a tensor read at an
    #: index offset by the run-time size (a padding ``attention_mask`` of every token seen,
    #: read at the cached keys' positions ``kv + max(s - 3, 0)``): the call passes the
    #: tensor narrowed to ``[offset, offset + extent)`` along that dim, read at ``kv``
    shifts: tuple = ()

    def describe(self) -> str:
        """One line for the report."""
        said = ", ".join(f"{s} = {n}" for s, n in zip(self.symbols, self.names))
        return (f"query position offset by the run-time size {said}, aligned bottom-right (query position "
                f"Lk - Lq + q; checked on each call: {', '.join(f'{c} == 0' for c in self.conditions) or 'always'})")


def _split(g):
    """``g`` (expanded) as ``(index part, rest)``: the terms that read ``q, kv, b, h`` or a
    tensor, and the others."""
    from sympy.core.function import AppliedUndef

    idx, rest = sympy.Integer(0), sympy.Integer(0)
    for t in sympy.Add.make_args(sympy.expand(g)):
        if t.free_symbols & _INDEX or t.atoms(AppliedUndef):
            idx += t
        else:
            rest += t
    return idx, rest


def align(e, symbols: set, names: dict, sizes: tuple):
    """The mask (or additive bias) ``e`` written at ``s = Lk - Lq``.

    Args:
        e: a sympy boolean (or Piecewise bias) in ``q, kv, b, h, Lq, Lk``, tensor reads and
            the run-time size ``symbols``.
        symbols: the size symbols the graph does not tie to ``Lq`` / ``Lk`` (one).
        names: ``str(symbol)`` -> the graph input it came from (for the report).
        sizes: ``(Lq, Lk)`` of the site as sympy values: numbers for a graph with static
            sizes (then a ``max`` / ``min`` of ``Lq`` / ``Lk`` alone is evaluated, as the
            kernel only runs at those sizes), else expressions in ``Lq`` / ``Lk``.

    Returns:
        ``(aligned expression, Alignment)``.

    Raises:
        NotAligned: several symbols, a symbol inside the index part of a comparison (it
            scales or reads the positions), or in the values of a bias.
    """
    from sympy.core.function import AppliedUndef

    if len(symbols) != 1:
        raise NotAligned(f"several run-time sizes {sorted(map(str, symbols))}")
    s = next(iter(symbols))
    s0 = Lk - Lq
    shifts, subs = {}, {}
    for app in e.atoms(AppliedUndef):  # reads at an offset position: the call narrows the tensor
        args = list(app.args)
        for i, a in enumerate(args):
            if not a.has(s):
                continue
            idx, rest = _split(a)
            if idx.has(s) or idx.atoms(AppliedUndef):
                raise NotAligned(f"the run-time size {s} enters the index part {idx} of the read {app}")
            key = (app.func.__name__, i)
            if shifts.setdefault(key, rest) != rest:
                raise NotAligned(f"{app.func.__name__} is read at two offsets")
            args[i] = idx
        subs[app] = app.func(*args)
    e = e.subs(subs, simultaneous=True) if subs else e
    conds = []
    for r in e.atoms(sympy.Rel):
        if not r.has(s):
            continue
        idx, rest = _split(r.lhs - r.rhs)
        if idx.has(s):
            raise NotAligned(f"the run-time size {s} enters the index part {idx} of {r}")
        d = sympy.expand(rest - rest.subs(s, s0))
        if d != 0 and d not in conds:
            conds.append(d)
    pieces = e.args if isinstance(e, sympy.Piecewise) else ()
    if any(p.expr.has(s) for p in pieces):
        raise NotAligned(f"the bias values depend on the run-time size {s}")
    out = e.subs(s, s0)
    lq, lk = sizes
    if lq.is_number and lk.is_number:  # static sizes: max / min of Lq, Lk alone are numbers
        out = out.replace(lambda x: bool(_minmax(x)) and x.free_symbols <= {Lq, Lk},
                          lambda x: x.subs({Lq: lq, Lk: lk}))
    if out.has(s):
        raise NotAligned(f"the aligned mask still depends on {s}")
    keep = None
    if not e.atoms(AppliedUndef) and not (e.free_symbols & {b_idx, h_idx}):
        keep = e if not isinstance(e, sympy.Piecewise) else sympy.Or(
            *[p.cond for p in pieces if not _drops(p.expr)])
    return out, Alignment((s,), (names.get(str(s), "a size"),), tuple(conds), keep,
                          tuple((f, i, c) for (f, i), c in shifts.items()))


def _minmax(e) -> str:
    """``"Max"`` / ``"Min"`` for sympy's and torch's (``torch.utils._sympy``) max / min, else ``""``."""
    name = type(e).__name__
    return name if name in ("Max", "Min") and isinstance(e, sympy.Basic) else ""


def _drops(v) -> bool:
    from .mask import _drops as drops

    return drops(v)


def merge(alignments: List[Alignment]) -> Optional[Alignment]:
    """The alignments of one site's masks as one (same symbol; the conditions of all; the
    fallback mask the conjunction, or None when one has none)."""
    if not alignments:
        return None
    syms = {a.symbols for a in alignments}
    if len(syms) != 1:
        raise NotAligned("masks offset by different run-time sizes")
    conds = tuple(dict.fromkeys(itertools.chain.from_iterable(a.conditions for a in alignments)))
    keep = None if any(a.keep is None for a in alignments) else sympy.And(*[a.keep for a in alignments])
    shifts = tuple(dict.fromkeys(itertools.chain.from_iterable(a.shifts for a in alignments)))
    return Alignment(alignments[0].symbols, alignments[0].names, conds, keep, shifts)


# ---------------------------------------------------------------------- run time
def _value(e, env: dict):
    """``e`` evaluated on ints / SymInts (``env``: symbol -> value) or, with ``q`` / ``kv`` in
    ``env`` as broadcast index tensors, on tensors (the fallback mask)."""
    if e is sympy.true or e is sympy.false:
        return bool(e)
    if isinstance(e, sympy.Symbol):
        return env[e]
    if isinstance(e, sympy.Integer):
        return int(e)
    if e.is_Rational:
        return float(e)
    args = [_value(a, env) for a in e.args]
    if isinstance(e, sympy.Add):
        return sum(args[1:], args[0])
    if isinstance(e, sympy.Mul):
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if _minmax(e):
        pick = torch.maximum if _minmax(e) == "Max" else torch.minimum
        sym = torch.sym_max if _minmax(e) == "Max" else torch.sym_min
        out = args[0]
        for a in args[1:]:
            if isinstance(out, torch.Tensor) or isinstance(a, torch.Tensor):
                out = pick(torch.as_tensor(out), torch.as_tensor(a))
            else:
                out = sym(out, a)
        return out
    rel = {sympy.Le: lambda a, c: a <= c, sympy.Lt: lambda a, c: a < c, sympy.Ge: lambda a, c: a >= c,
           sympy.Gt: lambda a, c: a > c, sympy.Eq: lambda a, c: a == c, sympy.Ne: lambda a, c: a != c}
    for t, f in rel.items():
        if isinstance(e, t):
            return f(*args)
    if isinstance(e, (sympy.And, sympy.Or)):
        out = args[0]
        for a in args[1:]:
            out = (out & a) if isinstance(e, sympy.And) else (out | a)
        return out
    if isinstance(e, sympy.Not):
        return ~args[0] if isinstance(args[0], torch.Tensor) else not args[0]
    raise NotAligned(f"cannot evaluate {e} at run time")


_ALIGNED: dict = {}
_LOCK = threading.Lock()


def register(alignment: Alignment, fallback_key: Optional[str], narrow: tuple = ()) -> int:
    """Keep ``alignment`` for :func:`aligned_attention`; returns its id.

    Args:
        alignment: the site's :class:`Alignment`.
        fallback_key: the spec text of the site's fallback kernel (the same site with a
            mask tensor instead of the aligned mask), or None.
        narrow: ``((position in tensors, dim, "Lq" | "Lk", offset), ...)``: the tensors the
            call narrows (the alignment's ``shifts``, placed in the call's tensor list).
    """
    entry = (alignment, fallback_key, tuple(narrow))
    with _LOCK:
        for i, got in _ALIGNED.items():
            if got == entry:
                return i
        i = len(_ALIGNED)
        _ALIGNED[i] = entry
        return i


def aligned_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *sizes, align_id: int,
                      **kw) -> torch.Tensor:
    """:func:`attncc.fx.site.attention` for a site whose mask was aligned bottom-right
    (:func:`align`): runs the aligned kernel when the call's sizes keep the alignment,
    else the fallback kernel with the graph's mask evaluated at those sizes.

    Args:
        q, k, v: as :func:`~attncc.fx.site.attention` (``(B, H, Lq, D)``, ``(B, Hkv, Lk, D)``).
        sizes: the values of the alignment's run-time size symbols (ints or SymInts, in
            ``Alignment.symbols`` order).
        align_id: the id :func:`register` returned.
        kw: the keywords of :func:`~attncc.fx.site.attention` (``key``, ``scale``,
            ``tensors``, ...).

    Returns:
        ``(B, H, Lq, Dv)``.

    Raises:
        ValueError: the sizes break the alignment and the site has no fallback (its mask
            reads tensors or depends on the batch / head).
    """
    alignment, fallback, narrow = _ALIGNED[align_id]
    env = dict(zip(alignment.symbols, sizes))
    env[Lq], env[Lk] = q.shape[2], k.shape[2]
    if narrow:
        tensors = list(kw["tensors"])
        for pos, dim, ext, off in narrow:
            tensors[pos] = tensors[pos].narrow(dim, _value(off, env), env[Lq if ext == "Lq" else Lk])
        kw = {**kw, "tensors": tensors}
    if all(_value(c, env) == 0 for c in alignment.conditions):
        return attention(q, k, v, **kw)
    if fallback is None or alignment.keep is None:
        said = ", ".join(f"{s} = {n} = {env[s]}" for s, n in zip(alignment.symbols, alignment.names))
        raise ValueError(f"the attncc graph pass aligned this site's mask bottom-right, but the run-time size {said} "
                         f"with Lq = {env[Lq]}, Lk = {env[Lk]} breaks {alignment.conditions} and the mask has no "
                         "fallback (it reads tensors)")
    env[q_idx] = torch.arange(q.shape[2], device=q.device)[:, None]
    env[kv_idx] = torch.arange(k.shape[2], device=q.device)[None, :]
    keep = torch.as_tensor(_value(alignment.keep, env), device=q.device)
    keep = keep.expand(q.shape[2], k.shape[2])
    return attention(q, k, v, **{**kw, "key": fallback, "tensors": [keep] + list(kw["tensors"])})
