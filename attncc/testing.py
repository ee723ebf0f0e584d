"""Property-based testing of attention implementations against :func:`attncc.reference`.

A ``.attn`` spec is a precise definition of an attention variant; this module turns it
into a generator of hard inputs (`Hypothesis <https://hypothesis.readthedocs.io>`_
strategies) and a checker for *your* implementation of the variant: a Triton or CUDA
kernel, a FlexAttention ``score_mod`` / ``mask_mod``, a port to another framework::

    import attncc.testing, torch.nn.functional as F

    def mine(q, k, v):                      # q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D/Dv)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    attncc.testing.check(mine, attncc.pattern_path("causal"), max_examples=200, grads=True)

:func:`check` calls ``fn(q, k, v, **tensors)`` on drawn inputs (``tensors``: the spec's
``tensor`` declarations, by keyword) and compares the output (and with
``return_lse=True`` the log-sum-exp, and with ``grads=True`` the gradients of q, k, v and
the float spec tensors) with the float64 dense reference. On a mismatch it raises
``AssertionError`` describing the *shrunk* failing case (shapes, dtype, layout, seed, the
worst element and both values, which keys the reference allows in that row) and a
snippet that rebuilds it bit for bit.

With pytest, use the strategy directly (``@given`` style)::

    from hypothesis import given, settings
    import attncc.testing as at

    @settings(max_examples=50, deadline=None)
    @given(x=at.inputs("patterns/sliding_window.attn", window=8))
    def test_mine(x):
        at.compare(mine_window, x)        # or: q, k, v, tensors = x; ... your own asserts

What is drawn (:class:`Space` bounds it): batch ``B``, query / key-value heads with GQA
ratios ``Hq / Hkv``, ``Lq != Lk`` with lengths around tile boundaries (15, 16, 17, 31,
...) and around the spec's int params (a window of 8: lengths 7, 8, 9, 10), ``Lq = 1``,
head dims including non-powers of two and ``D != Dv``, fp32 / fp16 / bf16, non-contiguous
layouts (``(B, L, H, D)`` memory transposed like transformers' tensors, a padded or
strided last dim), large logits (q scaled by 8 or 30), and the spec's tensors with values
in their valid ranges (:func:`attncc.inputs.tensor_values`): int tensors used as indices
stay within the bounds the read analysis derives (:func:`index_bounds`), segment ids come
packed with padding (fully masked rows), as singletons (a single allowed key) or as one
segment, bool tensors sparse, dense, empty (fully masked rows), full or one key per row,
float tables normal, large or zero. Grid patterns draw grid shapes satisfying the
pattern's size conditions (e.g. every axis at least the neighborhood kernel). Drawn
shapes whose mask would read a tensor out of its bounds (``doc[q]`` with ``Lq > Lk``)
are rejected, as the kernels would refuse them.

Tolerances (:data:`TOLERANCES`, :data:`GRAD_TOLERANCES`): an output element passes when
``|out - ref| <= atol + rtol * |ref|`` (``ref`` exact in float64 for the very inputs
drawn, i.e. the low-precision values upcast); a gradient passes when
``max |g - ref| <= atol + rtol * max |ref|`` (normwise: near-zero gradient entries are
noise), plus for the float spec tensors twice the shift that FlashAttention-2's
``delta = rowsum(dO * O)`` taken from the returned, rounded output causes (it is
amplified by factors such as ALiBi's ``kv - q``; see :func:`_delta_error_scale`); the
LSE (natural log, float32) with :data:`LSE_TOLERANCE`, and rows with no
allowed key must give LSE ``-inf`` exactly where the reference does. NaN never passes.
The output must have the reference's shape and q's dtype.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import sympy as sp
import torch
try:
    from hypothesis import HealthCheck, Phase, assume, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st
except ImportError as e:  # an optional dependency: the "testing" extra
    raise ImportError("attncc.testing needs hypothesis: pip install hypothesis (or the extra: "
                      "pip install -e \".[testing]\")") from e

from . import ir as I
from .checks import check_reads, check_sizes, compile_read_checks, compile_size_checks
from .dense import dense_mask, reference
from .dsl import PatternSpec
from .inputs import VALUE_MODES, example_tensors
from .passes import index_range, read_checks

__all__ = ["Space", "Case", "Inputs", "CheckReport", "TOLERANCES", "GRAD_TOLERANCES", "LSE_TOLERANCE",
           "inputs", "build", "compare", "check", "index_bounds"]

#: dtype -> ``(atol, rtol)`` of outputs, elementwise ``|out - ref| <= atol + rtol * |ref|``.
#: fp32: kernels accumulating in fp32 (no TF32); fp16 / bf16: one rounding of P to the
#: input dtype before the PV product (FlashAttention-2) plus the output's rounding.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}
#: dtype -> ``(atol, rtol)`` of gradients, normwise ``max |g - ref| <= atol + rtol * max |ref|``
GRAD_TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 5e-2)}
#: ``(atol, rtol)`` of the LSE (float32 whatever the input dtype)
LSE_TOLERANCE = (1e-4, 1e-4)
#: spec tensor gradients also allow ``DELTA_SLACK`` times the shift that FlashAttention-2's
#: ``delta = rowsum(dO * O)``, computed from the returned (rounded) output, causes
#: (:func:`_delta_error_scale`)
DELTA_SLACK = 2.0

#: logit magnitudes drawn: q is multiplied by one of these (large logits stress the online softmax)
LOGIT_SCALES = (1.0, 8.0, 30.0)
#: lengths drawn on purpose: tile boundaries of common block sizes, and the smallest
TILE_LENGTHS = (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)
#: int params up to this value also give lengths ``p - 1 .. p + 2`` (a window's edges)
MAX_PARAM_LENGTH = 320

LAYOUTS = {
    "contiguous": "(B, H, L, D) contiguous",
    "transposed": "(B, L, H, D) memory viewed as (B, H, L, D) (transformers' layout)",
    "padded": "last dim a slice of a wider row (row stride D + 3)",
    "strided": "last dim with stride 2",
}


@dataclass(frozen=True)
class Space:
    """Bounds of what :func:`inputs` draws.

    Attributes:
        dtypes: input dtypes of q, k, v (spec tensors keep their declared dtypes).
        max_batch: ``B`` in ``1..max_batch``.
        max_kv_heads: ``Hkv`` in ``1..max_kv_heads``.
        max_group: GQA ratio ``Hq / Hkv`` in ``1..max_group`` (1 = MHA).
        max_len: 1-D patterns: ``Lq``, ``Lk`` in ``1..max_len``, plus :data:`TILE_LENGTHS`
            up to ``max_len`` and the lengths around int params (up to
            :data:`MAX_PARAM_LENGTH`).
        head_dims: ``D`` and ``Dv`` drawn from these (``Dv != D`` sometimes).
        layouts: memory layouts of q, k, v (keys of :data:`LAYOUTS`).
        grid_extra: grid patterns: each axis in ``[smallest valid, smallest + grid_extra]``.
        max_grid_tokens: grid patterns: at most this many tokens.
        edge_cases: draw large logits and the tensor value modes that fully mask rows or
            leave one key (else: logits of scale 1 and each kind's default values).
    """

    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    max_batch: int = 2
    max_kv_heads: int = 2
    max_group: int = 3
    max_len: int = 64
    head_dims: tuple = (8, 16, 24, 40, 64, 80)
    layouts: tuple = tuple(LAYOUTS)
    grid_extra: int = 4
    max_grid_tokens: int = 400
    edge_cases: bool = True

    def __post_init__(self):
        bad = [x for x in self.layouts if x not in LAYOUTS]
        if bad or not self.layouts:
            raise ValueError(f"Space.layouts: unknown layouts {bad} (have: {', '.join(LAYOUTS)})")
        if not self.dtypes or any(d not in TOLERANCES for d in self.dtypes):
            raise ValueError(f"Space.dtypes must be a non-empty subset of {list(TOLERANCES)}, got {self.dtypes}")
        for name in ("max_batch", "max_kv_heads", "max_group", "max_len", "max_grid_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"Space.{name} must be >= 1, got {getattr(self, name)}")
        if not self.head_dims or any(not 1 <= d <= 256 for d in self.head_dims):
            raise ValueError(f"Space.head_dims must be in 1..256, got {self.head_dims}")


@dataclass(frozen=True)
class Case:
    """One drawn input, everything needed to rebuild it bit for bit (:func:`build`).

    Attributes:
        B, H, Hkv, Lq, Lk, D, Dv: sizes (``H`` = query heads; grid patterns: ``Lq = Lk`` =
            the grid's size).
        dtype: q/k/v dtype name (``"float32"``, ``"float16"``, ``"bfloat16"``).
        layout: a key of :data:`LAYOUTS`.
        seed: of the CPU ``torch.Generator`` drawing q, k, v (``N(0, 1)``), the tensors and
            the output gradient.
        logit_scale: q is multiplied by it before the cast to ``dtype``.
        grid: the grid shape of a grid pattern, else ``()``.
        modes: ``((tensor, value mode), ...)`` (:data:`attncc.inputs.VALUE_MODES`).
        free: ``((free dim, size), ...)`` of free tensor dims (e.g. the rank ``R``).
    """

    B: int
    H: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    dtype: str = "float32"
    layout: str = "contiguous"
    seed: int = 0
    logit_scale: float = 1.0
    grid: tuple = ()
    modes: tuple = ()
    free: tuple = ()

    @property
    def sizes(self) -> dict:
        """``{"B", "H", "Hkv", "Lq", "Lk", "D", "Dv", "G0", "G1", "G2"}``."""
        s = {n: getattr(self, n) for n in I.SIZE_NAMES}
        s.update(I.grid_sizes(self.grid or None))
        return s

    def describe(self) -> str:
        """One line: the sizes, dtype, layout, seed and value modes."""
        L = f"grid={'x'.join(map(str, self.grid))}" if self.grid else f"Lq={self.Lq} Lk={self.Lk}"
        parts = [f"B={self.B} Hq={self.H} Hkv={self.Hkv} {L} D={self.D} Dv={self.Dv} dtype={self.dtype} "
                 f"layout={self.layout} seed={self.seed} logit_scale={self.logit_scale:g}"]
        if self.modes:
            parts.append("tensors: " + ", ".join(f"{n}={m}" for n, m in self.modes))
        if self.free:
            parts.append(", ".join(f"{n}={v}" for n, v in self.free))
        return "; ".join(parts)


class Inputs(tuple):
    """``(q, k, v, tensors)`` drawn by :func:`inputs` (unpack it), with what built it:
    ``.case`` (:class:`Case`), ``.spec``, ``.pattern``, ``.params``, ``.ir``. Its ``repr``
    is the :func:`build` call that rebuilds it (what Hypothesis prints for a falsifying
    example)."""

    def __new__(cls, q, k, v, tensors, case, spec, pattern, params, ir):
        self = super().__new__(cls, (q, k, v, tensors))
        self.case, self.spec, self.pattern, self.params, self.ir = case, spec, pattern, params, ir
        return self

    def __repr__(self) -> str:
        return _build_call(self)

    def reference(self, return_lse: bool = False, dtype=torch.float64):
        """:func:`attncc.reference` of these inputs upcast to ``dtype`` (exact for float64):
        ``out (B, Hq, Lq, Dv)`` (grid: ``(B, Hq, *grid, Dv)``), with ``return_lse`` also the
        LSE ``(B, Hq, Lq)`` float32."""
        q, k, v, tensors = self
        return reference(self.spec, q.to(dtype), k.to(dtype), v.to(dtype), pattern=self.pattern,
                         return_lse=return_lse, **self.params, **tensors)


# ----------------------------------------------------------------------------- analysis
def index_bounds(ir: I.AttentionIR) -> dict:
    """Value bounds of the int tensors that the pattern uses as indices of other reads.

    For a read ``table[h, bucket[kv - q + Lq - 1]]`` the value ``v`` of ``bucket`` must
    keep ``table``'s index in ``[0, table.shape[1])`` for every valid ``b, h, q, kv``; an
    index ``c * v + rest`` (``c`` a non-zero integer, ``rest`` monotone in each index, its
    range from :func:`attncc.passes.index_range`) gives ``v`` in
    ``[ceil(-rest_min / c), floor((dim - 1 - rest_max) / c)]`` for ``c > 0`` (mirrored for
    ``c < 0``). Reads in the mask, score, sink and gate are considered; an index that is
    not of that form constrains nothing here.

    Returns:
        tensor name -> list of ``(lo, hi)`` sympy expressions of the sizes (intersect them).
    """
    out: dict = {}
    exprs = [e for e in (ir.mask, ir.score, ir.sink, ir.gate) if isinstance(e, sp.Basic)]
    reads = set().union(*(e.atoms(sp.Indexed) for e in exprs)) if exprs else set()
    for read in sorted(reads, key=sp.default_sort_key):
        outer = ir.tensor(str(read.base.label))
        for axis, ix in enumerate(read.indices):
            for inner in ix.atoms(sp.Indexed):
                t = ir.tensor(str(inner.base.label))
                if t.kind != "int":
                    continue
                val = sp.Dummy("value", integer=True)
                e = sp.expand(ix.subs(inner, val))
                c = sp.diff(e, val)
                rest = sp.expand(e - c * val)
                if not (c.is_Integer and c != 0) or val in rest.free_symbols or rest.atoms(sp.Indexed):
                    continue
                r = (rest, rest) if not rest.free_symbols & set(I.INDEX.values()) else index_range(rest)
                if r is None:
                    continue
                top = outer.shape[axis] - 1
                if c > 0:
                    bound = (sp.ceiling(-r[0] / c), sp.floor((top - r[1]) / c))
                else:
                    bound = (sp.ceiling((top - r[1]) / c), sp.floor(-r[0] / c))
                out.setdefault(t.name, []).append(bound)
    return out


def _concrete_bounds(bounds: dict, sizes: dict, free: tuple = ()) -> dict:
    """:func:`index_bounds` at these sizes and free dims (``((name, size), ...)``): name ->
    ``(lo, hi)`` ints (maybe ``lo > hi``)."""
    subs = {I.SIZES[n]: v for n, v in sizes.items() if n in I.SIZES}
    subs.update({I.free_dim(n): v for n, v in free})
    out = {}
    for name, pairs in bounds.items():
        los = [int(sp.sympify(lo).subs(subs)) for lo, _ in pairs]
        his = [int(sp.sympify(hi).subs(subs)) for _, hi in pairs]
        out[name] = (max(los), min(his))
    return out


def _min_axis_sizes(ir: I.AttentionIR, checks: list) -> list:
    """Per grid axis, the smallest size meeting the pattern's size conditions when every
    other axis is large (e.g. the neighborhood kernel)."""
    n = len(ir.grid)
    out = []
    for i in range(n):
        for m in range(1, 257):
            g = [256] * n
            g[i] = m
            sizes = {"B": 1, "H": 1, "Hkv": 1, "D": 16, "Dv": 16, "Lq": math.prod(g), "Lk": math.prod(g),
                     **I.grid_sizes(g)}
            try:
                check_sizes(ir, checks, sizes)
            except ValueError:
                continue
            out.append(m)
            break
        else:
            raise ValueError(f"pattern {ir.name!r}: no size of grid axis {ir.grid[i]!r} up to 256 satisfies its "
                             f"size conditions")
    return out


# ----------------------------------------------------------------------------- building
def _lay_out(x: torch.Tensor, layout: str, dtype) -> torch.Tensor:
    """``x`` (B, H, *L, D) cast to ``dtype`` in memory layout ``layout`` (same values)."""
    if layout == "contiguous":
        return x.to(dtype)
    if layout == "transposed":
        return x.movedim(1, -2).contiguous().to(dtype).movedim(-2, 1)
    D = x.shape[-1]
    if layout == "padded":
        y = torch.zeros(*x.shape[:-1], D + 3, dtype=dtype)
        y[..., :D] = x.to(dtype)
        return y[..., :D]
    y = torch.zeros(*x.shape[:-1], 2 * D, dtype=dtype)
    y[..., ::2] = x.to(dtype)
    return y[..., ::2]


def _lower(spec, pattern, params, reserved=("space", "device")) -> I.AttentionIR:
    """The IR of the pattern; a spec param named like one of our keywords cannot be passed
    through ``**params`` and is refused (instead of silently taking its default)."""
    ir = I.lower(spec, pattern, **params)
    clash = sorted({n for n, _ in ir.params} & set(reserved))
    if clash:
        raise TypeError(f"pattern {ir.name!r} declares param(s) {', '.join(clash)}, which attncc.testing uses as "
                        f"keyword arguments ({', '.join(reserved)}): rename the param to test it here")
    return ir


def _make(ir: I.AttentionIR, case: Case, device, bounds: dict | None = None):
    """``(q, k, v, tensors)`` of ``case``: q/k/v drawn from the case's seed in (B, H, L, D)
    order, then the tensors (:func:`attncc.inputs.example_tensors`)."""
    g = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    tokens_q = case.grid or (case.Lq,)
    tokens_k = case.grid or (case.Lk,)
    q = torch.randn(case.B, case.H, *tokens_q, case.D, generator=g) * case.logit_scale
    k = torch.randn(case.B, case.Hkv, *tokens_k, case.D, generator=g)
    v = torch.randn(case.B, case.Hkv, *tokens_k, case.Dv, generator=g)
    q, k, v = (_lay_out(x, case.layout, dtype).to(device) for x in (q, k, v))
    if bounds is None:
        bounds = _concrete_bounds(index_bounds(ir), case.sizes, case.free)
    tensors = example_tensors(ir, case.sizes, device, g, free=dict(case.free), modes=dict(case.modes),
                              bounds=bounds)
    return q, k, v, tensors


def build(spec, case: Case, pattern: str | None = None, device="cpu", **params) -> Inputs:
    """Rebuild the inputs of a :class:`Case` (what a failure report's snippet calls).

    Args:
        spec: ``.attn`` text, a path or a parsed pattern (as :func:`attncc.compile`).
        case: the case (printed in the failure report).
        pattern: the pattern name when the spec holds several.
        device: where the tensors go.
        **params: the spec's param values.

    Returns:
        :class:`Inputs` ``(q, k, v, tensors)``: q ``(B, Hq, Lq, D)`` (grid: ``(B, Hq, *grid,
        D)``), k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)`` in ``case.dtype`` and
        ``case.layout``; tensors name -> tensor of its declared shape and dtype.

    Raises:
        SpecError: a bad spec; TypeError: unknown params.
    """
    ir = _lower(spec, pattern, params)
    return Inputs(*_make(ir, case, device), case, spec, pattern, dict(params), ir)


def _lengths(space: Space, ir: I.AttentionIR) -> st.SearchStrategy:
    """Sequence lengths: any in ``1..max_len``, the tile boundaries, and the edges of the
    spec's int params (a window ``w``: ``w - 1 .. w + 2``)."""
    special = {n for n in TILE_LENGTHS if n <= space.max_len}
    for _, val in ir.params:
        if isinstance(val, int) and not isinstance(val, bool) and 1 <= val <= MAX_PARAM_LENGTH:
            special.update(n for n in range(val - 1, val + 3) if n >= 1)
    return st.one_of(st.integers(1, space.max_len), st.sampled_from(sorted(special)))


def inputs(spec, pattern: str | None = None, *, space: Space | None = None, device="cpu",
           **params) -> st.SearchStrategy:
    """A Hypothesis strategy drawing :class:`Inputs` ``(q, k, v, tensors)`` for a pattern.

    See the module docstring for what is drawn; ``space`` bounds it.

    Args:
        spec: ``.attn`` text, a path or a parsed pattern (as :func:`attncc.compile`).
        pattern: the pattern name when the spec holds several.
        space: a :class:`Space` (default ``Space()``).
        device: where the tensors go (``"cpu"`` or ``"cuda"``).
        **params: the spec's param values (compile-time constants: fixed, not drawn).

    Returns:
        A strategy of :class:`Inputs`: q ``(B, Hq, Lq, D)`` (grid patterns ``(B, Hq, *grid,
        D)``), k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)`` (one dtype, possibly
        non-contiguous), ``tensors`` name -> tensor of each spec tensor.

    Raises:
        SpecError: a bad spec. TypeError: unknown params.
    """
    space = Space() if space is None else space
    ir = _lower(spec, pattern, params)
    size_checks = compile_size_checks(ir)
    mask_reads = compile_read_checks(read_checks(ir, ir.mask))
    bounds = index_bounds(ir)
    min_axes = _min_axis_sizes(ir, size_checks) if ir.grid else []
    lengths = _lengths(space, ir)
    tensor_kinds = [(t.name, "index" if t.name in bounds else t.kind) for t in ir.tensors]

    @st.composite
    def draw_inputs(draw):
        Hkv = draw(st.integers(1, space.max_kv_heads))
        H = Hkv * draw(st.integers(1, space.max_group))
        if ir.grid:
            grid = tuple(draw(st.integers(m, m + space.grid_extra)) for m in min_axes)
            assume(math.prod(grid) <= max(space.max_grid_tokens, math.prod(min_axes)))
            Lq = Lk = math.prod(grid)
        else:
            grid, Lq, Lk = (), draw(lengths), draw(lengths)
        D = draw(st.sampled_from(space.head_dims))
        # a fixed number of choices per example (Hypothesis prefers shorter choice sequences
        # when shrinking): the Dv candidate is drawn even when Dv = D is chosen
        same_dv, dv = draw(st.sampled_from((True, False))), draw(st.sampled_from(space.head_dims))
        Dv = D if same_dv else dv
        edge = space.edge_cases
        modes = tuple((n, draw(st.sampled_from(VALUE_MODES[kind] if edge else VALUE_MODES[kind][:1])))
                      for n, kind in tensor_kinds)
        case = Case(B=draw(st.integers(1, space.max_batch)), H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv,
                    dtype=str(draw(st.sampled_from(space.dtypes))).replace("torch.", ""),
                    layout=draw(st.sampled_from(space.layouts)), seed=draw(st.integers(0, 2 ** 16)),
                    logit_scale=draw(st.sampled_from(LOGIT_SCALES if edge else LOGIT_SCALES[:1])), grid=grid,
                    modes=tuple(m for m in modes if m[1] != VALUE_MODES[dict(tensor_kinds)[m[0]]][0]),
                    free=tuple((n, draw(st.integers(1, 8))) for n in ir.free_dims))
        sizes = case.sizes
        try:
            check_sizes(ir, size_checks, sizes)
        except ValueError:
            assume(False)
        conc = _concrete_bounds(bounds, sizes, case.free)
        assume(all(lo <= hi for lo, hi in conc.values()))
        q, k, v, tensors = _make(ir, case, device, conc)
        try:  # shapes the kernels refuse (a mask read out of bounds), masks undefined here (x % 0)
            check_reads(mask_reads, sizes, tensors)
            dense_mask(ir, sizes, tensors, device)
        except (ValueError, RuntimeError, ZeroDivisionError):
            assume(False)
        return Inputs(q, k, v, tensors, case, spec, pattern, dict(params), ir)

    return draw_inputs()


# ----------------------------------------------------------------------------- comparing
def _fn_name(fn) -> str:
    from attncc.runtime import CompiledAttention

    if isinstance(fn, CompiledAttention):
        return f"attncc's kernel for {fn.ir.name!r}"
    base = getattr(fn, "func", fn)  # functools.partial
    mod, name = getattr(base, "__module__", None), getattr(base, "__qualname__", None)
    return f"{mod}.{name}" if mod and name else repr(fn)


def _spec_literal(spec) -> str:
    if isinstance(spec, PatternSpec):
        from pathlib import Path

        return repr(spec.file) if Path(spec.file).is_file() else repr(spec.source)
    return repr(str(spec))


def _build_call(x: Inputs) -> str:
    args = [_spec_literal(x.spec), repr(x.case)]
    if x.pattern is not None:
        args.append(f"pattern={x.pattern!r}")
    dev = x[0].device
    if dev.type != "cpu":
        args.append(f"device={str(dev)!r}")
    args += [f"{n}={v!r}" for n, v in x.params.items()]
    return f"attncc.testing.build({', '.join(args)})"


def _snippet(fn, x: Inputs, return_lse: bool) -> str:
    from attncc.runtime import CompiledAttention

    base = getattr(fn, "func", fn)
    kw = "".join(f", {n}={v!r}" for n, v in x.params.items())
    pat = f", pattern={x.pattern!r}" if x.pattern is not None else ""
    if isinstance(base, CompiledAttention):
        pname = x.pattern if x.pattern is not None else None
        get = f"fn = attncc.compile({_spec_literal(x.spec)}, {pname!r}{kw})"
    else:
        mod, name = getattr(base, "__module__", None), getattr(base, "__qualname__", "")
        if mod and name and "<" not in name and mod != "__main__":
            get = f"from {mod} import {name.split('.')[0]} as fn  # {name}"
        else:
            get = f"fn = ...  # your function {_fn_name(fn)}"
    call = "fn(q, k, v, return_lse=True, **tensors)" if return_lse and isinstance(base, CompiledAttention) \
        else "fn(q, k, v, **tensors)"
    first = "out, lse = " if return_lse else "out = "
    return "\n".join([
        "import torch, attncc, attncc.testing",
        "from attncc.testing import Case",
        f"q, k, v, tensors = {_build_call(x)}",
        get,
        first + call,
        f"ref = attncc.reference({_spec_literal(x.spec)}, q.double(), k.double(), v.double(){pat}{kw}, **tensors)",
        "print((out.double() - ref).abs().max())",
    ])


def _ranges(idx: list) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ", ".join(out) if out else "none"


def _q_text(x: Inputs, qi: int) -> str:
    if not x.case.grid:
        return f"q={qi}"
    coords = []
    for ax, n in zip(reversed(x.ir.grid), reversed(x.case.grid)):
        coords.append(f"{ax}={qi % n}")
        qi //= n
    return f"q=({', '.join(reversed(coords))})"


def _row_keys(x: Inputs, b: int, h: int, qi: int) -> str:
    """Which keys the reference allows in row (b, h, q)."""
    m = dense_mask(x.ir, x.case.sizes, x[3], x[0].device)[b, h, qi]
    idx = torch.nonzero(m).flatten().tolist()
    return f"row (b={b}, h={h}, {_q_text(x, qi)}): the reference allows kv in {{{_ranges(idx)}}} " \
           f"({len(idx)} of {m.numel()} keys)"


class _Mismatch(AssertionError):
    """A disagreement with the reference (an ``AssertionError``; its message is the report)."""


def _fail(fn, x: Inputs, return_lse: bool, what: str, detail: list) -> None:
    ir = x.ir
    params = ", ".join(f"{n}={v!r}" for n, v in ir.params)
    lines = [f"{_fn_name(fn)} disagrees with attncc.reference on pattern {ir.name!r}"
             + (f" ({params})" if params else "") + f": {what}",
             f"  case: {x.case.describe()}", *("  " + d for d in detail),
             "  reproduce:", *("    " + s for s in _snippet(fn, x, return_lse).splitlines())]
    raise _Mismatch("\n".join(lines))


def _axes_names(name: str, x: Inputs, ndim: int) -> list:
    if name in ("out", "grad of q"):
        return ["b", "h", "q", "dv" if name == "out" else "d"][:ndim]
    if name in ("grad of k", "grad of v"):
        return ["b", "hkv", "kv", "d" if name == "grad of k" else "dv"][:ndim]
    if name == "lse":
        return ["b", "h", "q"]
    t = x.ir.tensor(name.removeprefix("grad of "))
    return [str(d) for d in t.shape]


def _index_text(names: list, idx: tuple) -> str:
    return ", ".join(f"{n}={i}" for n, i in zip(names, idx))


def _compare_tensor(fn, x, return_lse, name, got, want, atol, rtol, normwise=False, row_info=True, slack=None):
    """Raise the failure report when ``got`` is not within tolerance of ``want`` (float64);
    ``slack``: a tensor of extra allowed error per element."""
    if not isinstance(got, torch.Tensor):
        _fail(fn, x, return_lse, f"{name} is a {type(got).__name__}, expected a tensor", [])
    if tuple(got.shape) != tuple(want.shape):
        _fail(fn, x, return_lse, f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}", [])
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    nan = torch.isnan(g)
    bad_inf = (torch.isinf(g) | torch.isinf(w)) & (g != w)
    diff = (g - w).abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    fin_w = w.nan_to_num(0.0, posinf=0.0, neginf=0.0).abs()
    limit = atol + rtol * (fin_w.max() if normwise and w.numel() else fin_w)
    if slack is not None:
        limit = limit + slack
    off = nan | bad_inf | (diff > limit)
    if not bool(off.any()):
        return
    excess = torch.where(nan | bad_inf, torch.full_like(diff, math.inf), diff - limit)
    flat = int(torch.argmax(excess.flatten()))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(g.shape)))
    names = _axes_names(name, x, g.dim())
    gv, wv = float(g[idx]), float(w[idx])
    rule = f"atol {atol:g} + rtol {rtol:g} * " + ("max |expected|" if normwise else "|expected|")
    if slack is not None:
        rule += f" + delta slack {float(slack[idx]):.3g}"
    what = f"NaN in {name}" if bool(nan.any()) else f"{name} differs"
    detail = [f"worst: {name}[{_index_text(names, idx)}]: got {gv!r}, expected {wv!r} "
              f"(|diff| {abs(gv - wv):.3g} > {rule}); {int(off.sum())} of {off.numel()} elements off"
              + (f", {int(nan.sum())} NaN" if bool(nan.any()) else "")]
    if row_info and names[:3] == ["b", "h", "q"]:
        detail.append(_row_keys(x, idx[0], idx[1], idx[2]))
    elif names[:3] == ["b", "hkv", "kv"]:
        grp = x.case.H // x.case.Hkv
        detail.append(f"key (b={idx[0]}, hkv={idx[1]}, kv={idx[2]}) serves query heads "
                      f"{idx[1] * grp}..{idx[1] * grp + grp - 1} (GQA group {grp})")
    _fail(fn, x, return_lse, what, detail)


