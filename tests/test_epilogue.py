"""Beyond score_mod: sigmoid attention, attention sinks, fused output gates, low-rank bias
folding (FlashBias). Each pattern is checked against attncc.reference and against an
unfused torch composition written here (SDPA then * sigmoid(g); explicit sigmoid
attention; softmax with an extra sink column then dropped; SDPA with the materialised
U @ W^T bias), with gradients vs autograd of the composition."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc
from attncc.errors import SpecError
from attncc.inputs import example_inputs

from conftest import max_err

#: (B, Hq, Hkv, Lq, Lk, D, Dv): ragged, GQA, Lq != Lk both ways, decode row, Dv != D
SHAPES = [(1, 2, 2, 45, 45, 16, 16), (2, 4, 2, 33, 70, 32, 24), (1, 2, 1, 1, 37, 16, 16), (1, 2, 2, 50, 20, 16, 16)]


def _causal_br(Lq, Lk):
    """Bottom-right causal mask (the library's sink/gate patterns use top-left kv <= q)."""
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    return j <= i


def _expand_kv(x, Hq):
    return x.repeat_interleave(Hq // x.shape[1], dim=1)


def _sdpa(q, k, v, mask=None, bias=None):
    """Plain masked softmax attention in float64 with GQA (rows with no key: 0)."""
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    sc = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        sc = sc + bias
    if mask is not None:
        sc = sc.masked_fill(~mask, -math.inf)
    p = torch.softmax(sc, -1).nan_to_num(0.0)
    return p @ v


def _composition(name, q, k, v, tens):
    """The unfused torch version of each pattern (float64)."""
    Lq, Lk = q.shape[2], k.shape[2]
    m = _causal_br(Lq, Lk)
    if name == "gated_causal":
        return _sdpa(q, k, v, m) * torch.sigmoid(tens["g"].permute(0, 2, 1, 3))
    if name == "moh_output_weight":
        return _sdpa(q, k, v, m) * tens["w"].permute(0, 2, 1)[..., None]
    if name == "sigmoid_attention":
        kk, vv = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        return torch.sigmoid(q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1]) - math.log(Lk)) @ vv
    if name == "sink_window":
        kk, vv = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
        sc = (q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~((j <= i) & (i - j < 24)), -math.inf)
        sink = tens["sink"].view(1, -1, 1, 1).expand(*sc.shape[:3], 1)
        return torch.softmax(torch.cat([sc, sink], -1), -1)[..., :-1] @ vv
    if name == "lowrank_bias":
        return _sdpa(q, k, v, None, tens["U"] @ tens["W"].transpose(-1, -2))
    raise KeyError(name)


NAMES = ["gated_causal", "moh_output_weight", "sigmoid_attention", "sink_window", "lowrank_bias"]


@pytest.mark.parametrize("name", NAMES)
def test_epilogue_pattern_matches_composition_and_reference(name):
    path = attncc.pattern_path(name)
    params = {"window": 24} if name == "sink_window" else {}
    kern = attncc.compile(path, name, **params)
    for i, (B, H, Hkv, Lq, Lk, D, Dv) in enumerate(SHAPES):
        q, k, v, tens, _ = example_inputs(kern.ir, B, H, Hkv, Lq, Lk, D, Dv, seed=i)
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        ts = {n: t.clone().requires_grad_() for n, t in tens.items()}
        out = kern(*xs, **ts)
        ref = attncc.reference(path, q, k, v, pattern=name, **params, **tens)
        ys = [x.double().requires_grad_() for x in (q, k, v)]
        us = {n: t.double().requires_grad_() for n, t in tens.items()}
        comp = _composition(name, *ys, us)
        assert not torch.isnan(out).any()
        assert max_err(out, ref) < 2e-5, (name, i)
        assert max_err(out, comp) < 2e-5, (name, i)
        dout = torch.randn_like(out)
        out.backward(dout)
        comp.backward(dout.double())
        for a, b_ in zip(xs + list(ts.values()), ys + list(us.values())):
            assert a.grad is not None, name
            assert max_err(a.grad, b_.grad) < 1e-4 * (1 + b_.grad.abs().max().item()), (name, i)


