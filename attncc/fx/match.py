"""Find attention sites in an FX graph and replace them with compiled attncc kernels.

Two kinds of site:

* ``scaled_dot_product_attention`` calls (``attn_mask``, ``is_causal``, ``scale``,
  ``enable_gqa``);
* hand-written chains, matched from the softmax outwards by declarative rules::

      matmul(q, k^T) [* scale | / c | *= c | /= c] [softcap] [+ mask/bias]...
        [.masked_fill(drop, finfo.min)] [cat sink column] [- rowmax] softmax(dim=-1)
        [.to | .type(dtype)] [dropout p=0 / eval] [drop sink column] matmul(., v)

  After either, an output gate ``* sigmoid(x)`` reached through layout-only ops
  (transpose / permute / reshape / contiguous) is fused as the pattern's ``gate:`` clause.

In both, ``k``/``v`` produced by a GQA ``repeat_kv`` (``[:, :, None].expand().reshape()``)
or ``repeat_interleave(n, dim=1)`` are taken from before the repeat (the kernel does
GQA natively). Masks are recovered symbolically (:mod:`attncc.fx.mask`) or passed as
tensors. Each rule is a small function in :data:`SCORE_RULES` / :data:`PROB_RULES`;
the matcher tries them in order, so a new motif is one more entry.

The graph is also held as a networkx DiGraph: single-use checks on chain
intermediates (``out_degree``) and the check that a mask or bias does not depend on
the scores (``has_path``) are graph queries there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional

import networkx as nx
import sympy
import torch
import torch.fx as fx

from . import site as S
from .layout import call_with_value, rebind_inplace, unfold_heads
from . import positions as P
from .mask import Diagonals, Opaque, bucket_diagonals, recover, recover_score
from .ops import arg, op_of, same_size, shape_of, value_of

log = logging.getLogger("attncc")


class LeaveAlone(Exception):
    """The site was recognised but is not replaced; the message says why."""


# ---------------------------------------------------------------------- reports
@dataclass
class SiteReport:
    """One attention site: where, what was inferred, and whether it was replaced.

    Attributes:
        node: name of the FX node whose value the site computes (the output matmul or
            the SDPA call).
        kind: ``"sdpa"`` or ``"chain"`` (a hand-written matmul-softmax-matmul).
        replaced: True when the site now calls an attncc kernel.
        pattern: the inferred pattern (name and clauses), when one was inferred.
        reason: why the site was left alone (empty when replaced).
        spec: the generated ``.attn`` text (replaced sites).
    """

    node: str
    kind: str
    replaced: bool
    pattern: str = ""
    reason: str = ""
    spec: str = ""

    def line(self) -> str:
        """The one log line of this site."""
        if self.replaced:
            return f"attncc: replaced {self.kind} site {self.node}: {self.pattern}"
        return f"attncc: left {self.kind} site {self.node} alone: {self.reason}"


@dataclass
class Report:
    """The sites :func:`rewrite` found in one graph (in graph order)."""

    sites: List[SiteReport] = field(default_factory=list)

    @property
    def replaced(self) -> List[SiteReport]:
        """Sites that now call attncc kernels."""
        return [s for s in self.sites if s.replaced]

    @property
    def left_alone(self) -> List[SiteReport]:
        """Sites left as they were, each with its reason."""
        return [s for s in self.sites if not s.replaced]

    def __str__(self) -> str:
        if not self.sites:
            return "attncc: no attention sites found"
        return "\n".join(s.line() for s in self.sites)


# ---------------------------------------------------------------------- helpers
_shape, _same = shape_of, same_size


def _number(x) -> Optional[float]:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def _dim_is_last(dim, rank) -> bool:
    return dim == -1 or dim == rank - 1


class Graph:
    """The FX graph as a networkx DiGraph (edges producer -> consumer)."""

    def __init__(self, g: fx.Graph):
        self.nx = nx.DiGraph()
        for n in g.nodes:
            self.nx.add_node(n)
            for p in n.all_input_nodes:
                self.nx.add_edge(p, n)

    def single_use(self, n: fx.Node, allowed=()) -> bool:
        """``n`` feeds exactly one consumer outside ``allowed``."""
        return len([u for u in self.nx.successors(n) if u not in allowed]) == 1

    def depends(self, n, on: fx.Node) -> bool:
        """``n`` is computed from ``on``."""
        return isinstance(n, fx.Node) and nx.has_path(self.nx, on, n)


# ---------------------------------------------------------------------- GQA
def strip_repeat(n: fx.Node):
    """``(base, n_rep)``: the KV tensor before a GQA head repeat, or ``(n, 1)``.

    Recognises ``x[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv*n, L, D)`` (and
    ``unsqueeze(2)``) and ``repeat_interleave(n, dim=1)``; the shapes recorded on the
    nodes must agree."""
    op = op_of(n)
    if op == "repeat_interleave":
        rep, dim = arg(n, 1, "repeats"), arg(n, 2, "dim")
        if isinstance(rep, int) and dim in (1, -3) and isinstance(n.args[0], fx.Node):
            return n.args[0], rep
        return n, 1
    if op not in ("reshape", "view") or not isinstance(n.args[0], fx.Node):
        return n, 1
    e = n.args[0]
    if op_of(e) != "expand" or not isinstance(e.args[0], fx.Node):
        return n, 1
    u = e.args[0]
    base = None
    if op_of(u) == "unsqueeze" and arg(u, 1, "dim") in (2, -3):
        base = u.args[0]
    elif op_of(u) == "getitem":
        idx = u.args[1]
        if isinstance(idx, tuple) and len(idx) >= 3 and idx[2] is None and all(i == slice(None) for i in idx[:2]) \
                and all(i == slice(None) or i is Ellipsis for i in idx[3:]):
            base = u.args[0]
    if not isinstance(base, fx.Node):
        return n, 1
    bs, es, rs = _shape(base), _shape(e), _shape(n)
    if not (bs and es and rs) or len(bs) != 4 or len(es) != 5 or len(rs) != 4:
        return n, 1
    if not all(_same(es[i], bs[j]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3))):
        return n, 1
    if not (_same(rs[1], es[1] * es[2]) and _same(rs[2], bs[2]) and _same(rs[3], bs[3])):
        return n, 1
    rep = es[2]
    return base, (int(rep) if not isinstance(rep, torch.SymInt) else rep)


# ---------------------------------------------------------------------- chain rules
@dataclass
class Step:
    """One recognised step of a score chain: ``kind`` in ``scale, softcap, add, sinks,
    shift, cast``; ``value`` its constant or tensor node."""

    kind: str
    value: object = None


def _rule_scale(g, n):
    if op_of(n) in ("mul", "imul"):
        a, b = n.args[:2]
        for x, c in ((a, b), (b, a)):
            if isinstance(x, fx.Node) and _number(c) is not None:
                yield x, Step("scale", _number(c))
    if op_of(n) in ("div", "idiv"):
        x, c = n.args[:2]
        if isinstance(x, fx.Node) and _number(c):
            yield x, Step("scale", 1.0 / _number(c))


def _rule_softcap(g, n):
    """``cap * tanh(x / cap)`` (Gemma 2)."""
    if op_of(n) != "mul":
        return
    a, b = n.args[:2]
    for t, c in ((a, b), (b, a)):
        if isinstance(t, fx.Node) and op_of(t) == "tanh" and _number(c) and g.single_use(t):
            d = t.args[0]
            if isinstance(d, fx.Node) and op_of(d) == "div" and _number(d.args[1]) == _number(c) \
                    and isinstance(d.args[0], fx.Node) and g.single_use(d):
                yield d.args[0], Step("softcap", _number(c))


def _rule_fill(g, n):
    """``x.masked_fill(drop, v)`` with ``v`` -inf, ``<= -1e30`` or the dtype's lowest
    value (MPT's ``finfo(dtype).min``): ``drop`` (True = masked out) is a mask."""
    if op_of(n) == "masked_fill" and isinstance(n.args[0], fx.Node) and isinstance(arg(n, 1, "mask"), fx.Node):
        if _masks_out(arg(n, 2, "value"), n.args[0]):
            yield n.args[0], Step("fill", arg(n, 1, "mask"))


def _masks_out(v, x: fx.Node) -> bool:
    """``v`` is a fill value that removes a score of ``x``: -inf, ``<= -1e30`` or the lowest
    value of ``x``'s dtype (MPT's ``finfo(dtype).min``)."""
    v, xv = _number(v), value_of(x)
    low = torch.finfo(xv.dtype).min if isinstance(xv, torch.Tensor) and xv.is_floating_point() else -1e30
    return v is not None and (v <= -1e30 or v <= low)


def _rule_where(g, n):
    """``torch.where(keep, x, v)`` (True = attend) or ``torch.where(drop, v, x)`` with ``v``
    -inf, ``<= -1e30`` or the dtype's lowest value: the hand-written form of masked_fill."""
    if op_of(n) == "where" and len(n.args) == 3 and isinstance(n.args[0], fx.Node):
        cond, a, b = n.args
        for x, v, kind in ((a, b, "keepfill"), (b, a, "fill")):
            if isinstance(x, fx.Node) and not isinstance(v, fx.Node) and _masks_out(v, x):
                yield x, Step(kind, cond)


def _rule_add(g, n):
    if op_of(n) in ("add", "iadd") and len(n.args) == 2 and not n.kwargs:
        a, b = n.args
        for x, m in ((a, b), (b, a)):
            if isinstance(x, fx.Node) and isinstance(m, fx.Node):
                yield x, Step("add", m)


def _rule_sinks(g, n):
    """``cat([x, sinks], dim=-1)`` (gpt-oss): one extra logit column per row."""
    if op_of(n) == "cat":
        parts, dim = n.args[0], arg(n, 1, "dim", 0)
        if isinstance(parts, (list, tuple)) and len(parts) == 2 and _dim_is_last(dim, len(_shape(n) or ())):
            x, s = parts
            ss = _shape(s)
            if isinstance(x, fx.Node) and ss is not None and ss[-1] == 1:
                yield x, Step("sinks", s)


def _rule_shift(g, n):
    """``x - x.max(dim=-1, keepdim=True).values``: softmax is shift invariant."""
    if op_of(n) == "sub" and isinstance(n.args[1], fx.Node):
        x, mx = n.args[:2]
        m = mx.args[0] if op_of(mx) == "getitem" and mx.args[1] == 0 else mx
        if op_of(m) in ("max", "amax") and m.args[0] is x and arg(m, 1, "dim") in (-1, len(_shape(x)) - 1) \
                and arg(m, 2, "keepdim", False):
            yield x, Step("shift", (m, mx))


def _is_bool(n) -> bool:
    v = value_of(n)
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool


def _same_shape_view(n) -> bool:
    """``n`` is a view / reshape that keeps its input's shape (Falcon's
    ``scores.view(B, H, Lq, Lk)`` of a ``(B, H, Lq, Lk)`` tensor)."""
    if op_of(n) not in ("view", "reshape") or not isinstance(n.args[0], fx.Node):
        return False
    a, b = _shape(n.args[0]), _shape(n)
    return a is not None and b is not None and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _rule_cast(g, n):
    if (op_of(n) in ("to", "contiguous") and isinstance(n.args[0], fx.Node) and not _is_bool(n)) \
            or _same_shape_view(n):
        yield n.args[0], Step("cast")


#: steps between matmul(q, k^T) and the softmax, tried in this order
SCORE_RULES: List[Callable] = [_rule_softcap, _rule_scale, _rule_add, _rule_fill, _rule_where, _rule_sinks, _rule_shift,
                               _rule_cast]


def _qk(n: fx.Node):
    """``(q, k)`` when ``n`` is ``matmul(q, k.transpose(-2, -1))`` of 4-D tensors."""
    if op_of(n) != "matmul" or len(n.args) != 2 or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    q, kt = n.args
    if op_of(kt) == "transpose":
        dims = sorted(d % 4 for d in kt.args[1:3])
        if dims != [2, 3]:
            return None
    elif op_of(kt) == "permute":
        p = kt.args[1:] if len(kt.args) > 2 else kt.args[1]
        if tuple(p) not in ((0, 1, 3, 2), (0, 1, -1, -2)):
            return None
    else:
        return None
    k = kt.args[0]
    if not isinstance(k, fx.Node) or len(_shape(q) or ()) != 4 or len(_shape(k) or ()) != 4:
        return None
    return q, k


def _walk_scores(g: Graph, n: fx.Node, steps: list, depth: int = 0, why: Optional[list] = None):
    """Back from the softmax input to matmul(q, k^T): ``(qk_node, steps outer-first)``.
    ``why`` collects the reasons steps that match a rule were not taken (an intermediate
    read elsewhere, a scale that is a run-time value), for the report."""
    why = [] if why is None else why
    if _qk(n):
        return n, steps
    if depth > 16:
        return None
    if op_of(n) in ("mul", "imul", "div", "idiv"):
        for c in n.args[:2]:
            if isinstance(c, fx.Node) and not isinstance(value_of(c), torch.Tensor):
                why.append(f"the scale {c.name} in {n.name} is a run-time value (a symbolic size such as "
                           "sqrt(head_dim) under dynamic shapes)")
    for rule in SCORE_RULES:
        for x, step in rule(g, n):
            allowed = step.value if step.kind == "shift" else ()
            if not g.single_use(x, allowed):
                if step.kind == "add" and g.depends(step.value, x):
                    raise LeaveAlone(f"the added term {step.value.name} depends on the scores")
                others = [u.name for u in g.nx.successors(x) if u is not n and u not in (allowed or ())]
                why.append(f"the scores {x.name} are also read by {', '.join(others)} (shared with another site "
                           "or returned)")
                continue
            got = _walk_scores(g, x, steps + [step], depth + 1, why)
            if got:
                return got
    return None


def _walk_probs(g: Graph, sm: fx.Node):
    """Forward from the softmax to matmul(p, v): ``(pv_node, v, notes)``."""
    n, dropped_col, notes = sm, False, []
    for _ in range(8):
        users = list(n.users)
        if len(users) != 1:
            raise LeaveAlone("the attention probabilities are used elsewhere (e.g. returned as attention weights)")
        u = users[0]
        op = op_of(u)
        if op == "matmul" and u.args[0] is n:
            return u, u.args[1], dropped_col, notes
        if (op in ("to", "contiguous") and not _is_bool(u)) or _same_shape_view(u):
            pass
        elif op == "dropout":
            p, training = arg(u, 1, "p", 0.5), arg(u, 2, "training", True)
            if training is not False and p != 0:
                raise LeaveAlone(f"dropout p={p} in training mode (attention dropout is not fused)")
        elif op == "getitem" and u.args[1] in ((Ellipsis, slice(None, -1, None)),
                                               (slice(None),) * 3 + (slice(None, -1, None),)):
            dropped_col = True
        else:
            raise LeaveAlone(f"the probabilities go through {op or u.target}, not matmul(p, v)")
        n = u
    raise LeaveAlone("no matmul(p, v) after the softmax")


def _feeds_matmul(sm: fx.Node) -> bool:
    n = sm
    for _ in range(8):
        if len(n.users) != 1:
            return any(op_of(u) == "matmul" for u in n.users)
        n = next(iter(n.users))
        if op_of(n) == "matmul":
            return True
        if op_of(n) not in ("to", "contiguous", "dropout", "getitem") and not _same_shape_view(n):
            return False
    return False


# ---------------------------------------------------------------------- site building
@dataclass
class Found:
    """A matched site before it becomes a :class:`~attncc.fx.site.Site`."""

    out: fx.Node
    kind: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    causal: bool = False
    #: (node, kind, movable): kind "keep" (bool, True = attend), "additive" (float added
    #: to the score) or "drop" (bool, True = masked out: masked_fill); movable: no
    #: non-linear score step follows it
    masks: list = field(default_factory=list)
    score_ops: list = field(default_factory=list)  # ("softcap", c) | ("bias", node)
    sink: Optional[fx.Node] = None
    scores: Optional[fx.Node] = None  # matmul(q, k^T) of a chain
    #: additive mask / bias node -> the factor a later scale multiplies it by
    factors: dict = field(default_factory=dict)


def _tensor_dims(n: fx.Node, sizes: dict) -> tuple:
    shp = _shape(n)
    if shp is None:
        raise LeaveAlone(f"a mask/bias {n.name} of unknown shape")
    try:
        return S.broadcast_dims(shp, sizes, f"the mask/bias {n.name}", same=_same)
    except ValueError as e:
        raise LeaveAlone(str(e)) from None


@dataclass(frozen=True)
class Scaled:
    """A bias tensor the chain multiplies by ``factor`` after adding it (``(s + b) * c``):
    passed to the kernel as ``node * factor``."""

    node: fx.Node
    factor: float


def _scaled(node: fx.Node, factors: dict):
    c = factors.get(node, 1)
    return node if c == 1 else Scaled(node, float(c))


def _site_of(f: Found, sizes: dict, g: Graph):
    """``(Site, tensors)``: the symbolic masks folded in, the rest passed as tensors."""
    mask = sympy.true
    if f.causal:
        mask = S.kv_idx <= S.q_idx
    tensors, mask_tensor, ops, drops = [], None, [], False
    notes, reads, float_reads, index_reads, aligned = [], [], [], [], []
    symbolic = 0  # masks recovered as expressions (all aligned: the site has a fallback mask)
    for node, kind, movable in f.masks:
        if f.scores is not None and g.depends(node, f.scores):
            raise LeaveAlone(f"the added term {node.name} depends on the scores")
        if kind in ("drop", "keep") and not movable:
            raise LeaveAlone(f"the masked_fill / where with {node.name} comes before a non-linear score step")
        try:
            if not movable:
                raise Opaque("it is added before a non-linear score step")
            got_align: list = []  # a decode mask offset by the cache length: aligned bottom-right
            if kind == "additive":  # a mask, a closed-form score term (ALiBi), or both
                e, term = recover_score(node, sizes, reads, float_reads, index_reads, align=got_align)
                aligned += got_align
                symbolic += e is not None
                if term is not None:
                    ops.append(("term", term * f.factors.get(node, 1)))
                mask = sympy.And(mask, e) if e is not None else mask
                continue
            got = list(reads)  # names continue after the reads of earlier masks
            e = recover(node, sizes, reads=got, align=got_align)
            reads[:] = got
            aligned += [(a if kind != "drop" or a.keep is None else replace(a, keep=sympy.Not(a.keep)), n)
                        for a, n in got_align]
            symbolic += 1
            mask = sympy.And(mask, sympy.Not(e) if kind == "drop" else e)
        except Opaque as e:
            notes.append(f"mask {node.name} passed as a tensor ({e})")
            dims = _tensor_dims(node, sizes)
            if kind == "additive":
                ops.append(("bias", dims, _scaled(node, f.factors)))
            else:
                if mask_tensor is not None:
                    raise LeaveAlone("two opaque boolean masks")
                mask_tensor, drops = dims, kind == "drop"
                tensors.insert(0, node)
    # the movable terms are added together (Falcon adds ALiBi twice: in the chain and in its mask)
    terms = [op[1] for op in ops if op[0] == "term"]
    if len(terms) > 1:
        first = next(i for i, op in enumerate(ops) if op[0] == "term")
        ops = [op for op in ops if op[0] != "term"]
        ops.insert(first, ("term", sympy.factor_terms(sympy.expand(sum(terms)))))
    # the chain's own score ops (softcaps, biases added before a softcap) come first: the
    # movable masks / biases above are added after every non-linear step
    ops = [op if op[0] == "softcap" else ("bias", _tensor_dims(op[1], sizes), _scaled(op[1], f.factors))
           for op in f.score_ops] + ops
    # score ops in application order; bias tensors in declaration order
    score_ops, biases = [], []
    for op in ops:
        if op[0] == "bias":
            score_ops.append(("bias", op[1]))
            biases.append(op[2])
        else:
            score_ops.append(op)
    mask = sympy.simplify_logic(mask) if mask is not sympy.true else None
    if mask is sympy.false:
        raise LeaveAlone("the recovered mask drops every pair")
    site = S.Site(mask=mask, mask_tensor=mask_tensor, score_ops=tuple(score_ops), sinks=f.sink is not None,
                  mask_tensor_drops=drops, mask_reads=tuple((n, d) for n, d, _ in reads),
                  score_reads=tuple((n, d) for n, d, _ in float_reads),
                  index_reads=tuple((n, d) for n, d, _ in index_reads))
    tensors = tensors + [x for _, _, x in reads + float_reads + index_reads] + biases
    if aligned:
        how = P.merge([a for a, _ in aligned])
        if mask_tensor is not None or symbolic != len(aligned) or how.keep is None:
            how = replace(how, keep=None)  # the fallback's mask tensor would not be the whole mask
        elif f.causal:
            how = replace(how, keep=sympy.And(S.kv_idx <= S.q_idx, how.keep))
        nodes = {k: n for _, ns in aligned for k, n in ns.items()}
        notes.append(how.describe())
        narrow = []
        for fname, pos, off in how.shifts:  # a tensor read at an offset: narrowed by the call
            name, dims, node = next(r for r in reads if f"read_{r[2].name}" == fname)
            shape = value_of(node).shape
            dim = [d for d in range(len(shape)) if isinstance(shape[d], torch.SymInt) or shape[d] != 1][pos]
            narrow += [(i, dim, dims[pos], off) for i, t in enumerate(tensors) if t is node]
            notes.append(f"{name} read at [{', '.join(dims)}] from {node.target} offset by {off} along dim {dim}")
        return site, tensors, notes, (how, [nodes[str(s)] for s in how.symbols], tuple(narrow))
    return site, tensors, notes, None


def _sizes(q: fx.Node, k: fx.Node) -> dict:
    qs, ks = _shape(q), _shape(k)
    return {"B": qs[0], "H": qs[1], "Lq": qs[2], "Lk": ks[2]}


def _check_qkv(q, k, v):
    vals = [value_of(x) for x in (q, k, v)]
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in vals):
        raise LeaveAlone("q, k, v are not 4-D tensors (B, H, L, D)")
    dts = {x.dtype for x in vals}
    if len(dts) != 1 or next(iter(dts)) not in (torch.float32, torch.float16, torch.bfloat16):
        raise LeaveAlone(f"q, k, v dtypes {sorted(map(str, dts))} (the kernel takes one of float32/16, bfloat16)")
    for x in (vals[0], vals[2]):
        d = x.shape[-1]
        d = d.node.hint if isinstance(d, torch.SymInt) else d
        if d is None or d > 256:
            raise LeaveAlone("head dim above 256 (or unknown)")


