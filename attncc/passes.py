"""Analyses of the IR: which key tiles each query tile visits, and which are full.

The main entry is :func:`plan`, which returns a :class:`KernelPlan`:

* ``path="closed"`` — the mask is static (indices, sizes, params only) and built
  from bounds on ``kv`` that are affine in ``kv`` (or in ``kv // c``) with a
  monotone dependence on ``q`` (causal, windows, prefix, bands, block-diagonal,
  sinks...). For a query tile whose valid rows are ``q_lo..q_hi`` the set of
  keys any of its rows may see is a union of intervals ``[lo, hi)`` and the keys
  *every* row sees is ``[flo, fhi)``; all four are sympy expressions of
  ``q_lo, q_hi`` (and ``h``, ``b``, sizes) printed into the kernel, which derives
  tile ranges from its program id. No table, no mask materialisation.
* ``path="box"`` — grid patterns whose mask, in grid coordinates, is a union of at
  most :data:`MAX_BOXES` products of per-axis conditions (neighborhoods with
  dilation/stride/causal, Swin windows, MaxViT grids, criss-cross...). Query tiles
  are boxes on the grid; per axis, a residue test ``kc % d == qc % d`` becomes
  ``d`` dilation groups (sub-problems: the tile lives inside one group, the test is
  dropped), and the remaining conditions give the key interval of the query box on
  that axis in closed form (the 1-D analysis, in group coordinates). The key box is
  the product of the axis intervals. Tokens are permuted before the kernel so that
  every box is contiguous (:mod:`attncc.layout`), and back after.
* ``path="table"`` — the mask reads a tensor (document ids, labels) or has
  atoms the closed form cannot bound; the runtime evaluates the mask once per
  (shape, params, tensor values) in a vectorised way and caches a block table
  (like FlexAttention's ``BlockMask``).

Rewrites are a declarative list of (match, replace) rules applied bottom-up by
one matcher (:func:`rewrite`), in the style of tinygrad's pattern matcher.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import sympy as sp

from . import ir as I
from .ir import BQ_HI, BQ_LO, GQ, LG, AttentionIR, Lk, h, kv, q, q_hi, q_lo, s  # noqa: F401 (re-exported)

MAX_INTERVALS = 3
#: the key index and the key's grid coordinates
_KEY_SYMBOLS = {kv, *I.KC}
#: most key boxes of a box plan (their union is visited)
MAX_BOXES = 3


# ----------------------------------------------------------------------------- rewrites
#: what sympy may raise while simplifying or deciding a valid expression (e.g.
#: ``PrecisionExhausted`` from ``floor(max(14, q) / 7)``, "The argument 'nan' is not comparable")
SYMPY_ERRORS = (ArithmeticError, TypeError, ValueError, AttributeError, NotImplementedError, RecursionError)


def _simplify(e):
    """``sympy.simplify(e)``, or ``e`` unchanged where sympy fails on it (a simplification
    is an optimisation: the unsimplified expression means the same)."""
    try:
        return sp.simplify(e)
    except SYMPY_ERRORS:
        return e


def _is_int(e) -> bool:
    return bool(e.is_integer)


def _rel_parts(e):
    """Return (lhs, rhs, op) for a relational with op in {<=, <, >=, >, ==, !=}."""
    return e.lhs, e.rhs, e.rel_op


def _abs_rule(e):
    """|x| <= y  ->  -y <= x <= y ;  |x| >= y  ->  x >= y or x <= -y (and mirrored)."""
    if not isinstance(e, sp.core.relational.Relational) or e.rel_op in ("==", "!="):
        return None
    lhs, rhs, op = _rel_parts(e)
    if isinstance(rhs, sp.Abs) and not isinstance(lhs, sp.Abs):
        lhs, rhs, op = rhs, lhs, {"<=": ">=", "<": ">", ">=": "<=", ">": "<"}[op]
    if not isinstance(lhs, sp.Abs):
        return None
    x = lhs.args[0]
    R = {"<=": sp.Le, "<": sp.Lt, ">=": sp.Ge, ">": sp.Gt}
    if op in ("<=", "<"):
        return sp.And(R[op](x, rhs), R[op](-x, rhs))
    return sp.Or(R[op](x, rhs), R[op](-x, rhs))


def _minmax_rule(e):
    """max(a, b) <= y -> a <= y and b <= y; min(a, b) <= y -> a <= y or b <= y (and mirrored).

    Only for a min/max of the key index: a bound on ``kv`` by a min/max of ``q`` terms is
    already an interval (its ends are monotone in ``q``), and splitting it would only
    multiply the intervals."""
    if not isinstance(e, sp.core.relational.Relational) or e.rel_op in ("==", "!="):
        return None
    lhs, rhs, op = _rel_parts(e)
    flip = {"<=": ">=", "<": ">", ">=": "<=", ">": "<"}
    if isinstance(rhs, (sp.Min, sp.Max)) and not isinstance(lhs, (sp.Min, sp.Max)):
        lhs, rhs, op = rhs, lhs, flip[op]
    if not isinstance(lhs, (sp.Min, sp.Max)) or not lhs.free_symbols & _KEY_SYMBOLS:
        return None
    R = {"<=": sp.Le, "<": sp.Lt, ">=": sp.Ge, ">": sp.Gt}
    parts = [R[op](a, rhs) for a in lhs.args]
    upper = op in ("<=", "<")
    conj = (isinstance(lhs, sp.Max) and upper) or (isinstance(lhs, sp.Min) and not upper)
    return sp.And(*parts) if conj else sp.Or(*parts)


def _eq_ne_rule(e):
    """integer x == y -> x <= y and x >= y; x != y -> x < y or x > y (residue tests
    x % c == r and tensor reads are left alone)."""
    if not isinstance(e, (sp.Eq, sp.Ne)) or e.atoms(sp.Mod) or e.atoms(sp.Indexed):
        return None
    if not e.free_symbols & (_KEY_SYMBOLS | {q, *I.QC}):  # a run-time scalar test (``flag[h] != 0``):
        return None  # one condition, not two intervals (see _cond_atom)
    if not (_is_int(e.lhs) and _is_int(e.rhs)):
        return None
    if isinstance(e, sp.Eq):
        return sp.And(sp.Le(e.lhs, e.rhs), sp.Ge(e.lhs, e.rhs))
    return sp.Or(sp.Lt(e.lhs, e.rhs), sp.Gt(e.lhs, e.rhs))


#: the normalising rewrites applied to every mask before range analysis
MASK_RULES = (_abs_rule, _minmax_rule, _eq_ne_rule)


def rewrite(expr, rules=MASK_RULES):
    """Apply ``rules`` bottom-up until no rule matches (a fixpoint)."""
    for _ in range(20):
        new = _rewrite_once(expr, rules)
        if new == expr:
            return new
        expr = new
    return expr


def _rewrite_once(expr, rules):
    if isinstance(expr, (sp.And, sp.Or, sp.Not)):
        return expr.func(*[_rewrite_once(a, rules) for a in expr.args])
    for rule in rules:
        out = rule(expr)
        if out is not None:
            return out
    return expr


# ----------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Interval:
    """Key index interval of one query tile (element units, half-open).

    ``[lo, hi)``: keys some row of the tile may attend to; ``[flo, fhi)``: keys
    every row of the tile attends to. Expressions of ``q_lo``, ``q_hi``, ``h``,
    ``b``, sizes.
    """

    lo: sp.Expr
    hi: sp.Expr
    flo: sp.Expr
    fhi: sp.Expr
    #: the keys of ONE row ``q`` are ``[rlo, rhi)`` (expressions of ``q``; ``None``: unbounded on
    #: that side, or unknown), from the key-bound atoms; used to prove rows empty
    #: (:func:`_row_nonempty`), not part of the interval's identity
    rlo: sp.Expr = field(default=None, compare=False)
    rhi: sp.Expr = field(default=None, compare=False)

    def __and__(self, o: "Interval") -> "Interval":
        return Interval(_max(self.lo, o.lo), _min(self.hi, o.hi), _max(self.flo, o.flo), _min(self.fhi, o.fhi),
                        _row_bound(self.rlo, o.rlo, _max), _row_bound(self.rhi, o.rhi, _min))


def _row_bound(a, b, f):
    return b if a is None else a if b is None else f(a, b)


def _max(a, b):
    return sp.Max(a, b)


def _min(a, b):
    return sp.Min(a, b)


ALL = Interval(sp.Integer(0), Lk, sp.Integer(0), Lk)
ALL_PARTIAL = Interval(sp.Integer(0), Lk, sp.Integer(0), sp.Integer(0))


def monotone(expr, var) -> int | None:
    """Direction of ``expr`` in integer ``var``: +1 non-decreasing, -1 non-increasing,
    0 constant, None unknown. Understands sums, constant multiples, floor/ceil,
    min/max."""
    if var not in expr.free_symbols:
        return 0
    if expr == var:
        return 1
    if isinstance(expr, sp.Add):
        dirs = {monotone(a, var) for a in expr.args} - {0}
        if None in dirs or len(dirs) > 1:
            return None
        return dirs.pop() if dirs else 0
    if isinstance(expr, sp.Mul):
        const = [a for a in expr.args if var not in a.free_symbols]
        rest = [a for a in expr.args if var in a.free_symbols]
        if len(rest) != 1:
            return None
        c = sp.Mul(*const)
        d = monotone(rest[0], var)
        if d is None or d == 0:
            return d
        if c.is_positive:
            return d
        if c.is_negative:
            return -d
        return None
    if isinstance(expr, (sp.floor, sp.ceiling)):
        return monotone(expr.args[0], var)
    if isinstance(expr, (sp.Min, sp.Max)):
        dirs = {monotone(a, var) for a in expr.args} - {0}
        if None in dirs or len(dirs) > 1:
            return None
        return dirs.pop() if dirs else 0
    return None


def _at(expr, qv):
    return expr.subs(q, qv)


def _extremes(expr):
    """(min over the tile rows, max over the tile rows) of an expression monotone in q."""
    d = monotone(expr, q)
    if d is None:
        return None
    a, b_ = _at(expr, q_lo), _at(expr, q_hi)
    if d >= 0:
        return a, b_
    return b_, a


def _kv_term(e):
    """Split integer ``e`` as ``a * g(kv) + r`` with g(kv) = kv or floor((kv + k0) / c).

    Returns (a, kind, k0, c, r) or None.
    """
    e = sp.expand(e)
    terms = sp.Add.make_args(e)
    kv_terms = [t for t in terms if kv in t.free_symbols]
    r = sp.Add(*[t for t in terms if kv not in t.free_symbols])
    if len(kv_terms) == 1:
        t = kv_terms[0]
        coeff, g = t.as_coeff_Mul()
        if g == kv and coeff != 0:
            return coeff, "id", 0, 1, r
        if isinstance(g, sp.floor) and coeff.is_number:
            inner = sp.expand(g.args[0])
            c_inv = inner.coeff(kv)
            rest = sp.expand(inner - c_inv * kv)
            if c_inv.is_Rational and c_inv > 0 and kv not in rest.free_symbols:
                c = 1 / c_inv
                k0 = sp.expand(rest * c)
                if c.is_Integer and k0.is_integer is not False and q not in k0.free_symbols and not k0.free_symbols:
                    return coeff, "floor", k0, c, r
    elif len(kv_terms) > 1:
        coeff = sp.expand(sum(t for t in kv_terms)).coeff(kv)
        if coeff.is_number and sp.expand(sum(kv_terms) - coeff * kv) == 0 and coeff != 0:
            return coeff, "id", 0, 1, r
    return None


def _bound_atom(rel):
    """KvSet of one relational atom: list[Interval] and whether it is exact.

    The atom is split as ``a * g(kv) + r  OP  0`` with integer ``g(kv)`` (``kv`` or
    ``floor((kv + k0) / c)``) and real ``r`` (e.g. ``g/2`` in dilation-group
    coordinates); the integer bound on ``g`` uses floor/ceil of ``-r / a``.
    """
    if not isinstance(rel, sp.core.relational.Relational):
        return None
    op = rel.rel_op
    if op in ("==", "!="):
        return None
    if not (rel.lhs.is_real and rel.rhs.is_real) or kv not in rel.free_symbols:
        return None
    split = _kv_term(rel.lhs - rel.rhs)
    if split is None:
        return None
    a, kind, k0, c, r = split
    if not (a.is_number and a != 0):
        return None
    if monotone(r, q) is None:
        return None
    x = -r / a  # a*g + r OP 0  <=>  g OP' x
    if a < 0:
        op = {"<=": ">=", "<": ">", ">=": "<=", ">": "<"}[op]
    if op in ("<=", "<"):  # g <= G
        G = sp.floor(x) if op == "<=" else sp.ceiling(x) - 1
        hi = (G + 1) if kind == "id" else (c * G + c - k0)
        ext = _extremes(hi)
        if ext is None:
            return None
        return Interval(sp.Integer(0), ext[1], sp.Integer(0), ext[0], rhi=hi)
    G = sp.ceiling(x) if op == ">=" else sp.floor(x) + 1  # g >= G
    lo = G if kind == "id" else (c * G - k0)
    ext = _extremes(lo)
    if ext is None:
        return None
    return Interval(ext[0], Lk, ext[1], Lk, rlo=lo)


def _cond_atom(cond):
    """A condition not involving kv: all keys if some/every row satisfies it."""
    if kv in cond.free_symbols:
        return None
    if q not in cond.free_symbols:
        some = every = cond
    else:
        if not isinstance(cond, sp.core.relational.Relational):
            return None
        if monotone(cond.lhs - cond.rhs, q) is None:
            return None
        a, b_ = cond.subs(q, q_lo), cond.subs(q, q_hi)
        some, every = sp.Or(a, b_), sp.And(a, b_)
    return Interval(sp.Integer(0), sp.Piecewise((Lk, some), (0, True)),
                    sp.Integer(0), sp.Piecewise((Lk, every), (0, True)))


@dataclass
class _Analysis:
    exact: bool = True
    notes: list = field(default_factory=list)


def kv_sets(mask, an: _Analysis) -> list[Interval] | None:
    """Union of intervals bounding the keys of a query tile; None if the number of
    intervals exceeds :data:`MAX_INTERVALS`."""
    if mask is sp.true:
        return [ALL]
    if mask is sp.false:
        return []
    if isinstance(mask, sp.And):
        acc = [ALL]
        for a in mask.args:
            sub = kv_sets(a, an)
            if sub is None:
                return None
            acc = [x & y for x in acc for y in sub]
            if len(acc) > MAX_INTERVALS:
                return None
        return acc
    if isinstance(mask, sp.Or):
        acc = []
        for a in mask.args:
            sub = kv_sets(a, an)
            if sub is None:
                return None
            acc += sub
        return acc if len(acc) <= MAX_INTERVALS else None
    iv = _bound_atom(mask)
    if iv is not None:
        return [iv]
    iv = _cond_atom(mask)
    if iv is not None:
        return [iv]
    an.exact = False
    an.notes.append(f"atom {mask} bounds no key range: its tiles are visited as partial (masked)")
    return [ALL_PARTIAL]


# ----------------------------------------------------------------------------- index ranges
#: ranges of the index variables: b in [0, B-1], h in [0, H-1], q in [0, Lq-1], kv in [0, Lk-1]
def _var_box():
    from .ir import B, H, Dv, Lq, b, dv
    return {b: (0, B - 1), h: (0, H - 1), q: (0, Lq - 1), kv: (0, Lk - 1), dv: (0, Dv - 1)}


def index_range(expr):
    """(min, max) of an integer index expression over all valid ``b, h, q, kv``, as sympy
    expressions of the sizes; None when the expression is not monotone in each index."""
    box = _var_box()
    lo_subs, hi_subs = {}, {}
    for var, (a, z) in box.items():
        if var not in expr.free_symbols:
            continue
        d = monotone(expr, var)
        if d is None:
            return None
        lo_subs[var], hi_subs[var] = (a, z) if d >= 0 else (z, a)
    return _simplify(expr.subs(lo_subs)), _simplify(expr.subs(hi_subs))


def read_in_bounds(ix, dim) -> bool:
    """True when index ``ix`` provably lies in ``[0, dim)`` for all valid indices."""
    r = index_range(ix)
    if r is None:
        return False
    lo, hi = r
    return bool(_simplify(lo).is_nonnegative) and bool(_simplify(dim - 1 - hi).is_nonnegative)


def read_checks(ir: AttentionIR, expr) -> tuple:
    """Call-time bounds checks of the tensor reads of ``expr``: tuples
    ``(tensor, axis, index text, min expr, max expr)`` for reads not provably in bounds."""
    out = []
    for read in sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key):
        t = ir.tensor(str(read.base.label))
        for axis, ix in enumerate(read.indices):
            if read_in_bounds(ix, t.shape[axis]):
                continue
            r = index_range(ix)
            if r is not None:
                out.append((t.name, axis, str(read), r[0], r[1]))
    return tuple(out)


def value_read_checks(ir: AttentionIR, expr) -> tuple:
    """The tensor reads of a score, sink or gate expression that are not provably in bounds:
    tuples ``(tensor, axis, index text, min expr, max expr)``, min / max ``None`` when the
    index depends on tensor values or is not monotone (``table[h, bucket[kv - q]]``).

    A read is checked before the launch only when its static range does not fit the tensor
    at the call's sizes, or it has none (see :func:`attncc.dense.check_clause_reads`)."""
    if expr is None:
        return ()
    out = []
    for read in sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key):
        t = ir.tensor(str(read.base.label))
        for axis, ix in enumerate(read.indices):
            if ix.atoms(sp.Indexed):
                out.append((t.name, axis, str(read), None, None))
                continue
            if read_in_bounds(ix, t.shape[axis]):
                continue
            r = index_range(ix)
            out.append((t.name, axis, str(read), *(r if r is not None else (None, None))))
    return tuple(out)


