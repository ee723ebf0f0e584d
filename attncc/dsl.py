"""The ``.attn`` spec language: text -> :class:`PatternSpec` (AST with source spans).

A ``.attn`` file holds one or more pattern blocks::

    pattern sliding_window:
        \"\"\"Causal sliding-window attention (Mistral).\"\"\"
        param window: int = 4096
        tensor doc: int32[Lk]
        mask: kv <= q and q - kv < window
        score: s + 0.5

Block structure is read with Python's own :mod:`tokenize` (so comments, blank
lines, bracket continuation and indentation behave as in Python) and every
expression with :mod:`ast` in ``eval`` mode. Nothing here knows about sympy: the
lowering to the IR (:mod:`attncc.ir`) walks the ``ast`` nodes kept here and
reports its own errors through :meth:`SpecExpr.span_of`.
"""

from __future__ import annotations

import ast
import io
import os
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Span, SpecError

#: clause keywords a pattern body may contain, with what each one expects.
CLAUSES = {
    "grid": "1 to 3 spatial axis names, e.g. 'grid: y, x' (q, k, v are then (B, H, *grid, D))",
    "mask": "a boolean expression of b, h, q, kv (which query/key pairs exist)",
    "score": "an expression of s (the scaled dot product) giving the new score",
    "normalize": "softmax (default) or sigmoid (p = sigmoid(score), no row normalization)",
    "sink": "a sink logit (an expression of b, h and q): exp(sink) joins the softmax denominator",
    "gate": "an expression of b, h, q, dv (output feature) multiplying the normalized output",
    "route": "run-time top-k block routing, e.g. 'route: topk(8, block=64, pool=mean)' (MoBA / NSA selection)",
}
DECLARATIONS = ("param", "tensor")
PARAM_TYPES = {"int": int, "float": float, "bool": bool}
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "float64", "int32", "int64", "int16", "int8", "uint8", "bool")
#: index variables, the score variable and the size names every expression may use.
INDEX_NAMES = ("b", "h", "q", "kv")
SIZE_NAMES = ("B", "H", "Hkv", "Lq", "Lk", "D", "Dv")
#: run-time sizes of grid axes 0..2 (1 for axes a pattern does not declare); specs name them
#: by the upper-case axis name (``grid: y, x`` -> ``Y``, ``X``)
GRID_SIZE_NAMES = ("G0", "G1", "G2")
RESERVED = set(INDEX_NAMES) | set(SIZE_NAMES) | {"s", "True", "False", "inf"}


@dataclass(frozen=True, eq=False)
class SpecExpr:
    """An expression of the spec language, kept as a Python ``ast`` node.

    Attributes:
        text: the expression's source text.
        node: the parsed ``ast.expr``.
        file: source file name; ``line``/``col``: 1-based position of ``text``'s
            first character in the file.
        lines: all source lines of the file (to quote them in errors).
    """

    text: str
    node: ast.expr
    file: str
    line: int
    col: int
    lines: tuple[str, ...] = field(repr=False)

    def span_of(self, node: ast.AST | None = None) -> Span:
        """Return the file :class:`Span` of ``node`` (a node inside this expression)."""
        node = node or self.node
        rel_line = getattr(node, "lineno", 1)
        line_no = self.line + rel_line - 1
        src = self.lines[line_no - 1] if 0 < line_no <= len(self.lines) else ""
        base = self.col - 1 if rel_line == 1 else 0
        rel_text = self.text.splitlines()[rel_line - 1] if self.text else ""
        col = base + _char_col(rel_text, getattr(node, "col_offset", 0))
        end_line = getattr(node, "end_lineno", rel_line)
        if end_line == rel_line and getattr(node, "end_col_offset", None) is not None:
            length = _char_col(rel_text, node.end_col_offset) - _char_col(rel_text, node.col_offset)
        else:
            length = len(src) - col
        return Span(self.file, line_no, col + 1, src.rstrip("\n"), max(1, length))


