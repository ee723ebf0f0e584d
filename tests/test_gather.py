"""Token-level top-k attention (issue 15, DSA style): ``attncc.gather_attention`` (the Triton
kernels, here under the interpreter) against ``gather_attention_reference`` (forward, LSE and
the q / k / v gradients, the LSE's gradient included), the reference and the kernels against
SDPA with a dense mask built here from the lists, bad input, and the kernels compiled for
sm_90a with real Triton (0 spills)."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.runtime.gather import gather_attention_reference
from conftest import compiled_resources


def _inputs(seed, B, Hq, Hkv, Lq, Lk, D, Dv, topk, dtype=torch.float32, lo=-3, hi_extra=3, channels_last=False):
    """q, k, v (requiring grad) and int64 lists with entries in ``[lo, Lk + hi_extra)``: some
    negative, some ``>= Lk``, duplicates likely; row (0, 1, 0) and (B-1, Lq-1, Hkv-1) have no
    valid key."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv))
    if channels_last:  # (B, L, H, D) storage seen as (B, H, L, D): non-contiguous strides
        t = [torch.randn(s[0], s[2], s[1], s[3], generator=g).to(dtype).transpose(1, 2) for s in shapes]
    else:
        t = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
    q, k, v = (x.requires_grad_() for x in t)
    idx = torch.randint(lo, Lk + hi_extra, (B, Lq, Hkv, topk), generator=g)
    idx[0, 1, 0] = -1
    idx[-1, -1, -1] = Lk + 5
    return q, k, v, idx


def _grads(out, lse, q, k, v, seed=0):
    """q / k / v gradients of a random linear function of out and of the finite LSE entries."""
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g).to(out.dtype)
    dl = torch.randn(lse.shape, generator=g)
    loss = (out.float() * do.float()).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * dl).sum()
    return torch.autograd.grad(loss, (q, k, v), retain_graph=True)


CONFIGS = [  # (B, Hq, Hkv, Lq, Lk, D, Dv, topk, causal, extra)
    (2, 4, 2, 12, 24, 32, 24, 12, False, {}),                    # GQA, Lq < Lk, Dv != D
    (1, 4, 2, 30, 19, 16, 16, 10, True, {}),                     # GQA, causal, Lq > Lk
    (1, 2, 2, 24, 24, 16, 32, 8, True, dict(channels_last=True)),  # Hq = Hkv, strided inputs
    (1, 4, 1, 24, 150, 16, 16, 140, False, dict(lo=-10)),       # 2 or 3 chunks of 64 keys, > 16 rows per key
]


