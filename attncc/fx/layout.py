"""Graph normalisations run before matching: forms that compute attention in another
layout or through in-place ops, rewritten to the ``(B, H, L, D)`` chain the matcher reads.

* :func:`rebind_inplace`: after ``s.div_(c)`` (or ``s *= c`` / ``s += m``) later readers
  of ``s`` read the in-place op's result, which is the same tensor: exact, kept.
* :func:`unfold_heads`: BLOOM computes attention with the heads folded into the batch,
  ``(B*H, L, D)``::

      scores = alibi.baddbmm(batch1=q3, batch2=k3^T, beta=b, alpha=a).view(B, H, Lq, Lk)
      out3 = torch.bmm(probs.view(B*H, Lq, Lk), v3)

  with ``q3 = q.reshape(B*H, Lq, D)`` (and ``k3``, ``v3``) of 4-D tensors. Each product
  becomes its 4-D form (``a * q @ k^T + b * alibi.unflatten(0, (B, H))``;
  ``(probs @ v).flatten(0, 1)``). These rewrites are undone (:meth:`Folding.undo`) when no
  site consumed them, so a graph the pass does not replace keeps its own ops.

Each rule is one function from a node to a :class:`Folding` (or None); :data:`RULES` lists
them in the order :func:`unfold_heads` tries them.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.fx as fx

from .ops import arg, op_of, same_size as _eq, shape_of as _shape, value_of

log = logging.getLogger("attncc")

_INPLACE = ("idiv", "imul", "iadd")


def rebind_inplace(g: fx.Graph) -> None:
    """Make every reader of ``x`` that runs after an in-place op ``u = x.op_(...)`` read
    ``u`` instead (``u`` returns ``x`` itself, so the values are the same); afterwards an
    in-place step sits in the chain like its out-of-place form."""
    order = {n: i for i, n in enumerate(g.nodes)}
    for u in list(g.nodes):
        if op_of(u) in _INPLACE and u.args and isinstance(u.args[0], fx.Node):
            x = u.args[0]
            for r in list(x.users):
                if r is not u and order[r] > order[u]:
                    r.replace_input_with(x, u)


# ---------------------------------------------------------------------- foldings
@dataclass
class Folding:
    """One head-folded product rewritten in 4-D.

    Attributes:
        key: the new 4-D matmul; a site that replaced the chain erased it.
        old_out / new_out: the folded node whose readers moved, and the node they read now.
        created: the nodes added, in creation order.
        erased: ``(node, args, kwargs, position)`` of the folded nodes removed (now dead);
            erasing a node clears its arguments, ``position`` is its place in the graph.
    """

    key: fx.Node
    old_out: fx.Node
    new_out: fx.Node
    created: List[fx.Node] = field(default_factory=list)
    erased: List[fx.Node] = field(default_factory=list)

    def undo(self, g: fx.Graph) -> None:
        """Put the folded ops back (new nodes with the removed nodes' ops, arguments and
        metadata, in their order) and remove the 4-D ones."""
        copies: dict = {}
        with g.inserting_before(self.created[0]):
            for old, args, kwargs, _ in sorted(self.erased, key=lambda e: e[3]):  # the original order
                args, kwargs = fx.node.map_arg((args, kwargs), lambda a: copies.get(a, a))
                copies[old] = g.create_node(old.op, old.target, args, kwargs)
                copies[old].meta = dict(old.meta)
        self.new_out.replace_all_uses_with(copies[self.old_out])
        for n in reversed(self.created):
            if not n.users:
                g.erase_node(n)


def _call(g: fx.Graph, created: list, target, *args, **kwargs) -> fx.Node:
    n = call_with_value(g, target, *args, **kwargs)
    created.append(n)
    return n


def call_with_value(g: fx.Graph, target, *args, **kwargs) -> fx.Node:
    """A new ``call_function`` node (at the graph's insertion point) with its example
    value, computed on the arguments' example values under their fake mode."""
    n = g.call_function(target, args, kwargs)
    vals, kvals = fx.node.map_aggregate((args, kwargs), value_of)
    tensors = [v for v in list(vals) + list(kvals.values()) if isinstance(v, torch.Tensor)]
    # the values' own fake mode (the tracing context's may be another one)
    mode = next((t.fake_mode for t in tensors if getattr(t, "fake_mode", None) is not None), None)
    try:
        with mode if mode is not None else contextlib.nullcontext():
            n.meta["example_value"] = target(*vals, **kvals)
    except Exception as e:  # noqa: BLE001 - no value: the matcher then sees an unknown shape
        log.debug("attncc: no example value for %s: %s", n.name, e)
    return n


def _unfolded(n) -> Optional[fx.Node]:
    """The 4-D ``(B, H, L, D)`` tensor that ``n`` folds to ``(B*H, L, D)`` by a reshape /
    view / ``flatten(0, 1)``, or None."""
    if not isinstance(n, fx.Node) or op_of(n) not in ("reshape", "view", "flatten") \
            or not isinstance(n.args[0], fx.Node):
        return None
    if op_of(n) == "flatten" and (arg(n, 1, "start_dim", 0), arg(n, 2, "end_dim", -1)) != (0, 1):
        return None
    x = n.args[0]
    xs, ns = _shape(x), _shape(n)
    if xs is None or ns is None or len(xs) != 4 or len(ns) != 3:
        return None
    if _eq(ns[0], xs[0] * xs[1]) and _eq(ns[1], xs[2]) and _eq(ns[2], xs[3]):
        return x
    return None


def _view_heads(v: fx.Node):
    """``(B, H)`` as the arguments of a ``view`` / ``reshape`` to ``(B, H, Lq, Lk)``, or None."""
    shape = v.args[1:] if len(v.args) > 2 else (arg(v, 1, "shape"),)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if len(shape) != 4 or any(isinstance(s, int) and s < 0 for s in shape[:2]):
        return None
    return shape[0], shape[1]


def _rule_scores(g: fx.Graph, v: fx.Node) -> Optional[Folding]:
    """``view(bmm(q3, k3^T) | baddbmm(bias, q3, k3^T, beta, alpha), B, H, Lq, Lk)`` ->
    ``alpha * q @ k^T (+ beta * bias.unflatten(0, (B, H)))``."""
    if op_of(v) not in ("view", "reshape") or len(_shape(v) or ()) != 4 or not isinstance(v.args[0], fx.Node):
        return None
    s3 = v.args[0]
    if len(s3.users) != 1 or len(_shape(s3) or ()) != 3:
        return None
    if op_of(s3) == "matmul" and len(s3.args) == 2 and not s3.kwargs:
        bias, a, b, beta, alpha = None, s3.args[0], s3.args[1], 0, 1
    elif op_of(s3) == "baddbmm":
        bias, a, b = arg(s3, 0, "input"), arg(s3, 1, "batch1"), arg(s3, 2, "batch2")
        beta, alpha = s3.kwargs.get("beta", 1), s3.kwargs.get("alpha", 1)
    else:
        return None
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in (beta, alpha)):
        return None
    if not isinstance(b, fx.Node) or op_of(b) != "transpose" or sorted(d % 3 for d in b.args[1:3]) != [1, 2]:
        return None
    q, k = _unfolded(a), _unfolded(b.args[0])
    heads = _view_heads(v)
    if q is None or k is None or heads is None:
        return None
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if not (_eq(qs[0], ks[0]) and _eq(qs[1], ks[1]) and all(_eq(x, y) for x, y in zip(vs, qs[:3] + ks[2:3]))):
        return None
    if beta != 0 and (not isinstance(bias, fx.Node) or len(_shape(bias) or ()) > 3):
        return None
    created: list = []
    with g.inserting_before(v):
        s = _call(g, created, torch.matmul, q, _call(g, created, torch.transpose, k, -2, -1))
        key = s
        if alpha != 1:
            s = _call(g, created, operator.mul, s, float(alpha))
        if beta != 0:
            bs = _shape(bias)
            if len(bs) == 3 and not (isinstance(bs[0], int) and bs[0] == 1):
                b4 = _call(g, created, torch.unflatten, bias, 0, heads)
            else:
                b4 = bias  # broadcast over (B*H) alike: the same over (B, H)
            if beta != 1:
                b4 = _call(g, created, operator.mul, b4, float(beta))
            s = _call(g, created, operator.add, s, b4)
    return _commit(g, Folding(key, v, s, created), [v, s3, b, b.args[0], a])