def index_tensors(expr) -> tuple:
    """Names of the tensors read inside the indices of other reads of ``expr`` (whose values
    decide where those reads land), sorted."""
    names = set()
    for read in expr.atoms(sp.Indexed) if expr is not None else ():
        for ix in read.indices:
            names |= {str(r.base.label) for r in sp.sympify(ix).atoms(sp.Indexed)}
    return tuple(sorted(names))


# ----------------------------------------------------------------------------- boxes
# (the box symbols GQ, BQ_LO, BQ_HI, LG are defined in attncc.ir)


@dataclass(frozen=True)
class Box:
    """Keys of a query box: one :class:`Interval` per grid axis, in group coordinates
    (``j = x // d`` inside dilation group ``g = x % d``), expressions of ``q_lo<i>``,
    ``q_hi<i>``, ``g<i>``, ``lg<i>`` and sizes. The box is their product."""

    axes: tuple


def _residue(atom, i):
    """``d`` when ``atom`` is ``kc_i % d == qc_i % d`` (either side), else None."""
    if not isinstance(atom, sp.Eq):
        return None
    a, c = atom.lhs, atom.rhs
    if not (isinstance(a, sp.Mod) and isinstance(c, sp.Mod) and a.args[1] == c.args[1]):
        return None
    if {a.args[0], c.args[0]} != {I.QC[i], I.KC[i]}:
        return None
    d = a.args[1]
    if d.free_symbols & (set(I.QC) | set(I.KC) | {q, kv}):
        return None
    return d


