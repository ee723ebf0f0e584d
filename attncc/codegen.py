"""Code generation: sympy -> Triton expressions, and Jinja rendering of kernel templates.

:class:`TritonPrinter` prints IR expressions as Triton code (Python floor
semantics for ``//`` and ``%`` through small helpers, masked loads for tensor
reads, common reads loaded once). :func:`render_forward` fills the kernel templates
with the printed mask, score and key ranges of a :class:`~attncc.passes.KernelPlan`;
the result is a readable, deterministic Python module holding the ``@triton.jit``
kernels.

Templates (``templates/``): ``attention.py.j2`` renders the module (header, imports,
helpers) and includes the kernel families, ``forward.py.j2`` (``attn_fwd``,
``count_tiles``), ``backward.py.j2`` (``attn_bwd_pre``, ``attn_bwd_dq``,
``attn_bwd_dkdv``) and ``decode.py.j2`` (``attn_decode``, ``decode_merge``: split-KV
decoding), which import the shared macros of ``macros.j2``.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import sympy as sp

from . import ir as I
from .ir import BQ_HI, BQ_LO, GQ, LG, q_hi, q_lo

if TYPE_CHECKING:  # codegen only prints the plan: it imports neither the analysis nor the gradients
    from .passes import KernelPlan

#: names of IR symbols inside the generated kernels
KERNEL_NAMES = {
    I.q: "q_idx", I.kv: "kv_idx", I.h: "off_h", I.b: "off_b", I.s: "s",
    I.dv: "dv_idx", I.B: "B", I.H: "Hq", I.Hkv: "Hkv", I.Lq: "Lq", I.Lk: "Lk", I.D: "D", I.Dv: "Dv",
    q_lo: "q_lo", q_hi: "q_hi",
    **{g: f"G{i}" for i, g in enumerate(I.GRID_SIZES)},
}


class TritonPrinter:
    """Print sympy IR expressions as Triton source.

    Tensor reads (``sympy.Indexed``) become masked ``tl.load``s emitted once into
    :attr:`lines` (so two uses of ``doc[kv]`` load once) and referred to by name.

    Args:
        names: symbol -> code name.
        tensors: tensor name -> :class:`attncc.ir.TensorSpec`.
        prefix: prefix of the temporaries holding loads.
        int_cast: a type integer / bool reads are converted to after their load (``"tl.int64"``
            for the run-time scalars of key ranges, whose bound arithmetic must not wrap).
        bounds: read -> per index ``(in_bounds, nonnegative)``, the plan's
            :attr:`~attncc.passes.KernelPlan.read_bounds` (a read without an entry is an
            error: the bounds masks are printed from the analysis, never derived here).
    """

    def __init__(self, names: dict, tensors: dict, prefix: str = "r", bounds: dict | None = None,
                 int_cast: str = ""):
        self.int_cast = int_cast
        self.names = names
        self.tensors = tensors
        self.prefix = prefix
        self.bounds = bounds or {}
        self.loads: dict = {}
        self.lines: list[str] = []

    # -- entry
    def __call__(self, e) -> str:
        return self.p(sp.sympify(e))

    def p(self, e) -> str:  # noqa: C901 - one dispatch over node kinds
        if e in self.names:
            return self.names[e]
        if e is sp.true or e == sp.true:
            return "True"
        if e is sp.false or e == sp.false:
            return "False"
        if e is sp.oo:
            return 'float("inf")'
        if e is sp.S.NegativeInfinity:
            return '(-float("inf"))'
        if e.is_Integer:
            return str(int(e)) if e >= 0 else f"({int(e)})"
        if e.is_Rational or e.is_Float:
            v = float(e)
            return repr(v) if v >= 0 else f"({v!r})"
        if e is sp.E:
            return repr(float(sp.E))
        if e.is_number and e.is_extended_real and e.is_finite:  # exp(1) * sqrt(2), pi / 3, ...: one float
            v = float(e)
            return repr(v) if v >= 0 else f"({v!r})"
        if isinstance(e, sp.Symbol):
            raise KeyError(f"no kernel name for symbol {e}")
        if isinstance(e, sp.Indexed):
            return self._load(e)
        if isinstance(e, sp.Add):
            terms = sorted(e.args, key=lambda a: (bool(a.as_coeff_Mul()[0].is_number and a.as_coeff_Mul()[0] < 0),
                                                  sp.default_sort_key(a)))
            out = self.p(terms[0])
            for t in terms[1:]:
                c, rest = t.as_coeff_Mul()
                if c.is_number and c < 0:
                    out += f" - {self.p(-t)}"
                else:
                    out += f" + {self.p(t)}"
            return f"({out})"
        if isinstance(e, sp.Mul):
            num, den = [], []
            for a in e.args:
                if isinstance(a, sp.Pow) and a.exp.is_Integer and a.exp < 0:
                    den.append(a.base ** (-a.exp))
                else:
                    num.append(a)
            c = sp.Mul(*[a for a in num if a.is_number])
            rest = [a for a in num if not a.is_number]
            parts = [self.p(a) for a in rest]
            if c != 1 or not parts:
                parts.insert(0, self.p(c))
            out = " * ".join(parts)
            if den:
                out = f"{out} / {self.p(sp.Mul(*den))}"
            return f"({out})"
        if isinstance(e, sp.Pow):
            base, ex = e.args
            if base == 2:
                return f"tl.exp2({self._flt(ex)})"
            if ex.is_Integer and 0 < ex <= 4:
                return "(" + " * ".join([self.p(base)] * int(ex)) + ")"
            if ex.is_Integer and ex < 0:
                return f"(1.0 / {self.p(base ** (-ex))})"
            if ex == sp.Rational(1, 2):
                return f"tl.sqrt({self._flt(base)})"
            return f"tl.exp2({self._flt(ex)} * tl.log2({self._flt(base)}))"
        if isinstance(e, sp.floor):
            return self._intdiv(e.args[0], "_floordiv", "_floor_snap")
        if isinstance(e, sp.ceiling):
            return self._intdiv(e.args[0], "_cdiv", "_ceil_snap")
        if isinstance(e, sp.Mod):
            a, m = e.args
            if a.is_integer and m.is_integer:
                return f"_mod({self.p(a)}, {self.p(m)})"
            return f"_fmod({self._flt(a)}, {self._flt(m)})"
        if isinstance(e, sp.Abs):
            return f"tl.abs({self.p(e.args[0])})"
        if isinstance(e, (sp.Min, sp.Max)):
            fn = "tl.minimum" if isinstance(e, sp.Min) else "tl.maximum"
            args = sorted(e.args, key=sp.default_sort_key)
            out = self.p(args[-1])
            for a in reversed(args[:-1]):
                out = f"{fn}({self.p(a)}, {out})"
            return out
        if isinstance(e, sp.exp):
            return f"tl.exp({self._flt(e.args[0])})"
        if isinstance(e, sp.log):
            return f"tl.log({self._flt(e.args[0])})"
        if isinstance(e, sp.tanh):
            return f"_tanh({self._flt(e.args[0])})"
        if isinstance(e, I.sigmoid):
            return f"tl.sigmoid({self._flt(e.args[0])})"
        if isinstance(e, sp.Heaviside):  # from differentiating max/min/where; H(0) = 1/2 as in sympy
            x = self._flt(e.args[0])
            return f"tl.where({x} > 0, 1.0, tl.where({x} == 0, 0.5, 0.0))"
        if isinstance(e, sp.sign):  # from differentiating abs
            x = self.p(e.args[0])
            return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"
        if isinstance(e, sp.DiracDelta):  # derivative of a step: zero almost everywhere
            return "0.0"
        if isinstance(e, sp.Piecewise):
            *cases, (last, cond) = e.args
            out = self.p(last) if cond == sp.true else f"tl.where({self.p(cond)}, {self.p(last)}, 0)"
            for val, c in reversed(cases):
                out = f"tl.where({self.p(c)}, {self.p(val)}, {out})"
            return out
        if isinstance(e, sp.core.relational.Relational):
            op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[e.rel_op]
            return f"({self.p(e.lhs)} {op} {self.p(e.rhs)})"
        if isinstance(e, (sp.And, sp.Or)):
            args = sorted(e.args, key=sp.default_sort_key)
            op = " & " if isinstance(e, sp.And) else " | "
            scal = [a for a in args if _is_scalar(a)]
            block = [a for a in args if not _is_scalar(a)]
            if not scal or not block:
                return "(" + op.join(self.p(a) for a in args) + ")"
            # scalar with block operands: select with where (scalar & block is mistyped by the interpreter)
            s_code = "(" + op.join(self.p(a) for a in scal) + ")"
            b_code = "(" + op.join(self.p(a) for a in block) + ")"
            if isinstance(e, sp.And):
                return f"tl.where({s_code}, {b_code}, False)"
            return f"tl.where({s_code}, True, {b_code})"
        if isinstance(e, sp.Not):
            return f"({self.p(e.args[0])} == 0)"
        if isinstance(e, sp.Equivalent):
            a, c = e.args
            return f"({self.p(a)} == {self.p(c)})"
        raise NotImplementedError(f"cannot print {type(e).__name__} ({e}) as Triton")

    # -- helpers
    def _flt(self, e) -> str:
        out = self.p(e)
        if e.is_integer:
            return f"({out}).to(tl.float32)" if e.free_symbols else f"{float(e)!r}"
        return out

    def _intdiv(self, x, helper, float_fn) -> str:
        num, den = sp.fraction(sp.together(x))
        if den == 1 and num.is_integer:
            return self.p(num)
        if num.is_integer and den.is_Integer and den > 0:
            return f"{helper}({self.p(sp.expand(num))}, {int(den)})"
        if num.is_integer and den.is_integer and den.is_positive:  # e.g. q // X on a grid
            return f"{helper}({self.p(sp.expand(num))}, {self.p(den)})"
        # an integer: key-range bounds and indices are int32 (a float bound crashes the launch)
        return f"{float_fn}({self._flt(x)}).to(tl.int32)"

    def index_code(self, e: sp.Indexed) -> tuple[str, str]:
        """``(offset, mask)`` code of a read: the element offset from the tensor's base
        pointer (its stride arguments) and the in-bounds condition ("" when the read
        is provably in bounds). Query, key and output-column indices are clamped to the
        valid range (ragged tile lanes are discarded anyway): the in-bounds proof assumes
        ``q < Lq``, ``kv < Lk`` and ``dv < Dv``, and a padded lane (``dv >= Dv`` when
        ``BLOCK_DV > Dv``) must not read past the tensor, whose memory may hold NaN that a
        zero ``dO`` lane would turn into a NaN row sum (delta)."""
        t = self.tensors[str(e.base.label)]
        flags = self.bounds.get(e)
        if flags is None:
            raise KeyError(f"the plan has no bounds analysis of the read {e} (see attncc.passes.read_bounds)")
        offs, block_conds, scalar_conds = [], [], []
        clamp = I.CLAMPED
        saved = dict(self.names)
        dv_c = f"tl.minimum({self.names.get(I.dv, 'dv_idx')}, {self.names.get(I.Dv, 'Dv')} - 1)"
        self.names.update({clamp[I.q]: "q_idx_c", clamp[I.kv]: "kv_idx_c", clamp[I.dv]: dv_c})
        try:
            for i, ix in enumerate(e.indices):
                code = self.p(ix.subs(clamp))
                if ix.is_Integer:
                    offs.append(f"{int(ix)} * t_{t.name}_s{i}")
                else:
                    offs.append(f"({code}).to(tl.int64) * t_{t.name}_s{i}")
                in_bounds, nonnegative = flags[i]
                if in_bounds:
                    continue
                conds = scalar_conds if _is_scalar(ix) else block_conds
                if not nonnegative:
                    conds.append(f"({code} >= 0)")
                conds.append(f"({code} < t_{t.name}_n{i})")
        finally:
            self.names = saved
        mask = ""
        if block_conds:
            mask = " & ".join(block_conds)
            if scalar_conds:  # scalar & block masks: combine with where (the interpreter mistypes scalar & block)
                mask = f"tl.where({' & '.join(scalar_conds)}, {mask}, False)"
        elif scalar_conds:
            mask = " & ".join(scalar_conds)
        return " + ".join(offs), mask

    def _load(self, e: sp.Indexed) -> str:
        """A masked load of a tensor read, emitted once into :attr:`lines`."""
        if e in self.loads:
            return self.loads[e]
        t = self.tensors[str(e.base.label)]
        offs, mask = self.index_code(e)
        var = f"{self.prefix}{len(self.loads)}_{t.name}"
        mask = f", mask={mask}, other=0" if mask else ""
        conv = ".to(tl.float32)" if t.kind == "float" else (f".to({self.int_cast})" if self.int_cast else "")
        self.lines.append(f"{var} = tl.load(t_{t.name} + {offs}{mask}){conv}")
        self.loads[e] = var
        return var


#: symbols that vary over the elements of a tile
_TILE_SYMBOLS = {I.q, I.kv, I.s, I.dv, *I.QC, *I.KC}


def _is_scalar(e) -> bool:
    """True when ``e`` does not vary over the tile (no q, kv, grid coordinates or s, also
    inside reads)."""
    return not (e.free_symbols & _TILE_SYMBOLS)


#: the template that renders a kernel module (it includes the kernel family templates)
TEMPLATE = "attention.py.j2"


@functools.lru_cache(maxsize=None)
def template_text(name: str) -> str:
    """Return the text of ``templates/<name>`` (installed package data or the source tree)."""
    try:
        return resources.files("attncc.templates").joinpath(name).read_text()
    except (ModuleNotFoundError, FileNotFoundError, TypeError):
        return (Path(__file__).resolve().parent.parent / "templates" / name).read_text()


@functools.lru_cache(maxsize=None)
def template_names() -> tuple[str, ...]:
    """The names of all the kernel templates (``templates/*.j2``), sorted: what the cache
    key hashes, so that a change to any of them rebuilds the kernels."""
    try:
        names = [f.name for f in resources.files("attncc.templates").iterdir()]
    except (ModuleNotFoundError, FileNotFoundError, TypeError):
        names = [f.name for f in (Path(__file__).resolve().parent.parent / "templates").iterdir()]
    return tuple(sorted(n for n in names if n.endswith(".j2")))


def _template_source(name: str):
    try:
        return template_text(name)
    except (FileNotFoundError, IsADirectoryError):
        return None  # jinja2.TemplateNotFound


@functools.lru_cache(maxsize=None)
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FunctionLoader(_template_source), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


def _block(printer: TritonPrinter, exprs: dict) -> tuple[list[str], dict]:
    """Print several expressions with one shared set of loads."""
    out = {k: printer(v) for k, v in exprs.items()}
    return list(printer.lines), out


def tensor_arg_names(ir) -> list[str]:
    """Kernel argument names carrying the spec tensors: pointer, strides, sizes per tensor."""
    out = []
    for t in ir.tensors:
        out.append(f"t_{t.name}")
        out += [f"t_{t.name}_s{i}" for i in range(t.ndim)]
        out += [f"t_{t.name}_n{i}" for i in range(t.ndim)]
    return out


def _pieces(i: int, starts_at_zero=()) -> list[tuple[str, str]]:
    """Tile ranges of interval ``i`` minus the tile ranges of intervals ``0..i-1``
    (so that a tile in several intervals is visited once). The part before an interval
    ``j`` in ``starts_at_zero`` (its key range starts at key 0) is empty and not generated."""
    pieces = [(f"t_lo{i}", f"t_hi{i}")]
    for j in range(i):
        nxt = []
        for a, b in pieces:
            if j not in starts_at_zero:
                nxt.append((a, f"tl.minimum({b}, t_lo{j})"))
            nxt.append((f"tl.maximum({a}, t_hi{j})", b))
        pieces = nxt
    return pieces


def _printer(plan: KernelPlan, names: dict, prefix: str, int_cast: str = "") -> TritonPrinter:
    """A :class:`TritonPrinter` of ``plan``'s expressions (its tensors and read bounds)."""
    return TritonPrinter(names, {t.name: t for t in plan.ir.tensors}, prefix, dict(plan.read_bounds), int_cast)


def _backward_parts(plan: KernelPlan, ps: TritonPrinter) -> tuple:
    """Print the plan's score derivatives (:attr:`~attncc.passes.KernelPlan.backward`) for the
    backward with printer ``ps``.

    Returns:
        ``(dscore_code, backward_error, printed, tensor_grad_errors)``: ``printed`` holds
        ``(GradRead, derivative code, offset code, in-bounds code)`` per differentiable
        read (a tensor with one read that cannot be printed gets no gradient at all);
        the errors say why the backward, or a tensor's gradient, cannot be generated.
    """
    back = plan.backward
    backward_error = back.error
    dscore = 'float("nan")'
    if back.dscore is not None:
        try:
            dscore = ps(back.dscore)
        except NotImplementedError as e:  # the forward still compiles; the backward says why it cannot
            backward_error = f"the derivative of the score in s cannot be generated: {e}"
    printed, tgrad_errors = [], {}
    for g, c in back.reads:
        if c is None:
            tgrad_errors.setdefault(g.tensor, f"the read {g.read} has no counterpart in the coordinate form")
            continue
        try:
            offs, inb = ps.index_code(c.read)
            printed.append((g, ps(c.deriv), offs, inb))
        except NotImplementedError as e:
            tgrad_errors.setdefault(g.tensor, f"the derivative of the score in {g.read} cannot be generated: {e}")
    return dscore, backward_error, [x for x in printed if x[0].tensor not in tgrad_errors], tgrad_errors


def _epilogue_parts(plan: KernelPlan, names: dict) -> tuple:
    """The sink and gate clauses as the forward's epilogue and the backward preprocessing
    kernel evaluate them (value and the derivatives in its reads, sharing one set of loads).

    Returns:
        ``(ereads, lines, tensor_grad_errors)``: per printable read of the plan's
        ``backward.epilogue`` (:func:`~attncc.gradients.epilogue_reads`) a dict ``j, clause,
        tensor, kind, read, code`` (``j``: its ``PE<j>`` buffer); ``lines``: ``{"sink": [...],
        "gate": [...]}``, the loads of each clause's value and derivatives (the value as
        ``sink_val`` / ``gate_val``); errors: tensor name -> why it gets no gradient.
    """
    ir = plan.ir
    ereads, lines, errors = [], {}, {}
    for clause, expr in (("sink", ir.sink), ("gate", ir.gate)):
        pr = _printer(plan, names, "se" if clause == "sink" else "ge")
        value = pr(expr) if expr is not None else "0.0"
        for c, g in plan.backward.epilogue:
            if c != clause:
                continue
            try:
                code = pr(g.deriv)
            except NotImplementedError as e:
                errors.setdefault(g.tensor, f"the derivative of the {clause} in {g.read} cannot be generated: {e}")
                continue
            ereads.append(dict(clause=clause, tensor=g.tensor, kind=g.kind, read=str(g.read), code=code, g=g))
        lines[clause] = list(pr.lines) + [f"{clause}_val = {value}"]
    return ereads, lines, errors


def _gradient_parts(plan: KernelPlan, ps: TritonPrinter, names: dict) -> tuple:
    """:func:`_backward_parts` and :func:`_epilogue_parts` together: a tensor whose gradient
    cannot be generated in one place gets none at all.

    Returns:
        ``(dscore_code, backward_error, printed, tensor_grad_errors, ereads, epi_lines)``:
        ``printed`` / ``ereads`` keep the reads of tensors that get a gradient (``ereads``
        numbered ``j``: their ``PE<j>`` buffers).
    """
    dscore, err, printed, terr = _backward_parts(plan, ps)
    ereads, epi_lines, eerr = _epilogue_parts(plan, names)
    for n, why in eerr.items():
        terr.setdefault(n, why)
    printed = [x for x in printed if x[0].tensor not in terr]
    ereads = [dict(e, j=j) for j, e in enumerate(x for x in ereads if x["tensor"] not in terr)]
    return dscore, err, printed, terr, ereads, epi_lines


def backward_support(plan: KernelPlan) -> tuple:
    """What the generated backward of ``plan`` can do, without rendering a module.

    Returns:
        ``(backward_error, tensor_grad_errors, grad_reads, epilogue_reads)``: ``""`` or why
        there is no backward; tensor name -> why it gets no gradient; the
        :class:`~attncc.gradients.GradRead` s whose partials the dQ kernel writes, in
        kernel argument order; those of the sink / gate reads whose partials the
        preprocessing kernel writes (``PE<j>`` order).
    """
    names, _, score = _kernel_forms(plan)
    ps = _printer(plan, names, "sc")
    ps(score)
    _, err, printed, terr, ereads, _ = _gradient_parts(plan, ps, names)
    return err, terr, tuple(x[0] for x in printed), tuple(e["g"] for e in ereads)


def _kernel_forms(plan: KernelPlan) -> tuple:
    """``(names, mask, score)`` as the kernels evaluate them (:meth:`~attncc.passes.KernelPlan.forms`):
    the default symbol names, or, for box plans, grid names (the original lengths for
    ``Lq``/``Lk``, which the kernel sees permuted)."""
    ir = plan.ir
    names = dict(KERNEL_NAMES)
    mask, score = plan.forms()
    if plan.path != "box":
        return names, mask, score
    n = len(ir.grid)
    flat = "(" + " * ".join(f"G{i}" for i in range(n)) + ")"
    names.update({I.Lq: flat, I.Lk: flat})
    for i in range(n):
        names.update({I.QC[i]: f"qc{i}", I.KC[i]: f"kc{i}", GQ[i]: f"g{i}", BQ_LO[i]: f"q_lo{i}",
                      BQ_HI[i]: f"q_hi{i}", LG[i]: f"lg{i}"})
    return names, mask, score


def render_forward(plan: KernelPlan, version: str = "", paged: bool = False) -> str:
    """Render the forward kernel module for ``plan``.

    ``paged``: the forward and decode kernels read K / V through a page table (a paged KV
    cache, see :mod:`attncc.runtime.paged` and ``templates/paged.j2``); off, the module is the
    one rendered without the paged feature (byte-identical).

    Returns:
        Python source defining ``attn_fwd`` (the FlashAttention-style forward
        kernel) and ``count_tiles`` (the same tile iteration, counting only), the backward
        kernels and the split-KV decode kernels ``attn_decode`` / ``decode_merge``, all
        ``@triton.jit``.
    """
    from attncc.runtime.configs import ws_supported  # (attncc.runtime imports this module)

    ir = plan.ir
    box = plan.path == "box"
    names, mask, score = _kernel_forms(plan)
    # score and mask inside the kv loop (2-D blocks)
    pm = _printer(plan, names, "m")
    block_lines, block_code = [], ""
    if plan.blocks is not None:  # the block read apart: tiles inside one block skip it (see mask_block)
        br = plan.blocks
        mask = br.rest
        block_lines, bc = _block(_printer(plan, names, "bk"), {"blk": sp.Ne(br.read, 0)})
        block_code = bc["blk"]
    mask_lines, m = _block(pm, {"mask": mask})
    ps = _printer(plan, names, "sc")
    # the score and its derivative in s (for the backward) share their tensor loads
    score_lines, sc = _block(ps, {"score": score})
    # with the epilogue's reads (sink / gate) and their derivatives for the backward preprocessing
    sc["dscore"], backward_error, printed, tgrad_errors, ereads, epi_lines = _gradient_parts(plan, ps, names)
    greads = [dict(j=j, tensor=g.tensor, kind=g.kind, read=str(g.read), code=code, offs=offs,
                   inb=f" & ({inb})" if inb else "") for j, (g, code, offs, inb) in enumerate(printed)]
    score_lines = list(ps.lines)
    intervals, range_lines = [], []
    if plan.path == "closed":
        # run-time scalars (per-head windows, sink counts): loaded as int64 once per program,
        # the bounds computed in int64 and clamped to [0, Lk] before the int32 tile arithmetic,
        # so that any int32 value behaves as in the reference (no wrap-around)
        scal = bool(plan.scalars)
        pr = _printer(plan, names, "rg", int_cast="tl.int64" if scal else "")
        for i, iv in enumerate(plan.intervals):
            zero = sp.Integer(0)
            clamps = {"lo_c": sp.Max(iv.lo, zero), "hi_c": sp.Min(iv.hi, I.Lk),
                      "flo_c": sp.Max(iv.flo, zero), "fhi_c": sp.Max(sp.Min(iv.fhi, I.Lk), zero)}
            if scal:
                clamps = {k: sp.Max(sp.Min(x, I.Lk), zero) if x.atoms(sp.Indexed) else x for k, x in clamps.items()}
            _, d = _block(pr, {"lo": iv.lo, "hi": iv.hi, "flo": iv.flo, "fhi": iv.fhi, **clamps})
            if scal:
                d.update({k: f"({d[k]}).to(tl.int32)" for k, x in clamps.items() if x.atoms(sp.Indexed)})
            d["idx"] = i
            d["pieces"] = _pieces(i, [j for j, jv in enumerate(plan.intervals[:i]) if sp.Max(jv.lo, zero) == 0])
            # key range and full range both start at key 0: the first piece has no leading
            # partial tiles (causal, ALiBi, ...), so that loop is not generated
            d["lead_empty"] = sp.Max(iv.lo, zero) == 0 and sp.Max(iv.flo, zero) == 0
            # a full range that ends before key 16 holds no full tile (tiles have >= 16 keys):
            # no full loop (the first keys of global_sliding_window's sinks)
            d["no_full"] = sp.Min(iv.fhi, 15) == iv.fhi
            intervals.append(d)
        range_lines = list(pr.lines)
    ctx = _box_context(plan if box else None, names)
    ctx.update(_lowrank_context(bool(ir.lowrank)))
    ctx.update(_paged_context(paged))
    # the decode kernel (decode.py.j2) packs the query heads of a KV head into one tile: key
    # ranges that depend on the head are computed per head and united
    ctx.update(decode_heads=any(I.h in sp.sympify(x).free_symbols for iv in plan.intervals
                                for x in (iv.lo, iv.hi, iv.flo, iv.fhi)))
    ctx.update(sigmoid=(ir.normalize == "sigmoid"), has_sink=ir.sink is not None, has_gate=ir.gate is not None,
               ereads=ereads, epi_lines=epi_lines, epi_meta=[[e["tensor"], e["kind"]] for e in ereads],
               eargs="".join(f"PE{e['j']}, " for e in ereads))
    ctx.update(
        version=version,
        ir=ir,
        plan=plan,
        ir_lines=ir.pretty().splitlines(),
        plan_lines=plan.describe().splitlines(),
        tensors=list(ir.tensors),
        mask_lines=mask_lines,
        mask_code=m["mask"],
        block_lines=block_lines,
        block_code=block_code,
        block_size=(plan.blocks.bq, plan.blocks.bk) if plan.blocks is not None else None,
        mask_is_true=(mask == sp.true),
        score_lines=score_lines,
        score_code=sc["score"],
        dscore_code=sc["dscore"],
        backward_error=backward_error,
        tgrad_errors=tgrad_errors,
        greads=greads,
        grad_meta=[[g["tensor"], g["kind"]] for g in greads],
        gargs="".join(f"PG{g['j']}, " for g in greads),
        # per-read tile-function arguments: row-sum accumulators, else partial-buffer pointers
        gin="".join((f"ga{g['j']}, " if g["kind"] == "row" else f"pgb{g['j']}, ") for g in greads)
        + ("du, " if ir.lowrank else ""),
        gout="".join(f", ga{g['j']}" for g in greads if g["kind"] == "row") + (", du" if ir.lowrank else ""),
        visit_code=" | ".join(f"((pid_n >= t_lo{i}) & (pid_n < t_hi{i}))" for i in range(len(intervals))) or "False",
        full_code=" | ".join(f"((pid_n >= f_lo{i}) & (pid_n < f_hi{i}))" for i in range(len(intervals))) or "False",
        intervals=intervals,
        range_lines=range_lines,
        targs="".join(a + ", " for a in tensor_arg_names(ir)),
        # several key intervals: a tile of one interval's masked range may be full in another's
        dyn_full=len(intervals) > 1,
        in_full_count=" | ".join(f"((n >= f_lo{i}) & (n < f_hi{i}))" for i in range(len(intervals))),
        full_ranges=", ".join([f"f_lo{i}, f_hi{i}" for i in range(len(intervals))] +
                              ["0, 0"] * (3 - len(intervals)) if len(intervals) > 1 else ["0, 0, 0, 0, 0, 0"]),
        # the forward's key-tile loops: warp-specialised when WS, where the installed Triton can
        **(dict(tile_range="tl.range", ws_arg=", warp_specialize=WS") if ws_supported()
           else dict(tile_range="range", ws_arg="")),
    )
    return _env().get_template(TEMPLATE).render(**ctx)


def _lowrank_context(on: bool) -> dict:
    """Template variables of the dot() terms (see the lr_setup macro of ``templates/macros.j2``):
    argument lists that are empty when the pattern has none, so such kernels are unchanged."""
    names = ("LR", "LRK", "LRDW", "LRDWO", "LRX", "LRXC", "LRA")
    if not on:
        return dict(lowrank=False, **{n: "" for n in names})
    return dict(
        lowrank=True,
        LR="u, w_base, stride_wn, stride_wr, R, ",  # forward / dQ tile functions
        LRK="u_base, stride_um, stride_ur, R, ", LRDW="w, dw, ", LRDWO=", dw",  # dK/dV tile function
        LRX=" BLOCK_R: tl.constexpr,", LRXC=", BLOCK_R=BLOCK_R",
        # kernel arguments: factors, their gradients (backward), strides, rank
        LRA="LU, LW, DLU, DLW, stride_ub, stride_uh, stride_um, stride_ur, "
            "stride_wb, stride_wh, stride_wn, stride_wr, R, ",
    )


def _paged_context(on: bool) -> dict:
    """Template variables of paged KV caches (see ``templates/paged.j2``): argument lists that
    are empty when not paged, so unpaged kernels are unchanged."""
    names = ("PG", "PGX", "PGXC", "PGA")
    if not on:
        return dict(paged=False, **{n: "" for n in names})
    return dict(
        paged=True,
        PG="bt_row, stride_kp, stride_vp, ",  # tile functions: page table row, page strides
        PGX=" PAGE: tl.constexpr,", PGXC=", PAGE=PAGE",
        PGA=" BT, KVL, stride_btb,",  # kernel arguments: page table, kv_lens, page table row stride
    )


#: index arguments of the per-tile kernel functions (see the q_index / kv_index macros)
_IDX = "q_idx, q_idx_c, q_ok, qc0, qc1, qc2, kv_idx, kv_idx_c, kv_ok, kc0, kc1, kc2"
#: the size arguments of every kernel: sizes, grid sizes, then the box layout (dilation
#: groups and padded group lengths per axis; 1 where unused)
_SZ = "B, Hq, Hkv, Lq, Lk, D, Dv, G0, G1, G2, DIL0, DIL1, DIL2, J0, J1, J2"
#: box tile shapes (tokens per axis of a query / key tile), compile-time
_TILE_CX = ("TM0: tl.constexpr, TM1: tl.constexpr, TM2: tl.constexpr, "
            "TN0: tl.constexpr, TN1: tl.constexpr, TN2: tl.constexpr,")


def _box_context(plan, names: dict) -> dict:
    """Template variables of the box iteration (see the box_* macros of ``templates/macros.j2``)."""
    ctx = dict(IDX=_IDX, SZ=_SZ, TILE_CX=_TILE_CX, box=plan is not None, axes=[], boxes=[],
               lqo="Lq", lko="Lk")
    if plan is None:
        return ctx
    n = len(plan.ir.grid)
    axes = list(range(n))
    flat = "(" + " * ".join(f"G{i}" for i in axes) + ")"
    pr = _printer(plan, names, "bx")
    boxes = []
    for bx in plan.boxes:
        per_axis = []
        for i, iv in enumerate(bx.axes):
            zero, lg = sp.Integer(0), LG[i]
            _, d = _block(pr, {"lo": iv.lo, "hi": iv.hi, "flo": iv.flo, "fhi": iv.fhi,
                               "lo_c": sp.Max(iv.lo, zero), "hi_c": sp.Min(iv.hi, lg),
                               "flo_c": sp.Max(iv.flo, zero), "fhi_c": sp.Max(sp.Min(iv.fhi, lg), zero)})
            per_axis.append(d)
        boxes.append(per_axis)
    nb = len(boxes)

    def member(prefix, j):
        return " & ".join(f"(kt{a} >= {prefix}_lo{j}_{a}) & (kt{a} < {prefix}_hi{j}_{a})" for a in axes)

    def linear(var, count):  # row-major linear index of per-axis values
        out = f"{var}0"
        for a in axes[1:]:
            out = f"({out}) * {count}{a} + {var}{a}"
        return out

    member_code = " | ".join(f"({member('kt', j)})" for j in range(nb)) or "False"
    ctx.update(
        axes=axes, unused_axes=list(range(n, 3)), boxes=boxes, lqo=flat, lko=flat,
        tm_after=["(" + " * ".join(["1"] + [f"TM{b}" for b in axes[a + 1:]]) + ")" for a in axes],
        tn_after=["(" + " * ".join(["1"] + [f"TN{b}" for b in axes[a + 1:]]) + ")" for a in axes],
        q_ok_code=" & ".join(f"(qc{a} < G{a})" for a in axes),
        kv_ok_code=" & ".join(f"(kc{a} < G{a})" for a in axes),
        q_flat_code=linear("qc", "G"), kv_flat_code=linear("kc", "G"),
        box_nonempty=[" & ".join(f"(kt_hi{j}_{a} > kt_lo{j}_{a})" for a in axes) for j in range(nb)],
        bb_lo_code=[_fold("tl.minimum", [f"tl.where(ne{j}, kt_lo{j}_{a}, 1 << 30)" for j in range(nb)])
                    for a in axes],
        bb_hi_code=[_fold("tl.maximum", [f"tl.where(ne{j}, kt_hi{j}_{a}, 0)" for j in range(nb)]) for a in axes],
        q_empty_code=" | ".join(f"(q_lo{a} > q_hi{a})" for a in axes),
        w_prod=" * ".join(f"w{a}" for a in axes) if nb else "0",
        box_member_code=member_code,
        box_visit_code="True" if nb == 1 else member_code,
        box_full_code=" | ".join(f"({member('kf', j)})" for j in range(nb)) or "False",
        kt_linear=linear("kt", "NK"),
        nqt=" * ".join(f"NQ{a}" for a in axes), nkt=" * ".join(f"NK{a}" for a in axes),
    )
    return ctx


def _fold(fn: str, parts: list) -> str:
    out = parts[-1]
    for p in reversed(parts[:-1]):
        out = f"{fn}({p}, {out})"
    return out