def _rule_pv(g: fx.Graph, o3: fx.Node) -> Optional[Folding]:
    """``bmm(p.view(B*H, Lq, Lk), v3)`` of a 4-D ``p`` -> ``(p @ v).flatten(0, 1)``."""
    if op_of(o3) != "matmul" or len(o3.args) != 2 or o3.kwargs or len(_shape(o3) or ()) != 3:
        return None
    p3, v3 = o3.args
    if not isinstance(p3, fx.Node) or op_of(p3) not in ("view", "reshape", "flatten") or len(p3.users) != 1:
        return None
    p, v = p3.args[0], _unfolded(v3)
    ps, p3s = _shape(p), _shape(p3)
    if v is None or ps is None or len(ps) != 4 or p3s is None:
        return None
    vs = _shape(v)
    if not (_eq(p3s[0], ps[0] * ps[1]) and _eq(p3s[1], ps[2]) and _eq(p3s[2], ps[3])
            and _eq(ps[0], vs[0]) and _eq(ps[1], vs[1]) and _eq(ps[3], vs[2])):
        return None
    created: list = []
    with g.inserting_before(o3):
        o = _call(g, created, torch.matmul, p, v)
        out = _call(g, created, torch.flatten, o, 0, 1)
    return _commit(g, Folding(o, o3, out, created), [o3, p3, v3])


def _commit(g: fx.Graph, f: Folding, old: list) -> Folding:
    """Move the readers of ``f.old_out`` to ``f.new_out`` and remove the folded nodes that
    are now dead (``old`` lists users before their inputs)."""
    f.old_out.replace_all_uses_with(f.new_out)
    pos = {n: i for i, n in enumerate(g.nodes)}
    for n in old:
        if isinstance(n, fx.Node) and not n.users and all(n is not e[0] for e in f.erased):
            f.erased.append((n, n.args, n.kwargs, pos[n]))
            g.erase_node(n)
    return f


#: the head-folding rules, tried on every node in graph order
RULES: List[Callable] = [_rule_scores, _rule_pv]


def unfold_heads(g: fx.Graph) -> List[Folding]:
    """Rewrite BLOOM-style head-folded products to 4-D (see the module docstring).

    Returns:
        The foldings made; the caller undoes (:meth:`Folding.undo`) those whose ``key`` is
        still in the graph after the sites were replaced.
    """
    done = []
    for n in list(g.nodes):
        if n.graph is not g or n._erased:
            continue
        for rule in RULES:
            f = rule(g, n)
            if f is not None:
                done.append(f)
                break
    return done
