"""An attention site, as the graph pass and the transformers integration infer it, and
the one function that turns it into ``.attn`` spec text.

Both front ends (:mod:`attncc.fx` reading FX graphs, :mod:`attncc.hf` reading model
configs) describe what they found as a :class:`Site`; :func:`spec_text` writes the
pattern, :func:`kernel_for` compiles it once per distinct text, and :func:`attention`
is the call the rewritten graph (or the transformers attention function) makes.

Semantics (the eager code the site replaces defines them):

* ``score = q·k * scale``, then ``score_ops`` in order: ``("softcap", cap)`` is
  ``cap * tanh(score / cap)`` (Gemma 2), ``("bias", name)`` adds a float tensor
  ``(B|1, H|1, Lq|1, Lk|1)`` read at ``[b, h, q, kv]`` (size-1 dims read at 0),
  ``("term", expr)`` adds a closed form in ``q, kv, b, h, Lq, Lk`` and the float tensors
  of ``score_reads`` (ALiBi: ``slope0[h]*(kv - q)``).
* ``mask`` is a sympy boolean in ``q, kv, b, h, Lq, Lk`` (``q``/``kv`` the query / key
  index, ``Lq``/``Lk`` the lengths); ``mask_tensor`` a bool tensor read like a bias
  (True = the pair exists). Pairs outside the mask get probability 0.
* ``sinks``: a learned sink logit per (b, h, q) joins the softmax denominator (gpt-oss,
  StreamingLLM): the spec's ``sink:`` clause, fused in the kernel's epilogue (forward) and
  its backward preprocessing (the logits' gradient).
* A query row with no allowed key gives 0 (eager with an additive ``finfo.min`` mask
  would average all values there; such rows do not occur in causal / sliding-window
  models).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import List, Optional

import sympy
import torch

#: index and size symbols of the recovered masks (the spec language's names)
q_idx, kv_idx, b_idx, h_idx = sympy.symbols("q kv b h", integer=True)
Lq, Lk = sympy.symbols("Lq Lk", integer=True, positive=True)
MASK_NAMES = {"q": q_idx, "kv": kv_idx, "b": b_idx, "h": h_idx, "Lq": Lq, "Lk": Lk}

_DIMS = ("B", "H", "Lq", "Lk")
_INDEX = ("b", "h", "q", "kv")


@dataclass(frozen=True)
class Site:
    """What an attention site computes, independent of where it was found.

    Attributes:
        mask: sympy boolean over ``q, kv`` (and ``b, h, Lq, Lk``), or None (all pairs).
        mask_tensor: shape of a bool mask tensor ``(B|1, H|1, Lq|1, Lk|1)`` as dim names
            (``"B"``, ``"H"``, ``"Lq"``, ``"Lk"`` or ``"1"``), or None.
        score_ops: ``(("softcap", cap) | ("bias", dims)), ...`` applied to ``s`` in order;
            ``dims`` like ``mask_tensor``.
        sinks: a sink logit per (b, h, q) joins the softmax denominator.
        gate: an output gate ``* sigmoid(g)`` follows the site (Qwen3-Next's gated
            attention), fused as the spec's ``gate:`` clause; ``g`` is passed in the
            output's layout ``(B, H, Lq, Dv)`` (see :func:`gate_to_output`).
        mask_tensor_drops: the mask tensor is True where a pair is masked out
            (``scores.masked_fill(drop, finfo.min)``, MPT) instead of True = attend.
    """

    mask: Optional[sympy.Basic] = None
    mask_tensor: Optional[tuple] = None
    score_ops: tuple = ()
    sinks: bool = False
    gate: bool = False
    mask_tensor_drops: bool = False
    #: ``((name, dims), ...)``: integer tensors the mask reads (``pad0[b, kv]``, a padding
    #: ``attention_mask`` of key validity recovered as a per-batch read), ``dims`` the
    #: spec's dim names (``("B", "Lk")``); passed as int32 with their size-1 dims dropped
    mask_reads: tuple = ()
    #: ``((name, dims), ...)``: float tensors the score terms read at batch / head indices
    #: (ALiBi slopes ``slope0[h]``), passed as float32 with their size-1 dims dropped
    score_reads: tuple = ()
    #: ``((name, dims), ...)``: int32 tensors the score terms index tables with (T5's
    #: bucket of each relative distance, ``bucket0: int32[Lq + Lk - 1]``), passed as they are
    index_reads: tuple = ()

    def tensor_names(self) -> List[str]:
        """Names of the run-time tensors the spec declares, in call order."""
        names = ["allowed"] if self.mask_tensor else []
        names += [n for n, _ in self.mask_reads] + [n for n, _ in self.score_reads]
        names += [n for n, _ in self.index_reads]
        names += [f"bias{i}" for i, (op, _) in enumerate(self.score_ops) if op == "bias"]
        return names + (["sink"] if self.sinks else []) + (["g"] if self.gate else [])

    def describe(self) -> str:
        """One-line summary: the inferred pattern name and its clauses."""
        full = mask_name(without_reads(self.mask))
        bits = [pattern_name(self) + (full[full.index("("):] if "(" in full else "")]
        if self.mask is not None:
            bits.append(f"mask: {print_mask(self.mask)}")
        in_mask = {a.func.__name__ for a in (self.mask.atoms(sympy.core.function.AppliedUndef)
                                             if self.mask is not None else ())}
        for n, dims in self.mask_reads:
            bits.append(f"key padding {n}[{', '.join(dims)}] read in the mask (padded key tiles skipped)" if n in in_mask
                        else f"{n}: int32[{', '.join(dims)}] (an integer tensor of the graph, read in the score)")
        if self.mask_tensor:
            bits.append(f"{'drop ' if self.mask_tensor_drops else ''}mask tensor [{', '.join(self.mask_tensor)}]")
        for op, arg in self.score_ops:
            if op == "term":
                bits.append(f"score term {_sstr(arg)} ({term_name(arg)}, recovered from the graph)")
            else:
                bits.append(f"softcap {arg:g}" if op == "softcap" else f"bias [{', '.join(arg)}]")
        for n, dims in self.score_reads:
            bits.append(f"{n}: float32[{', '.join(dims)}]")
        for n, dims in self.index_reads:
            what = "the bucket of each distance kv - q, from the graph's bucket function" if n.startswith("bucket") \
                else "an index tensor of the graph, read in the score"
            bits.append(f"{n}: int32[{', '.join(dims)}] ({what})")
        if self.sinks:
            bits.append("sinks (fused sink clause)")
        if self.gate:
            bits.append("output gate (fused gate clause)")
        return "; ".join(bits)


def broadcast_dims(shape: tuple, sizes: dict, name: str = "tensor", same=None) -> tuple:
    """The dim names of a mask / bias tensor read at ``[b, h, q, kv]`` with broadcasting.

    Args:
        shape: the tensor's shape, rank <= 4 (leading size-1 dims are implied).
        sizes: ``{"B": .., "H": .., "Lq": .., "Lk": ..}`` of the attention (query heads).
        name: the argument's name, for the error message.
        same: equality of two sizes (default ``==``; the graph pass compares SymInts).

    Returns:
        One of ``"B"``, ``"H"``, ``"Lq"``, ``"Lk"`` or ``"1"`` per dim (the
        :class:`Site` ``mask_tensor`` / ``("bias", dims)`` form).

    Raises:
        ValueError: rank above 4, or a dim that is neither 1 nor the attention's size.
    """
    same = same or (lambda a, c: a == c)
    if len(shape) > 4:
        raise ValueError(f"{name} has shape {tuple(shape)}: more than 4 dims, expected (B|1, H|1, Lq|1, Lk|1)")
    shape = (1,) * (4 - len(shape)) + tuple(shape)
    dims = []
    for s, dim in zip(shape, _DIMS):
        if not isinstance(s, torch.SymInt) and s == 1:
            dims.append("1")
        elif same(s, sizes[dim]):
            dims.append(dim)
        else:
            want = tuple(sizes[d] for d in _DIMS)
            raise ValueError(f"{name} has shape {shape}, which does not broadcast to (B, H, Lq, Lk) = {want}")
    return tuple(dims)


def _read(dims: tuple) -> str:
    return ", ".join("0" if d == "1" else i for d, i in zip(dims, _INDEX))


def without_reads(mask):
    """``mask`` with every comparison that reads a tensor (``pad0[b, kv] != 0``) set to
    True: the index-only part, which :func:`mask_name` names."""
    from sympy.core.function import AppliedUndef

    if mask is None or not mask.atoms(AppliedUndef):
        return mask
    rels = [r for r in mask.atoms(sympy.Rel) if r.atoms(AppliedUndef)]
    out = mask.subs({r: sympy.true for r in rels})
    return None if out is sympy.true else out


class _SpecPrinter(sympy.printing.str.StrPrinter):
    """sympy's str printer, with tensor reads ``f(b, kv)`` written ``f[b, kv]`` and the
    spec language's ``abs`` / ``min`` / ``max``."""

    def _print_Abs(self, expr):
        return f"abs({self._print(expr.args[0])})"

    def _print_Min(self, expr):
        return f"min({', '.join(self._print(a) for a in expr.args)})"

    def _print_Max(self, expr):
        return f"max({', '.join(self._print(a) for a in expr.args)})"

    def _print_Mod(self, expr):
        return f"({self._print(expr.args[0])}) % ({self._print(expr.args[1])})"

    def _print_floor(self, expr):
        n, d = sympy.fraction(sympy.together(expr.args[0]))
        if d.is_Integer and d != 1:
            return f"(({self._print(n)}) // {d})"
        return f"floor({self._print(expr.args[0])})"

    def _print_Piecewise(self, expr):
        *pieces, last = expr.args
        out = self._print(last.expr)
        for p in reversed(pieces):
            out = f"where({print_mask(p.cond)}, {self._print(p.expr)}, {out})"
        return out

    def _print_Function(self, expr):
        from sympy.core.function import AppliedUndef

        if isinstance(expr, AppliedUndef):
            return f"{expr.func.__name__}[{', '.join(self._print(a) for a in expr.args)}]"
        return super()._print_Function(expr)