def _axes_of(atom, n):
    return {i for i in range(n) if atom.free_symbols & {I.QC[i], I.KC[i]}}


def box_analysis(ir: AttentionIR):
    """The box plan of a grid pattern: ``(groups, boxes, notes)`` or ``(None, None, reason)``.

    ``groups[i]`` is the number of dilation groups on axis ``i`` (a sympy expression of
    sizes; 1 when the axis has no residue test) and ``boxes`` the :class:`Box` list.
    Requires: the mask reads no tensor, uses grid coordinates only (no bare q/kv), and
    splits into at most :data:`MAX_BOXES` products of per-axis conditions, each axis
    bounded exactly by the 1-D analysis.
    """
    n = len(ir.grid)
    mask = ir.coord_mask
    if mask is None or not n:
        return None, None, "not a grid pattern"
    if mask.atoms(sp.Indexed):
        return None, None, "the mask reads tensors"
    if mask.free_symbols & {q, kv}:
        return None, None, "the mask uses the flattened q / kv index, not grid coordinates"
    norm = rewrite(mask)
    if norm is sp.false:
        return [sp.Integer(1)] * n, [], ()
    dnf = sp.to_dnf(norm) if isinstance(norm, (sp.And, sp.Or)) else norm
    disjuncts = dnf.args if isinstance(dnf, sp.Or) else (dnf,)
    groups = [None] * n
    boxes, notes = [], []
    for conj in disjuncts:
        atoms = conj.args if isinstance(conj, sp.And) else (() if conj is sp.true else (conj,))
        per_axis = [[] for _ in range(n)]
        dil = [sp.Integer(1)] * n
        for atom in atoms:
            axes = _axes_of(atom, n)
            if len(axes) > 1:
                return None, None, f"the condition {atom} couples several grid axes"
            i = axes.pop() if axes else 0
            d = _residue(atom, i)
            if d is not None:
                if dil[i] != 1 and dil[i] != d:
                    return None, None, f"two residue tests on axis {ir.grid[i]!r}"
                dil[i] = d
            else:
                per_axis[i].append(atom)
        axis_sets = []
        for i in range(n):
            if groups[i] is None:
                groups[i] = dil[i]
            elif groups[i] != dil[i]:
                return None, None, f"the boxes of the mask group axis {ir.grid[i]!r} differently"
            d = dil[i]
            sub = {I.QC[i]: GQ[i] + d * q, I.KC[i]: GQ[i] + d * kv} if d != 1 else {I.QC[i]: q, I.KC[i]: kv}
            cond = sp.And(*[a.xreplace(sub) for a in per_axis[i]])
            an = _Analysis()
            ivs = kv_sets(rewrite(cond), an)
            if ivs is None or not an.exact:
                why = "; ".join(an.notes) or "too many key intervals"
                return None, None, f"axis {ir.grid[i]!r}: {why}"
            rn = {q_lo: BQ_LO[i], q_hi: BQ_HI[i], Lk: LG[i]}
            if d == 1:
                rn[GQ[i]] = sp.Integer(0)
            axis_sets.append([Interval(*(_simplify(x.xreplace(rn)) for x in (v.lo, v.hi, v.flo, v.fhi)))
                              for v in ivs])
        for combo in _product(axis_sets):
            boxes.append(Box(tuple(combo)))
            if len(boxes) > MAX_BOXES:
                return None, None, f"the mask splits into more than {MAX_BOXES} key boxes"
    return groups, boxes, tuple(notes)