def compare(fn, x: Inputs, *, grads: bool = False, return_lse: bool = False, atol: float | None = None,
            rtol: float | None = None) -> None:
    """Check ``fn`` on one drawn input against :func:`attncc.reference` (the ``@given`` form).

    Args:
        fn: called as ``fn(q, k, v, **tensors)``; returns ``out`` ``(B, Hq, Lq, Dv)`` (grid:
            ``(B, Hq, *grid, Dv)``) in q's dtype, or ``(out, lse)`` with ``return_lse``
            (``lse`` ``(B, Hq, Lq)``, natural log, ``-inf`` for a row with no allowed key).
            An attncc kernel (:class:`attncc.runtime.CompiledAttention`) is called with
            ``return_lse=True`` when that is asked.
        x: :class:`Inputs` from :func:`inputs` or :func:`build`.
        grads: also compare the gradients of q, k, v and the float spec tensors for the
            loss ``sum(out * dO)`` (``dO ~ N(0, 1)`` from the case's seed; the LSE does not
            enter the loss).
        return_lse: ``fn`` returns ``(out, lse)``; the LSE is compared too.
        atol / rtol: override :data:`TOLERANCES` (and :data:`GRAD_TOLERANCES`) for the
            input dtype.

    Raises:
        AssertionError: a mismatch, NaN, a wrong shape or dtype, or ``fn`` raising: the
            message gives the case, the worst element with both values, the keys the
            reference allows in its row, and a snippet reproducing it.
        ValueError: ``return_lse`` for a ``normalize: sigmoid`` pattern (no LSE).
    """
    from attncc.runtime import CompiledAttention

    q, k, v, tensors = x
    if return_lse and x.ir.normalize == "sigmoid":
        raise ValueError(f"pattern {x.ir.name!r} uses normalize: sigmoid, which has no LSE: check without return_lse")
    dtype = q.dtype
    f_atol, f_rtol = TOLERANCES[dtype]
    g_atol, g_rtol = GRAD_TOLERANCES[dtype]
    f_atol, g_atol = (f_atol, g_atol) if atol is None else (atol, atol)
    f_rtol, g_rtol = (f_rtol, g_rtol) if rtol is None else (rtol, rtol)
    call_kw = {"return_lse": True} if return_lse and isinstance(fn, CompiledAttention) else {}

    floats = [n for n in tensors if tensors[n].is_floating_point()] if grads else []
    if grads:  # leaves of the user's graph: views of fresh bases, so layouts survive
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        tensors = {n: t.detach().requires_grad_() if n in floats else t for n, t in tensors.items()}
    try:
        res = fn(q, k, v, **tensors, **call_kw)
    except Exception as e:  # noqa: BLE001  (any failure of the user's code is a finding)
        _fail(fn, x, return_lse, f"it raised {type(e).__name__}: {e}", [])
    if return_lse:
        if not (isinstance(res, tuple) and len(res) == 2):
            _fail(fn, x, return_lse, f"return_lse=True: expected (out, lse), got {type(res).__name__}", [])
        out, lse = res
    else:
        out, lse = res, None
    if isinstance(out, torch.Tensor) and out.dtype != dtype:
        _fail(fn, x, return_lse, f"out has dtype {out.dtype}, expected q's dtype {dtype}", [])

    rq, rk, rv = (t.detach().double().requires_grad_(grads) for t in x[:3])
    rt = {n: t.detach().double().requires_grad_() if n in floats else t for n, t in x[3].items()}
    rout, rlse = reference(x.spec, rq, rk, rv, pattern=x.pattern, return_lse=True, **x.params, **rt) \
        if x.ir.normalize == "softmax" else (reference(x.spec, rq, rk, rv, pattern=x.pattern, **x.params, **rt), None)
    for name, got, want in (("out", out, rout), ("lse", lse, rlse)):
        if name == "lse" and not return_lse:
            continue
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            what = f"shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else f"type {type(got).__name__}"
            _fail(fn, x, return_lse, f"{name} has {what}, expected shape {tuple(want.shape)}", [])
        if x.case.grid:  # compare on flattened tokens (the report prints grid coordinates)
            n = len(x.case.grid)
            got, want = got.flatten(2, 1 + n), want.flatten(2, 1 + n)
        tol = (f_atol, f_rtol) if name == "out" else LSE_TOLERANCE
        _compare_tensor(fn, x, return_lse, name, got, want, *tol)
    if not grads:
        return
    gen = torch.Generator().manual_seed(x.case.seed + 1)
    go = torch.randn(tuple(rout.shape), generator=gen, dtype=torch.float64)
    names = ["q", "k", "v", *floats]
    if not out.requires_grad:
        _fail(fn, x, return_lse, "grads=True but out does not require grad (no backward through fn)", [])
    try:
        got = torch.autograd.grad(out, [q, k, v, *(tensors[n] for n in floats)], go.to(out.device, dtype),
                                  allow_unused=True)
    except Exception as e:  # noqa: BLE001
        _fail(fn, x, return_lse, f"its backward raised {type(e).__name__}: {e}", [])
    want = torch.autograd.grad(rout, [rq, rk, rv, *(rt[n] for n in floats)], go, allow_unused=True)
    slack = _delta_error_scale(x, out, rout, go, floats) if floats else {}
    for n, a, b in zip(names, got, want):
        a = torch.zeros_like(x[3][n] if n in floats else x["qkv".index(n)]) if a is None else a
        b = torch.zeros(a.shape, dtype=torch.float64) if b is None else b
        if x.case.grid and n in "qkv":
            a, b = a.flatten(2, 1 + len(x.case.grid)), b.flatten(2, 1 + len(x.case.grid))
        extra = slack.get(n)
        extra = None if extra is None else DELTA_SLACK * extra
        _compare_tensor(fn, x, return_lse, f"grad of {n}", a, b, g_atol, g_rtol, normwise=True, row_info=False,
                        slack=extra)