def _sstr(e) -> str:
    return _SpecPrinter().doprint(e)


def print_mask(e) -> str:
    """A sympy boolean as ``.attn`` expression text (``and``/``or``/``not``)."""
    if e is sympy.true or e is True:
        return "True"
    if e is sympy.false or e is False:
        return "False"
    if isinstance(e, sympy.And):
        return " and ".join(f"({print_mask(a)})" for a in e.args)
    if isinstance(e, sympy.Or):
        return " or ".join(f"({print_mask(a)})" for a in e.args)
    if isinstance(e, sympy.Not):
        return f"not ({print_mask(e.args[0])})"
    if isinstance(e, sympy.Rel):
        return f"{_sstr(e.lhs)} {e.rel_op} {_sstr(e.rhs)}"
    raise ValueError(f"cannot print {e!r} as a mask")


def spec_text(site: Site, name: Optional[str] = None) -> str:
    """The ``.attn`` pattern a site computes (one ``pattern`` block).

    The scale is not part of the text: it is passed at call time.

    Raises:
        ValueError: a mask expression that has no ``.attn`` spelling.
    """
    lines = [f"pattern {name or pattern_name(site)}:"]
    if site.mask_tensor:
        lines.append(f"    tensor allowed: bool[{', '.join(site.mask_tensor)}]")
    for n, dims in site.mask_reads:
        lines.append(f"    tensor {n}: int32[{', '.join(dims)}]")
    for n, dims in site.score_reads:
        lines.append(f"    tensor {n}: float32[{', '.join(dims)}]")
    for n, dims in site.index_reads:
        lines.append(f"    tensor {n}: int32[{', '.join(dims)}]")
    score = "s"
    for i, (op, arg) in enumerate(site.score_ops):
        if op == "softcap":
            score = f"{float(arg)!r} * tanh(({score}) / {float(arg)!r})"
        elif op == "bias":
            lines.append(f"    tensor bias{i}: float32[{', '.join(arg)}]")
            score = f"({score}) + bias{i}[{_read(arg)}]"
        elif op == "term":
            score = f"({score}) + ({_sstr(arg)})"
        else:
            raise ValueError(f"unknown score op {op!r}")
    if site.sinks:
        lines.append("    tensor sink: float32[B, H, Lq]")
    if site.gate:
        lines.append("    tensor g: float32[B, H, Lq, Dv]")
    masks = []
    if site.mask is not None and site.mask is not sympy.true:
        masks.append(f"({print_mask(site.mask)})")
    if site.mask_tensor:
        read = f"allowed[{_read(site.mask_tensor)}]"
        masks.append(f"not ({read})" if site.mask_tensor_drops else read)
    if masks:
        lines.append(f"    mask: {' and '.join(masks)}")
    if score != "s":
        lines.append(f"    score: {score}")
    if site.sinks:
        lines.append("    sink: sink[b, h, q]")
    if site.gate:
        lines.append("    gate: sigmoid(g[b, h, q, dv])")
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def _candidates(Lq_: int, Lk_: int):
    import numpy as np

    qq, kk = np.meshgrid(np.arange(Lq_), np.arange(Lk_), indexing="ij")
    return qq, kk


