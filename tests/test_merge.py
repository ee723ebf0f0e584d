"""Merging partial attention states (issue 16, section 3): ``attncc.merge_state`` /
``merge_states`` (the Triton kernel under the interpreter and the torch path) against attention
over the whole key set and against ``merge_states_reference``; associativity, commutativity,
``-inf`` parts, gradients against autograd through the torch formula, bad input; ``attncc.cascade``
(shared prefix + per-row suffix) against causal_bottom_right over the concatenation, forward and
gradients; and the merge kernel compiled for sm_90a and sm_80 with real Triton (0 spills)."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.runtime.merge import merge_states_reference
from conftest import compiled_resources

FULL = "pattern full:\n    score: s\n"


def _states(seed, shape=(2, 3, 5), Dv=24, n=2, dtype=torch.float32, grad=False):
    """n random states: out ``(*shape, Dv)`` and float32 lse ``shape``."""
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(*shape, Dv, generator=g).to(dtype) for _ in range(n)]
    lses = [torch.randn(*shape, generator=g) * 3 for _ in range(n)]
    if grad:
        for x in outs + lses:
            x.requires_grad_()
    return outs, lses


def _close(a, b, tol=2e-6):
    """a == b within ``tol * (1 + |b|)`` where b is finite, the same infinities, no NaN."""
    assert not a.isnan().any() and not b.isnan().any()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin) and torch.equal(a[~fin], b[~fin].to(a.dtype))
    err = torch.where(fin, (a.double() - b.double()).abs() / (1 + b.double().abs()), 0.0)
    assert err.max() <= tol, err.max()


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_merge_of_two_key_halves_equals_attention_over_all(backend):
    kern = attncc.compile(FULL)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 16, generator=g)
    k, v = torch.randn(2, 2, 20, 16, generator=g), torch.randn(2, 2, 20, 24, generator=g)
    want, want_lse = kern(q, k, v, return_lse=True)
    oa, la = kern(q, k[:, :, :8], v[:, :, :8], return_lse=True)
    ob, lb = kern(q, k[:, :, 8:], v[:, :, 8:], return_lse=True)
    out, lse = attncc.merge_state(oa, la, ob, lb, backend=backend)
    assert out.shape == want.shape and out.dtype == want.dtype and lse.dtype == torch.float32
    _close(out, want, 2e-6)
    _close(lse, want_lse, 2e-6)
    # three parts, list form
    parts = [kern(q, k[:, :, s], v[:, :, s], return_lse=True) for s in (slice(0, 5), slice(5, 13), slice(13, 20))]
    out3, lse3 = attncc.merge_states([p[0] for p in parts], [p[1] for p in parts], backend=backend)
    _close(out3, want, 2e-6)
    _close(lse3, want_lse, 2e-6)


def test_kernel_equals_torch_path_and_reference():
    for dtype, Dv, shape, tol in ((torch.float32, 24, (2, 3, 5), 1e-6), (torch.float32, 200, (37,), 1e-6),
                                  (torch.bfloat16, 64, (1, 2, 3, 9), 8e-3), (torch.float16, 8, (4, 1), 1e-3)):
        outs, lses = _states(1, shape, Dv, dtype=dtype)
        lses[0][..., 0] = float("-inf")
        lses[1].view(-1)[-1] = float("-inf")
        a = attncc.merge_state(outs[0], lses[0], outs[1], lses[1], backend="interpret")
        b = attncc.merge_state(outs[0], lses[0], outs[1], lses[1])
        c = merge_states_reference(outs, lses)
        for x in (a, b):
            assert x[0].dtype == dtype and x[0].shape == outs[0].shape
            _close(x[0], c[0], tol)
            _close(x[1], c[1], 1e-6)
        _close(a[0], b[0], tol)


def test_strided_inputs_and_mixed_dtypes():
    outs, lses = _states(2, (3, 6), 16)
    oa = outs[0].transpose(0, 1).contiguous().transpose(0, 1)          # non-contiguous, same values
    la = torch.randn(6, 3).t()                                         # non-contiguous lse
    ob = outs[1].to(torch.bfloat16)
    for backend in ("torch", "interpret"):
        out, lse = attncc.merge_state(oa, la, ob, lses[1], backend=backend)
        ref, rlse = merge_states_reference([oa, ob], [la, lses[1]])
        assert out.dtype == torch.float32
        _close(out, ref, 1e-5)
        _close(lse, rlse, 1e-6)


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_associative_and_commutative(backend):
    outs, lses = _states(3, (4, 5), 32, n=3)
    m = lambda a, b: attncc.merge_state(a[0], a[1], b[0], b[1], backend=backend)  # noqa: E731
    s = list(zip(outs, lses))
    left = m(m(s[0], s[1]), s[2])
    right = m(s[0], m(s[1], s[2]))
    swapped = m(s[2], m(s[1], s[0]))
    allat = attncc.merge_states(outs, lses, backend=backend)
    for x in (right, swapped, allat):
        _close(x[0], left[0], 2e-6)
        _close(x[1], left[1], 2e-6)
    ab, ba = m(s[0], s[1]), m(s[1], s[0])
    _close(ab[0], ba[0], 1e-6)
    assert torch.equal(ab[1], ba[1])


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_neg_inf_parts(backend):
    outs, lses = _states(4, (2, 6), 8)
    lses[0][0] = float("-inf")              # row block 0: a empty -> b
    lses[1][1, :3] = float("-inf")          # b empty -> a
    lses[0][1, 4:] = float("-inf")
    lses[1][1, 4:] = float("-inf")          # both empty -> 0 and -inf
    outs[0][0] = float("nan")               # an empty part's output is never read
    outs[1][1, 4:] = float("nan")
    out, lse = attncc.merge_state(outs[0], lses[0], outs[1], lses[1], backend=backend)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[0], outs[1][0]) and torch.equal(lse[0], lses[1][0])
    assert torch.equal(out[1, :3], outs[0][1, :3]) and torch.equal(lse[1, :3], lses[0][1, :3])
    assert bool((out[1, 4:] == 0).all()) and bool(torch.isneginf(lse[1, 4:]).all())
    # all-empty list
    e_out, e_lse = attncc.merge_states([torch.ones(3, 4)] * 3, [torch.full((3,), float("-inf"))] * 3, backend=backend)
    assert bool((e_out == 0).all()) and bool(torch.isneginf(e_lse).all())
    # gradients at -inf parts: 0, never NaN
    o = [x.clone().nan_to_num(0.0).requires_grad_() for x in outs]
    lz = [x.clone().requires_grad_() for x in lses]
    out, lse = attncc.merge_state(o[0], lz[0], o[1], lz[1], backend=backend)
    loss = out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    grads = torch.autograd.grad(loss, o + lz)
    for gr in grads:
        assert not gr.isnan().any()
    assert bool((grads[0][0] == 0).all()) and bool((grads[2][0] == 0).all())
    assert bool((grads[0][1, 4:] == 0).all()) and bool((grads[3][1, 4:] == 0).all())


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_gradients_equal_autograd_through_torch_formula(backend):
    """The analytic backward against torch autograd through :func:`merge_states_reference`
    (2 and 3 states, float32 and bfloat16 outputs), the LSE's incoming gradient included."""
    for n, dtype, tol in ((2, torch.float32, 1e-5), (3, torch.float32, 1e-5), (2, torch.bfloat16, 1e-2)):
        outs, lses = _states(5 + n, (2, 3, 4), 12, n=n, dtype=dtype, grad=True)
        g = torch.Generator().manual_seed(9)
        do = torch.randn(outs[0].shape, generator=g).to(dtype)
        dl = torch.randn(lses[0].shape, generator=g)
        out, lse = attncc.merge_states(outs, lses, backend=backend)
        ref, rlse = merge_states_reference(outs, lses)
        got = torch.autograd.grad((out.float() * do.float()).sum() + (lse * dl).sum(), outs + lses,
                                  retain_graph=True)
        want = torch.autograd.grad((ref.float() * do.float()).sum() + (rlse * dl).sum(), outs + lses,
                                   retain_graph=True)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert (a.double() - b.double()).abs().max() < tol
        # the output's gradient alone (lse unused)
        got = torch.autograd.grad((out.float() * do.float()).sum(), outs + lses, retain_graph=True)
        want = torch.autograd.grad((ref.float() * do.float()).sum(), outs + lses)
        for a, b in zip(got, want):
            assert (a.double() - b.double()).abs().max() < tol