@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_kernels_equal_reference(case):
    B, Hq, Hkv, Lq, Lk, D, Dv, topk, causal, extra = CONFIGS[case]
    q, k, v, idx = _inputs(case, B, Hq, Hkv, Lq, Lk, D, Dv, topk, **extra)
    if case == 0:
        idx = idx.to(torch.int32)
        idx[1, 2, 1, :] = 5  # one key, listed topk times: attended to once
    if case == 3:
        idx[0, 3, 0] = torch.arange(topk)  # 140 distinct keys: 3 chunks of 64
    out, lse = attncc.gather_attention(q, k, v, idx, causal=causal, return_lse=True, backend="interpret")
    want, want_lse = gather_attention_reference(q, k, v, idx, causal=causal, return_lse=True)
    assert out.shape == (B, Hq, Lq, Dv) and out.dtype == q.dtype
    assert lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out - want).abs().max() < 2e-5
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all())
    assert bool(empty[0, :Hq // Hkv, 1].all()) and bool(empty[-1, -(Hq // Hkv):, -1].all())
    assert bool((out[empty] == 0).all())
    assert (torch.where(empty, 0.0, lse - want_lse)).abs().max() < 2e-5
    if case == 0:
        assert (out[1, 2:4, 2] - v[1, 1, 5]).abs().max() < 1e-6  # a duplicated single key: softmax weight 1
    got = _grads(out, lse, q, k, v)
    ref = _grads(want, want_lse, q, k, v)
    for a, e in zip(got, ref):
        assert not a.isnan().any()
        assert (a - e).abs().max() < 5e-5
    if case == 0:  # deterministic: a second backward is bitwise equal
        for a, b in zip(got, _grads(out, lse, q, k, v)):
            assert torch.equal(a, b)
        # CPU default: the reference
        assert torch.equal(attncc.gather_attention(q, k, v, idx), want)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tol):
    q, k, v, idx = _inputs(5, 1, 4, 2, 12, 20, 32, 32, 16, dtype=dtype)
    out, lse = attncc.gather_attention(q, k, v, idx, causal=True, return_lse=True, backend="interpret", scale=0.2)
    want, want_lse = gather_attention_reference(q, k, v, idx, causal=True, return_lse=True, scale=0.2)
    assert out.dtype == dtype
    assert (out.float() - want.float()).abs().max() < tol
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert (torch.where(empty, 0.0, lse - want_lse)).abs().max() < tol
    for a, e in zip(_grads(out, lse, q, k, v), _grads(want, want_lse, q, k, v)):
        assert a.dtype == dtype
        assert (a.float() - e.float()).abs().max() < 10 * tol * (1 + e.float().abs().max())


def _dense_mask(idx, Hq, Lk, causal):
    """bool (B, Hq, Lq, Lk) from the lists by plain loops (independent of the library)."""
    B, Lq, Hkv, _ = idx.shape
    G = Hq // Hkv
    m = torch.zeros(B, Hq, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for i in range(Lq):
            for g in range(Hkv):
                for j in idx[b, i, g].tolist():
                    if 0 <= j < Lk and (not causal or j <= i):
                        m[b, g * G:(g + 1) * G, i, j] = True
    return m


@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa_with_dense_mask(causal):
    """Every row lists its own position (so SDPA has no empty row); keys repeated, -1 and
    out-of-range entries mixed in."""
    B, Hq, Hkv, L, D, topk = 1, 4, 2, 18, 16, 9
    q, k, v, idx = _inputs(9, B, Hq, Hkv, L, L, D, D, topk)
    idx[..., 0] = torch.arange(L)[None, :, None]
    idx[..., 1] = idx[..., 2]
    mask = _dense_mask(idx, Hq, L, causal)
    assert mask.any(-1).all() and not mask.all(-1).any()
    G = Hq // Hkv
    sd = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                          attn_mask=mask)
    out = attncc.gather_attention(q, k, v, idx, causal=causal, backend="interpret")
    ref = gather_attention_reference(q, k, v, idx, causal=causal)
    assert (out - sd).abs().max() < 2e-5 and (ref - sd).abs().max() < 2e-5
    do = torch.randn_like(out)
    want = torch.autograd.grad(sd, (q, k, v), do)
    for got in (torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        for a, e in zip(got, want):
            assert (a - e).abs().max() < 5e-5


Q, K, V, I = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 8), torch.zeros(1, 8, 2, 3,
                                                                                                      dtype=torch.long)


@pytest.mark.parametrize("args, kw, err, match", [
    ((Q[0], K, V, I), {}, ValueError, r"q must have 4 dims \(B, H, L, D\)"),
    ((Q, K, V, I[0]), {}, ValueError, r"kv_index must have 4 dims \(B, Lq, Hkv, topk\)"),
    ((Q.to(torch.float64), K, V, I), {}, TypeError, "q must be float16, bfloat16 or float32"),
    ((Q, K.half(), V, I), {}, TypeError, "q, k and v must have one dtype"),
    ((Q, K, V, I.float()), {}, TypeError, "kv_index must be int32 or int64"),
    ((Q, torch.randn(1, 2, 10, 8), V, I), {}, ValueError, r"k must have shape \(B, Hkv, Lk, D\) = \(1, Hkv, Lk, 16\)"),
    ((Q, K, torch.randn(1, 2, 9, 8), I), {}, ValueError, r"v must have shape \(B, Hkv, Lk, Dv\) = \(1, 2, 10, Dv\)"),
    ((Q, torch.randn(1, 3, 10, 16), torch.randn(1, 3, 10, 8), I), {}, ValueError,
     r"Hq = 4 must be a multiple of the key heads Hkv = 3"),
    ((Q, K, V, torch.zeros(1, 7, 2, 3, dtype=torch.long)), {}, ValueError,
     r"kv_index must have shape \(B, Lq, Hkv, topk\) = \(1, 8, 2, topk\), got \(1, 7, 2, 3\)"),
    ((Q, K, V, torch.zeros(1, 8, 2, 0, dtype=torch.long)), {}, ValueError, "empty inputs"),
    ((Q, K, V, I.to("meta")), {}, ValueError, "must be on one device"),
    ((Q, K, V, I), dict(scale=float("nan")), ValueError, "scale must be a finite number"),
    ((Q, K, V, I), dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_inputs_are_refused(args, kw, err, match):
    with pytest.raises(err, match=match):
        attncc.gather_attention(*args, **kw)
    if "backend" not in kw:
        with pytest.raises(err, match=match):
            gather_attention_reference(*args, **kw)


_AOT = '''
import json, os
os.environ["TRITON_INTERPRET"] = "0"
import torch
from attncc import aot
from attncc.runtime import gather as G
out = []
for Hq, Hkv in [(16, 1), (8, 8)]:
    B, L, D, T, dt = 1, 512, 128, 256, torch.bfloat16
    q = torch.empty(B, Hq, L, D, dtype=dt)
    k, v = torch.empty(B, Hkv, L, D, dtype=dt), torch.empty(B, Hkv, L, D, dtype=dt)
    idx, cnt = G._canonical(torch.randint(0, L, (B, L, Hkv, T)), L, True)
    off, qidx = G._transpose_index(idx, cnt, L)
    lse, delta = torch.empty(B, Hq, L), torch.empty(B, Hq, L)
    for name, fn, launch in [("fwd", G._gather_fwd_kernel, G._forward_launch(q, k, v, idx, cnt, 0.1)[0]),
                             ("dq", G._gather_dq_kernel, G._dq_launch(q, k, v, q, lse, delta, idx, cnt, 0.1)[0]),
                             ("dkdv", G._gather_dkdv_kernel,
                              G._dkdv_launch(q, k, v, q, lse, delta, off, qidx, 0.1)[0])]:
        for tgt in ("sm_90a", "sm_80"):
            ck, _ = aot.compile_launch(fn, launch, tgt)
            out.append({"kernel": name, "G": Hq // Hkv, "target": tgt, **aot.resource_usage(ck.asm["cubin"])})
print(json.dumps(out))
'''


def test_kernels_compile_for_sm90a_without_spills():
    """The forward, dQ and dK / dV launches at D = 128, bfloat16, topk = 256 (G = 16 and
    G = 1) compiled with real Triton for sm_90a and sm_80 (no GPU: a separate process with the
    interpreter off): no spills, no local memory; the forward and dQ use tensor cores."""
    recs = compiled_resources(_AOT)
    assert len(recs) == 12
    for rec in recs:
        assert rec["kernel"] == "dkdv" or rec["mma"], rec