def _mask_values(mask, Lq_: int, Lk_: int):
    import numpy as np

    qq, kk = _candidates(Lq_, Lk_)
    f = sympy.lambdify((q_idx, kv_idx, Lq, Lk), mask, modules="numpy")
    return np.broadcast_to(np.asarray(f(qq, kk, Lq_, Lk_), dtype=bool), qq.shape)


@functools.lru_cache(maxsize=1024)
def mask_name(mask) -> str:
    """A library-style name for a recovered mask, found by comparing it with causal
    (top-left / bottom-right), causal sliding windows and the bidirectional band
    ``abs(q - kv) <= window`` (ModernBERT's local layers) on a few shapes; ``"masked"``
    when it is none of these. Only used for reports: the kernel uses the mask itself."""
    if mask is None or mask is sympy.true:
        return "dense"
    if mask.free_symbols & {b_idx, h_idx}:
        return "masked"
    shapes = [(1, 1), (7, 7), (5, 37), (37, 37), (3, 70)]
    try:
        got = [_mask_values(mask, a, c) for a, c in shapes]
    except Exception:  # noqa: BLE001 - a mask numpy cannot evaluate is just not named
        return "masked"
    big = _mask_values(mask, 200, 200)
    window = int(big[-1].sum())
    half = int(big[100].sum()) // 2  # the band's half width (row 100 is clear of both ends)
    for nm, form in (("causal", kv_idx <= q_idx), ("causal_bottom_right", kv_idx <= q_idx + Lk - Lq),
                     (f"sliding_window(window={window})", sympy.And(kv_idx <= q_idx, q_idx - kv_idx < window)),
                     (f"sliding_window_bottom_right(window={window})",
                      sympy.And(kv_idx <= q_idx + Lk - Lq, q_idx + Lk - Lq - kv_idx < window)),
                     (f"sliding_window_bidirectional(window={half})", sympy.Abs(q_idx - kv_idx) <= half)):
        if all((g == _mask_values(form, a, c)).all() for g, (a, c) in zip(got + [big], shapes + [(200, 200)])):
            return nm
    return "masked"