def _delta_error_scale(x: Inputs, out: torch.Tensor, rout: torch.Tensor, go: torch.Tensor, floats: list) -> dict:
    """How far a FlashAttention-2 backward's own rounding moves each spec tensor's gradient.

    The backward computes ``dS = P * (dP - delta)`` with ``delta_i = sum_dv dO * O`` from
    the output O and dO in the input dtype, so ``delta_i`` is off by ``err_i = sum_dv
    dO * out - sum_dv dO * ref`` (``out`` = what ``fn`` returned, ``dO`` rounded to its
    dtype). That error reaches a spec tensor's gradient as ``-sum_i err_i * d LSE_i / d
    read`` -- rows no longer sum to zero, and e.g. ALiBi's ``(kv - q)`` factor multiplies
    it by the distance -- while q, k and v gradients see it only once per row. Returns,
    per float spec tensor, ``|d/d read sum_i err_i LSE_i|`` elementwise (``{}`` for
    sigmoid patterns: no delta).
    """
    if x.ir.normalize != "softmax":
        return {}
    go_r = go.to(out.dtype).double()
    err = (go_r * out.detach().double().cpu()).sum(-1) - (go * rout.detach()).sum(-1)
    rt = {n: t.detach().double().requires_grad_() if n in floats else t for n, t in x[3].items()}
    q, k, v = (t.detach().double() for t in x[:3])
    _, lse = reference(x.spec, q, k, v, pattern=x.pattern, return_lse=True, **x.params, **rt)
    lse = lse.double()
    loss = (err * torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))).sum()
    grads = torch.autograd.grad(loss, [rt[n] for n in floats], allow_unused=True)
    return {n: g.abs().nan_to_num(0.0) for n, g in zip(floats, grads) if g is not None}


