"""Parser / lowering / analysis fuzzing: for any spec text, only SpecError escapes.

Two hypothesis strategies, together well over 2,000 inputs per run: random specs from a
grammar of the spec language (masks, scores, sinks, gates, grids, params and tensors,
with the constants that broke the compiler: 0, 0.0, huge integers, 1e400, inf, nan-making
folds) and library specs mutated character-wise. Each input goes through parse, lower,
plan and the kernel source rendering (no launch); the test fails on any exception other
than :class:`attncc.SpecError`, and every SpecError must carry a file location.
"""

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

import attncc
from attncc import SpecError, codegen
from attncc.ir import lower
from attncc.passes import plan

NUM_LEAVES = ["q", "kv", "h", "b", "Lq", "Lk", "H", "0", "1", "2", "7", "-3", "0.0", "0.5", "3.5", "0.1",
              "2 ** 31", "10 ** 20", "1e400", "inf", "w", "doc[kv]", "doc[q]", "tab[h]", "tab[doc[kv] % 4]"]
SCORE_LEAVES = NUM_LEAVES + ["s", "s", "s"]
GRID_LEAVES = ["q.x", "q.y", "kv.x", "kv.y", "X", "Y", "1", "3", "0"]
FUNCS1 = ["log", "exp", "sqrt", "floor", "ceil", "abs", "tanh", "sigmoid", "exp2", "log2"]
BINOPS = ["+", "-", "*", "/", "//", "%", "**"]
CMPS = ["<", "<=", ">", ">=", "==", "!="]

HEADER = ("pattern fz:\n    param w: int = 4\n    tensor doc: int32[Lk]\n    tensor tab: float32[H]\n")
GRID_HEADER = "pattern fz:\n    grid: y, x\n    param w: int = 4\n"


def num_expr(rnd, leaves, depth=3) -> str:
    """A random numeric expression text over ``leaves``."""
    if depth == 0 or rnd.random() < 0.3:
        return rnd.choice(leaves)
    k = rnd.randrange(5)
    a = num_expr(rnd, leaves, depth - 1)
    if k == 0:
        return f"({a} {rnd.choice(BINOPS)} {num_expr(rnd, leaves, depth - 1)})"
    if k == 1:
        return f"{rnd.choice(FUNCS1)}({a})"
    if k == 2:
        return f"{rnd.choice(['min', 'max'])}({a}, {num_expr(rnd, leaves, depth - 1)})"
    if k == 3:
        return f"clamp({a}, {rnd.choice(leaves)}, {rnd.choice(leaves)})"
    return f"-{a}"


def bool_expr(rnd, leaves, depth=2) -> str:
    """A random boolean expression text (comparisons joined by and / or / not)."""
    if depth == 0 or rnd.random() < 0.5:
        if rnd.random() < 0.1:
            return rnd.choice(["True", "False"])
        return f"{num_expr(rnd, leaves, 2)} {rnd.choice(CMPS)} {num_expr(rnd, leaves, 2)}"
    if rnd.random() < 0.2:
        return f"not ({bool_expr(rnd, leaves, depth - 1)})"
    return f"({bool_expr(rnd, leaves, depth - 1)} {rnd.choice(['and', 'or'])} {bool_expr(rnd, leaves, depth - 1)})"


def random_spec(rnd) -> str:
    """A whole spec: 1-D (mask, score, sink, gate clauses) or a 2-D grid (mask, score)."""
    if rnd.random() < 0.25:
        lines = [GRID_HEADER, f"    mask: {bool_expr(rnd, GRID_LEAVES)}\n"]
        if rnd.random() < 0.5:
            lines.append(f"    score: s + {num_expr(rnd, GRID_LEAVES)}\n")
        return "".join(lines)
    lines = [HEADER]
    if rnd.random() < 0.7:
        lines.append(f"    mask: {bool_expr(rnd, NUM_LEAVES)}\n")
    if rnd.random() < 0.5:
        lines.append(f"    score: {num_expr(rnd, SCORE_LEAVES)}\n")
    if rnd.random() < 0.2:
        lines.append(f"    sink: {num_expr(rnd, ['h', 'q', 'b', '0.5', 'tab[h]', 'log(0)', '1 / 0.0'])}\n")
    if rnd.random() < 0.2:
        lines.append(f"    gate: {num_expr(rnd, ['h', 'q', 'dv', '0.5', 'tab[h]', 'sqrt(-1.0)'])}\n")
    return "".join(lines)


def mutated_spec(rnd, texts) -> str:
    """A library spec with a few characters inserted, deleted or replaced."""
    text = rnd.choice(texts)
    for _ in range(rnd.randint(1, 4)):
        i = rnd.randint(0, len(text))
        ch = rnd.choice(MUTATIONS)
        kind = rnd.randrange(3)
        text = text[:i] + ch + text[i:] if kind == 0 else text[:i] + text[i + 1:] if kind == 1 else \
            text[:i] + ch + text[i + 1:]
    return text


MUTATIONS = list("()[]:,.+-*/%<>=!~ \n\t0123456789qkvshbLlogé\"'#") + ["**", " and ", " or ", "inf", "1e400"]
#: IR keys planned already (a mutation inside a comment or docstring changes no IR)
_PLANNED: set = set()


def _pipeline(text: str, with_plan: bool = True) -> None:
    """parse + lower (+ plan) of every pattern of ``text``, as ``attncc.compile`` runs them
    before code generation; SpecError is the only exception allowed, and it must name its
    location."""
    from attncc.dsl import parse
    try:
        for pat in parse(text):
            ir = lower(pat)
            if with_plan and ir.key() not in _PLANNED:
                plan(ir)
                _PLANNED.add(ir.key())
    except SpecError as e:
        assert "error:" in str(e)
        if e.span is not None:
            assert e.span.line >= 1 and e.span.col >= 1


def fuzz(n: int) -> settings:
    """``n`` examples, no deadline (sympy's first calls are slow), no example database."""
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)


#: specs per hypothesis example (hypothesis draws the seed of each batch and shrinks it)
BATCH = 10


@fuzz(140)
@given(st.randoms(use_true_random=False))
def test_random_specs_raise_only_spec_errors(rnd):
    """1,400 random specs per run: all parsed and lowered, one in twenty planned (planning is
    the sympy-heavy part; the suite's time budget)."""
    plan_this_batch = rnd.random() < 0.5
    for i in range(BATCH):
        _pipeline(random_spec(rnd), with_plan=(i == 0 and plan_this_batch))


@fuzz(70)
@given(st.randoms(use_true_random=False))
def test_mutated_library_specs_raise_only_spec_errors(rnd):
    """700 mutated library specs per run, parsed and lowered; one in five planned (each
    distinct IR once)."""
    texts = sorted({p.read_text() for p in attncc.library_patterns().values()})
    for i in range(BATCH):
        _pipeline(mutated_spec(rnd, texts), with_plan=(i % 5 == 0))


def test_rendering_of_random_specs():
    """Code generation (the rest of ``attncc.compile``) on a few random specs."""
    import random
    rnd = random.Random(14)
    for _ in range(12):
        try:
            from attncc.dsl import parse
            for pat in parse(random_spec(rnd)):
                codegen.render_forward(plan(lower(pat)))
        except SpecError:
            pass