def _gqa(k: fx.Node, v: fx.Node, q: fx.Node):
    (kb, kr), (vb, vr) = strip_repeat(k), strip_repeat(v)
    if kr != 1 and _same(kr, vr) and _same(_shape(kb)[1], _shape(vb)[1]):
        return kb, vb
    return k, v


def match_sdpa(g: Graph, n: fx.Node) -> Found:
    """An SDPA call as a :class:`Found` (raises :class:`LeaveAlone`)."""
    q, k, v = (arg(n, i, nm) for i, nm in enumerate(("query", "key", "value")))
    m, p = arg(n, 3, "attn_mask"), arg(n, 4, "dropout_p", 0.0)
    causal, scale, gqa = arg(n, 5, "is_causal", False), arg(n, 6, "scale"), arg(n, 7, "enable_gqa", False)
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        raise LeaveAlone("q, k, v are not graph values")
    if p != 0:
        raise LeaveAlone(f"dropout_p={p} (attention dropout is not fused)")
    if not isinstance(causal, bool):
        raise LeaveAlone("is_causal is not a constant")
    _check_qkv(q, k, v)
    if scale is None:
        d = _shape(q)[-1]
        if isinstance(d, torch.SymInt):
            raise LeaveAlone("symbolic head dim")
        scale = 1.0 / math.sqrt(d)
    if _number(scale) is None:
        raise LeaveAlone("scale is not a constant")
    if not gqa:
        k, v = _gqa(k, v, q)
    f = Found(n, "sdpa", q, k, v, float(scale), causal=causal)
    if isinstance(m, fx.Node):
        mv = value_of(m)
        additive = isinstance(mv, torch.Tensor) and mv.dtype != torch.bool
        f.masks.append((m, "additive" if additive else "keep", True))
    elif m is not None:
        raise LeaveAlone("attn_mask is not a graph value")
    return f


