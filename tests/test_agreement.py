"""Kernel and reference agree on every input, or both refuse it (issue 14, section 2).

Each test below failed before its fix: exact integer comparisons against float
expressions, float coefficients and huge constants in masks, sympy failures inside the
analyses, non-finite constant folds, empty grid masks, non-ASCII pattern names, stale
block tables, inference mode, out-of-bounds tensor reads, float-built index expressions
and rows masked by huge finite biases. The kernels run under the Triton interpreter at
tiny shapes; every output is compared with ``attncc.reference`` (and torch SDPA where it
expresses the pattern).
"""

import math

import pytest
import torch

import attncc
from attncc import SpecError

from conftest import max_err


def _qkv(L, Lk=None, B=1, H=1, D=16, grid=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shp_q = (B, H, *(grid or (L,)), D)
    shp_k = (B, H, *(grid or (Lk or L,)), D)
    return torch.randn(shp_q, generator=g), torch.randn(shp_k, generator=g), torch.randn(shp_k, generator=g)


def _agree(spec, q, k, v, **tensors):
    """Kernel and reference outputs and LSEs agree (0 / -inf rows included)."""
    f = attncc.compile(spec)
    out, lse = f(q, k, v, return_lse=True, **tensors)
    ref, rlse = attncc.reference(spec, q, k, v, return_lse=True, **tensors)
    assert max_err(out, ref) < 1e-4, (spec, max_err(out, ref))
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse)), spec
    fin = torch.isfinite(rlse)
    assert max_err(lse[fin], rlse[fin]) < 1e-4 if fin.any() else True
    return f, out, lse


def _dense_sdpa(q, k, v, allowed):
    """SDPA with a boolean mask (the independent oracle for index-only masks)."""
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                            attn_mask=allowed).float()


# ----------------------------------------------------------------------------- exact comparisons
@pytest.mark.parametrize("mask,allowed", [
    ("kv <= q ** 0.5", lambda qi, ki: ki * ki <= qi),
    ("kv <= sqrt(q)", lambda qi, ki: ki * ki <= qi),
    ("kv <= q * 0.5", lambda qi, ki: 2 * ki <= qi),
    ("kv < Lk * 0.5", lambda qi, ki: 2 * ki < 40 + 0 * qi),
    ("kv <= ceil(q / 3.5)", lambda qi, ki: ki <= torch.div(2 * qi + 6, 7, rounding_mode="floor")),
    ("kv >= q * 0.1 and kv <= q", lambda qi, ki: (10 * ki >= qi) & (ki <= qi)),
])
def test_float_expressions_in_masks_are_exact(mask, allowed):
    """``kv <= q ** 0.5`` dropped key 5 at q = 25 (float32 exp2(0.5 * log2(25)) = 4.9999995);
    float coefficients crashed at launch (a float key-range bound). Checked against SDPA with
    the integer-exact mask at every query (q = 25, 36 are perfect squares)."""
    spec = f"pattern p:\n    mask: {mask}\n"
    q, k, v = _qkv(40)
    f, out, _ = _agree(spec, q, k, v)
    qi, ki = torch.arange(40).view(-1, 1), torch.arange(40).view(1, -1)
    want = allowed(qi, ki)
    ok = want.any(-1)
    sd = _dense_sdpa(q, k, v, want)
    assert max_err(out[..., ok, :], sd[..., ok, :]) < 1e-4
    assert f.plan.path in ("closed", "table")


@pytest.mark.parametrize("mask", ["kv <= q + 2 ** 31", "kv <= q * 10 ** 20", "kv < q - 3000000000",
                                  "kv <= q * 2147483648.0"])
def test_integer_constants_beyond_int32_are_spec_errors(mask):
    """They crashed at launch ("out of range for type int32"): now a SpecError with location."""
    with pytest.raises(SpecError) as ei:
        attncc.compile(f"pattern p:\n    mask: {mask}\n")
    assert ei.value.span.line == 2 and "32-bit" in str(ei.value)


def test_int_param_beyond_int32_is_a_spec_error():
    spec = "pattern p:\n    param w: int = 4\n    mask: kv <= q and q - kv < w\n"
    with pytest.raises(SpecError, match="32-bit"):
        attncc.compile(spec, w=2 ** 40)


# ----------------------------------------------------------------------------- only SpecError escapes
@pytest.mark.parametrize("mask", ["max(14, q) // 7 > 2", "kv <= max(14, q) // 7 + q // 2"])
def test_sympy_failures_in_the_analysis_do_not_escape(mask):
    """``PrecisionExhausted`` from sympy's simplification escaped compile() on a valid spec."""
    q, k, v = _qkv(40)
    _agree(f"pattern p:\n    mask: {mask}\n", q, k, v)