def _char_col(text: str, byte_offset: int) -> int:
    """Convert an ``ast`` UTF-8 byte offset within ``text`` to a character offset."""
    return len(text.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))


@dataclass(frozen=True, eq=False)
class ParamDecl:
    """``param NAME: int|float|bool = DEFAULT``: a compile-time constant.

    ``default`` is ``None`` when no default is given (then the value must be
    passed to :func:`attncc.compile`).
    """

    name: str
    type: str
    default: object
    span: Span


@dataclass(frozen=True, eq=False)
class TensorDecl:
    """``tensor NAME: DTYPE[DIM, ...]``: a run-time input passed by keyword.

    ``dims`` are expressions of integers, size names and params.
    """

    name: str
    dtype: str
    dims: tuple[SpecExpr, ...]
    span: Span


@dataclass(frozen=True, eq=False)
class PatternSpec:
    """One parsed ``pattern NAME:`` block.

    Attributes:
        name: the pattern name.
        doc: its docstring ('' when absent).
        params / tensors: declarations in source order.
        clauses: clause keyword -> :class:`SpecExpr` (e.g. ``"mask"``, ``"score"``).
        span: location of the ``pattern`` line.
        source: the whole text of the file the block came from.
    """

    name: str
    doc: str
    params: tuple[ParamDecl, ...]
    tensors: tuple[TensorDecl, ...]
    clauses: dict
    span: Span
    source: str = field(repr=False, default="")

    @property
    def file(self) -> str:
        return self.span.file


@dataclass
class _LogicalLine:
    level: int
    tokens: list  # tokenize.TokenInfo without NL/COMMENT/NEWLINE


def _span(file: str, lines: list[str], row: int, col0: int, length: int = 1) -> Span:
    text = lines[row - 1].rstrip("\n") if 0 < row <= len(lines) else ""
    return Span(file, row, col0 + 1, text, max(1, length))


def _tok_span(file: str, lines: list[str], tok: tokenize.TokenInfo) -> Span:
    (r0, c0), (r1, c1) = tok.start, tok.end
    return _span(file, lines, r0, c0, (c1 - c0) if r1 == r0 else len(lines[r0 - 1]) - c0)


def _logical_lines(text: str, file: str, lines: list[str]) -> list[_LogicalLine]:
    out: list[_LogicalLine] = []
    level = 0
    cur: list = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.INDENT:
                level += 1
            elif tok.type == tokenize.DEDENT:
                level -= 1
            elif tok.type in (tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER):
                continue
            elif tok.type == tokenize.NEWLINE:
                if cur:
                    out.append(_LogicalLine(level, cur))
                cur = []
            elif tok.type == tokenize.ERRORTOKEN and tok.string.isspace():
                continue
            else:
                if not cur and tok.type == tokenize.ERRORTOKEN:
                    raise SpecError(f"unexpected character {tok.string!r}", _tok_span(file, lines, tok))
                cur.append(tok)
    except tokenize.TokenError as e:
        msg, (row, col) = e.args
        row = min(row, len(lines)) or 1
        if "multi-line statement" in msg:
            # find the unclosed bracket to point at it
            raise SpecError("unclosed bracket: expected a matching ')' or ']' before the end of the file",
                            _unclosed_bracket_span(file, lines, cur) or _span(file, lines, row, 0)) from None
        raise SpecError(f"could not read the spec: {msg}", _span(file, lines, row, col)) from None
    except IndentationError as e:
        raise SpecError(f"bad indentation: {e.msg}", _span(file, lines, e.lineno or 1, 0)) from None
    if cur:
        out.append(_LogicalLine(level, cur))
    return out


def _unclosed_bracket_span(file, lines, toks) -> Span | None:
    stack = []
    for t in toks:
        if t.string in "([{":
            stack.append(t)
        elif t.string in ")]}" and stack:
            stack.pop()
    return _tok_span(file, lines, stack[-1]) if stack else None