def term_name(term) -> str:
    """``"alibi"`` for a score term ``a * slope[h] * (kv - q + c)`` (``a > 0`` a number, ``c``
    constant along the keys: the same softmax as ALiBi's ``slope[h] * (kv - q)``, e.g. MPT's
    ``kv - Lk + 1``, BLOOM's ``kv``, Falcon's ``2 / sqrt(d) * kv``),
    ``"alibi_symmetric"`` for ``-a * slope[h] * abs(q - kv)``, ``"alibi_positions"`` for
    ``slope[h] * f(pos[b, kv], ...)`` (per-batch key positions read from integer tensors of
    the graph: BLOOM's ``cumsum(attention_mask) - 1`` with padding), ``"relative_position_bias"`` for
    T5's ``table[bucket[kv - q + Lq - 1], h]``, else ``"score_term"``.
    Only used for reports: the kernel computes the term itself."""
    from sympy.core.function import AppliedUndef

    tables = [a for a in term.atoms(AppliedUndef) if len(a.args) == 2 and isinstance(a.args[0], AppliedUndef)]
    if len(tables) == 1 and term == tables[0] and a_rel(tables[0].args[0]):
        return "relative_position_bias"
    parts = [_part_name(a) for a in sympy.Add.make_args(term)]
    if len(parts) > 1 or parts[0]:
        return "_".join(parts) if all(parts) else "score_term"
    reads = [a for a in term.atoms(AppliedUndef) if set(a.args) <= {h_idx}]
    if len(reads) == 1:
        rest = sympy.simplify(term / reads[0])
        if not rest.has(reads[0]):
            c = sympy.simplify(sympy.diff(rest, kv_idx))  # a scaled slope is a slope (Falcon: slope / sqrt(d))
            if c.is_number and c > 0 and not (rest - c * kv_idx).has(kv_idx) and not isinstance(rest, sympy.Piecewise):
                return "alibi"
            c = sympy.simplify(-rest / sympy.Abs(q_idx - kv_idx))
            if c.is_number and c > 0:
                return "alibi_symmetric"
            if rest.free_symbols <= {b_idx, kv_idx} and any(set(a.args) == {b_idx, kv_idx}
                                                           for a in rest.atoms(AppliedUndef)):
                return "alibi_positions"  # slope[h] * pos[b, kv]: BLOOM's cumsum(mask) - 1 key positions
    return "score_term"