@pytest.mark.parametrize("expr,col", [
    ("log(0)", 17), ("1 / 0.0", 21), ("inf - inf", 17), ("sqrt(-1.0)", 17), ("q % 0.0", 21),
    ("exp(1) / (1 - 1.0)", 27), ("q // 0.0", 22), ("1e400 + q", 17),
])
def test_non_finite_constant_folds_are_spec_errors(expr, col):
    """NotImplementedError ("cannot print zoo"), ZeroDivisionError or TypeError escaped."""
    with pytest.raises(SpecError) as ei:
        attncc.compile(f"pattern p:\n    mask: kv <= {expr}\n")
    assert (ei.value.span.line, ei.value.span.col) == (2, col), str(ei.value)


def test_deep_nesting_is_a_spec_error():
    deep = "(" * 300 + "q" + ")" * 300
    with pytest.raises(SpecError):
        attncc.compile(f"pattern p:\n    mask: kv <= {deep}\n")
    chain = " + ".join(["q"] * 3000)
    with pytest.raises(SpecError):
        attncc.compile(f"pattern p:\n    mask: kv <= {chain} - {chain}\n")


@pytest.mark.parametrize("mask", ["False", "q.x < q.x", "kv.x // 3 < -1"])
def test_empty_grid_masks_compile_and_give_zero(mask):
    """IndexError in codegen: an empty grid pattern now gives 0 output and -inf LSE."""
    spec = f"pattern g:\n    grid: y, x\n    mask: {mask}\n"
    q, k, v = _qkv(0, grid=(4, 5))
    _, out, lse = _agree(spec, q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_non_ascii_pattern_name():
    """``pattern é:`` raised UnicodeDecodeError registering the torch op."""
    q, k, v = _qkv(20)
    _agree("pattern é:\n    mask: kv <= q\n", q, k, v)


# ----------------------------------------------------------------------------- block tables
DOC = "pattern d:\n    tensor doc: int32[Lk]\n    mask: doc[q] == doc[kv] and kv <= q\n"


@pytest.mark.parametrize("change", ["numpy", "data"])
def test_block_table_sees_in_place_changes_without_version_bump(change):
    """The table cache was keyed on the version counter: ``doc.numpy()[:] = 0`` and
    ``doc.data.zero_()`` returned the stale table (0.67 off)."""
    q, k, v = _qkv(48)
    doc = (torch.arange(48) // 5).to(torch.int32)
    f = attncc.compile(DOC, block_m=16, block_n=16)
    f(q, k, v, doc=doc)
    version = doc._version
    if change == "numpy":
        doc.numpy()[:] = 0
    else:
        doc.data.zero_()
    assert doc._version == version  # the case under test: no version bump
    out = f(q, k, v, doc=doc)
    assert max_err(out, attncc.reference(DOC, q, k, v, doc=doc)) < 1e-4
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert max_err(out, causal) < 1e-4


def test_block_table_pattern_under_inference_mode():
    """"Inference tensors do not track version counter" under torch.inference_mode()."""
    q, k, v = _qkv(40)
    with torch.inference_mode():
        doc = (torch.arange(40) // 7).to(torch.int32)
        f = attncc.compile(DOC)
        out = f(q, k, v, doc=doc)
        doc[:] = 1  # an in-place change of an inference tensor
        out2 = f(q, k, v, doc=doc)
    assert max_err(out, attncc.reference(DOC, q, k, v, doc=(torch.arange(40) // 7).to(torch.int32))) < 1e-4
    assert max_err(out2, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-4


# ----------------------------------------------------------------------------- out-of-bounds reads
T5 = ("pattern t:\n    tensor table: float32[H, 8]\n    tensor bucket: int32[Lq + Lk - 1]\n    mask: kv <= q\n"
      "    score: s + table[h, bucket[kv - q + Lq - 1]]\n")
L_OOB = 24


def _raises_alike(spec, q, k, v, match, **tensors):
    """The kernel (before any launch) and the reference raise the same ValueError."""
    msgs = []
    for fn in (attncc.compile(spec), lambda *a, **t: attncc.reference(spec, *a, **t)):
        with pytest.raises(ValueError, match=match) as ei:
            fn(q, k, v, **tensors)
        msgs.append(str(ei.value))
    assert msgs[0] == msgs[1]


@pytest.mark.parametrize("bad", [8, -1, 100])
def test_score_read_out_of_bounds_raises_in_kernel_and_reference(bad):
    """The kernel computed such a score as if the bias were absent; the reference raised."""
    q, k, v = _qkv(L_OOB, H=2)
    bucket = torch.full((2 * L_OOB - 1,), 3, dtype=torch.int32)
    bucket[L_OOB - 5] = bad  # kv - q = -4: an allowed pair
    _raises_alike(T5, q, k, v, "score reads tensor 'table' out of its bounds", table=torch.randn(2, 8),
                  bucket=bucket)


def test_score_read_out_of_bounds_only_at_masked_pairs_is_fine():
    """Masked pairs never contribute: both compute (and agree with a dense bias in SDPA)."""
    q, k, v = _qkv(L_OOB, H=2)
    bucket = torch.cat([torch.arange(L_OOB) % 8, torch.full((L_OOB - 1,), 99)]).to(torch.int32)
    table = torch.randn(2, 8)
    _, out, _ = _agree(T5, q, k, v, table=table, bucket=bucket)
    qi, ki = torch.arange(L_OOB).view(-1, 1), torch.arange(L_OOB).view(1, -1)
    idx = bucket.long()[(ki - qi + L_OOB - 1).clamp(0, 2 * L_OOB - 2)].clamp(max=7)
    bias = torch.where(ki <= qi, table[:, idx], torch.tensor(-math.inf))  # (H, Lq, Lk)
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
    assert max_err(out, sd) < 1e-4


def test_score_read_check_sees_in_place_changes_of_index_tensors():
    """The value check is remembered per content: a later in-place change is checked again."""
    q, k, v = _qkv(L_OOB, H=2)
    bucket = torch.full((2 * L_OOB - 1,), 2, dtype=torch.int32)
    table = torch.randn(2, 8)
    f = attncc.compile(T5)
    out = f(q, k, v, table=table, bucket=bucket)
    assert max_err(out, attncc.reference(T5, q, k, v, table=table, bucket=bucket)) < 1e-4
    bucket.numpy()[:] = 8
    with pytest.raises(ValueError, match="out of its bounds"):
        f(q, k, v, table=table, bucket=bucket)


@pytest.mark.parametrize("spec,tensors,match", [
    ("pattern t:\n    tensor sk: float32[H]\n    mask: kv <= q\n    sink: sk[h + 1]\n",
     lambda: dict(sk=torch.randn(2)), "sink reads tensor 'sk'"),
    ("pattern t:\n    tensor sk: float32[H]\n    tensor which: int32[H]\n    mask: kv <= q\n    sink: sk[which[h]]\n",
     lambda: dict(sk=torch.randn(2), which=torch.tensor([0, 2], dtype=torch.int32)), "sink reads tensor 'sk'"),
    ("pattern t:\n    tensor g: float32[Lq, Dv]\n    mask: kv <= q\n    gate: g[q, dv + 1]\n",
     lambda: dict(g=torch.randn(L_OOB, 16)), "gate reads tensor 'g'"),
    ("pattern t:\n    tensor g: float32[8]\n    tensor sel: int32[Lq]\n    mask: kv <= q\n    gate: g[sel[q]]\n",
     lambda: dict(g=torch.randn(8), sel=torch.arange(L_OOB, dtype=torch.int32)), "gate reads tensor 'g'"),
    ("pattern t:\n    tensor lab: int32[4]\n    tensor doc: int32[Lk]\n    mask: lab[doc[q]] == lab[doc[kv]]\n",
     lambda: dict(lab=torch.arange(4, dtype=torch.int32), doc=torch.arange(L_OOB, dtype=torch.int32) // 5),
     "mask reads tensor 'lab'"),
])
def test_mask_sink_gate_reads_out_of_bounds_raise_alike(spec, tensors, match):
    """Sink and gate reads out of bounds were 0 in both (silently); mask reads raised."""
    q, k, v = _qkv(L_OOB, H=2)
    _raises_alike(spec, q, k, v, match, **tensors())


def test_sink_and_gate_reads_in_bounds_agree():
    spec = ("pattern t:\n    tensor sk: float32[4]\n    tensor which: int32[H]\n    tensor g: float32[8]\n"
            "    tensor sel: int32[Lq]\n    mask: kv <= q\n    sink: sk[which[h]]\n    gate: g[sel[q]]\n")
    q, k, v = _qkv(L_OOB, H=2)
    _agree(spec, q, k, v, sk=torch.randn(4), which=torch.tensor([3, 0], dtype=torch.int32), g=torch.randn(8),
           sel=(torch.arange(L_OOB) % 8).to(torch.int32))


# ----------------------------------------------------------------------------- huge finite biases
BIAS = "pattern b:\n    tensor bias: float32[Lq, Lk]\n    score: s + bias[q, kv]\n"


def test_rows_masked_by_huge_finite_biases_give_the_mean_of_v():
    """A bias <= about -2.36e38 on every key of a row gave 0 / -inf (score * log2(e) overflowed);
    SDPA and FlexAttention give the mean of V. The rule (attncc.dense.clamp_score): finite
    scores are clamped to +-2**127 in kernel and reference; only -inf excludes a pair."""
    L = 20
    q, k, v = _qkv(L)
    bias = torch.zeros(L, L)
    bias[3] = -3e38
    bias[5] = -2.36e38
    bias[7, :4] = -1e38
    bias[9] = -math.inf  # excluded by the score: 0 / -inf
    bias[11] = torch.finfo(torch.float32).max  # huge positive: clamped as well (not NaN)
    bias[11, 1:] = 0
    _, out, lse = _agree(BIAS, q, k, v, bias=bias)
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    rows = [r for r in range(L) if r != 9]
    assert max_err(out[..., rows, :], sd[..., rows, :]) < 1e-4
    assert max_err(out[0, 0, 3], v[0, 0].mean(0)) < 1e-5
    assert torch.equal(out[0, 0, 9], torch.zeros(16)) and torch.isneginf(lse[0, 0, 9])


def test_huge_finite_bias_gradients_agree():
    """Clamped scores get derivative 0 (bias, q, k). Rows whose every score is clamped are
    left out: the backward recomputes P from the float32 LSE, which cannot resolve log(Lk)
    at |LSE| ~ 1e38 (as in every LSE-based FlashAttention backward)."""
    L = 16
    q, k, v = _qkv(L)
    bias = torch.randn(L, L)
    bias[2, 3:] = -3e38
    bias[6, :5] = -2.5e38
    bias[9, 1] = 3e38  # a huge positive bias: one-hot at the limit
    ins = [x.clone().requires_grad_() for x in (q, k, v, bias)]
    ref_ins = [x.clone().double().requires_grad_() for x in (q, k, v, bias)]
    out = attncc.compile(BIAS)(*ins[:3], bias=ins[3])
    ref = attncc.reference(BIAS, *ref_ins[:3], bias=ref_ins[3])
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    for a, b_ in zip(ins, ref_ins):
        assert max_err(a.grad, b_.grad) < 1e-4
    assert torch.equal(ins[3].grad[2, 3:], torch.zeros(L - 3))  # clamped scores: derivative 0
    assert torch.equal(ins[3].grad[6, :5], torch.zeros(5))


# ----------------------------------------------------------------------------- float-built indices
T5_INLINE = ("pattern t5:\n    tensor table: float32[H, 16]\n    mask: kv <= q\n"
             "    score: s + table[h, where(q - kv < 8, q - kv, min(15, 8 + floor(8 * log((q - kv) / 8) / log(16))))]\n")


def _t5_bucket_exact(d: torch.Tensor) -> torch.Tensor:
    """T5's causal bucket (8 exact, 8 log-spaced up to distance 128) in integer arithmetic:
    ``8 + floor(8 * log(d / 8) / log(16)) = 8 + floor(log2(d * d)) - 6``."""
    d = d.long()
    big = torch.tensor([8 + (int(x) * int(x)).bit_length() - 7 for x in d.flatten().clamp(min=1)]).view(d.shape)
    return torch.where(d < 8, d, big.clamp(max=15))


def test_float_built_bucket_index_agrees_at_exact_powers():
    """The float32 kernel put |kv - q| = 64 in bucket 13 (5.9999995), the float64 reference in
    14 (0.53 in the output). Both now follow the FLOOR_TOL rule; checked against exact
    integer buckets through SDPA at every distance up to 129 (16, 32, 64, 128 included)."""
    L = 130
    q, k, v = _qkv(L, D=16)
    table = torch.randn(1, 16) * 3
    _, out, _ = _agree(T5_INLINE, q, k, v, table=table)
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    d = (qi - ki).clamp(min=0)
    bias = torch.where(ki <= qi, table[0, _t5_bucket_exact(d)], torch.tensor(-math.inf))
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert max_err(out, sd) < 1e-4


@pytest.mark.parametrize("d", [8, 16, 64, 128, 4096])
def test_float_built_index_boundaries_in_the_reference(d):
    """The rule itself at exact powers (float64 and float32 evaluation alike)."""
    from attncc.dense import eval_expr
    expr = attncc.lower(T5_INLINE).score.atoms(__import__("sympy").Indexed).pop().indices[1]
    for dt in (torch.float64, torch.float32):
        env = {attncc.ir.q: torch.tensor([d]), attncc.ir.kv: torch.tensor([0])}
        got = int(eval_expr(expr, env, {}, float_dtype=dt).floor())
        assert got == int(_t5_bucket_exact(torch.tensor([d]))[0]), (d, dt, got)