# ----------------------------------------------------------------------------- check
@dataclass
class CheckReport:
    """What :func:`check` ran: ``examples`` passed, ``seconds``, and how many of them had
    GQA (``Hq > Hkv``), ``Lq != Lk``, non-contiguous layouts and rows with no allowed key
    (``masked_rows``) or a single allowed key (``single_key_rows``)."""

    pattern: str
    examples: int = 0
    seconds: float = 0.0
    gqa: int = 0
    ragged: int = 0
    noncontiguous: int = 0
    masked_rows: int = 0
    single_key_rows: int = 0
    dtypes: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """One line: the pattern, examples and coverage."""
        dts = ", ".join(f"{d} {n}" for d, n in sorted(self.dtypes.items()))
        return (f"{self.pattern}: {self.examples} examples in {self.seconds:.1f}s ({dts}; GQA {self.gqa}, "
                f"Lq != Lk {self.ragged}, non-contiguous {self.noncontiguous}, with fully masked rows "
                f"{self.masked_rows}, with single-key rows {self.single_key_rows})")

    def add(self, x: Inputs) -> None:
        c = x.case
        self.examples += 1
        self.gqa += c.H > c.Hkv
        self.ragged += c.Lq != c.Lk
        self.noncontiguous += c.layout != "contiguous"
        self.dtypes[c.dtype] = self.dtypes.get(c.dtype, 0) + 1
        n = dense_mask(x.ir, c.sizes, x[3], x[0].device).sum(-1)
        self.masked_rows += bool((n == 0).any())
        self.single_key_rows += bool((n == 1).any())


