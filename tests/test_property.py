"""Hypothesis: random compositions of mask atoms and score terms compile and match the reference."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc
from attncc.dense import dense_mask, nonempty_tiles
from attncc.inputs import example_inputs

from conftest import max_err

ints = st.integers(min_value=1, max_value=40)

MASK_ATOMS = [
    st.just("kv <= q"),
    st.just("kv <= q + Lk - Lq"),
    ints.map(lambda w: f"q - kv < {w}"),
    ints.map(lambda w: f"abs(q - kv) <= {w}"),
    ints.map(lambda p: f"kv < {p}"),
    ints.map(lambda p: f"kv >= {p}"),
    ints.map(lambda p: f"q >= {p}"),
    st.integers(2, 5).map(lambda d: f"(q - kv) % {d} == 0"),
    st.integers(2, 20).map(lambda P: f"q // {P} == kv // {P}"),
    st.integers(2, 20).map(lambda P: f"kv // {P} <= q // {P}"),
    st.just("h == 0 or kv <= q"),
    st.just("doc[q] == doc[kv]"),
    st.just("flag[kv]"),
    st.just("max(q, kv) < 2 * min(q, kv) + 3"),
]

SCORE_TERMS = [
    st.just("s"),
    st.floats(0.25, 2.0).map(lambda c: f"s * {c:.3f}"),
    st.floats(1.0, 30.0).map(lambda c: f"{c:.3f} * tanh(s / {c:.3f})"),
    st.just("s + slope[h] * (kv - q)"),
    st.floats(0.01, 0.5).map(lambda a: f"s - {a:.3f} * abs(q - kv)"),
    st.just("where(kv < q, s, s * 0.5)"),
    st.just("s + floor(q / 3) * 0.1 - ceil(kv / 5) * 0.05"),
    st.just("sigmoid(s) + s"),
    st.just("s + bias[h, q % 4]"),
    st.just("max(s, -2.0) + exp2(-(kv % 3))"),
    st.just("s * (1.0 + 0.1 * slope[h]) + bias[h, kv % 4]"),
    st.just("s + bias[h, abs(kv - q) % 4] * slope[h]"),
]


@st.composite
def masks(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        return draw(st.one_of(*MASK_ATOMS))
    op = draw(st.sampled_from(["and", "or", "not"]))
    a = draw(masks(depth - 1))
    if op == "not":
        return f"not ({a})"
    return f"({a}) {op} ({draw(masks(depth - 1))})"


@st.composite
def specs(draw):
    mask = draw(st.one_of(st.none(), masks()))
    score = draw(st.one_of(*SCORE_TERMS))
    body = ["    tensor doc: int32[Lk]", "    tensor flag: bool[Lk]", "    tensor slope: float32[H]",
            "    tensor bias: float32[H, 4]"]
    if mask is not None:
        body.append(f"    mask: {mask}")
    body.append(f"    score: {score}")
    return "pattern random:\n" + "\n".join(body) + "\n"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), Lq=st.integers(1, 80), extra=st.integers(0, 40), gqa=st.booleans(),
       D=st.sampled_from([16, 24]), seed=st.integers(0, 1000))
def test_random_specs_match_reference(spec, Lq, extra, gqa, D, seed):
    Lk = Lq + extra  # doc[q] needs Lq <= Lk
    kern = attncc.compile(spec)
    H, Hkv = (2, 1) if gqa else (2, 2)
    q, k, v, tens, sizes = example_inputs(kern.ir, 1, H, Hkv, Lq, Lk, D, seed=seed)
    out, lse = kern(q, k, v, return_lse=True, **tens)
    ref, rlse = attncc.reference(spec, q, k, v, return_lse=True, **tens)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert max_err(out, ref) < 5e-5, spec
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)), spec
    # tile skipping never drops a non-empty tile; table and exact closed forms visit exactly those
    st_ = kern.tile_stats(Lq, Lk, B=1, H=H, **{n: tens[n] for n in kern.plan.mask_tensors})
    ne = nonempty_tiles(dense_mask(kern.ir, sizes, tens, "cpu"), st_["block_m"], st_["block_n"])
    assert st_["visited"] >= ne, spec
    if kern.plan.path == "table":
        assert st_["visited"] == ne, spec


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), Lq=st.integers(1, 70), extra=st.integers(0, 30), gqa=st.booleans(), seed=st.integers(0, 1000))
def test_random_specs_gradients_match_reference(spec, Lq, extra, gqa, seed):
    Lk = Lq + extra
    kern = attncc.compile(spec)
    H, Hkv = (2, 1) if gqa else (2, 2)
    q, k, v, tens, _ = example_inputs(kern.ir, 1, H, Hkv, Lq, Lk, 16, seed=seed)
    go = torch.randn(1, H, Lq, 16, generator=torch.Generator().manual_seed(seed))

    def grads(fn, dtype):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        ts = {n: t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for n, t in tens.items()}
        (fn(*xs, **ts) * go.to(dtype)).sum().backward()
        # q, k, v, then the float spec tensors (a tensor the score does not read: zero gradient)
        return [x.grad for x in xs] + [t.grad if t.grad is not None else torch.zeros_like(t)
                                       for t in ts.values() if t.is_floating_point()]

    got = grads(lambda a, b, c, **t: kern(a, b, c, **t), torch.float32)
    want = grads(lambda a, b, c, **t: attncc.reference(spec, a, b, c, **t), torch.float64)
    for a, b in zip(got, want):
        assert not torch.isnan(a).any(), spec
        assert max_err(a, b) < 1e-4 * (1 + b.abs().max().item()), spec