def drop_residues(mask, groups):
    """``mask`` with each residue test ``kc_i % d == qc_i % d`` of a grouped axis (``d ==
    groups[i]``) replaced by ``True``: inside one dilation group it always holds."""
    rep = {}
    for atom in mask.atoms(sp.Eq):
        for i, d in enumerate(groups):
            if d != 1 and _residue(atom, i) == d:
                rep[atom] = sp.true
    return mask.xreplace(rep)


def _product(lists):
    out = [[]]
    for lst in lists:
        out = [o + [x] for o in out for x in lst]
    return out


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class KernelPlan:
    """What codegen needs beyond the IR.

    Attributes:
        ir: the analysed :class:`AttentionIR`.
        path: ``"closed"`` (key ranges computed in the kernel from the program id)
            or ``"table"`` (block table built at run time from the mask and cached).
        intervals: for ``closed``: the :class:`Interval` list (their union is visited).
        exact: ``closed`` only: every mask atom bounded a key range, so visited tiles
            are exactly the tiles the analysis proves non-empty at element level.
        mask_tensors / score_tensors: names of tensors read by the mask / score.
        score_is_identity: the score is plain ``s`` (scale folded into exp2).
        mask_uses_b / mask_uses_h: the mask depends on the batch / head index.
        notes: lines for ``attncc explain``.
        mask_read_checks: see :func:`read_checks` (checked before each launch).
        value_read_checks: ``((clause, checks), ...)`` for the clauses ``score``, ``sink``,
            ``gate`` with reads not provably in bounds (:func:`value_read_checks`), checked
            before each launch as :func:`attncc.reference` checks them.
        groups / boxes: ``box`` only: dilation groups per grid axis (sympy expressions of
            the sizes) and the :class:`Box` list (see :func:`box_analysis`).
        box_mask: ``box`` only: the coordinate-form mask with the residue tests that the
            grouping guarantees replaced by ``True`` (what partial tiles evaluate).
        scalars: ``closed`` plans: the tensor reads in the intervals (sympy ``Indexed``; indices
            of ``b``, ``h`` and sizes only: per-head windows, sink counts, flags), which every
            kernel loads once per program before computing its key ranges (see
            :func:`scalar_reads`).
        blocks: ``table`` plans whose mask is a tensor-free part AND one block-level read
            ``blk[..., q // BQ, kv // BK]`` (:class:`BlockRead`, see :func:`block_read`): the
            runtime builds the table from the block tensor and the closed form of the rest
            (O(tiles) work on the device), never from a dense evaluation of the mask.
        backward: the :class:`~attncc.gradients.BackwardPlan` (score derivatives, the reads
            whose gradients the kernels compute, the sink / gate reads) of :meth:`forms`'s score.
        read_bounds: ``((read, ((in_bounds, nonnegative), ...)), ...)``: per tensor read the
            kernels evaluate (mask, score, derivatives, sink, gate, key ranges), per index
            whether it provably lies in ``[0, size)`` (no bounds mask needed) and whether it
            is provably ``>= 0`` (see :func:`read_bounds`). Codegen only prints the plan: these
            are every analysis result it needs.
    """

    ir: AttentionIR
    path: str
    intervals: tuple = ()
    exact: bool = True
    mask_tensors: tuple = ()
    score_tensors: tuple = ()
    score_is_identity: bool = True
    mask_uses_b: bool = False
    mask_uses_h: bool = False
    notes: tuple = ()
    mask_read_checks: tuple = ()
    value_read_checks: tuple = ()
    groups: tuple = ()
    boxes: tuple = ()
    box_mask: sp.Basic = None
    backward: object = None
    read_bounds: tuple = ()
    blocks: "BlockRead" = None
    scalars: tuple = ()

    def forms(self) -> tuple:
        """``(mask, score)`` as the kernels evaluate them: the IR's, or for box plans the
        coordinate forms (the mask without the residue tests the grouping guarantees)."""
        if self.path == "box":
            return self.box_mask, self.ir.coord_score
        return self.ir.mask, self.ir.score

    def describe(self) -> str:
        """Multi-line description of the analysis (used by ``attncc explain``)."""
        out = []
        if self.path == "closed":
            out.append("path: closed form -- each query tile computes its key-tile range from its program id "
                       "(no block table, no mask materialisation)")
            out.append(f"  exact: {'yes' if self.exact else 'no (conservative: some tiles visited as partial may be empty)'}")
            for i, iv in enumerate(self.intervals):
                out.append(f"  interval {i}: keys [{iv.lo}, {iv.hi})  full for all rows: [{iv.flo}, {iv.fhi})")
            out.append("  (q_lo, q_hi = first and last valid query row of the tile)")
        elif self.path == "box":
            ax = self.ir.grid
            out.append("path: grid boxes, closed form -- query tiles are boxes on the grid; each computes its key "
                       "box per axis from its program id (no block table, no mask materialisation)")
            for i, a in enumerate(ax):
                d = self.groups[i]
                out.append(f"  axis {a} (size G{i}): " + (f"{d} dilation groups (sub-problems: a tile holds tokens "
                           f"{a} = g + {d} * j of one group g; the residue test is dropped)" if d != 1
                           else "one group") + f"; j = group coordinate, lg{i} = tokens of the group")
            for j, bx in enumerate(self.boxes):
                for i, iv in enumerate(bx.axes):
                    out.append(f"  key box {j}, axis {ax[i]}: j in [{iv.lo}, {iv.hi})  full for all rows: "
                               f"[{iv.flo}, {iv.fhi})")
            out.append("  (q_lo<i>, q_hi<i> = first and last valid group coordinate of the query box on axis i; "
                       "g<i> = its dilation group)")
            out.append("  layout: tokens permuted before the kernel to (groups, tiles, rows of a tile) on every axis "
                       "(padded to whole tiles), and back after, so every box is contiguous "
                       "(the permutation is skipped when it is the identity); tile shapes per axis are chosen "
                       "per call from the axis sizes by a cost model over these closed forms")
        elif self.blocks is not None:
            br = self.blocks
            out.append(f"path: block table from the block tensor {br.tensor} -- the mask is (rest) and "
                       f"{br.read} != 0, a read per block of {br.bq} queries x {br.bk} keys: per call the table "
                       "is built on the device from the block tensor (any / all of the blocks under each tile, "
                       "O(tiles) work, no evaluation of the mask per (q, kv) pair), intersected with the "
                       + ("closed form of the rest" if br.intervals is not None else
                          "tile classes of the rest (evaluated per tile; no closed form)"))
            for i, iv in enumerate(br.intervals or ()):
                out.append(f"  rest, interval {i}: keys [{iv.lo}, {iv.hi})  full for all rows: [{iv.flo}, {iv.fhi})")
        else:
            why = "the mask reads tensors " + ", ".join(self.mask_tensors) if self.mask_tensors else \
                "the mask has atoms with no closed-form key range"
            out.append(f"path: block table -- {why}; the table is built once per (shape, params, tensor "
                       "values) by a vectorised mask evaluation and cached")
        out.append(f"score: {'identity (scale folded into exp2)' if self.score_is_identity else self.ir.score}")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