def match_chain(g: Graph, sm: fx.Node) -> Found:
    """A hand-written softmax attention chain ending in ``sm``'s consumers."""
    x = sm.args[0]
    dim = arg(sm, 1, "dim")
    rank = len(_shape(x) or ())
    if not _dim_is_last(dim, rank):
        raise LeaveAlone(f"softmax over dim {dim}, not the key axis (-1)")
    out, v, dropped_col, _ = _walk_probs(g, sm)
    why: list = []
    walked = _walk_scores(g, x, [], why=why) if isinstance(x, fx.Node) else None
    if walked is None:
        if why:
            raise LeaveAlone(why[0])
        raise LeaveAlone("the softmax input is not matmul(q, k^T) followed by scale/softcap/bias/sink steps")
    qk, steps = walked
    steps = steps[::-1]  # application order: from the matmul outwards
    q, k = _qk(qk)
    if not g.single_use(qk):
        raise LeaveAlone("the raw scores are used elsewhere")
    if not isinstance(v, fx.Node):
        raise LeaveAlone("v is not a graph value")
    _check_qkv(q, k, v)
    k, v = _gqa(k, v, q)
    f = Found(out, "chain", q, k, v, 1.0, scores=qk)
    nonlinear_after = [i for i, s in enumerate(steps) if s.kind == "softcap"]
    for i, s in enumerate(steps):
        if s.kind == "scale":
            # (s + bias) * c = c * s + c * bias (Falcon's ALiBi, then ``*= inv_norm``)
            if any(t.kind in ("softcap", "sinks") for t in steps[:i]):
                raise LeaveAlone("a scale applied after a softcap or a sink column")
            if s.value <= 0 and any(t.kind in ("add", "fill", "keepfill") for t in steps[:i]):
                raise LeaveAlone(f"a scale {s.value:g} <= 0 applied after a mask")
            f.scale *= s.value
            for t in steps[:i]:
                if t.kind == "add":
                    f.factors[t.value] = f.factors.get(t.value, 1.0) * s.value
            continue
        if s.kind in ("cast", "shift"):
            continue
        if s.kind == "softcap":
            f.score_ops.append(("softcap", s.value))
        elif s.kind == "add":
            mv = value_of(s.value)
            if not isinstance(mv, torch.Tensor) or not mv.is_floating_point():
                raise LeaveAlone(f"the added term {s.value.name} is not a float tensor")
            movable = not any(j > i for j in nonlinear_after)
            if movable:
                f.masks.append((s.value, "additive", True))
            else:
                f.score_ops.append(("bias", s.value))
        elif s.kind in ("fill", "keepfill"):
            mv = value_of(s.value)
            if not isinstance(mv, torch.Tensor) or mv.dtype != torch.bool:
                raise LeaveAlone(f"masked_fill / where with {s.value.name}, which is not a bool tensor")
            f.masks.append((s.value, "drop" if s.kind == "fill" else "keep", not any(j > i for j in nonlinear_after)))
        elif s.kind == "sinks":
            if not dropped_col:
                raise LeaveAlone("a column is appended to the scores but not dropped after the softmax")
            if any(t.kind in ("add", "softcap") for t in steps[i + 1:]):
                raise LeaveAlone("score steps after the sink column is appended")
            f.sink = s.value
    if dropped_col and f.sink is None:
        raise LeaveAlone("the last probability column is dropped but no sink column was appended")
    return f