def test_bad_inputs():
    outs, lses = _states(12, (2, 5), 8)
    a, b, la, lb = outs[0], outs[1], lses[0], lses[1]
    cases = [
        (lambda: attncc.merge_state(a, la, b[:, :4], lb), ValueError, "out_b"),
        (lambda: attncc.merge_state(a, la, b, lb[:, :4]), ValueError, "lse_b"),
        (lambda: attncc.merge_state(a, la[..., None], b, lb), ValueError, "lse_a"),
        (lambda: attncc.merge_state(a, la.double(), b, lb), TypeError, "lse_a must be float32"),
        (lambda: attncc.merge_state(a, la, b, lb.half()), TypeError, "lse_b must be float32"),
        (lambda: attncc.merge_state(a.long(), la, b, lb), TypeError, "out_a"),
        (lambda: attncc.merge_state(a, la, b.numpy(), lb), TypeError, "out_b"),
        (lambda: attncc.merge_state(a[0, 0], la[0, 0], b[0, 0], lb[0, 0]), ValueError, "at least 2 dims"),
        (lambda: attncc.merge_state(a, la, b.to("meta"), lb), ValueError, "one device"),
        (lambda: attncc.merge_state(a, la, b, lb, backend="cuda"), ValueError, "backend"),
        (lambda: attncc.merge_states([a, b], [la]), ValueError, "one LSE per output"),
        (lambda: attncc.merge_states([], []), ValueError, "no states"),
        (lambda: attncc.merge_states([a, b, b[:1]], [la, lb, lb[:1]]), ValueError, r"outs\[2\]"),
        (lambda: attncc.merge_states(a, la), TypeError, "lists"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def _cascade_inputs(seed, B, Hq, Hkv, Lq, Lp, Ls, D, Dv):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    pk, pv = torch.randn(1, Hkv, Lp, D, generator=g), torch.randn(1, Hkv, Lp, Dv, generator=g)
    sk, sv = torch.randn(B, Hkv, Ls, D, generator=g), torch.randn(B, Hkv, Ls, Dv, generator=g)
    return [x.requires_grad_() for x in (q, pk, pv, sk, sv)]


@pytest.mark.parametrize("case", [(3, 4, 2, 1, 9, 6, 16, 16, "torch"),       # decoding, GQA
                                  (2, 2, 2, 5, 7, 5, 16, 24, "torch"),       # chunked prefill, Lq = Ls, Dv != D
                                  (2, 2, 1, 3, 4, 6, 16, 16, "interpret")])  # the kernels under the interpreter
def test_cascade_equals_causal_bottom_right_over_concatenation(case):
    B, Hq, Hkv, Lq, Lp, Ls, D, Dv, backend = case
    opts = dict(backend=backend) if backend == "interpret" else {}
    full = attncc.compile(FULL, **opts)
    cbr = attncc.compile(attncc.pattern_path("causal_bottom_right"), **opts)
    q, pk, pv, sk, sv = _cascade_inputs(sum(case[:-1]), B, Hq, Hkv, Lq, Lp, Ls, D, Dv)
    out, lse = attncc.cascade(full, cbr, q, pk, pv, sk, sv, scale=0.3, return_lse=True, backend=backend)
    kc = torch.cat([pk.expand(B, -1, -1, -1), sk], 2)
    vc = torch.cat([pv.expand(B, -1, -1, -1), sv], 2)
    want, want_lse = cbr(q, kc, vc, scale=0.3, return_lse=True)
    assert out.shape == (B, Hq, Lq, Dv)
    _close(out, want, 2e-6)
    _close(lse, want_lse, 2e-6)
    g = torch.Generator().manual_seed(1)
    do, dl = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    got = torch.autograd.grad((out * do).sum() + (lse * dl).sum(), (q, pk, pv, sk, sv))
    ref = torch.autograd.grad((want * do).sum() + (want_lse * dl).sum(), (q, pk, pv, sk, sv))
    for a, b in zip(got, ref):
        assert a.shape == b.shape and not a.isnan().any()
        assert (a - b).abs().max() < 2e-5
    # plain (dense) SDPA over the concatenation agrees too
    if Hq == Hkv:
        mask = torch.ones(Lq, Lp + Ls, dtype=torch.bool).tril(Lp + Ls - Lq)
        sd = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=0.3)
        _close(out, sd, 2e-6)


def test_cascade_bad_inputs():
    full = attncc.compile(FULL)
    q, pk, pv, sk, sv = _cascade_inputs(0, 2, 2, 2, 1, 4, 3, 16, 16)
    with pytest.raises(ValueError, match="prefix_k must have batch 1"):
        attncc.cascade(full, full, q, torch.cat([pk] * 3), pv, sk, sv)
    with pytest.raises(ValueError, match="suffix_v must have batch 2"):
        attncc.cascade(full, full, q, pk, pv, sk, sv[:1])
    with pytest.raises(ValueError, match="q must have 4 dims"):
        attncc.cascade(full, full, q[0], pk, pv, sk, sv)


_AOT = '''
import json, os
os.environ["TRITON_INTERPRET"] = "0"
import torch
from attncc import aot
from attncc.runtime import merge as M
out = []
for Dv, dt in [(128, torch.bfloat16), (256, torch.float32), (80, torch.float16)]:
    a, b = torch.empty(4, 32, 1000, Dv, dtype=dt), torch.empty(4, 32, 1000, Dv, dtype=dt)
    la, lb = torch.empty(4, 32, 1000), torch.empty(4, 32, 1000)
    launch = M._merge_launch(a, la, b, lb, dt)[0]
    for tgt in ("sm_90a", "sm_80"):
        ck, _ = aot.compile_launch(M._merge_kernel, launch, tgt)
        out.append({"Dv": Dv, "target": tgt, **aot.resource_usage(ck.asm["cubin"])})
print(json.dumps(out))
'''


def test_merge_kernel_compiles_for_sm90a_and_sm80_without_spills():
    """The merge launch at Dv = 128 bf16, 256 fp32 and 80 fp16 compiled with real Triton for
    sm_90a and sm_80 (no GPU: a separate process with the interpreter off): no spills, no
    local memory."""
    recs = compiled_resources(_AOT)
    assert len(recs) == 6