@dataclass(frozen=True)
class BlockRead:
    """A mask of the form ``rest and blk[i_0, ..., q // bq, kv // bk] != 0`` (block sparsity
    read from a tensor, as FlexAttention's ``BlockMask`` or MoBA's gate): ``rest`` reads no
    tensor, ``i_0, ...`` depend on ``b``, ``h`` and sizes only.

    Attributes:
        tensor: the block tensor's name.
        read: the read ``blk[...]`` (sympy ``Indexed``).
        bq / bk: queries / keys per block.
        rest: the tensor-free part of the mask (``true`` when there is none).
        intervals: the closed-form :class:`Interval` list of ``rest`` (as a closed plan's),
            or ``None`` when ``rest`` has no closed form (grid patterns, unbounded atoms).
    """

    tensor: str
    read: sp.Indexed
    bq: int
    bk: int
    rest: sp.Basic
    intervals: tuple = None


def _block_of(ix, var) -> int | None:
    """``c`` when the index ``ix`` is ``floor(var / c)`` (or ``var`` itself: ``c = 1``) for a
    positive integer ``c``, else ``None``."""
    ix = sp.sympify(ix)
    if ix == var:
        return 1
    if isinstance(ix, sp.floor):
        c = sp.simplify(var / ix.args[0])
        if c.is_Integer and c > 0:
            return int(c)
    return None