@dataclass
class Gate:
    """An output gate ``* sigmoid(x)`` after a site, reached from the site's output
    ``(B, H, Lq, Dv)`` through layout-only ops.

    Attributes:
        mul: the multiply node; chain_end: its attention-side operand.
        x: the sigmoid's input (shaped like ``chain_end``).
        recipe: the layout ops from the site's output to ``chain_end``, as
            :func:`attncc.fx.site.gate_to_output` takes them.
    """

    mul: fx.Node
    chain_end: fx.Node
    x: fx.Node
    recipe: tuple


def _layout_step(n: fx.Node):
    """One layout-only op as a recipe step, or None (an op that changes values)."""
    op = op_of(n)
    if op in ("contiguous", "clone", "to"):
        return ("id",)
    if op == "transpose":
        return ("transpose", arg(n, 1, "dim0"), arg(n, 2, "dim1"))
    if op == "permute":
        dims = n.args[1:] if len(n.args) > 2 else arg(n, 1, "dims")
        return ("permute", tuple(dims))
    if op in ("reshape", "view"):
        shape = n.args[1:] if len(n.args) > 2 else arg(n, 1, "shape")
        if not isinstance(shape, (tuple, list)):
            shape = (shape,)
        return ("reshape", tuple(shape))
    return None


def _gate_after(out: fx.Node, order: dict):
    """``(Gate or None, note)``: the output gate following ``out`` when it can be fused
    into the kernel's epilogue (else None, and the note says why it stays a multiply)."""
    n, recipe = out, []
    for _ in range(8):
        if len(n.users) != 1:
            return None, ""
        u = next(iter(n.users))
        if op_of(u) == "mul":
            other = u.args[1] if u.args[0] is n else u.args[0]
            if not (isinstance(other, fx.Node) and op_of(other) == "sigmoid"):
                return None, ""
            x = other.args[0]
            if not isinstance(x, fx.Node) or _shape(x) is None or _shape(n) is None:
                return None, "output gate left unfused (its input has no known shape)"
            if len(_shape(x)) != len(_shape(n)) or not all(_same(a, c) for a, c in zip(_shape(x), _shape(n))):
                return None, "output gate left unfused (the gate broadcasts)"
            if order.get(x, len(order)) > order[out]:
                return None, "output gate left unfused (the gate is computed after the attention)"
            return Gate(u, n, x, tuple(recipe)), ""
        step = _layout_step(u)
        if step is None:
            return None, ""
        sizes: list = []  # the nodes among the op's arguments (symbolic sizes)
        fx.node.map_arg(tuple(u.args[1:]), lambda a: sizes.append(a) or a)
        if any(order.get(a, len(order)) > order[out] for a in sizes):
            return None, "output gate left unfused (its layout ops use sizes computed after the attention)"
        recipe.append(step)
        n = u
    return None, ""