def _expr_after(tokens: list, idx: int, file: str, lines: list[str], what: str, anchor) -> SpecExpr:
    """Parse the tokens ``tokens[idx:]`` of one logical line as an expression."""
    if idx >= len(tokens):
        sp = _tok_span(file, lines, anchor)
        raise SpecError(f"expected {what} after '{anchor.string}'", Span(sp.file, sp.line, sp.col + sp.length, sp.text, 1))
    first, last = tokens[idx], tokens[-1]
    (r0, c0), (r1, c1) = first.start, last.end
    if r0 == r1:
        src = lines[r0 - 1][c0:c1]
    else:
        src = lines[r0 - 1][c0:] + "".join(lines[r0:r1 - 1]) + lines[r1 - 1][:c1]
    try:
        node = ast.parse(src, mode="eval").body
    except (RecursionError, MemoryError):
        raise SpecError(f"{what} is nested too deeply", _span(file, lines, r0, c0)) from None
    except SyntaxError as e:
        rel_line = e.lineno or 1
        rel_col = (e.offset or 1) - 1
        row = r0 + rel_line - 1
        col = (c0 if rel_line == 1 else 0) + rel_col
        msg = e.msg
        if msg.startswith("invalid syntax"):
            msg = "invalid syntax"
        raise SpecError(f"{msg} in {what}", _span(file, lines, row, min(col, max(0, len(lines[row - 1].rstrip()) - 1)))) from None
    return SpecExpr(src, node, file, r0, c0 + 1, tuple(lines))


def parse(text: str, file: str = "<string>") -> list[PatternSpec]:
    """Parse ``.attn`` source text into its pattern blocks.

    Args:
        text: the spec source.
        file: the file name used in error locations.

    Returns:
        The :class:`PatternSpec` of each ``pattern`` block, in source order.

    Raises:
        SpecError: syntax errors, unknown keywords, duplicate clauses / patterns /
            declarations, bad param defaults or tensor dtypes; the message points
            to ``file:line:col``. Name and type errors inside expressions are found
            by :func:`attncc.ir.lower`.
    """
    lines = text.splitlines(keepends=True)
    if not lines or not text.endswith("\n"):
        text += "\n"
        lines = text.splitlines(keepends=True)
    logical = _logical_lines(text, file, lines)
    patterns: list[PatternSpec] = []
    seen: dict[str, Span] = {}
    cur = None  # dict under construction
    for ll in logical:
        toks = ll.tokens
        head = toks[0]
        if ll.level == 0:
            if cur is not None:
                patterns.append(_finish(cur, text))
                cur = None
            if head.string != "pattern":
                raise SpecError(f"expected 'pattern NAME:' at the top level, found {head.string!r}",
                                _tok_span(file, lines, head))
            if len(toks) < 2 or toks[1].type != tokenize.NAME:
                raise SpecError("expected a pattern name after 'pattern'", _tok_span(file, lines, toks[min(1, len(toks) - 1)]))
            name_tok = toks[1]
            if len(toks) < 3 or toks[2].string != ":":
                raise SpecError(f"expected ':' after 'pattern {name_tok.string}'", _tok_span(file, lines, toks[min(2, len(toks) - 1)]))
            if len(toks) > 3:
                raise SpecError("unexpected text after 'pattern NAME:' (the body goes on the next, indented lines)",
                                _tok_span(file, lines, toks[3]))
            name = name_tok.string
            sp = _tok_span(file, lines, name_tok)
            if name in seen:
                raise SpecError(f"duplicate pattern {name!r} (first defined at line {seen[name].line})", sp)
            seen[name] = sp
            cur = dict(name=name, doc="", params=[], tensors=[], clauses={}, span=sp, n_stmts=0, file=file)
            continue
        if cur is None:
            raise SpecError("unexpected indentation: statements belong inside a 'pattern NAME:' block",
                            _tok_span(file, lines, head))
        if ll.level > 1:
            raise SpecError("unexpected indentation", _tok_span(file, lines, head))
        _parse_statement(cur, toks, file, lines)
        cur["n_stmts"] += 1
    if cur is not None:
        patterns.append(_finish(cur, text))
    if not patterns:
        raise SpecError("the spec holds no 'pattern NAME:' block", _span(file, lines or [""], 1, 0))
    return patterns


