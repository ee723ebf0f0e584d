"""Every SpecError case of the spec language, with its file:line:col and caret."""

import pytest

import attncc
from attncc import SpecError

CASES = [
    # (source, line, col, fragment of the message)
    ("pattern a:\n    mask: kv <= (q\n", 2, 17, "unclosed bracket"),
    ("pattern a:\n    mask: kv <= q +\n", 2, None, "invalid syntax"),
    ("pattern a:\n    mask: qq <= kv\n", 2, 11, "unknown name 'qq'"),
    ("pattern a:\n    score: s + window\n", 2, 16, "unknown name 'window'"),
    ("pattern a:\n    mask: s > 0\n", 2, 11, "'s' (the score) cannot be used in a mask"),
    ("pattern a:\n    mask: kv + q\n", 2, 11, "must be a boolean expression"),
    ("pattern a:\n    mask: kv and q\n", 2, 11, "'and' needs boolean operands"),
    ("pattern a:\n    score: kv <= q\n", 2, 12, "must be a number"),
    ("pattern a:\n    tensor t: float32[H]\n    score: s + t[h, q]\n", 3, 16, "indexed with 2 indexes"),
    ("pattern a:\n    tensor t: float32[H, Lk]\n    score: s + t\n", 3, 16, "must be indexed with 2 indexes"),
    ("pattern a:\n    score: s + foo(q)\n", 2, 16, "unknown function 'foo'"),
    ("pattern a:\n    score: s + exp(q, kv)\n", 2, 16, "exp() takes 1 argument, got 2"),
    ("pattern a:\n    score: where(kv < q, s)\n", 2, 12, "where() takes 3 arguments, got 2"),
    ("pattern a:\n    score: s + where(q, s, 0)\n", 2, 22, "condition of where"),
    ("pattern a:\n    mask: kv <= q\n    mask: kv < q\n", 3, 5, "duplicate 'mask' clause (first given at line 2)"),
    ("pattern a:\n    score: s\n    score: s * 2\n", 3, 5, "duplicate 'score' clause"),
    ("pattern a:\n    mask: kv <= q\npattern a:\n    mask: kv < q\n", 3, 9, "duplicate pattern 'a'"),
    ("pattern a:\n    masks: kv <= q\n", 2, 5, "unknown statement 'masks'"),
    ("pattern a:\n    param w: int = 1\n    param w: int = 2\n", 3, 11, "duplicate declaration of 'w'"),
    ("pattern a:\n    param q: int = 1\n", 2, 11, "reserved name"),
    ("pattern a:\n    param w: int = 1.5\n", 2, 20, "param 'w' is int"),
    ("pattern a:\n    param w: string = 1\n", 2, 14, "expected a param type"),
    ("pattern a:\n    tensor t: float33[H]\n", 2, 15, "unknown tensor dtype 'float33'"),
    ("pattern a:\n    tensor t: float32[H, q]\n", 2, 26, "unknown name 'q' in a tensor dimension"),
    ("pattern a:\n    mask: kv[0] <= q\n", 2, 11, "only tensors can be indexed"),
    ("pattern a:\n    tensor t: float32[H]\n    mask: t[h] <= q and kv <= q\n", 3, 11, None),  # float compare is fine -> no error
    ("    mask: kv <= q\n", 1, 5, "unexpected indentation"),
    ("mask: kv <= q\n", 1, 1, "expected 'pattern NAME:'"),
    ("pattern a:\n    \"\"\"doc\"\"\"\n    mask: kv <= q\n    \"\"\"late\"\"\"\n", 4, 5, "docstring must be the first statement"),
    ("pattern a:\n    mask: kv <= q  # fine\n    score: s +\n", 3, None, "invalid syntax in the score expression"),
    ("pattern a:\n    mask: kv ~ q\n", 2, None, "invalid syntax"),
    ("pattern a:\n    score: s + q.y\n", 2, 16, "attribute access"),
    ("pattern a:\n    score: s / 0\n", 2, 16, "division by zero"),
    ("", 1, 1, "holds no 'pattern NAME:' block"),
]