def check(fn, spec, pattern: str | None = None, *, grads: bool = False, return_lse: bool = False,
          max_examples: int = 100, atol: float | None = None, rtol: float | None = None, space: Space | None = None,
          seed: int | None = None, device="cpu", **params) -> CheckReport:
    """Property-test ``fn`` against :func:`attncc.reference` on drawn inputs (no pytest needed).

    Runs Hypothesis over :func:`inputs` and :func:`compare`; on the first failure
    Hypothesis shrinks the case (smaller sizes, fewer heads, fp32, contiguous, default
    values...) and the ``AssertionError`` of the smallest failing case is raised.

    Args:
        fn: ``fn(q, k, v, **tensors) -> out`` (or ``(out, lse)`` with ``return_lse``); see
            :func:`compare`. An attncc kernel is called with ``return_lse=True`` when asked.
        spec: ``.attn`` text, a path or a parsed pattern.
        pattern: the pattern name when the spec holds several.
        grads: also compare gradients of q, k, v and the float spec tensors.
        return_lse: ``fn`` returns ``(out, lse)``; compare the LSE too.
        max_examples: Hypothesis examples to run (before shrinking).
        atol / rtol: override the dtype tolerances (:data:`TOLERANCES`).
        space: what to draw (:class:`Space`).
        seed: Hypothesis seed for a reproducible run (default: a fresh random run).
        device: where the inputs go (``"cpu"`` or ``"cuda"``).
        **params: the spec's params (fixed).

    Returns:
        A :class:`CheckReport` of the examples that passed.

    Raises:
        AssertionError: ``fn`` disagrees with the reference (see :func:`compare`).
        SpecError / TypeError / ValueError: a bad spec, unknown params, ``return_lse``
            with ``normalize: sigmoid``.
    """
    ir = _lower(spec, pattern, params, reserved=("space", "device", "seed", "grads", "return_lse", "max_examples",
                                                 "atol", "rtol"))
    strat = inputs(spec, pattern, space=space, device=device, **params)
    if return_lse and ir.normalize == "sigmoid":
        raise ValueError(f"pattern {ir.name!r} uses normalize: sigmoid, which has no LSE: check without return_lse")
    report = CheckReport(ir.name)
    t0 = time.perf_counter()

    # no "explain" phase: it reruns the shrunk case many times with little to show for tensors
    @settings(max_examples=max_examples, deadline=None, database=None, report_multiple_bugs=False,
              phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(x=strat)
    def run(x):
        compare(fn, x, grads=grads, return_lse=return_lse, atol=atol, rtol=rtol)
        report.add(x)

    if seed is not None:
        run = hypothesis_seed(seed)(run)
    run()
    report.seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------- command line
def _load_function(target: str):
    """``MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``) -> the callable."""
    import importlib
    import importlib.util
    import os
    import sys

    mod_name, sep, attr = target.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"--against expects MODULE:FUNCTION (or FILE.py:FUNCTION), got {target!r}")
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise FileNotFoundError(f"{mod_name}: file not found")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(mod_name))[0], mod_name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"--against {target}: cannot import module {mod_name!r}: {e}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--against {target}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"--against {target}: {attr!r} is not callable")
    return obj