def _finish(cur: dict, text: str) -> PatternSpec:
    return PatternSpec(cur["name"], cur["doc"], tuple(cur["params"]), tuple(cur["tensors"]),
                       dict(cur["clauses"]), cur["span"], text)


def _declared(cur: dict, name: str) -> Span | None:
    for d in cur["params"] + cur["tensors"]:
        if d.name == name:
            return d.span
    return None


def _parse_statement(cur: dict, toks: list, file: str, lines: list[str]) -> None:
    head = toks[0]
    if head.type == tokenize.STRING and len(toks) == 1:
        if cur["n_stmts"] != 0:
            raise SpecError("a docstring must be the first statement of a pattern", _tok_span(file, lines, head))
        try:
            cur["doc"] = ast.literal_eval(head.string).strip()
        except (ValueError, SyntaxError):
            raise SpecError("malformed docstring", _tok_span(file, lines, head)) from None
        return
    kw = head.string
    if kw in DECLARATIONS:
        if len(toks) < 2 or toks[1].type != tokenize.NAME:
            raise SpecError(f"expected a name after '{kw}'", _tok_span(file, lines, toks[min(1, len(toks) - 1)]))
        name_tok = toks[1]
        name = name_tok.string
        sp = _tok_span(file, lines, name_tok)
        if name in RESERVED:
            raise SpecError(f"{name!r} is a reserved name (index variables, size names and 's' cannot be redeclared)", sp)
        if (prev := _declared(cur, name)) is not None:
            raise SpecError(f"duplicate declaration of {name!r} (first declared at line {prev.line})", sp)
        if len(toks) < 3 or toks[2].string != ":":
            raise SpecError(f"expected ':' after '{kw} {name}'", _tok_span(file, lines, toks[min(2, len(toks) - 1)]))
        if kw == "param":
            cur["params"].append(_parse_param(name, sp, toks, file, lines))
        else:
            cur["tensors"].append(_parse_tensor(name, sp, toks, file, lines))
        return
    if kw in CLAUSES:
        if len(toks) < 2 or toks[1].string != ":":
            raise SpecError(f"expected ':' after '{kw}'", _tok_span(file, lines, toks[min(1, len(toks) - 1)]))
        sp = _tok_span(file, lines, head)
        if kw in cur["clauses"]:
            first = cur["clauses"][kw]
            raise SpecError(f"duplicate '{kw}' clause (first given at line {first.line})", sp)
        cur["clauses"][kw] = _expr_after(toks, 2, file, lines, f"the {kw} expression", toks[1])
        return
    expected = ", ".join(["param", "tensor", *CLAUSES])
    raise SpecError(f"unknown statement {kw!r} (expected one of: {expected}, or a docstring)",
                    _tok_span(file, lines, head))