# ---------------------------------------------------------------------- rewrite
def _ensure_values(gm: fx.GraphModule, example_inputs) -> None:
    """Record example values on every node (fake tensors) when the graph has none."""
    if any(value_of(n) is not None for n in gm.graph.nodes if n.op != "output"):
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                                         for x in example_inputs])


def _replace(gm: fx.GraphModule, f: Found, site: S.Site, tensors: list, gate: Optional[Gate] = None,
             aligned: Optional[tuple] = None) -> str:
    kern = S.kernel_for(site)
    if aligned is not None:  # the call checks the alignment; the fallback reads the graph's mask
        how, size_nodes, narrow = aligned
        fallback = None
        if how.keep is not None:
            fallback = S.kernel_for(replace(site, mask=None, mask_tensor=("1", "1", "Lq", "Lk"),
                                            mask_tensor_drops=False)).key
        align_id = P.register(how, fallback, narrow)
    g = gm.graph
    out_dtype = value_of(f.out).dtype
    with g.inserting_before(f.out):
        # derived tensors (T5's bucket of each distance, read off the graph's bucket matrix)
        tensors = [_derived(g, t) if isinstance(t, Diagonals) else t for t in tensors]
        tensors = [call_with_value(g, operator.mul, t.node, t.factor) if isinstance(t, Scaled) else t
                   for t in tensors]
        sink = None
        if f.sink is not None:
            sink = g.call_function(_select_last, (f.sink,))
        fn, args, extra = S.attention, (f.q, f.k, f.v), {}
        if aligned is not None:
            fn, args, extra = P.aligned_attention, (f.q, f.k, f.v, *size_nodes), {"align_id": align_id}
        new = g.call_function(fn, args,
                              {**extra, "key": kern.key, "scale": f.scale, "tensors": list(tensors), "sink": sink,
                               "out_dtype": out_dtype, "gate": gate.x if gate else None,
                               "gate_layout": list(gate.recipe) if gate else None})
    new.meta.update({k: v for k, v in f.out.meta.items() if k in ("example_value", "val", "stack_trace")})
    f.out.replace_all_uses_with(new)
    if gate is not None:  # the layout chain now carries the gated output: the multiply goes
        gate.mul.replace_all_uses_with(gate.chain_end)
    return kern.text


