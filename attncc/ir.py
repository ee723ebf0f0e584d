"""The attention IR: a pattern lowered to sympy expressions, with params specialised.

``lower(spec, **params)`` turns a :class:`attncc.dsl.PatternSpec` into an
:class:`AttentionIR` whose ``mask`` is a sympy boolean and whose ``score`` is a
sympy expression of ``s`` (the scaled dot product ``q . k * scale``), the index
symbols ``b, h, q, kv``, the size symbols ``B, H, Hkv, Lq, Lk, D, Dv`` and
tensor reads (``sympy.Indexed``). Type errors (a non-boolean mask, ``s`` in a
mask, a wrong number of indices, unknown functions...) are raised here as
:class:`SpecError` pointing at the offending text.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field

import sympy as sp

from .dsl import GRID_SIZE_NAMES, INDEX_NAMES, SIZE_NAMES, PatternSpec, SpecExpr, check_param_value, load
from .errors import MissingParamError, SpecError

# ----------------------------------------------------------------------------- symbols
b, h, q, kv = (sp.Symbol(n, integer=True, nonnegative=True) for n in INDEX_NAMES)
s = sp.Symbol("s", real=True)
SIZES = {n: sp.Symbol(n, integer=True, positive=True) for n in SIZE_NAMES + GRID_SIZE_NAMES}
INDEX = {"b": b, "h": h, "q": q, "kv": kv}
#: the output feature index (gate clauses only)
dv = sp.Symbol("dv", integer=True, nonnegative=True)
B, H, Hkv, Lq, Lk, D, Dv = (SIZES[n] for n in SIZE_NAMES)
GRID_SIZES = tuple(SIZES[n] for n in GRID_SIZE_NAMES)
#: grid coordinates of the query / key token on axis i (the coordinate form of grid patterns)
QC = tuple(sp.Symbol(f"qc{i}", integer=True, nonnegative=True) for i in range(3))
KC = tuple(sp.Symbol(f"kc{i}", integer=True, nonnegative=True) for i in range(3))
#: symbols of the analysis's closed forms (:mod:`attncc.passes`), which the kernels evaluate:
#: the first and last valid query row of a query tile; per grid axis i the group (dilation
#: residue) of the query tile, first / last valid row of the query box in group coordinates,
#: and the group's length (tokens of the group on the axis)
q_lo = sp.Symbol("q_lo", integer=True, nonnegative=True)
q_hi = sp.Symbol("q_hi", integer=True, nonnegative=True)
GQ = tuple(sp.Symbol(f"g{i}", integer=True, nonnegative=True) for i in range(3))
BQ_LO = tuple(sp.Symbol(f"q_lo{i}", integer=True, nonnegative=True) for i in range(3))
BQ_HI = tuple(sp.Symbol(f"q_hi{i}", integer=True, nonnegative=True) for i in range(3))
LG = tuple(sp.Symbol(f"lg{i}", integer=True, nonnegative=True) for i in range(3))
#: the query, key and output-column indices as the kernels' tensor reads use them: clamped to
#: the valid range (a ragged or padded tile lane reads the last row / column; its result is
#: discarded), so a read nested in another read's index is analysed in this form
CLAMPED = {q: sp.Symbol("q_idx_c"), kv: sp.Symbol("kv_idx_c"), dv: sp.Symbol("dv_idx_c")}


def grid_sizes(grid=None) -> dict:
    """``{"G0", "G1", "G2"}`` of a grid shape (1 for axes it does not have; ``None``: all 1)."""
    g = list(grid or ())
    return {n: (g[i] if i < len(g) else 1) for i, n in enumerate(GRID_SIZE_NAMES)}


def grid_of(sizes: dict) -> list:
    """The grid sizes ``[G0, G1, G2]`` of a sizes dict (1 where absent)."""
    return [sizes.get(n, 1) for n in GRID_SIZE_NAMES]


def grid_coord(idx, i: int, n: int):
    """Coordinate on axis ``i`` of an ``n``-axis grid of the row-major flattened token index
    ``idx``: ``floor(idx / (G<i+1> * ...)) mod G<i>``."""
    inner = sp.Mul(*GRID_SIZES[i + 1:n])
    c = sp.floor(idx / inner) if i < n - 1 else idx
    return sp.Mod(c, GRID_SIZES[i]) if i > 0 else c


def flatten_coords(expr, n: int):
    """``expr`` of the coordinate form (:data:`QC`, :data:`KC`) rewritten in the flattened
    ``q``/``kv`` of an ``n``-axis grid (the form of ``AttentionIR.mask``/``score``)."""
    rep = {QC[i]: grid_coord(q, i, n) for i in range(n)}
    rep.update({KC[i]: grid_coord(kv, i, n) for i in range(n)})
    return expr.xreplace(rep)


def free_dim(name: str) -> sp.Symbol:
    """The symbol of a free tensor dimension (see ``AttentionIR.free_dims``)."""
    return sp.Symbol(name, integer=True, positive=True)


def size_values(sizes: dict) -> list:
    """The values of :data:`SIZES` in order from a sizes dict (grid sizes default to 1)."""
    return [sizes.get(n, 1) for n in SIZES]

#: torch dtype name -> value kind in expressions
DTYPE_KIND = {"float32": "float", "float16": "float", "bfloat16": "float", "float64": "float",
              "int32": "int", "int64": "int", "int16": "int", "int8": "int", "uint8": "int", "bool": "bool"}


class sigmoid(sp.Function):
    """Logistic sigmoid ``1 / (1 + exp(-x))`` as a sympy function (differentiable)."""

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return 1 / (1 + sp.exp(-x))
        return None

    def fdiff(self, argindex=1):
        return self * (1 - self)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))


# ----------------------------------------------------------------------------- IR
@dataclass(frozen=True)
class TensorSpec:
    """A run-time tensor input of a pattern.

    Attributes:
        name: keyword name at call time.
        dtype: dtype name (``"float32"``, ``"int32"``, ``"bool"``...).
        shape: one sympy expression per dim (in size symbols, params substituted).
        base: the ``sympy.IndexedBase`` used for reads in ``mask``/``score``.
    """

    name: str
    dtype: str
    shape: tuple
    base: sp.IndexedBase = field(compare=False)

    @property
    def kind(self) -> str:
        return DTYPE_KIND[self.dtype]

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Route:
    """A ``route:`` clause: the block lists of every call come from top-k routing
    (:func:`attncc.topk_blocks`, MoBA (Lu et al. 2025) / NSA (Yuan et al. 2025) block
    selection) on the call's q and k; the pattern's mask then holds inside the selected blocks.

    Attributes:
        topk: blocks per query block, the forced ones included (MoBA's convention).
        block: tokens per key block (and per query block when ``granularity`` is ``"block"``).
        pool: ``"mean"`` or ``"max"`` pooling of a key block's tokens.
        causal: blocks after the query block are never selected.
        local_blocks / sink_blocks: the most recent / leading blocks always selected.
        share: ``"kv_head"`` (a GQA group shares one list, NSA) or ``"head"``.
        granularity: ``"block"`` (one list per query block) or ``"token"`` (per query token, MoBA).
    """

    topk: int
    block: int = 64
    pool: str = "mean"
    causal: bool = True
    local_blocks: int = 1
    sink_blocks: int = 0
    share: str = "kv_head"
    granularity: str = "block"

    def kwargs(self) -> dict:
        """The keyword arguments of :func:`attncc.topk_blocks` for this route."""
        return dict(block_size=self.block, topk=self.topk, pool=self.pool, causal=self.causal,
                    local_blocks=self.local_blocks, sink_blocks=self.sink_blocks, share=self.share,
                    query_granularity=self.granularity)


@dataclass(frozen=True)
class LowRank:
    """A score term ``dot(A[a_idx], B[b_idx])``: the last axes of two tensors contracted.

    ``a_idx`` uses ``b, h, q`` only (the query-side factor), ``b_idx`` ``b, h, kv`` only
    (the key-side factor); each is a tuple of index symbols naming which of those the
    tensor's leading axes are (FlashBias, Wu et al. 2025: a rank-R bias ``U W^T``)."""

    a: str
    a_idx: tuple
    b: str
    b_idx: tuple

    def __str__(self) -> str:
        return f"dot({self.a}[{', '.join(map(str, self.a_idx))}], {self.b}[{', '.join(map(str, self.b_idx))}])"


@dataclass(frozen=True)
class AttentionIR:
    """A pattern with params specialised: what every later stage consumes.

    Attributes:
        name / doc: the pattern's name and docstring.
        params: ``((name, value), ...)`` the specialised param values.
        tensors: the :class:`TensorSpec` of each run-time tensor, in declaration order.
        mask: sympy boolean in ``b, h, q, kv``, sizes, tensor reads (``true`` = all pairs).
        score: sympy expression in ``s`` and the same names (``s`` = unmodified score).
        file: the spec's file name.
        grid: the spatial axis names (``("y", "x")``) of a grid pattern, else ``()``. Tokens
            are flattened row-major: ``q = (y * X + x)``; axis ``i`` has run-time size ``G<i>``.
        checks: ``((condition, message), ...)``: boolean expressions of the sizes that must
            hold at call time (e.g. a neighborhood kernel no larger than its axis).
        coord_mask / coord_score: grid patterns: ``mask`` and ``score`` written in the
            coordinates ``qc<i>``/``kc<i>`` (:data:`QC`, :data:`KC`) of the query and key
            tokens instead of ``floor``/``Mod`` of the flattened ``q``/``kv`` (bare ``q``,
            ``kv`` remain where the spec uses them); ``None`` for 1-D patterns. The
            box-tiling analysis and kernels use this form.
        normalize: ``"softmax"`` or ``"sigmoid"`` (``p = sigmoid(score)`` per pair, no row
            normalization, masked pairs 0; Ramapuram et al. 2024, "Theory, Analysis, and Best
            Practices for Sigmoid Self-Attention").
        sink: the sink logit (expression of ``b, h, q``) whose ``exp`` joins the softmax
            denominator (attention sinks as in gpt-oss / "Efficient Streaming Language Models
            with Attention Sinks", Xiao et al. 2023); ``None`` = no sink.
        gate: the output gate (expression of ``b, h, q, dv``) multiplying the normalized
            output (Qiu et al. 2025, "Gated Attention for Large Language Models"); ``None``.
        lowrank: the :class:`LowRank` terms ``dot(A[...], B[...])`` of the score, folded into
            the QK^T product (FlashBias, Wu et al. 2025): ``score`` is written in the folded
            score, i.e. its ``s`` stands for ``s + sum of the dot terms``.
        free_dims: names of the free tensor dimensions (a new name used as a whole
            dimension, e.g. ``R`` in ``float32[B, H, Lq, R]``): their values are bound at
            call time from the tensors passed, and must agree across tensors.
    """

    name: str
    doc: str
    params: tuple
    tensors: tuple
    mask: sp.Basic
    score: sp.Expr
    file: str = "<string>"
    grid: tuple = ()
    checks: tuple = ()
    coord_mask: sp.Basic = None
    coord_score: sp.Expr = None
    normalize: str = "softmax"
    sink: sp.Expr = None
    gate: sp.Expr = None
    lowrank: tuple = ()
    free_dims: tuple = ()
    route: Route = None

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def tensors_in(self, expr) -> list[TensorSpec]:
        """The tensors read by ``expr`` (in declaration order)."""
        names = {str(i.base.label) for i in expr.atoms(sp.Indexed)}
        return [t for t in self.tensors if t.name in names]

    @property
    def mask_is_static(self) -> bool:
        """True when the mask depends on indices, sizes and params only (no tensor)."""
        return not self.mask.atoms(sp.Indexed)

    def key(self) -> str:
        """A deterministic text identity of this IR (used for cache keys)."""
        parts = [self.name, repr(self.params),
                 repr([(t.name, t.dtype, [sp.srepr(d) for d in t.shape]) for t in self.tensors]),
                 sp.srepr(self.mask), sp.srepr(self.score), repr(self.grid),
                 sp.srepr(self.coord_mask), sp.srepr(self.coord_score), self.normalize,
                 sp.srepr(self.sink), sp.srepr(self.gate), repr(self.lowrank),
                 repr([(sp.srepr(c), m) for c, m in self.checks]), repr(self.free_dims)]
        if self.route is not None:
            parts.append(repr(self.route))
        return "\n".join(parts)

    def pretty(self) -> str:
        """A human-readable print of the IR."""
        lines = [f"pattern {self.name}"]
        if self.doc:
            lines.append(f"  doc:    {self.doc.splitlines()[0]}")
        if self.grid:
            lines.append(f"  grid:   {', '.join(f'{a} (size G{i})' for i, a in enumerate(self.grid))}; "
                         f"q = kv = flattened row-major index")
        for n, v in self.params:
            lines.append(f"  param  {n} = {v!r}")
        for t in self.tensors:
            lines.append(f"  tensor {t.name}: {t.dtype}[{', '.join(str(d) for d in t.shape)}]")
        if self.free_dims:
            lines.append(f"  free dims: {', '.join(self.free_dims)} (bound by the tensors passed)")
        lines.append(f"  mask:   {self.mask}")
        for lr in self.lowrank:
            lines.append(f"  low-rank term (folded into QK^T): {lr}")
        lines.append(f"  score:  {self.score}" + ("   (s = s + the low-rank terms)" if self.lowrank else ""))
        if self.normalize != "softmax":
            lines.append(f"  normalize: {self.normalize}")
        if self.sink is not None:
            lines.append(f"  sink:   {self.sink}")
        if self.gate is not None:
            lines.append(f"  gate:   {self.gate}")
        if self.route is not None:
            lines.append(f"  route:  {self.route}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- lowering
def lower(spec, pattern: str | None = None, **params) -> AttentionIR:
    """Lower a spec to an :class:`AttentionIR`, specialising ``params``.

    Args:
        spec: ``.attn`` text, a path, or a :class:`PatternSpec`.
        pattern: which block to pick when the spec holds several.
        **params: values overriding the ``param`` defaults.

    Raises:
        SpecError: any name/type error in the spec (with ``file:line:col``).
        TypeError: an unknown param name, a param without default and no value.
    """
    pat = load(spec, pattern)
    values = {}
    declared = {p.name: p for p in pat.params}
    for name in params:
        if name not in declared:
            known = ", ".join(declared) or "none"
            raise TypeError(f"pattern {pat.name!r} has no param {name!r} (declared params: {known})")
    for p in pat.params:
        if p.name in params:
            values[p.name] = check_param_value(p.name, p.type, params[p.name])
        elif p.default is not None:
            values[p.name] = p.default
        else:
            raise MissingParamError(f"param {p.name!r} of pattern {pat.name!r} has no default and no value: pass "
                                    f"{p.name}=VALUE to attncc.compile (or give it a default in the spec)", p.span)
    lw = _Lowerer(pat, values)
    if "grid" in pat.clauses:
        lw.set_grid(pat.clauses["grid"])
    tensors = tuple(lw.tensor_spec(t) for t in pat.tensors)
    lw.tensors = {t.name: t for t in tensors}
    mask = sp.true
    if "mask" in pat.clauses:
        mask = lw.lower_clause(pat.clauses["mask"], "mask", want="bool", allow_s=False)
    score = s
    if "score" in pat.clauses:
        score = lw.lower_clause(pat.clauses["score"], "score", want="num", allow_s=True)
        score = lw.fold_lowrank(score, pat.clauses["score"])
    normalize, sink, gate = lw.epilogue_clauses(pat)
    route = lw.route_clause(pat.clauses["route"]) if "route" in pat.clauses else None
    checks = list(lw.checks)
    coord_mask = coord_score = None
    if lw.grid:  # the same clauses again, with coordinates as symbols
        lw.coord_symbols = True
        coord_mask, coord_score = sp.true, s
        if "mask" in pat.clauses:
            coord_mask = lw.lower_clause(pat.clauses["mask"], "mask", want="bool", allow_s=False)
        if "score" in pat.clauses:
            terms, lw.lowrank = lw.lowrank, []  # dot() terms index tokens by the flat q / kv
            coord_score = lw.fold_lowrank(lw.lower_clause(pat.clauses["score"], "score", want="num", allow_s=True),
                                          pat.clauses["score"])
            lw.lowrank = terms
        lw.coord_symbols = False
    if lw.grid:
        n = sp.Mul(*GRID_SIZES[:len(lw.grid)])
        checks += [(sp.Eq(Lq, n), "the query grid must be the declared grid"),
                   (sp.Eq(Lk, n), "the key grid must be the query grid")]
    return AttentionIR(pat.name, pat.doc, tuple(values.items()), tensors, mask, score, pat.file,
                       tuple(lw.grid), tuple(dict.fromkeys(checks)), coord_mask, coord_score,
                       normalize, sink, gate, tuple(lw.lowrank), tuple(lw.free_dims), route)


#: the name of the block tensor :func:`with_block_mask` adds (a spec tensor of that name
#: cannot also take a run-time block mask)
BLOCK_TENSOR = "blocks"


def with_block_mask(ir: AttentionIR, bq: int, bk: int, per_batch: bool, heads: str) -> AttentionIR:
    """``ir`` with a run-time block mask joined to its mask: the pattern's mask AND
    ``blocks[b, h, q // bq, kv // bk]`` (FlexAttention's ``BlockMask`` semantics: a pair is
    computed only inside a listed block; attncc also keeps the pattern's own mask there).

    Args:
        bq / bk: queries / keys per block (positive).
        per_batch: the block tensor has one entry per batch (else one, broadcast).
        heads: ``"q"`` one entry per query head, ``"kv"`` per key/value head (query head
            ``h`` reads ``h // (H / Hkv)``), ``"one"`` one entry broadcast over heads.

    Returns:
        The IR (named ``<pattern>_blocks``) with a bool tensor :data:`BLOCK_TENSOR` of shape
        ``(B | 1, H | Hkv | 1, ceil(Lq / bq), ceil(Lk / bk))``.

    Raises:
        ValueError: the pattern already declares a tensor named :data:`BLOCK_TENSOR`.
    """
    if any(t.name == BLOCK_TENSOR for t in ir.tensors):
        raise ValueError(f"pattern {ir.name!r} declares a tensor named {BLOCK_TENSOR!r}, the name of the run-time "
                         "block mask's tensor: rename it to pass block_mask=")
    one = sp.Integer(1)
    shape = (B if per_batch else one, {"q": H, "kv": Hkv, "one": one}[heads],
             sp.floor((Lq + bq - 1) / bq), sp.floor((Lk + bk - 1) / bk))
    base = sp.IndexedBase(BLOCK_TENSOR, integer=True)
    lead = (b if per_batch else sp.Integer(0), {"q": h, "kv": sp.floor(h / (H / Hkv)), "one": sp.Integer(0)}[heads])

    def clause(qi, ki):
        return sp.Ne(base[(*lead, sp.floor(qi / bq), sp.floor(ki / bk))], 0)

    coord_mask = ir.coord_mask
    if ir.grid:  # the flat token index in the coordinate form (row-major)
        n = len(ir.grid)

        def flat(c):
            return sum(c[i] * sp.Mul(*GRID_SIZES[i + 1:n]) for i in range(n))

        coord_mask = sp.And(coord_mask, clause(flat(QC), flat(KC)))
    return dataclasses.replace(ir, name=f"{ir.name}_blocks",
                               tensors=ir.tensors + (TensorSpec(BLOCK_TENSOR, "bool", shape, base),),
                               mask=sp.And(ir.mask, clause(q, kv)), coord_mask=coord_mask, route=None)


POS_TENSOR = "positions"
#: the columns of the run-time positions tensor of :func:`with_positions`, int32 ``(B, 5)``
POS_COLUMNS = ("q_offset", "kv_offset", "q_total", "kv_total", "kv_len")


def with_positions(ir: AttentionIR, ragged: bool) -> AttentionIR:
    """``ir`` evaluated at global positions: the twin a call with ``q_offset`` / ``kv_offset``
    / ``q_total`` / ``kv_total`` / ``kv_lens`` runs (query shards, KV caches, context
    parallelism; FlashAttention / FlashInfer KV-cache conventions).

    In ``mask``, ``score``, ``sink`` and ``gate``, ``q -> q + P[b, 0]``, ``kv -> kv + P[b, 1]``,
    ``Lq -> P[b, 2]``, ``Lk -> P[b, 3]`` with ``P`` the int32 tensor :data:`POS_TENSOR` of shape
    ``(B, 5)`` (columns :data:`POS_COLUMNS`): reads indexed by ``b`` only, so they are run-time
    scalars of the closed-form analysis (:func:`attncc.passes.scalar_reads`) and a causal or
    windowed mask keeps its closed-form key ranges. ``ragged``: also ``kv < P[b, 4]`` on the
    local key index (a ragged KV cache: keys past ``kv_lens[b]`` are masked, their tiles
    skipped). Spec tensor dimensions written with ``Lq`` / ``Lk`` become free dimensions
    (the tensors hold the whole sequence; reads outside them are refused at call time).

    Returns:
        The IR named ``<pattern>_pos`` (``<pattern>_ragged``) with the extra tensor.

    Grid patterns: :func:`attncc.grid_positions.with_grid_positions` (offsets and totals in
    rows of the first grid axis, positions tensor ``(B, 7)``; not ``ragged``).

    Raises:
        NotImplementedError: ``dot()`` terms or a ``route:`` clause (their index arithmetic is
            not shifted); a grid pattern with ``ragged``.
        ValueError: the pattern declares a tensor named :data:`POS_TENSOR`.
    """
    if ir.grid:  # offsets in rows of the first grid axis (attncc.grid_positions)
        from .grid_positions import with_grid_positions

        return with_grid_positions(ir, ragged)
    why = "dot() low-rank terms" if ir.lowrank else "a route: clause" if ir.route is not None else ""
    if why:
        raise NotImplementedError(f"q_offset / kv_offset / q_total / kv_total / kv_lens: pattern {ir.name!r} has "
                                  f"{why}; positions are supported for 1-D patterns without dot() terms or routing")
    if any(t.name == POS_TENSOR for t in ir.tensors):
        raise ValueError(f"pattern {ir.name!r} declares a tensor named {POS_TENSOR!r}, the name of the run-time "
                         "positions tensor: rename it to pass q_offset= / kv_offset= / kv_lens=")
    base = sp.IndexedBase(POS_TENSOR, integer=True)
    col = [base[b, i] for i in range(len(POS_COLUMNS))]
    subs = {q: q + col[0], kv: kv + col[1], Lq: col[2], Lk: col[3]}

    def glob(e):
        return None if e is None else sp.sympify(e).xreplace(subs)

    free = list(ir.free_dims)
    tensors = []
    for t in ir.tensors:  # dims in Lq / Lk: the whole sequence's, any length (reads are checked)
        shape = list(t.shape)
        for axis, d in enumerate(shape):
            if sp.sympify(d).free_symbols & {Lq, Lk}:
                name = f"{t.name}_{axis}_total"
                free.append(name)
                shape[axis] = free_dim(name)
        tensors.append(dataclasses.replace(t, shape=tuple(shape)))
    tensors.append(TensorSpec(POS_TENSOR, "int32", (B, sp.Integer(len(POS_COLUMNS))), base))
    mask = glob(ir.mask)
    if ragged:
        mask = sp.And(mask, sp.Lt(kv, col[4]))
    return dataclasses.replace(ir, name=f"{ir.name}_{'ragged' if ragged else 'pos'}", tensors=tuple(tensors),
                               mask=mask, score=glob(ir.score), sink=glob(ir.sink), gate=glob(ir.gate),
                               free_dims=tuple(free))


#: integers in expressions must satisfy |value| < 2**31 (the kernels' index arithmetic is int32)
INT32_LIMIT = 2 ** 31
#: a float literal whose shortest decimal form is a fraction with a denominator up to this
#: is lowered to that exact fraction (see :func:`exact_float`)
MAX_EXACT_DENOMINATOR = 10 ** 4


def exact_float(v: float) -> sp.Expr:
    """A float literal of a spec as a sympy number: the exact fraction its shortest decimal
    form names (``0.5`` -> 1/2, ``3.5`` -> 7/2, ``0.1`` -> 1/10) when its denominator is at
    most :data:`MAX_EXACT_DENOMINATOR`, else a ``Float``. Exact fractions let comparisons
    of integer indices with scaled indices (``kv <= q * 0.5``) be rewritten to integer form
    (:func:`exact_relational`), so the kernels and the reference agree on every pair."""
    if v != v or v in (float("inf"), float("-inf")):
        return sp.Float(v)
    r = sp.Rational(repr(v))
    return r if r.q <= MAX_EXACT_DENOMINATOR else sp.Float(v)


def exact_relational(rel):
    """Rewrite a comparison to an integer-exact form, or return it unchanged.

    * ``lhs OP rhs`` where ``lhs - rhs`` is a sum of rational multiples of integer terms
      (``kv <= q / 2``, ``kv < Lk * 7 / 10``): both sides multiplied by the common
      denominator (``2 * kv <= q``).
    * ``X OP sqrt(Y)`` (either side, also ``Y ** 0.5``) with integer ``X``, ``Y``: squared,
      ``X <= sqrt(Y)`` <=> ``Y >= 0 and (X < 0 or X**2 <= Y)`` and the mirrored forms (no
      float rounding: the float32 ``exp2(0.5 * log2(25))`` is 4.9999995).

    Used by the lowering on every comparison, so the reference, the block tables and the
    kernels all evaluate the exact form."""
    if not isinstance(rel, (sp.Lt, sp.Le, sp.Gt, sp.Ge, sp.Eq, sp.Ne)):
        return rel
    lhs, rhs = rel.lhs, rel.rhs
    op = type(rel)
    mirror = {sp.Lt: sp.Gt, sp.Le: sp.Ge, sp.Gt: sp.Lt, sp.Ge: sp.Le, sp.Eq: sp.Eq, sp.Ne: sp.Ne}
    for a, c, o in ((lhs, rhs, op), (rhs, lhs, mirror[op])):
        if isinstance(c, sp.Pow) and c.exp == sp.Rational(1, 2) and c.base.is_integer and a.is_integer:
            Y, X = c.base, a
            sq = o(X ** 2, Y)
            if o in (sp.Lt, sp.Le):  # X below sqrt(Y)
                out = sp.And(sp.Ge(Y, 0), sp.Or(sp.Lt(X, 0), sq))
            elif o in (sp.Gt, sp.Ge):
                out = sp.And(sp.Ge(Y, 0), sp.Ge(X, 0), sq)
            else:
                out = sp.And(sp.Ge(Y, 0), sp.Ge(X, 0), sq)
                out = out if o is sp.Eq else sp.Not(out)
            return out
    d = sp.expand(lhs - rhs)
    if d.is_integer or not d.free_symbols:
        return rel
    den = 1
    for t in sp.Add.make_args(d):
        coeff, rest = t.as_coeff_Mul()
        if not (coeff.is_Rational and (rest == 1 or rest.is_integer)):
            return rel
        den = sp.ilcm(den, coeff.q)
    if den == 1:
        return rel
    return op(sp.expand(lhs * den), sp.expand(rhs * den))


_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}
_CMPOPS = {ast.Lt: sp.Lt, ast.LtE: sp.Le, ast.Gt: sp.Gt, ast.GtE: sp.Ge, ast.Eq: sp.Eq, ast.NotEq: sp.Ne}


# name -> (min arity, max arity, builder(args, kinds) -> (expr, kind))
def _num_fn(f):
    return lambda a, k: (f(*a), "float")


FUNCTIONS = {
    "abs": (1, 1, lambda a, k: (sp.Abs(a[0]), k[0])),
    "min": (2, None, lambda a, k: (sp.Min(*a), "float" if "float" in k else "int")),
    "max": (2, None, lambda a, k: (sp.Max(*a), "float" if "float" in k else "int")),
    "clamp": (3, 3, lambda a, k: (sp.Min(sp.Max(a[0], a[1]), a[2]), "float" if "float" in k else "int")),
    "where": (3, 3, None),  # special-cased (first arg bool)
    "exp": (1, 1, _num_fn(sp.exp)),
    "exp2": (1, 1, _num_fn(lambda x: sp.Integer(2) ** x)),
    "log": (1, 1, _num_fn(sp.log)),
    "log2": (1, 1, _num_fn(lambda x: sp.log(x) / sp.log(2))),
    "sqrt": (1, 1, _num_fn(sp.sqrt)),
    "tanh": (1, 1, _num_fn(sp.tanh)),
    "sigmoid": (1, 1, _num_fn(sigmoid)),
    "floor": (1, 1, lambda a, k: (sp.floor(a[0]), "int")),
    "ceil": (1, 1, lambda a, k: (sp.ceiling(a[0]), "int")),
}


class _Lowerer:
    def __init__(self, pat: PatternSpec, values: dict):
        self.pat = pat
        self.values = values
        self.ptypes = {p.name: p.type for p in pat.params}
        self.tensors: dict[str, TensorSpec] = {}
        self.tensor_decls = {t.name: t for t in pat.tensors}
        self.grid: list[str] = []
        self.checks: list = []
        self.coord_symbols = False  # coord() gives QC/KC symbols (the coordinate form)
        self.lowrank: list = []  # LowRank terms of the score (dot(...) calls)
        self.allow_dv = False  # the gate clause may use dv
        self.free_dims: dict = {}  # name -> symbol of the free tensor dimensions

    # -- grids
    def set_grid(self, expr: SpecExpr) -> None:
        """Read ``grid: y, x[, t]``: 1 to 3 distinct new axis names."""
        self.expr = expr
        node = expr.node
        elts = node.elts if isinstance(node, ast.Tuple) else [node]
        if not 1 <= len(elts) <= 3:
            self.err(node, f"a grid has 1 to 3 axes, got {len(elts)}")
        for e in elts:
            if not isinstance(e, ast.Name):
                self.err(e, "grid axes are names, e.g. 'grid: y, x'")
            if e.id in INDEX or e.id == "s" or e.id in SIZES or e.id in self.values or e.id in self.tensor_decls:
                self.err(e, f"grid axis {e.id!r} clashes with a reserved or declared name")
            if e.id in self.grid:
                self.err(e, f"duplicate grid axis {e.id!r}")
            if e.id.upper() in self.values or e.id.upper() in self.tensor_decls or e.id.upper() in SIZES:
                self.err(e, f"the size name {e.id.upper()!r} of grid axis {e.id!r} clashes with a declared name")
            self.grid.append(e.id)

    def coord(self, idx, i: int):
        """Coordinate on grid axis ``i`` of the flattened (row-major) token index ``idx``
        (in the coordinate form: the symbol ``qc<i>`` / ``kc<i>``)."""
        if self.coord_symbols:
            return (QC if idx == q else KC)[i]
        return grid_coord(idx, i, len(self.grid))

    # -- names available
    def _expected_names(self, allow_s: bool) -> str:
        names = list(INDEX_NAMES) + (["s"] if allow_s else []) + list(SIZE_NAMES) + list(self.values) + list(self.tensor_decls)
        return ", ".join(names)

    def tensor_spec(self, decl) -> TensorSpec:
        dims = []
        for d in decl.dims:
            self.expr = d
            self.allow_s = False
            self.dims_mode = True
            e, kind = self.visit(d.node)
            if kind != "int":
                raise SpecError(f"a tensor dimension must be an integer expression of sizes and params, got {kind}",
                                d.span_of())
            dims.append(sp.sympify(e))
        self.dims_mode = False
        kinds = {"float": dict(real=True), "int": dict(integer=True), "bool": dict(integer=True)}
        base = sp.IndexedBase(decl.name, **kinds[DTYPE_KIND[decl.dtype]])
        return TensorSpec(decl.name, decl.dtype, tuple(dims), base)

    def lower_clause(self, expr: SpecExpr, clause: str, want: str, allow_s: bool):
        self.expr = expr
        self.allow_s = allow_s
        self.dims_mode = False
        self.clause = clause
        try:
            e, kind = self.visit(expr.node)
        except RecursionError:
            raise SpecError(f"the {clause} expression is nested too deeply", expr.span_of()) from None
        if want == "bool" and kind != "bool":
            raise SpecError(f"the {clause} must be a boolean expression (a comparison, and/or/not), "
                            f"but this is {'an integer' if kind == 'int' else 'a float'} expression", expr.span_of())
        if want == "num" and kind == "bool":
            raise SpecError(f"the {clause} must be a number, but this is a boolean expression "
                            f"(use where(cond, a, b) to select values)", expr.span_of())
        return e

    def err(self, node, msg):
        raise SpecError(msg, self.expr.span_of(node))

    # -- visitor
    def visit(self, node):
        meth = getattr(self, "visit_" + type(node).__name__, None)
        if meth is None:
            self.err(node, f"unsupported syntax {type(node).__name__} "
                           f"(expressions use numbers, names, operators, comparisons, and/or/not, [] and calls)")
        try:
            e, kind = meth(node)
        except SpecError:
            raise
        except (ArithmeticError, TypeError, ValueError, AttributeError, NotImplementedError) as exc:
            # sympy failing on a constant fold (PrecisionExhausted, Modulo by zero, invalid comparisons...)
            self.err(node, f"this expression cannot be evaluated ({type(exc).__name__}: {exc})")
        self._check_finite(node, e, kind)
        return e, kind

    def _check_finite(self, node, e, kind) -> None:
        """Refuse constant folds the kernels cannot represent: non-finite or complex values
        (``log(0)``, ``1 / 0.0``, ``inf - inf``, ``sqrt(-1.0)``; the name ``inf`` itself is
        allowed) and integers outside the kernels' signed 32-bit range."""
        if kind == "bool" or not isinstance(e, sp.Expr):
            return
        if e.has(sp.zoo, sp.nan, sp.I) or (e.is_number and e.is_extended_real is False):
            self.err(node, "this expression folds to a non-finite or complex value "
                           f"({e}): the kernels and the reference compute in real floating point")
        if e.is_number and e.is_extended_real and not e.is_finite and not isinstance(node, (ast.Name, ast.UnaryOp)):
            if not any(isinstance(n, ast.Name) and n.id == "inf" for n in ast.walk(node)):
                self.err(node, f"this expression folds to {e}: use the name inf for an infinite value")
        for a in sp.preorder_traversal(e):
            if a.is_Integer and abs(int(a)) >= INT32_LIMIT:
                self.err(node, f"the integer {a} is outside the kernels' 32-bit index range "
                               f"(|value| < 2**31): use a smaller constant")
            if a.is_Rational and not a.is_Integer and max(abs(a.p), a.q) >= INT32_LIMIT:
                self.err(node, f"the fraction {a} has a numerator or denominator outside the kernels' 32-bit "
                               f"range (< 2**31)")

    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, bool):
            return (sp.true if v else sp.false), "bool"
        if isinstance(v, int):
            return sp.Integer(v), "int"
        if isinstance(v, float):
            return exact_float(v), "float"
        self.err(node, f"unsupported constant {v!r} (expected a number or True/False)")

    def visit_Name(self, node):
        n = node.id
        if n in INDEX and not self.dims_mode:
            return INDEX[n], "int"
        if n == "dv" and self.allow_dv:
            return dv, "int"
        if n == "s" and not self.dims_mode:
            if not self.allow_s:
                self.err(node, "'s' (the score) cannot be used in a mask: masks depend on b, h, q, kv, sizes, "
                               "params and tensors only; put score changes in a 'score:' clause")
            return s, "float"
        if n in SIZES:
            return SIZES[n], "int"
        if self.grid and n in [a.upper() for a in self.grid]:
            return GRID_SIZES[[a.upper() for a in self.grid].index(n)], "int"
        if n == "inf":
            return sp.oo, "float"
        if n in self.values:
            v, t = self.values[n], self.ptypes[n]
            if t == "bool":
                return (sp.true if v else sp.false), "bool"
            if t == "int":
                if abs(int(v)) >= INT32_LIMIT:
                    self.err(node, f"param {n!r} = {v} is outside the kernels' 32-bit index range (|value| < 2**31)")
                return sp.Integer(v), "int"
            return exact_float(float(v)), "float"
        if n in self.tensor_decls:
            if self.dims_mode:
                self.err(node, "a tensor dimension cannot read a tensor")
            nd = len(self.tensor_decls[n].dims)
            self.err(node, f"tensor {n!r} must be indexed with {nd} index{'es' if nd != 1 else ''}, e.g. {n}[...]")
        if n in FUNCTIONS:
            self.err(node, f"{n!r} is a function: call it, e.g. {n}(...)")
        if self.dims_mode:
            if self.expr.node is node and n not in INDEX and n not in ("s", "dv") and n not in self.grid:
                # a whole dimension named by a new name: a free dimension, bound at call time
                self.free_dims.setdefault(n, free_dim(n))
                return self.free_dims[n], "int"
            self.err(node, f"unknown name {n!r} in a tensor dimension (expected an integer, a size name "
                           f"{', '.join(SIZE_NAMES)}, an int param, or a new name as a whole dimension: a "
                           f"free dimension such as R in float32[B, H, Lq, R])")
        self.err(node, f"unknown name {n!r} (expected one of: {self._expected_names(self.allow_s)})")

    def _num(self, node, e, kind, what):
        if kind == "bool":
            self.err(node, f"{what} needs a number, got a boolean expression")
        return e

    def visit_BinOp(self, node):
        op = _BINOPS.get(type(node.op))
        if op is None:
            if isinstance(node.op, (ast.BitAnd, ast.BitOr)):
                word = "and" if isinstance(node.op, ast.BitAnd) else "or"
                self.err(node, f"'{'&' if word == 'and' else '|'}' is not an operator of the spec language: "
                               f"write '{word}' (boolean {word}; comparisons chain as in Python)")
            self.err(node, "unsupported operator (expected + - * / // % **)")
        a, ka = self.visit(node.left)
        c, kc = self.visit(node.right)
        self._num(node.left, a, ka, f"'{op}'")
        self._num(node.right, c, kc, f"'{op}'")
        kind = "float" if "float" in (ka, kc) else "int"
        if op == "+":
            return a + c, kind
        if op == "-":
            return a - c, kind
        if op == "*":
            return a * c, kind
        if op == "/":
            if c.is_zero:
                self.err(node.right, "division by zero")
            return a / c, "float"
        if op == "//":
            if c.is_zero:
                self.err(node.right, "division by zero")
            return sp.floor(a / c), kind
        if op == "%":
            if c.is_zero:
                self.err(node.right, "modulo by zero")
            return sp.Mod(a, c), kind
        return a ** c, ("float" if kind == "float" or (c.is_number and c < 0) else "int")

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.Invert):
            self.err(node, "'~' is not an operator of the spec language: write 'not'")
        e, k = self.visit(node.operand)
        if isinstance(node.op, ast.Not):
            if k != "bool":
                self.err(node.operand, "'not' needs a boolean expression")
            return sp.Not(e), "bool"
        self._num(node.operand, e, k, "unary '-'")
        if isinstance(node.op, ast.USub):
            return -e, k
        if isinstance(node.op, ast.UAdd):
            return e, k
        self.err(node, "unsupported unary operator '~' (use 'not')")

    def visit_BoolOp(self, node):
        parts = []
        for v in node.values:
            e, k = self.visit(v)
            if k != "bool":
                word = "and" if isinstance(node.op, ast.And) else "or"
                self.err(v, f"'{word}' needs boolean operands (comparisons), got {'an integer' if k == 'int' else 'a float'} expression")
            parts.append(e)
        return (sp.And(*parts) if isinstance(node.op, ast.And) else sp.Or(*parts)), "bool"

    def visit_Compare(self, node):
        terms = []
        left, kl = self.visit(node.left)
        lnode = node.left
        for op, rnode in zip(node.ops, node.comparators):
            right, kr = self.visit(rnode)
            f = _CMPOPS.get(type(op))
            if f is None:
                self.err(node, "unsupported comparison (expected < <= > >= == !=)")
            if f in (sp.Eq, sp.Ne) and kl == "bool" and kr == "bool":
                eq = sp.Equivalent(left, right)
                terms.append(eq if f is sp.Eq else sp.Not(eq))
            else:
                self._num(lnode, left, kl, "a comparison")
                self._num(rnode, right, kr, "a comparison")
                terms.append(exact_relational(f(left, right)))
            left, kl, lnode = right, kr, rnode
        return sp.And(*terms), "bool"

    def visit_IfExp(self, node):
        return self._where(node, node.test, node.body, node.orelse)

    def _where(self, node, cnode, anode, bnode):
        c, kc = self.visit(cnode)
        if kc != "bool":
            self.err(cnode, "the condition of where(cond, a, b) must be boolean")
        a, ka = self.visit(anode)
        e, ke = self.visit(bnode)
        if ka == "bool" and ke == "bool":
            return sp.Or(sp.And(c, a), sp.And(sp.Not(c), e)), "bool"
        self._num(anode, a, ka, "where()")
        self._num(bnode, e, ke, "where()")
        return sp.Piecewise((a, c), (e, True)), ("float" if "float" in (ka, ke) else "int")

    def visit_Subscript(self, node):
        if not isinstance(node.value, ast.Name) or node.value.id not in self.tensor_decls:
            what = node.value.id if isinstance(node.value, ast.Name) else "this expression"
            self.err(node.value, f"only tensors can be indexed; {what!r} is not a declared tensor "
                                 f"(declared: {', '.join(self.tensor_decls) or 'none'})")
        name = node.value.id
        if self.dims_mode:
            self.err(node, "a tensor dimension cannot read a tensor")
        t = self.tensors[name]
        idx_nodes = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if len(idx_nodes) != t.ndim:
            self.err(node, f"tensor {name!r} has {t.ndim} dimension{'s' if t.ndim != 1 else ''} "
                           f"({t.dtype}[{', '.join(str(d) for d in t.shape)}]) but is indexed with {len(idx_nodes)} "
                           f"index{'es' if len(idx_nodes) != 1 else ''}")
        idx = []
        for i in idx_nodes:
            if isinstance(i, ast.Slice):
                self.err(i, "slices are not supported in tensor indices")
            e, k = self.visit(i)
            if k != "int":
                self.err(i, f"a tensor index must be an integer expression, got {'a float' if k == 'float' else 'a boolean'}")
            idx.append(e)
        read = t.base[tuple(idx)]
        if t.kind == "bool":
            return sp.Ne(read, 0), "bool"
        return read, t.kind

    def visit_Call(self, node):
        if not isinstance(node.func, ast.Name):
            self.err(node.func, "only named functions can be called")
        name = node.func.id
        if name == "neighborhood":
            return self.neighborhood(node)
        if name == "dot":
            return self.dot(node)
        if name not in FUNCTIONS:
            self.err(node.func, f"unknown function {name!r} (expected one of: {', '.join(FUNCTIONS)})")
        if node.keywords:
            self.err(node.keywords[0].value, f"{name}() takes no keyword arguments")
        lo, hi, build = FUNCTIONS[name]
        n = len(node.args)
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            self.err(node, f"{name}() takes {want} argument{'s' if (hi or lo) != 1 else ''}, got {n}")
        if name == "where":
            return self._where(node, *node.args)
        args, kinds = [], []
        for a in node.args:
            e, k = self.visit(a)
            self._num(a, e, k, f"{name}()")
            args.append(e)
            kinds.append(k)
        return build(args, kinds)

    # -- epilogue clauses and low-rank terms
    def epilogue_clauses(self, pat) -> tuple:
        """``(normalize, sink, gate)`` of the pattern (see :class:`AttentionIR`)."""
        normalize = "softmax"
        if "normalize" in pat.clauses:
            self.expr = pat.clauses["normalize"]
            node = self.expr.node
            if not isinstance(node, ast.Name) or node.id not in ("softmax", "sigmoid"):
                self.err(node, "normalize: must be softmax or sigmoid")
            normalize = node.id
        sink = gate = None
        if "sink" in pat.clauses:
            if normalize == "sigmoid":
                self.expr = pat.clauses["sink"]
                self.err(self.expr.node, "a sink joins the softmax denominator: it needs normalize: softmax")
            sink = self.lower_clause(pat.clauses["sink"], "sink", want="num", allow_s=False)
            self._only(pat.clauses["sink"], sink, {b, h, q}, "the sink is one logit per row: it may use b, h, q")
        if "gate" in pat.clauses:
            self.allow_dv = True
            try:
                gate = self.lower_clause(pat.clauses["gate"], "gate", want="num", allow_s=False)
            finally:
                self.allow_dv = False
            self._only(pat.clauses["gate"], gate, {b, h, q, dv},
                       "the gate multiplies the output row: it may use b, h, q and dv (the output feature)")
        return normalize, sink, gate

    #: the keywords of ``route: topk(...)``: name -> (kind, choices)
    _ROUTE_KEYS = {"block": ("int", None), "pool": ("name", ("mean", "max")), "causal": ("bool", None),
                   "local": ("int", None), "sink": ("int", None), "share": ("name", ("kv_head", "head")),
                   "granularity": ("name", ("block", "token"))}

    def route_clause(self, expr: SpecExpr) -> Route:
        """``route: topk(K, block=64, pool=mean, causal=True, local=1, sink=0, share=kv_head,
        granularity=block)`` as a :class:`Route` (ints: literals or int params).

        Raises:
            SpecError: another form, an unknown keyword or value (at its position), a grid
                pattern, or counts out of range (``K >= 1``, ``block >= 1``,
                ``local + sink <= K``).
        """
        self.expr = expr
        node = expr.node
        if self.grid:
            self.err(node, "route: selects blocks of the flattened token order: use it in a 1-D pattern (no grid)")
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "topk"):
            self.err(node, "route: must be topk(K, block=64, pool=mean, ...): top-k block routing")
        if len(node.args) != 1:
            self.err(node, "topk() takes one positional argument, the number of blocks K")

        def value(n, kind, choices, what):
            if kind in ("int", "bool"):  # a literal of the type, or a param of that type
                typ = int if kind == "int" else bool
                if isinstance(n, ast.Constant) and type(n.value) is typ:
                    return n.value
                if isinstance(n, ast.Name) and n.id in self.values and self.ptypes[n.id] == kind:
                    return typ(self.values[n.id])
                self.err(n, f"{what} must be " + ("an integer literal or an int param" if kind == "int"
                                                  else "True, False or a bool param"))
            if not (isinstance(n, ast.Name) and n.id in choices):
                self.err(n, f"{what} must be one of {', '.join(choices)}")
            return n.id

        got = {"topk": value(node.args[0], "int", None, "K (the blocks per query block)")}
        for kw in node.keywords:
            if kw.arg not in self._ROUTE_KEYS:
                self.err(kw.value, f"topk() has no keyword {kw.arg!r} (known: {', '.join(self._ROUTE_KEYS)})")
            kind, choices = self._ROUTE_KEYS[kw.arg]
            got[kw.arg] = value(kw.value, kind, choices, kw.arg)
        r = Route(got["topk"], got.get("block", 64), got.get("pool", "mean"), got.get("causal", True),
                  got.get("local", 1), got.get("sink", 0), got.get("share", "kv_head"), got.get("granularity", "block"))
        if r.topk < 1 or r.block < 1 or r.local_blocks < 0 or r.sink_blocks < 0:
            self.err(node, f"topk(): K and block must be >= 1, local and sink >= 0 (got {r})")
        if r.local_blocks + r.sink_blocks > r.topk:
            self.err(node, f"topk(): local + sink = {r.local_blocks + r.sink_blocks} blocks are forced but K = {r.topk}")
        return r

    def _only(self, expr: SpecExpr, e, allowed: set, msg: str) -> None:
        bad = (e.free_symbols & ({b, h, q, kv, dv, s} | set(QC) | set(KC))) - allowed
        for r in e.atoms(sp.Indexed):
            for ix in r.indices:
                bad |= (sp.sympify(ix).free_symbols & ({b, h, q, kv, dv} | set(QC) | set(KC))) - allowed
        if bad:
            self.err(expr.node, f"{msg} (got {', '.join(sorted(map(str, bad)))})")

    def dot(self, node):
        """``dot(A[...], B[...])``: a low-rank score term (see :class:`LowRank`)."""
        if self.clause != "score":
            self.err(node, "dot() is a low-rank score term: use it in the score clause")
        if len(node.args) != 2 or node.keywords:
            self.err(node, "dot() takes two tensor reads, e.g. dot(U[b, h, q], W[b, h, kv])")
        sides = []
        for a, allowed, side in zip(node.args, ({b, h, q}, {b, h, kv}), ("query", "key")):
            if not (isinstance(a, ast.Subscript) and isinstance(a.value, ast.Name) and a.value.id in self.tensor_decls):
                self.err(a, "dot() takes tensor reads, e.g. dot(U[b, h, q], W[b, h, kv])")
            t = self.tensors[a.value.id]
            if t.kind != "float":
                self.err(a, f"dot() needs float tensors; {t.name!r} is {t.dtype}")
            idx_nodes = a.slice.elts if isinstance(a.slice, ast.Tuple) else [a.slice]
            if len(idx_nodes) != t.ndim - 1:
                self.err(a, f"dot() contracts the last axis of {t.name!r} ({t.ndim} dims): index the other "
                            f"{t.ndim - 1}, e.g. {t.name}[{', '.join(['b', 'h', 'q' if side == 'query' else 'kv'][:t.ndim - 1])}]")
            idx = []
            for i in idx_nodes:
                if not (isinstance(i, ast.Name) and INDEX.get(i.id) in allowed):
                    self.err(i, f"the {side}-side factor of dot() is indexed by "
                                f"{', '.join(sorted(map(str, allowed)))} names only")
                idx.append(INDEX[i.id])
            if (q if side == "query" else kv) not in idx or len(set(idx)) != len(idx):
                self.err(a, f"the {side}-side factor must be indexed by {'q' if side == 'query' else 'kv'} "
                            f"(and optionally b, h), each once")
            sides.append((t.name, tuple(idx)))
        self.lowrank.append(LowRank(sides[0][0], sides[0][1], sides[1][0], sides[1][1]))
        return sp.Symbol(f"lowrank{len(self.lowrank) - 1}", real=True), "float"

    def fold_lowrank(self, score, expr: SpecExpr):
        """The score written in the folded score ``s' = s + sum of dot() terms``.

        Raises:
            SpecError: a dot() term that is not added to ``s`` (it could not be folded into QK^T).
        """
        if not self.lowrank:
            return score
        syms = [sp.Symbol(f"lowrank{i}", real=True) for i in range(len(self.lowrank))]
        folded = sp.simplify(score.subs(s, s - sp.Add(*syms)))
        if folded.free_symbols & set(syms):
            self.err(expr.node, "dot() terms must be added to s (score: s + dot(U[...], W[...]), possibly inside "
                                "a function of that sum): they are folded into the QK^T product")
        return folded

    def visit_Attribute(self, node):
        if not self.grid:
            self.err(node, "attribute access (like q.y) needs a grid: declare 'grid: y, x' first")
        if not isinstance(node.value, ast.Name) or node.value.id not in ("q", "kv") or self.dims_mode:
            self.err(node, "only q.<axis> and kv.<axis> coordinates exist (e.g. q.y, kv.x)")
        if node.attr not in self.grid:
            self.err(node, f"unknown grid axis {node.attr!r} (the grid is: {', '.join(self.grid)})")
        return self.coord(INDEX[node.value.id], self.grid.index(node.attr)), "int"

    def _axis_values(self, node, what: str, want: str):
        """An int/bool constant or a per-axis tuple of them -> one value per grid axis."""
        elts = node.elts if isinstance(node, ast.Tuple) else None
        if elts is not None and len(elts) != len(self.grid):
            self.err(node, f"{what} needs one value per grid axis ({len(self.grid)}: {', '.join(self.grid)}), "
                           f"got {len(elts)}")
        out = []
        for e in (elts if elts is not None else [node] * len(self.grid)):
            v, k = self.visit(e)
            if want == "bool":
                if v not in (sp.true, sp.false):
                    self.err(e, f"{what} must be True/False or a bool param (per axis: a tuple)")
                out.append(v == sp.true)
            else:
                if k != "int" or not sp.sympify(v).is_Integer:
                    self.err(e, f"{what} must be an integer constant or int param (per axis: a tuple)")
                out.append(int(v))
        return out

    def neighborhood(self, node):
        """``neighborhood(q, kv, kernel, dilation=1, stride=1, causal=False)`` with NATTEN's
        semantics per axis (Hassani et al., Neighborhood Attention; Generalized
        Neighborhood Attention for stride): within the dilation group of the query
        (``x % dilation``), the window of ``kernel`` keys is centred on the stride group's
        leader and shifted inward at the borders (causal: ends at the query, starts
        ``kernel - 1`` before the stride group's last query)."""
        if not self.grid:
            self.err(node, "neighborhood() needs a grid: declare 'grid: y, x' (or 'grid: x' for 1-D)")
        args = list(node.args)
        if len(args) < 2 or not all(isinstance(a, ast.Name) for a in args[:2]) or \
                [a.id for a in args[:2]] != ["q", "kv"]:
            self.err(node, "neighborhood() takes q and kv first: neighborhood(q, kv, kernel=..., dilation=1, "
                           "stride=1, causal=False)")
        names = ["kernel", "dilation", "stride", "causal"]
        given = {}
        for n, a in zip(names, args[2:]):
            given[n] = a
        if len(args) > 6:
            self.err(args[6], "neighborhood() takes at most 6 arguments")
        for kw in node.keywords:
            if kw.arg not in names:
                self.err(kw.value, f"neighborhood() has no argument {kw.arg!r} (expected: {', '.join(names)})")
            if kw.arg in given:
                self.err(kw.value, f"neighborhood() got {kw.arg!r} twice")
            given[kw.arg] = kw.value
        if "kernel" not in given:
            self.err(node, "neighborhood() needs kernel=... (an int or one per axis)")
        kern = self._axis_values(given["kernel"], "kernel", "int")
        dil = self._axis_values(given["dilation"], "dilation", "int") if "dilation" in given else [1] * len(self.grid)
        stri = self._axis_values(given["stride"], "stride", "int") if "stride" in given else [1] * len(self.grid)
        caus = self._axis_values(given["causal"], "causal", "bool") if "causal" in given else [False] * len(self.grid)
        conds = []
        for i, ax in enumerate(self.grid):
            k, d, st, c = kern[i], dil[i], stri[i], caus[i]
            where = given.get("kernel")
            if k < 2:
                self.err(where, f"kernel on axis {ax!r} must be >= 2, got {k}")
            if d < 1:
                self.err(given["dilation"], f"dilation on axis {ax!r} must be >= 1, got {d}")
            if st < 1 or st > k:
                self.err(given["stride"], f"stride on axis {ax!r} must be in 1..kernel ({k}), got {st}")
            L = GRID_SIZES[i]
            self.checks.append((sp.Ge(L, k * d), f"neighborhood on axis {ax!r}: kernel * dilation = {k} * {d} = "
                                                 f"{k * d} must not exceed the axis size"))
            xq, xk = self.coord(q, i), self.coord(kv, i)
            if d > 1:
                g = sp.Mod(xq, d)
                conds.append(sp.Eq(sp.Mod(xk, d), g))
                iq, jk = sp.floor(xq / d), sp.floor(xk / d)
                Lg = sp.floor((L - g + d - 1) / d)  # tokens of this dilation group on the axis
            else:
                iq, jk, Lg = xq, xk, L
            if c:
                last = sp.Min(sp.floor(iq / st) * st + st - 1, Lg - 1) if st > 1 else iq
                conds += [jk <= iq, last - jk < k]
            else:
                left, right = k // 2, k // 2 - (1 - k % 2)
                lead = sp.Min(sp.floor(iq / st) * st + st // 2, Lg - 1) if st > 1 else iq
                centre = sp.Min(sp.Max(lead, left), Lg - 1 - right)
                conds += [jk >= centre - left, jk <= centre + right]
        return sp.And(*conds), "bool"