def _parse_param(name, sp, toks, file, lines) -> ParamDecl:
    if len(toks) < 4 or toks[3].string not in PARAM_TYPES:
        bad = toks[min(3, len(toks) - 1)]
        raise SpecError(f"expected a param type (int, float or bool), found {bad.string!r}", _tok_span(file, lines, bad))
    ptype = toks[3].string
    if len(toks) == 4:
        return ParamDecl(name, ptype, None, sp)
    if toks[4].string != "=":
        raise SpecError("expected '= DEFAULT' after the param type", _tok_span(file, lines, toks[4]))
    expr = _expr_after(toks, 5, file, lines, "a default value", toks[4])
    try:
        value = ast.literal_eval(expr.node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        raise SpecError("a param default must be a literal number or True/False", expr.span_of()) from None
    value = check_param_value(name, ptype, value, expr.span_of())
    return ParamDecl(name, ptype, value, sp)


def check_param_value(name: str, ptype: str, value, span: Span | None = None):
    """Check/convert a param value against its declared type.

    Raises:
        SpecError: (with ``span``) when ``value`` does not fit ``ptype``.
    """
    if ptype == "bool":
        if not isinstance(value, bool):
            raise SpecError(f"param {name!r} is bool, got {value!r}", span)
        return value
    if ptype == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise SpecError(f"param {name!r} is int, got {value!r}", span)
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"param {name!r} is float, got {value!r}", span)
    return float(value)


def _parse_tensor(name, sp, toks, file, lines) -> TensorDecl:
    expr = _expr_after(toks, 3, file, lines, "a tensor type like float32[H, Lk]", toks[2])
    node = expr.node
    if not isinstance(node, ast.Subscript) or not isinstance(node.value, ast.Name):
        raise SpecError("expected a tensor type like float32[H, Lk]", expr.span_of())
    dtype = node.value.id
    if dtype not in TENSOR_DTYPES:
        raise SpecError(f"unknown tensor dtype {dtype!r} (expected one of: {', '.join(TENSOR_DTYPES)})",
                        expr.span_of(node.value))
    dims_nodes = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    if not dims_nodes:
        raise SpecError("a tensor needs at least one dimension", expr.span_of(node))
    dims = tuple(SpecExpr(expr.text, d, expr.file, expr.line, expr.col, expr.lines) for d in dims_nodes)
    return TensorDecl(name, dtype, dims, sp)


def load(spec, pattern: str | None = None) -> PatternSpec:
    """Return one :class:`PatternSpec` from a spec given as text, a path or a parsed pattern.

    Args:
        spec: ``.attn`` source text, a ``str``/``os.PathLike`` path to a ``.attn``
            file, or a :class:`PatternSpec`.
        pattern: the pattern name to pick when the spec holds several.

    Raises:
        SpecError: parse errors; ``pattern`` not found; several patterns and no
            ``pattern`` given (ambiguous).
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(spec, PatternSpec):
        if pattern is not None and pattern != spec.name:
            raise SpecError(f"pattern {pattern!r} requested but the spec given is pattern {spec.name!r}")
        return spec
    text, file = read_spec(spec)
    if isinstance(spec, str) and spec.strip().isidentifier() and file == "<string>":
        from .library import library_patterns

        if spec.strip() in library_patterns():
            raise SpecError(f"{spec.strip()!r} is the name of a library pattern, not spec text: use "
                            f"attncc.compile(attncc.pattern_path({spec.strip()!r}))")
    pats = parse(text, file)
    if pattern is None:
        if len(pats) > 1:
            names = ", ".join(p.name for p in pats)
            raise SpecError(f"{file} holds several patterns ({names}): pass pattern=NAME to pick one")
        return pats[0]
    for p in pats:
        if p.name == pattern:
            return p
    names = ", ".join(p.name for p in pats)
    raise SpecError(f"no pattern {pattern!r} in {file} (it holds: {names})")


def read_spec(spec) -> tuple[str, str]:
    """Return ``(text, file_name)`` for a spec given as text or as a path."""
    if isinstance(spec, os.PathLike):
        p = Path(spec)
        return p.read_text(), str(p)
    if isinstance(spec, str):
        if "\n" not in spec and (spec.endswith(".attn") or os.path.exists(spec)):
            p = Path(spec)
            if not p.exists():
                raise FileNotFoundError(f"spec file not found: {spec}")
            return p.read_text(), str(p)
        return spec, "<string>"
    raise TypeError(f"spec must be .attn text, a path or a PatternSpec, got {type(spec).__name__}")
