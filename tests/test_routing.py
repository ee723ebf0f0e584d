"""Top-k block routing (issue 15, section 3): ``attncc.topk_blocks`` (the fused Triton kernel,
here under the interpreter) against ``topk_blocks_reference``, the reference against a
selection computed here with ``torch.topk``, the schedule end to end through a compiled
pattern against SDPA with the expanded mask, and bad input."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.runtime.routing import topk_blocks_reference
from conftest import compiled_resources

CAUSAL = attncc.pattern_path("causal")


def _inputs(seed, B, Hq, Hkv, Lq, Lk, D=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)


def _blocks(bs, nk):
    """bool (B, H, nQ, nk): the listed blocks, from the lists (computed here)."""
    num, idx = bs.kv_num_blocks.long(), bs.kv_indices.long()
    live = torch.arange(idx.shape[-1]) < num[..., None]
    out = torch.zeros(*num.shape, nk + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(live, idx, nk), True)
    return out[..., :nk]


CONFIGS = [  # (B, Hq, Hkv, Lq, Lk, keyword arguments)
    (2, 4, 2, 100, 100, dict(block_size=16, topk=3)),
    (1, 4, 2, 90, 130, dict(block_size=16, topk=4, causal=False, share="head", pool="max")),
    (2, 2, 1, 120, 120, dict(block_size=16, topk=5, local_blocks=2, sink_blocks=1, pool="max")),
    (1, 4, 1, 75, 75, dict(block_size=8, topk=6, local_blocks=1, sink_blocks=2, share="kv_head")),
    (1, 2, 2, 70, 70, dict(block_size=32, topk=8)),  # fewer allowed blocks than topk
    (1, 2, 1, 21, 40, dict(block_size=8, topk=3, query_granularity="token", share="head")),
    (1, 2, 1, 24, 24, dict(block_size=8, topk=2, query_granularity="token", causal=False, sink_blocks=1, local_blocks=0)),
]


@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_kernel_equals_reference(case):
    B, Hq, Hkv, Lq, Lk, kw = CONFIGS[case]
    q, k = _inputs(case, B, Hq, Hkv, Lq, Lk)
    got = attncc.topk_blocks(q, k, backend="interpret", **kw)
    want = topk_blocks_reference(q, k, **kw)
    assert got.block_size == want.block_size
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
    assert torch.equal(got.kv_indices, want.kv_indices)
    assert got.kv_num_blocks.dtype == got.kv_indices.dtype == torch.int32
    # CPU default is the reference
    same = attncc.topk_blocks(q, k, **kw)
    assert torch.equal(same.kv_indices, want.kv_indices)
    # shape and invariants of the lists
    bs = kw["block_size"]
    bq = 1 if kw.get("query_granularity") == "token" else bs
    nq, nk = -(-Lq // bq), -(-Lk // bs)
    H = Hkv if kw.get("share", "kv_head") == "kv_head" else Hq
    assert tuple(want.kv_num_blocks.shape) == (B, H, nq)
    assert want.kv_indices.shape[-1] == min(kw["topk"], nk)
    assert bool((want.kv_num_blocks <= kw["topk"]).all())
    live = torch.arange(want.kv_indices.shape[-1]) < want.kv_num_blocks[..., None].long()
    d = want.kv_indices[..., 1:] - want.kv_indices[..., :-1]
    assert bool(((d > 0) | ~live[..., 1:]).all())  # ascending, no duplicates
    sel = _blocks(want, nk)
    i = torch.arange(nq)
    last = torch.clamp((i + 1) * bq, max=Lq) - 1
    jmax = torch.clamp(last // bs, max=nk - 1)
    j = torch.arange(nk)
    allowed = (j <= jmax[:, None]) if kw.get("causal", True) else torch.ones(nq, nk, dtype=torch.bool)
    assert not bool((sel & ~allowed).any())  # nothing in the future
    assert torch.equal(want.kv_num_blocks.long(), torch.minimum(allowed.sum(-1), torch.tensor(kw["topk"])).expand(B, H, nq))
    forced = allowed & (((j > jmax[:, None] - kw.get("local_blocks", 1)) & (j <= jmax[:, None]))
                        | (j < kw.get("sink_blocks", 0)))
    assert bool((sel | ~forced).all())  # the local and sink blocks are always there


@pytest.mark.parametrize("share", ["head", "kv_head"])
def test_reference_against_torch_topk(share):
    """Causal, local_blocks=1 (the own block), no sinks, blocks dividing L: the own block plus
    torch.topk over the earlier blocks of the pooled scores computed here."""
    B, Hq, Hkv, L, D, bs, topk = 2, 4, 2, 96, 16, 12, 3
    q, k = _inputs(7, B, Hq, Hkv, L, L, D)
    n = L // bs
    qp = q.view(B, Hq, n, bs, D).mean(3)
    kp = k.view(B, Hkv, n, bs, D).mean(3).repeat_interleave(Hq // Hkv, 1)
    s = qp @ kp.transpose(-1, -2)  # (B, Hq, n, n)
    if share == "kv_head":
        s = s.view(B, Hkv, Hq // Hkv, n, n).sum(2)
    want = torch.zeros(s.shape, dtype=torch.bool)
    for b, h, i in torch.cartesian_prod(*(torch.arange(x) for x in s.shape[:3])).tolist():
        want[b, h, i, i] = True
        if i > 0:
            want[b, h, i, torch.topk(s[b, h, i, :i], min(topk - 1, i)).indices] = True
    got = topk_blocks_reference(q, k, block_size=bs, topk=topk, share=share)
    assert torch.equal(_blocks(got, n), want)


def _sdpa(q, k, v, allowed):
    g = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                           attn_mask=allowed)


@pytest.mark.parametrize("kw", [dict(block_size=32, topk=3, share="kv_head", backend="interpret"),
                                dict(block_size=16, topk=4, sink_blocks=1, share="head", pool="max")])
def test_end_to_end_causal_matches_sdpa(kw):
    B, Hq, Hkv, L, D = 1, 4, 2, 160, 32
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, h, L, D, generator=g, requires_grad=True) for h in (Hq, Hkv, Hkv))
    bs = attncc.topk_blocks(q, k, **kw)
    assert not bs.kv_indices.requires_grad and not bs.kv_num_blocks.requires_grad  # no gradient to the router
    blk = kw["block_size"]
    listed = _blocks(bs, -(-L // blk))
    if listed.shape[1] != Hq:
        listed = listed.repeat_interleave(Hq // listed.shape[1], 1)
    qi, ki = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = listed[:, :, qi // blk, ki // blk] & (ki <= qi)
    assert allowed.any(-1).all()  # the own block is always listed
    assert not allowed[..., -1, :].all()  # the schedule is sparse
    out = attncc.compile(CAUSAL)(q, k, v, block_mask=bs)
    want = _sdpa(q, k, v, allowed)
    assert (out - want).abs().max() < 2e-5
    dout = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        assert (a - e).abs().max() < 5e-5


Q, K = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)


@pytest.mark.parametrize("args, kw, err, match", [
    ((Q[0], K), {}, ValueError, r"q must have 4 dims"),
    ((Q, K.to(torch.int32)), {}, TypeError, "k must be a floating-point tensor"),
    ((Q, torch.randn(1, 3, 64, 16)), {}, ValueError, r"Hq = 4 must be a multiple of the key heads Hkv = 3"),
    ((Q, torch.randn(1, 2, 64, 8)), {}, ValueError, "head dim"),
    ((Q, torch.randn(2, 2, 64, 16)), {}, ValueError, "batch"),
    ((Q, K), dict(block_size=0), ValueError, "block_size must be a positive int"),
    ((Q, K), dict(topk=0), ValueError, "topk must be a positive int"),
    ((Q, K), dict(topk=2, local_blocks=2, sink_blocks=1), ValueError, r"local_blocks \+ sink_blocks = 3 exceeds topk = 2"),
    ((Q, K), dict(local_blocks=-1), ValueError, "local_blocks must be an int >= 0"),
    ((Q, K), dict(pool="sum"), ValueError, "pool must be one of 'mean', 'max'"),
    ((Q, K), dict(share="group"), ValueError, "share must be one of"),
    ((Q, K), dict(query_granularity="row"), ValueError, "query_granularity must be one of"),
    ((Q, K), dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_inputs_are_refused(args, kw, err, match):
    with pytest.raises(err, match=match):
        attncc.topk_blocks(*args, **kw)
    if "backend" not in kw:
        with pytest.raises(err, match=match):
            topk_blocks_reference(*args, **kw)


_AOT = '''
import json, os
os.environ["TRITON_INTERPRET"] = "0"
import torch
from attncc import aot
from attncc.runtime import routing as R
out = []
for L, D, bs, gran, share, dt in [(32768, 128, 64, "block", "kv_head", torch.bfloat16),
                                  (131072, 128, 64, "block", "kv_head", torch.bfloat16),
                                  (262144, 128, 64, "block", "kv_head", torch.bfloat16),
                                  (8192, 64, 128, "token", "head", torch.float16)]:
    q = torch.empty(1, 32, L if gran == "block" else 64, D, dtype=dt)
    kp = torch.empty(1, 8, -(-L // bs), D, dtype=torch.float32)
    launch, _ = R._kernel_launch(q, kp, bs, 16, True, 1, 1, share, gran)
    for tgt in ("sm_90a", "sm_80"):
        ck, _ = aot.compile_launch(R._topk_blocks_kernel, launch, tgt)
        out.append({"L": L, "target": tgt, **aot.resource_usage(ck.asm["cubin"])})
print(json.dumps(out))
'''


def test_kernel_compiles_for_sm90a_without_spills():
    """The routing kernel compiled with real Triton for sm_90a and sm_80 (no GPU: a separate process with
    the interpreter off), at 32k, 128k and 256k keys (512 / 2048 / 4096 key blocks in registers) and per
    token: no spills, no local memory."""
    assert len(compiled_resources(_AOT)) == 8