def test_sink_fully_masked_rows_and_lse():
    """A row with no allowed key gives 0 output and LSE = the sink logit (never NaN)."""
    src = ("pattern s:\n    tensor sink: float32[H]\n    mask: kv <= q - 5\n    sink: sink[h]\n")
    kern = attncc.compile(src)
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 2, 20, 20, 16)
    out, lse = kern(q, k, v, return_lse=True, **tens)
    assert (out[:, :, :5] == 0).all() and not torch.isnan(out).any()
    assert torch.allclose(lse[0, :, :5], tens["sink"][:, None].expand(2, 5))
    ref, rlse = attncc.reference(src, q, k, v, return_lse=True, **tens)
    assert max_err(out, ref) < 2e-5 and max_err(lse, rlse) < 1e-5


def test_sigmoid_rejects_lse_and_masks_to_zero():
    src = "pattern s:\n    normalize: sigmoid\n    mask: kv <= q - 3\n"
    kern = attncc.compile(src)
    q, k, v, _, _ = example_inputs(kern.ir, 1, 1, 1, 10, 10, 16)
    with pytest.raises(ValueError, match="no log-sum-exp"):
        kern(q, k, v, return_lse=True)
    out = kern(q, k, v)
    assert (out[:, :, :3] == 0).all()
    assert max_err(out, attncc.reference(src, q, k, v)) < 2e-5


def test_lowrank_fold_is_explained_and_lowrank_spec_errors():
    kern = attncc.compile(attncc.pattern_path("lowrank_bias"))
    assert "dot(U[b, h, q], W[b, h, kv])" in kern.ir.pretty() and "folded into QK^T" in kern.ir.pretty()
    assert "folded" in attncc.explain(attncc.pattern_path("lowrank_bias"))
    text = attncc.explain(attncc.pattern_path("gated_causal"))
    assert "gradient of g (fused in the backward preprocessing" in text and "per output element" in text
    with pytest.raises(SpecError, match="must be added to s"):
        attncc.lower("pattern e:\n    tensor U: float32[B, H, Lq, 2]\n    tensor W: float32[B, H, Lk, 2]\n"
                     "    score: s * dot(U[b, h, q], W[b, h, kv])\n")
    with pytest.raises(SpecError, match="indexed by"):
        attncc.lower("pattern e:\n    tensor U: float32[B, H, Lq, 2]\n    tensor W: float32[B, H, Lk, 2]\n"
                     "    score: s + dot(U[b, h, kv], W[b, h, kv])\n")
    with pytest.raises(SpecError, match="gate multiplies the output row"):
        attncc.lower("pattern e:\n    tensor g: float32[Lk]\n    gate: g[kv]\n")
    with pytest.raises(SpecError, match="needs normalize: softmax"):
        attncc.lower("pattern e:\n    normalize: sigmoid\n    sink: 1.0\n")
    with pytest.raises(SpecError, match="softmax or sigmoid"):
        attncc.lower("pattern e:\n    normalize: relu\n")


def test_lowrank_under_softcap_folds():
    """dot() inside a function of s + dot() (softcap of the biased score) still folds."""
    src = ("pattern e:\n    tensor U: float32[B, H, Lq, 3]\n    tensor W: float32[B, H, Lk, 3]\n"
           "    mask: kv <= q\n    score: 20.0 * tanh((s + dot(U[b, h, q], W[b, h, kv])) / 20.0)\n")
    kern = attncc.compile(src)
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 2, 30, 30, 16)
    assert max_err(kern(q, k, v, **tens), attncc.reference(src, q, k, v, **tens)) < 2e-5


@st.composite
def epilogue_specs(draw):
    mask = draw(st.sampled_from(["kv <= q", "q - kv < 9 and kv <= q", "kv >= 4", "True"]))
    extra = draw(st.sampled_from(["none", "sink", "gate", "sigmoid", "lowrank", "sink+gate"]))
    lines = ["pattern p:", "    tensor sink: float32[H]", "    tensor g: float32[B, Lq, H, Dv]",
             "    tensor U: float32[B, Lq, 2]", "    tensor W: float32[B, H, Lk, 2]", f"    mask: {mask}"]
    if "sink" in extra:
        lines.append("    sink: sink[h]")
    if "gate" in extra:
        lines.append("    gate: sigmoid(g[b, q, h, dv])")
    if extra == "sigmoid":
        lines.append("    normalize: sigmoid")
    if extra == "lowrank":
        lines.append("    score: s + dot(U[b, q], W[b, h, kv])")
    shape = draw(st.sampled_from(SHAPES))
    return "\n".join(lines) + "\n", shape


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=epilogue_specs(), seed=st.integers(0, 1000))
def test_epilogue_property(case, seed):
    """Random mixes of masks with sinks, gates, sigmoid and dot(): kernel == reference, with gradients."""
    src, (B, H, Hkv, Lq, Lk, D, Dv) = case
    kern = attncc.compile(src)
    q, k, v, tens, _ = example_inputs(kern.ir, B, H, Hkv, Lq, Lk, D, Dv, seed=seed)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    ts = {n: t.clone().requires_grad_() for n, t in tens.items()}
    out = kern(*xs, **ts)
    ys = [x.double().requires_grad_() for x in (q, k, v)]
    us = {n: t.double().requires_grad_() for n, t in tens.items()}
    ref = attncc.reference(src, *ys, **us)
    assert max_err(out, ref) < 2e-5, src
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    for a, b_ in zip(xs + list(ts.values()), ys + list(us.values())):
        if b_.grad is None:
            assert a.grad is None or not a.grad.abs().any()
            continue
        ga = a.grad if a.grad is not None else torch.zeros_like(b_.grad)
        assert max_err(ga, b_.grad) < 1e-4 * (1 + b_.grad.abs().max().item()), src