def _part_name(term) -> str:
    """``"table_bias"`` for a table read at an index tensor's value (Swin's
    ``table0[index0[4*q + kv], h]``), ``"region_mask"`` for a piecewise constant
    (``where(regions0[..q..] - regions0[..kv..] == 0, 0, -100)``: Swin's shifted-window
    mask), else ``""``."""
    from sympy.core.function import AppliedUndef

    if isinstance(term, AppliedUndef) and term.func.__name__.startswith("table") \
            and any(r.func.__name__.startswith("index") for x in term.args for r in x.atoms(AppliedUndef)):
        return "table_bias"
    if isinstance(term, sympy.Piecewise) and all(p.expr.is_number for p in term.args):
        return "region_mask"
    return ""


def a_rel(read) -> bool:
    """``read`` is ``bucket[kv - q + Lq - 1]``: a read at the relative distance."""
    return len(read.args) == 1 and sympy.simplify(read.args[0] - (kv_idx - q_idx + Lq - 1)) == 0


def pattern_name(site: Site) -> str:
    """An identifier naming the site's pattern (``causal``, ``sliding_window_softcap``,
    ``causal_bias`` ...): the report's label and the spec's ``pattern`` name."""
    parts = [mask_name(without_reads(site.mask)).split("(")[0]]
    if site.mask_reads:
        parts.append("key_padding")
    if site.mask_tensor:
        parts.append("mask_tensor")
    parts += [term_name(arg) if op == "term" else op for op, arg in site.score_ops]
    if site.sinks:
        parts.append("sinks")
    if site.gate:
        parts.append("gated")
    return "_".join(parts)


# ---------------------------------------------------------------------- kernels
_KERNELS: dict = {}
_LOCK = threading.Lock()


@dataclass
class Kernel:
    """A compiled site: the :class:`~attncc.runtime.CompiledAttention` and its spec."""

    key: str
    text: str
    site: Site
    kern: object = field(repr=False)


def kernel_for(site: Site) -> Kernel:
    """Compile the site's pattern once per distinct spec text (process-wide cache).

    Raises:
        attncc.SpecError / ValueError: the site has no valid spec (callers leave the
            site alone and report why).
    """
    import attncc

    text = spec_text(site)
    with _LOCK:
        k = _KERNELS.get(text)
        if k is None:
            k = Kernel(key=text, text=text, site=site, kern=attncc.compile(text))
            _KERNELS[text] = k
    return k


def _as4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def _reshape_target(shape: tuple, target) -> tuple:
    """The shape ``reshape(target)`` gives a tensor of ``shape`` (one ``-1`` resolved)."""
    target = [int(t) for t in target]
    if -1 in target:
        known = 1
        for t in target:
            known *= t if t != -1 else 1
        total = 1
        for d in shape:
            total *= int(d)
        target[target.index(-1)] = total // known
    return tuple(target)