def cmd_test(args) -> int:
    """``attncc test FILE``: :func:`check` every pattern of FILE (or ``--pattern``) on attncc's
    own kernel or on ``--against MODULE:FUNCTION``; one line per pattern (``PASS`` /
    ``FAIL``), the counterexample after a failure; exit status 0 when all pass, else 1."""
    import sys

    import attncc
    from .cli import parse_params, params_for, read_patterns, select_pattern

    if args.examples < 1:
        raise ValueError(f"--examples must be >= 1, got {args.examples}")
    pats = read_patterns(args.file)
    if args.pattern is not None:
        pats = [select_pattern(args.file, pats, args.pattern)]
    params = parse_params(args.param)
    user_fn = _load_function(args.against) if args.against else None
    device = args.device or ("cuda" if torch.cuda.is_available() and not _interpreting() else "cpu")
    status = 0
    for pat in pats:
        p = params_for(pat, params)
        ir = I.lower(pat, pat.name, **p)
        if user_fn is None:
            fn = attncc.compile(pat, pat.name, **p)
            lse = ir.normalize == "softmax"
            who = "attncc kernel"
        else:
            fn, lse, who = user_fn, args.lse, args.against
        try:
            rep = check(fn, pat, pat.name, grads=args.grads, return_lse=lse, max_examples=args.examples,
                        seed=args.seed, device=device, **p)
        except AssertionError as e:
            status = 1
            text = str(e)
            print(f"FAIL {pat.name} ({who}): {text.splitlines()[0]}")
            print("\n".join(text.splitlines()[1:]))
            sys.stdout.flush()
            continue
        print(f"PASS {rep.summary()} [{who}{', grads' if args.grads else ''}{', lse' if lse else ''}]")
        sys.stdout.flush()
    return status


def _interpreting() -> bool:
    from attncc.runtime import cache

    return cache.interpreting()