def test_gated_training_under_torch_compile():
    """A gated-attention forward compiles with fullgraph=True and trains like eager."""
    kern = attncc.compile(attncc.pattern_path("gated_causal"))
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 2, 24, 24, 16, seed=3)
    g = tens["g"].clone().requires_grad_()

    def f(q, k, v, g):
        return kern(q, k, v, g=g).square().sum()

    eager = torch.autograd.grad(f(q, k, v, g), g)[0]
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, g), g)[0]
    assert max_err(eager, compiled) < 1e-5

def test_gate_reads_stay_inside_the_tensor_when_dv_is_padded():
    """Dv = 24 runs in BLOCK_DV = 32 lanes: the gate read g[b, q, h, dv] of a padded lane is
    clamped to the last column, not read past the tensor. Here the memory after g holds NaN
    (g a view at the start of a NaN-filled buffer): an unclamped read turned the padded
    lanes' gate into NaN, and 0 * NaN made the backward's row sum (delta) and so dq / dk NaN
    (the flaky NaN q-gradient of gated_causal, which depended on what the heap held)."""
    kern = attncc.compile(attncc.pattern_path("gated_causal"))
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 2, 5, 5, 16, 24, seed=0)
    n = tens["g"].numel()
    buf = torch.full((n + 64,), float("nan"))
    buf[:n] = tens["g"].flatten()
    g = buf[:n].view(tens["g"].shape).requires_grad_()
    qs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = kern(*qs, g=g)
    out.square().sum().backward()
    rs = [x.detach().clone().double().requires_grad_() for x in (q, k, v, tens["g"])]
    want = attncc.reference(attncc.pattern_path("gated_causal"), *rs[:3], g=rs[3])
    want.square().sum().backward()
    assert max_err(out, want) < 1e-5
    for got, ref in zip([*qs, g], rs):
        assert not torch.isnan(got.grad).any()
        assert max_err(got.grad, ref.grad) < 1e-4 * (1 + ref.grad.abs().max().item())



#: the four patterns of the issue's contract, verbatim (R is a free dimension)
CONTRACT = '''
pattern gated_causal:
    """Gated attention (Qiu et al. 2025): head-specific sigmoid gate after SDPA."""
    tensor g: float32[B, Lq, H, Dv]
    mask: kv <= q
    gate: sigmoid(g[b, q, h, dv])

pattern sigmoid_attention:
    """Sigmoid attention (Ramapuram et al. 2024, FlashSigmoid), b = -log(n)."""
    normalize: sigmoid
    score: s - log(Lk)

pattern sink_window:
    """Sliding window with a learned sink logit per head (gpt-oss, StreamingLLM)."""
    tensor sink: float32[H]
    param window: int = 128
    mask: kv <= q and q - kv < window
    sink: sink[h]

pattern lowrank_bias:
    """FlashBias: bias = U V^T of rank R, folded into the QK^T product."""
    tensor U: float32[B, H, Lq, R]
    tensor W: float32[B, H, Lk, R]
    score: s + dot(U[b, h, q], W[b, h, kv])
'''