def block_read(ir: AttentionIR):
    """The :class:`BlockRead` of ``ir.mask`` when it is a tensor-free part AND one read
    ``blk[..., q // bq, kv // bk] != 0`` of a tensor read nowhere else in the mask (the
    leading indices free of ``q`` and ``kv``); else ``None`` (the dense block table)."""
    atoms = sp.And.make_args(ir.mask)
    found = []
    for a in atoms:
        reads = a.atoms(sp.Indexed)
        if not reads:
            continue
        if len(reads) != 1 or not (isinstance(a, sp.Ne) and a.args[1] == 0 and a.args[0] in reads):
            return None
        found.append(a)
    if len(found) != 1:
        return None
    read = found[0].args[0]
    if len(read.indices) < 2 or any(ix.free_symbols & {q, kv} for ix in read.indices[:-2]):
        return None
    bq, bk = _block_of(read.indices[-2], q), _block_of(read.indices[-1], kv)
    if bq is None or bk is None:
        return None
    rest = sp.And(*[a for a in atoms if a is not found[0]])
    intervals = None
    if not ir.grid:  # grid patterns: tile classes of the rest per tile (their closed forms are boxes)
        try:
            rp = _plan(dataclasses.replace(ir, mask=rest))
        except SYMPY_ERRORS:
            rp = None
        if rp is not None and rp.path == "closed":
            intervals = rp.intervals
    return BlockRead(str(read.base.label), read, bq, bk, rest, intervals)


def _full_width(iv: Interval, probe=None) -> float:
    """Width of an interval's full range at a generic large shape. A tile in several
    intervals is visited once, by the first; putting the widest full ranges first lets a
    tile that is full in any interval run without mask code (e.g. the sink tile of a
    window + sinks mask is full while the window covers it)."""
    from .ir import SIZES
    subs = {q_lo: 10**6, q_hi: 10**6 + 127, h: 0}
    subs.update({sym: 2 * 10**6 for sym in SIZES.values()})
    subs.update(probe or {})
    try:
        return float((iv.fhi - iv.flo).subs(subs))
    except (TypeError, ValueError):
        return 0.0