def _derived(g: fx.Graph, t: Diagonals) -> fx.Node:
    """A node computing T5's bucket vector from the graph's bucket matrix (with its example value)."""
    node = g.call_function(bucket_diagonals, (t.node,))
    try:
        node.meta["example_value"] = bucket_diagonals(value_of(t.node))
    except Exception:  # noqa: BLE001 - the value is only informative
        pass
    return node


def _select_last(x: torch.Tensor) -> torch.Tensor:
    """``x[..., 0]``: the sink column ``(B, H, Lq, 1)`` as ``(B, H, Lq)``."""
    return x[..., 0]


def _erase_dead(g: fx.Graph, n: fx.Node) -> None:
    """Erase ``n`` and, recursively, the producers only it used (known pure ops only)."""
    todo, erased = [n], set()
    while todo:
        x = todo.pop()
        if x in erased or x.users or x.op not in ("call_function", "call_method"):
            continue
        if op_of(x) is None and x.target not in (S.attention, P.aligned_attention):
            continue
        ins = list(x.all_input_nodes)
        g.erase_node(x)
        erased.add(x)
        todo += ins


def rewrite(gm: fx.GraphModule, example_inputs=()) -> tuple:
    """Replace every attention site of ``gm`` that attncc can compute exactly.

    Args:
        gm: an FX graph module (dynamo's, ``symbolic_trace``'s, ...); modified in place.
        example_inputs: its inputs (used to record shapes when the nodes carry none).

    Returns:
        ``(gm, report)``: the rewritten module and a :class:`Report` with one entry
        per site (replaced, with the inferred pattern; or left alone, with the reason).
        One INFO line per site goes to the ``attncc`` logger.

    Sites that are not understood stay exactly as they were (the head-folded products
    :func:`~attncc.fx.layout.unfold_heads` rewrote for matching are put back).
    """
    _ensure_values(gm, example_inputs)
    rebind_inplace(gm.graph)
    foldings = unfold_heads(gm.graph)
    g = Graph(gm.graph)
    report = Report()
    dead = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in list(gm.graph.nodes):
        op = op_of(n)
        if op == "sdpa":
            kind = "sdpa"
        elif op == "softmax" and _feeds_matmul(n):
            kind = "chain"
        else:
            continue
        try:
            f = match_sdpa(g, n) if kind == "sdpa" else match_chain(g, n)
            site, tensors, notes, aligned = _site_of(f, _sizes(f.q, f.k), g)
            gate, gate_note = _gate_after(f.out, order)
            site = replace(site, gate=gate is not None)
            desc = site.describe() + "".join(f"; {x}" for x in notes + [gate_note] if x) + \
                (f"; GQA from {f.k.name}" if _shape(f.k)[1] != _shape(f.q)[1] else "")
            try:
                text = _replace(gm, f, site, tensors, gate, aligned)
            except Exception as e:  # noqa: BLE001 - a spec attncc rejects: leave the site alone
                raise LeaveAlone(f"attncc cannot compile the inferred pattern ({type(e).__name__}: {e})")
            rep = SiteReport(f.out.name, kind, True, desc, spec=text)
            dead.append(f.out)
            if gate is not None:
                dead.append(gate.mul)
        except LeaveAlone as e:
            rep = SiteReport(n.name, kind, False, reason=str(e))
        report.sites.append(rep)
        log.info(rep.line())
    for n in dead:
        _erase_dead(gm.graph, n)
    alive = set(gm.graph.nodes)
    for fold in foldings:
        if fold.key in alive:  # no site consumed it
            fold.undo(gm.graph)
    if report.replaced or foldings:
        gm.graph.lint()
        gm.recompile()
    return gm, report