@pytest.mark.parametrize("name", ["gated_causal", "sigmoid_attention", "sink_window", "lowrank_bias"])
def test_contract_text_compiles_and_matches_composition(name):
    """The issue's spec text as written (free rank R included) against the unfused compositions."""
    params = {"window": 24} if name == "sink_window" else {}
    kern = attncc.compile(CONTRACT, name, **params)
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 1, 29, 29, 16, seed=7)
    if name == "lowrank_bias":
        assert kern.ir.free_dims == ("R",)
        tens = {"U": torch.randn(1, 2, 29, 6) * 0.3, "W": torch.randn(1, 2, 29, 6) * 0.3}  # R = 6
    comp = _composition(name, q.double(), k.double(), v.double(), {n: t.double() for n, t in tens.items()})
    assert max_err(kern(q, k, v, **tens), comp) < 2e-5


def test_free_dimension_binding_and_errors():
    kern = attncc.compile(CONTRACT, "lowrank_bias")
    q, k, v, _, _ = example_inputs(kern.ir, 1, 2, 2, 12, 12, 16)
    with pytest.raises(ValueError, match=r"free dimension R is 3 in tensor 'U' \(dim 3\) but 5 in tensor 'W'"):
        kern(q, k, v, U=torch.randn(1, 2, 12, 3), W=torch.randn(1, 2, 12, 5))
    with pytest.raises(ValueError, match=r"tensor 'W' must have 4 dims"):
        kern(q, k, v, U=torch.randn(1, 2, 12, 3), W=torch.randn(2, 12, 3))
    with pytest.raises(ValueError, match=r"tensor 'U' must have shape"):  # the other dims are still checked
        kern(q, k, v, U=torch.randn(1, 2, 11, 3), W=torch.randn(1, 2, 12, 3))
    with pytest.raises(SpecError, match="unknown name 'R' in a tensor dimension") as e:
        attncc.lower("pattern e:\n    tensor U: float32[B, R + 1]\n    score: s + U[b, 0]\n")
    assert ":2:" in str(e.value)
    with pytest.raises(SpecError, match="unknown name 'R'"):  # free dims name dimensions only
        attncc.lower("pattern e:\n    tensor U: float32[B, H, Lq, R]\n    score: s * R\n")


def test_lowrank_on_a_grid_matches_biased_neighborhood():
    """dot() on a 2-D grid (flattened token indices): the folded kernel (a box plan) vs SDPA
    with the neighborhood mask and the materialised U W^T bias, gradients included."""
    src = ("pattern nb:\n    grid: y, x\n    tensor U: float32[B, H, Lq, R]\n    tensor W: float32[B, Lk, R]\n"
           "    mask: abs(q.y - kv.y) <= 2 and abs(q.x - kv.x) <= 1\n    score: s + dot(U[b, h, q], W[b, kv])\n")
    kern = attncc.compile(src)
    assert kern.plan.path == "box"
    Y, X = 6, 7
    q, k, v, tens, _ = example_inputs(kern.ir, 2, 2, 1, grid=(Y, X), D=16, seed=2)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    ts = {n: t.clone().requires_grad_() for n, t in tens.items()}
    out = kern(*xs, **ts)
    ys = [x.double().flatten(2, 3).requires_grad_() for x in (q, k, v)]
    us = {n: t.double().requires_grad_() for n, t in tens.items()}
    yy, xx = torch.arange(Y).repeat_interleave(X), torch.arange(X).repeat(Y)
    mask = ((yy[:, None] - yy[None, :]).abs() <= 2) & ((xx[:, None] - xx[None, :]).abs() <= 1)
    comp = _sdpa(*ys, mask, us["U"] @ us["W"][:, None].transpose(-1, -2))
    assert max_err(out.flatten(2, 3), comp) < 2e-5
    dout = torch.randn_like(out)
    out.backward(dout)
    comp.backward(dout.double().flatten(2, 3))
    for a, b_ in zip(xs + list(ts.values()), ys + list(us.values())):
        assert max_err(a.grad.reshape(b_.grad.shape), b_.grad) < 1e-4 * (1 + b_.grad.abs().max().item())