def lowrank_notes(ir: AttentionIR) -> tuple:
    """Explain lines about low-rank score terms: the ``dot()`` terms folded into QK^T, and
    additive biases with an exact low-rank form that are left to the kernel (e.g. ALiBi
    ``slope[h] * (kv - q)`` = ``slope[h] * kv - slope[h] * q``: rank 2)."""
    out = []
    if ir.lowrank:
        out.append(f"low-rank: {len(ir.lowrank)} dot() term(s) folded into the QK^T product (each tile adds "
                   f"(A / scale) B^T to q k^T, one extra GEMM of the summed rank; no Lq x Lk bias is "
                   f"materialised or read)")
    bias = sp.expand(ir.score - s)
    if bias != 0 and s not in bias.free_symbols:
        terms = sp.Add.make_args(bias)
        both = [t for t in terms if {q, kv} <= t.free_symbols]
        if not both and any(t.free_symbols & {q, kv} for t in terms):
            rank = sum(1 for t in terms if t.free_symbols & {q, kv})
            out.append(f"low-rank: the bias {ir.score - s} has an exact rank-{rank} form (its terms each depend on q "
                       f"or on kv only); not folded: the kernel computes it from indices at no memory cost")
    return tuple(out)


def plan(ir: AttentionIR) -> KernelPlan:
    """Analyse ``ir`` and choose how the kernel finds its key tiles.

    Where sympy fails inside an analysis of a valid mask (:data:`SYMPY_ERRORS`), the
    pattern takes the block-table path, which evaluates the mask itself and is exact.

    Returns:
        The :class:`KernelPlan`.
    """
    from .gradients import backward_analysis

    try:
        kp = _plan(ir)
    except SYMPY_ERRORS as e:
        note = f"the closed-form analysis failed ({type(e).__name__}: {e}); block table instead"
        kp = KernelPlan(ir, "table", mask_tensors=tuple(t.name for t in ir.tensors_in(ir.mask)),
                        score_tensors=tuple(t.name for t in ir.tensors_in(ir.score)),
                        score_is_identity=(ir.score == s), mask_uses_b=I.b in ir.mask.free_symbols,
                        mask_uses_h=h in ir.mask.free_symbols, mask_read_checks=(), notes=(note,))
    else:
        checks = {c: value_read_checks(ir, e) for c, e in (("score", ir.score), ("sink", ir.sink), ("gate", ir.gate))}
        kp = dataclasses.replace(kp, value_read_checks=tuple((c, v) for c, v in checks.items() if v))
    back = backward_analysis(ir, kp.forms()[1])
    return dataclasses.replace(kp, backward=back, read_bounds=read_bounds(ir, _printed_exprs(kp, back)))


def _printed_exprs(kp: KernelPlan, back) -> list:
    """Every expression of ``kp`` (with its backward analysis ``back``) that the kernels evaluate."""
    ir = kp.ir
    out = [*kp.forms(), back.dscore, ir.sink, ir.gate]
    out += [x for g, c in back.reads for x in (g.read, *((c.read, c.deriv) if c is not None else ()))]
    out += [x for _, g in back.epilogue for x in (g.read, g.deriv)]
    ivs = list(kp.intervals) + [iv for bx in kp.boxes for iv in bx.axes]
    out += [x for iv in ivs for x in (iv.lo, iv.hi, iv.flo, iv.fhi)]
    return [e for e in out if e is not None]


def read_bounds(ir: AttentionIR, exprs) -> tuple:
    """``((read, ((in_bounds, nonnegative), ...)), ...)`` for every tensor read in ``exprs``
    (nested reads too), in a fixed order: per index of the read, whether it provably lies in
    ``[0, size)`` for all valid indices (:func:`read_in_bounds`) and whether it is provably
    nonnegative (what the generated bounds mask leaves out)."""
    shapes = {t.name: t.shape for t in ir.tensors}
    reads = set()
    for e in exprs:
        reads |= sp.sympify(e).atoms(sp.Indexed)
    # a read inside another read's index is loaded with the clamped indices (attncc.ir.CLAMPED)
    todo = list(reads)
    while todo:
        for ix in todo.pop().indices:
            for r in sp.sympify(ix).atoms(sp.Indexed):
                rc = r.subs(I.CLAMPED)
                if rc not in reads:
                    reads.add(rc)
                    todo.append(rc)
    out = []
    for r in sorted(reads, key=sp.default_sort_key):
        shape = shapes[str(r.base.label)]
        out.append((r, tuple((read_in_bounds(ix, shape[i]), bool(sp.sympify(ix).is_nonnegative))
                             for i, ix in enumerate(r.indices))))
    return tuple(out)


def _plan(ir: AttentionIR) -> KernelPlan:
    mask_tensors = tuple(t.name for t in ir.tensors_in(ir.mask))
    score_tensors = tuple(t.name for t in ir.tensors_in(ir.score))
    common = dict(mask_tensors=mask_tensors, score_tensors=score_tensors,
                  score_is_identity=(ir.score == s),
                  mask_uses_b=sp.Symbol("b", integer=True, nonnegative=True) in ir.mask.free_symbols,
                  mask_uses_h=h in ir.mask.free_symbols,
                  mask_read_checks=read_checks(ir, ir.mask), notes=lowrank_notes(ir))
    if mask_tensors:
        scal = _scalar_plan(ir, common)
        if scal is not None:
            return scal
        return KernelPlan(ir, "table", blocks=block_read(ir), **common)
    if ir.grid:
        groups, boxes, why = box_analysis(ir)
        if boxes is not None and not boxes:  # empty everywhere: no key tile to visit, 0 / -inf rows
            return KernelPlan(ir, "closed", intervals=(), exact=True,
                              **dict(common, notes=common["notes"] + ("the mask is empty for every pair",)))
        if boxes is not None:
            return KernelPlan(ir, "box", groups=tuple(groups), boxes=tuple(boxes),
                              box_mask=drop_residues(ir.coord_mask, groups), **common)
        common["notes"] = common["notes"] + (f"no box plan: {why}",)
    return _closed_plan(ir, ir.mask, common)