def gate_to_output(x: torch.Tensor, out_shape: tuple, layout: list) -> torch.Tensor:
    """The gate operand ``x`` (in the layout the graph multiplies it in) brought back to
    the attention output's layout ``(B, H, Lq, Dv)``.

    Args:
        x: the gate's input, shaped like the end of the layout chain.
        out_shape: ``(B, H, Lq, Dv)``.
        layout: the graph's ops from the attention output to the multiply, in order:
            ``("id",)`` (contiguous / clone / cast), ``("transpose", d0, d1)``,
            ``("permute", dims)``, ``("reshape", target)``.

    Returns:
        ``x`` with each op undone in reverse order (views / reshapes: exact, differentiable).

    Raises:
        ValueError: ``x`` does not have the chain's final shape.
    """
    shapes = [tuple(int(d) for d in out_shape)]
    for step in layout:  # the shape after each step
        shp = list(shapes[-1])
        if step[0] == "transpose":
            a, c = step[1] % len(shp), step[2] % len(shp)
            shp[a], shp[c] = shp[c], shp[a]
        elif step[0] == "permute":
            shp = [shp[d] for d in step[1]]
        elif step[0] == "reshape":
            shp = list(_reshape_target(tuple(shp), step[1]))
        shapes.append(tuple(shp))
    if tuple(x.shape) != shapes[-1]:
        raise ValueError(f"the gate has shape {tuple(x.shape)}, expected {shapes[-1]}")
    for step, before in zip(reversed(layout), reversed(shapes[:-1])):
        if step[0] == "transpose":
            x = x.transpose(step[1], step[2])
        elif step[0] == "permute":
            inv = [0] * len(step[1])
            for i, d in enumerate(step[1]):
                inv[d % len(step[1])] = i
            x = x.permute(*inv)
        elif step[0] == "reshape":
            x = x.reshape(before)
    return x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: str, scale: float,
              tensors: List[torch.Tensor], sink: Optional[torch.Tensor] = None,
              out_dtype: Optional[torch.dtype] = None, gate: Optional[torch.Tensor] = None,
              gate_layout: Optional[list] = None) -> torch.Tensor:
    """Run a compiled site (the call a rewritten graph makes).

    Args:
        q: ``(B, Hq, Lq, D)``; k ``(B, Hkv, Lk, D)``; v ``(B, Hkv, Lk, Dv)`` (GQA native).
        key: the site's spec text (see :func:`kernel_for`; it must have been compiled).
        scale: the score scale.
        tensors: the spec's tensors in :meth:`Site.tensor_names` order (rank < 4 is
            padded with leading size-1 dims).
        sink: ``(B|1, Hq|1, Lq|1)`` sink logits (sites with sinks).
        out_dtype: dtype of the result (default ``q.dtype``).
        gate / gate_layout: gated sites: the gate's input ``x`` (the output is multiplied
            by ``sigmoid(x)`` in the kernel's epilogue) in the layout the graph used, and
            the ops that led there (:func:`gate_to_output`).

    Returns:
        ``(B, Hq, Lq, Dv)``.
    """
    kern = _KERNELS[key].kern
    names = [n for n in _KERNELS[key].site.tensor_names() if n not in ("sink", "g")]
    site = _KERNELS[key].site
    reads = {n: (torch.int32, len(d)) for n, d in site.mask_reads + site.index_reads}
    reads.update({n: (torch.float32, len(d)) for n, d in site.score_reads})

    def fit(t, dtype, ndim):  # size-1 dims dropped when the spec's tensor has fewer dims
        t = t.to(dtype)
        return t if t.dim() == ndim else t.reshape([d for d in t.shape if d != 1])

    named = {n: (fit(t, *reads[n]) if n in reads else _as4d(t)) for n, t in zip(names, tensors)}
    if sink is not None:  # the sink clause reads sink[b, h, q]
        named["sink"] = sink.expand(q.shape[0], q.shape[1], q.shape[2])
    if gate is not None:  # the gate clause reads g[b, h, q, dv]
        named["g"] = gate_to_output(gate, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]), gate_layout or [])
    return kern(q, k, v, scale=scale, **named).to(out_dtype or q.dtype)