def test_fused_epilogue_backward_on_grid_and_per_query_sink():
    """The preprocessing kernel's gate / sink gradients on box plans (permuted rows; sink per
    (b, h), gate mixing per-row and per-feature tensors; a per-query sink on a grid) and on a
    1-D pattern with a per-query sink, vs autograd of the float64 reference; repeated
    backward passes are bitwise equal."""
    cases = [
        ("pattern nb:\n    grid: y, x\n    tensor sink: float32[B, H]\n    tensor g: float32[B, H, Lq]\n"
         "    tensor g2: float32[Dv]\n    mask: abs(q.y - kv.y) <= 2 and abs(q.x - kv.x) <= 1\n"
         "    sink: 2 * sink[b, h]\n    gate: sigmoid(g[b, h, q]) * g2[dv] + exp(g2[dv] * g[b, h, q])\n",
         dict(B=2, H=2, Hkv=1, grid=(5, 9), D=16)),
        ("pattern nq:\n    grid: y, x\n    tensor sk: float32[H, Lq]\n    mask: abs(q.y - kv.y) <= 1 and kv.x <= q.x\n"
         "    sink: sk[h, q] + 0.25 * q.y\n", dict(B=1, H=2, Hkv=2, grid=(6, 7), D=16)),
        ("pattern s:\n    tensor sink: float32[H, Lq]\n    tensor w: float32[B, Lq, H]\n    mask: kv <= q - 2\n"
         "    sink: sink[h, q]\n    gate: w[b, q, h] ** 2\n", dict(B=2, H=2, Hkv=1, Lq=40, D=16, Dv=24)),
    ]
    for src, shape in cases:
        kern = attncc.compile(src)
        assert "def attn_bwd_pre(" in kern.source
        q, k, v, tens, _ = example_inputs(kern.ir, **shape, seed=5)
        ys = [x.double().requires_grad_() for x in (q, k, v)]
        us = {n: t.double().requires_grad_() for n, t in tens.items()}
        ref = attncc.reference(src, *ys, **us)
        dout = torch.randn(ref.shape, dtype=torch.float64)
        ref.backward(dout)
        grads = []
        for _ in range(2):
            xs = [x.clone().requires_grad_() for x in (q, k, v)]
            ts = {n: t.clone().requires_grad_() for n, t in tens.items()}
            out = kern(*xs, **ts)
            assert max_err(out, ref) < 2e-5, src
            out.backward(dout.float())
            grads.append([a.grad for a in xs + list(ts.values())])
        for a, a2, b_ in zip(*grads, ys + list(us.values())):
            assert torch.equal(a, a2)
            assert max_err(a, b_.grad) < 1e-4 * (1 + b_.grad.abs().max().item()), src


@pytest.mark.parametrize("name", ["gated_causal", "sink_window"])
def test_epilogue_bf16_forward_and_gradients(name):
    """bf16 inputs (fp32 accumulation; the gated upstream gradient is stored in bf16) vs the
    float64 reference, within bf16 rounding."""
    path = attncc.pattern_path(name)
    kern = attncc.compile(path)
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 1, 40, 40, 32, dtype=torch.bfloat16, seed=1)
    tens = {n: t.to(torch.bfloat16) for n, t in tens.items()}
    xs = [x.clone().requires_grad_() for x in (q, k, v, *tens.values())]
    ys = [x.double().requires_grad_() for x in (q, k, v, *tens.values())]
    out = kern(*xs[:3], **dict(zip(tens, xs[3:])))
    ref = attncc.reference(path, *ys[:3], **dict(zip(tens, ys[3:])))
    assert out.dtype == torch.bfloat16 and max_err(out, ref) < 3e-2
    dout = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(dout.to(torch.bfloat16))
    ref.backward(dout)
    for a, b_ in zip(xs, ys):
        assert a.grad.dtype == torch.bfloat16
        assert max_err(a.grad, b_.grad) < 3e-2 * (1 + b_.grad.abs().max().item()), name


def test_lowrank_training_under_torch_compile():
    """The dot() factors' gradients (from the dQ and dK/dV kernels) through torch.compile
    (fullgraph) equal eager, and match autograd of the materialised-bias composition."""
    kern = attncc.compile(attncc.pattern_path("lowrank_bias"))
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 1, 30, 30, 16, seed=6)
    U, W = (tens[n].clone().requires_grad_() for n in ("U", "W"))

    def f(q, k, v, U, W):
        return kern(q, k, v, U=U, W=W).square().sum()

    eager = torch.autograd.grad(f(q, k, v, U, W), (U, W))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, U, W), (U, W))
    Ud, Wd = (x.detach().double().requires_grad_() for x in (U, W))
    comp = _sdpa(q.double(), k.double(), v.double(), None, Ud @ Wd.transpose(-1, -2)).square().sum()
    ref = torch.autograd.grad(comp, (Ud, Wd))
    for a, b_, c in zip(eager, compiled, ref):
        assert max_err(a, b_) < 1e-5
        assert max_err(a, c) < 1e-4 * (1 + c.abs().max().item())