def scalar_reads(ir: AttentionIR) -> tuple | None:
    """The tensor reads of ``ir.mask`` when every one is a run-time scalar of a (batch, head):
    its indices depend on ``b``, ``h`` and sizes only (a window ``win[h]``, a sink count
    ``sinks[b, h]``, a flag ``is_retrieval[h]``; no read inside an index). ``None`` when a read
    depends on ``q`` / ``kv`` (document ids, labels: the block table) or the mask reads none."""
    reads = sorted(ir.mask.atoms(sp.Indexed), key=sp.default_sort_key)
    tile = {q, kv, *I.QC, *I.KC}
    if not reads or any(sp.sympify(ix).free_symbols & tile or sp.sympify(ix).atoms(sp.Indexed)
                        for r in reads for ix in r.indices):
        return None
    return tuple(reads)


def _scalar_plan(ir: AttentionIR, common: dict) -> KernelPlan | None:
    """The closed plan of a mask whose tensor reads are all run-time scalars
    (:func:`scalar_reads`): each read is replaced by a fresh symbol (integer for int / bool
    tensors, real for float ones), the closed-form analysis runs on the result, and the reads
    are put back into the interval bounds, which the kernels evaluate after loading the
    scalars once per program. ``None`` when the analysis has no closed form (the table)."""
    reads = scalar_reads(ir)
    if reads is None or ir.grid:
        return None
    syms = {}
    for i, r in enumerate(reads):
        kind = ir.tensor(str(r.base.label)).kind
        syms[r] = sp.Symbol(f"_scalar{i}", integer=True) if kind != "float" else sp.Symbol(f"_scalar{i}", real=True)
    kp = _closed_plan(ir, ir.mask.xreplace(syms), common, probe={v: 10**5 for v in syms.values()})
    if kp.path != "closed":
        return None
    back = {v: r for r, v in syms.items()}
    ivs = tuple(Interval(*(sp.sympify(x).xreplace(back) for x in (iv.lo, iv.hi, iv.flo, iv.fhi)))
                for iv in kp.intervals)
    used = set().union(*(x.atoms(sp.Indexed) for iv in ivs for x in (iv.lo, iv.hi, iv.flo, iv.fhi))) if ivs else set()
    note = ("run-time scalars of the key ranges (loaded once per program): "
            + ", ".join(str(r) for r in reads if r in used)) if used else ()
    return dataclasses.replace(kp, intervals=ivs, scalars=tuple(r for r in reads if r in used),
                               notes=kp.notes + ((note,) if note else ()))


def _merge_prefixes(ivs: list) -> list:
    """Intervals that start at key 0 (and whose full ranges do) merged into one:
    ``[0, a) | [0, b) = [0, max(a, b))``, exact for the keys and the full ranges. A flag
    ``is_retrieval[h]`` (every causal key) and the sinks of the other heads become one key
    range, so the kernels iterate fewer loops."""
    zero = sp.Integer(0)
    pre = [iv for iv in ivs if iv.lo == zero and iv.flo == zero]
    if len(pre) < 2:
        return ivs
    merged = Interval(zero, sp.Max(*(iv.hi for iv in pre)), zero, sp.Max(*(iv.fhi for iv in pre)))
    return [merged] + [iv for iv in ivs if not (iv.lo == zero and iv.flo == zero)]


def _row_nonempty(iv: Interval, scalars: set):
    """``iv.hi``, or ``Piecewise((iv.hi, w > 0), (0, True))`` when the keys of one row,
    ``[rlo(q), rhi(q))``, have a width ``w`` (its largest value over the tile's rows, ``w``
    monotone in ``q``) that depends on run-time ``scalars``: a window ``win[h] <= 0`` leaves
    every row empty, which the union over the rows (``[lo, hi)``) cannot see."""
    if iv.rlo is None or iv.rhi is None:
        return iv.hi
    w = sp.expand(iv.rhi - iv.rlo)
    if not w.free_symbols & scalars:
        return iv.hi
    ext = _extremes(w)
    if ext is None:
        return iv.hi
    return sp.Piecewise((iv.hi, sp.Gt(ext[1], 0)), (sp.Integer(0), True))


def _closed_plan(ir: AttentionIR, mask, common: dict, probe=None) -> KernelPlan:
    """The closed-form plan of ``mask`` (the table when it has none). ``probe``: values of
    run-time scalar symbols for ordering the intervals (:func:`_full_width`)."""
    common = dict(common)
    an = _Analysis()
    norm = rewrite(mask)
    ivs = kv_sets(norm, an)
    if ivs is None:
        common["notes"] = common.get("notes", ()) + (f"the mask splits into more than {MAX_INTERVALS} key intervals",)
        return KernelPlan(ir, "table", exact=True, **common)
    if not an.exact and (not all("Mod(" in n for n in an.notes) or ALL_PARTIAL in ivs):
        # an atom that is neither a key bound nor a residue test: the closed form would
        # visit tiles it cannot prove non-empty, the table is exact.
        common["notes"] = common.get("notes", ()) + tuple(an.notes)
        return KernelPlan(ir, "table", **common)
    if probe:
        ivs = _merge_prefixes(ivs)
    ivs = [Interval(*(_simplify(x) for x in (iv.lo, iv.hi, iv.flo, iv.fhi))) if not probe else
           Interval(*(_simplify(x) for x in (iv.lo, _row_nonempty(iv, set(probe)), iv.flo, iv.fhi))) for iv in ivs]
    ivs = sorted(ivs, key=lambda iv: _full_width(iv, probe), reverse=True)
    common["notes"] = common.get("notes", ()) + tuple(an.notes)
    return KernelPlan(ir, "closed", intervals=tuple(ivs), exact=an.exact, **common)