@pytest.mark.parametrize("src,line,col,frag", CASES)
def test_spec_error_location(src, line, col, frag):
    if frag is None:  # a valid spec in the list, to keep the cases honest
        attncc.lower(src)
        return
    with pytest.raises(SpecError) as ei:
        attncc.lower(src)
    e = ei.value
    msg = str(e)
    assert frag in msg, msg
    assert e.span is not None
    assert e.span.line == line, msg
    if col is not None:
        assert e.span.col == col, msg
    first = msg.splitlines()[0]
    assert first.startswith(f"<string>:{line}:{e.span.col}: error:"), first
    if src:
        # the offending line is quoted and a caret points at the column
        lines = msg.splitlines()
        assert lines[1].strip() == src.splitlines()[line - 1].strip()
        caret_col = lines[2].index("^") - 4 + 1
        assert caret_col == e.span.col


def test_file_name_in_location(tmp_path):
    f = tmp_path / "bad.attn"
    f.write_text("pattern a:\n    mask: kv <= qq\n")
    with pytest.raises(SpecError, match=r"bad.attn:2:17: error: unknown name 'qq'"):
        attncc.compile(f)


def test_pattern_selection(tmp_path):
    f = tmp_path / "two.attn"
    f.write_text("pattern a:\n    mask: kv <= q\n\npattern b:\n    mask: kv >= q\n")
    with pytest.raises(SpecError, match="several patterns"):
        attncc.lower(f)
    with pytest.raises(SpecError, match="no pattern 'c'"):
        attncc.lower(f, pattern="c")
    assert attncc.lower(f, pattern="b").name == "b"
    assert attncc.lower(str(f), pattern="a").name == "a"


def test_params_override_and_errors():
    src = "pattern w:\n    param window: int = 8\n    mask: q - kv < window\n"
    assert dict(attncc.lower(src, window=3).params) == {"window": 3}
    with pytest.raises(TypeError, match="no param 'widow'"):
        attncc.lower(src, widow=3)
    with pytest.raises(SpecError, match="param 'window' is int"):
        attncc.lower(src, window="x")
    with pytest.raises(TypeError, match="has no default"):
        attncc.lower("pattern w:\n    param window: int\n    mask: q - kv < window\n")


# ---------------------------------------------------------------- hints for the usual first mistakes
@pytest.mark.parametrize("op, word", [("&", "and"), ("|", "or")])
def test_bitwise_operators_suggest_and_or(op, word):
    with pytest.raises(SpecError, match=f"write '{word}'") as e:
        attncc.compile(f"pattern a:\n    mask: (kv <= q) {op} (q - kv < 4)\n")
    assert "<string>:2:11" in str(e.value)
    with pytest.raises(SpecError, match="write 'not'"):
        attncc.compile("pattern a:\n    mask: ~(kv > q)\n")


def test_param_without_default_is_a_spec_error_at_its_declaration():
    with pytest.raises(SpecError, match="param 'w' of pattern 'a' has no default") as e:
        attncc.compile("pattern a:\n    param w: int\n    mask: q - kv < w\n")
    assert "<string>:2:11" in str(e.value) and isinstance(e.value, TypeError)
    assert attncc.compile("pattern a:\n    param w: int\n    mask: q - kv < w\n", w=3).ir.params == (("w", 3),)


def test_library_name_as_spec_suggests_pattern_path():
    with pytest.raises(SpecError, match=r"attncc.pattern_path\('causal'\)"):
        attncc.compile("causal")


def test_param_at_call_time_says_it_is_compile_time():
    import torch

    kern = attncc.compile(attncc.pattern_path("sliding_window"))
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(TypeError, match=r"'window' is a compile-time param .*attncc.compile\(spec, window=VALUE\)"):
        kern(q, q, q, window=4)


def test_second_compile_of_the_same_spec_is_the_same_object(monkeypatch):
    """In a process, compile() of the same spec text, pattern and params returns the first result
    without lowering again (the compile-latency numbers are in the closing note, not timed here)."""
    src = "pattern memo_probe:\n    param w: int = 4\n    mask: kv <= q and q - kv < w\n"
    k1 = attncc.compile(src, w=5)
    import attncc.compiler as C

    monkeypatch.setattr(C, "lower", lambda *a, **k: (_ for _ in ()).throw(AssertionError("lowered again")))
    assert attncc.compile(src, w=5) is k1
    with pytest.raises(AssertionError, match="lowered again"):
        attncc.compile(src, w=6)
