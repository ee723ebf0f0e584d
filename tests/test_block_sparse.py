"""Run-time block sparsity (issue 15, sections 1-2): ``kern(q, k, v, block_mask=...)`` with an
``attncc.BlockSparse`` or a FlexAttention ``BlockMask``, against FlexAttention in eager mode
on the same indices (an independent implementation), SDPA with the expanded mask, and the
dense reference; block-read masks in specs; bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import attncc
from attncc import BlockSparse
from attncc.runtime import tiles

CAUSAL = attncc.pattern_path("causal")
FULL = """
pattern full:
    \"\"\"Every key (no mask).\"\"\"
"""


def _random_schedule(g, B, H, nq, nk, max_blocks, p_empty=0.2):
    """Random kv lists: unsorted, duplicate-free, empty rows, garbage past the counts."""
    num = torch.randint(0, max_blocks + 1, (B, H, nq), generator=g, dtype=torch.int32)
    num[torch.rand(B, H, nq, generator=g) < p_empty] = 0
    idx = torch.stack([torch.randperm(nk, generator=g)[:max_blocks] for _ in range(B * H * nq)]).view(B, H, nq, -1)
    idx = idx.to(torch.int32)
    pos = torch.arange(max_blocks)
    idx = torch.where(pos < num[..., None], idx, torch.full_like(idx, 10**6))  # past the count: ignored
    return num, idx


def _dense_allowed(bs: BlockSparse, B, Hq, Lq, Lk, pattern_mask):
    """bool (B, Hq, Lq, Lk): the pattern's mask AND the pair's block listed (computed here)."""
    bq, bk = bs.block_size
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    dense = torch.zeros(*bs.kv_num_blocks.shape[:2], nq, nk, dtype=torch.bool)
    for lists in ((bs.kv_num_blocks, bs.kv_indices), (bs.full_kv_num_blocks, bs.full_kv_indices)):
        if lists[0] is None:
            continue
        for b, h, i in torch.cartesian_prod(*(torch.arange(n) for n in lists[0].shape)).tolist():
            for j in lists[1][b, h, i, :int(lists[0][b, h, i])].tolist():
                dense[b, h, i, j] = True
    if dense.shape[1] not in (1, Hq):  # one list per key/value head
        dense = dense.repeat_interleave(Hq // dense.shape[1], dim=1)
    qi, ki = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    return dense[:, :, qi // bq, ki // bk].expand(B, Hq, Lq, Lk) & pattern_mask(qi, ki)


def _sdpa(q, k, v, allowed):
    """SDPA with a bool mask; rows with no allowed key give 0 (attncc's convention)."""
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                           attn_mask=allowed)
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))


CASES = [  # (spec, pattern mask, B, Hq, Hkv, Lq, Lk, block size, schedule heads)
    (CAUSAL, lambda qi, ki: ki <= qi, 2, 4, 2, 100, 100, (32, 32), "q"),
    (FULL, lambda qi, ki: torch.ones_like(ki <= qi), 1, 4, 2, 70, 130, (16, 32), "kv"),
    (CAUSAL, lambda qi, ki: ki <= qi, 2, 2, 2, 96, 96, (48, 24), "one"),
]


@pytest.mark.parametrize("backend", ["torch", "interpret"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_block_mask_forward_and_grads_match_sdpa_and_reference(case, backend):
    spec, pmask, B, Hq, Hkv, Lq, Lk, (bq, bk), heads = CASES[case]
    g = torch.Generator().manual_seed(case)
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    th = {"q": Hq, "kv": Hkv, "one": 1}[heads]
    num, idx = _random_schedule(g, B, th, nq, nk, max_blocks=min(nk, 3))
    bs = BlockSparse(num, idx, (bq, bk))
    q = torch.randn(B, Hq, Lq, 32, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, 32, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, 32, generator=g, requires_grad=True)
    kern = attncc.compile(spec, backend=backend)
    out = kern(q, k, v, block_mask=bs)
    allowed = _dense_allowed(bs, B, Hq, Lq, Lk, pmask)
    assert (~allowed.any(-1)).any() and allowed.any()  # the schedule has empty rows and visited ones
    want = _sdpa(q, k, v, allowed)
    assert (out - want).abs().max() < 2e-5
    ref = attncc.reference(spec, q.detach(), k.detach(), v.detach(), block_mask=bs)
    assert (out.detach() - ref).abs().max() < 2e-5
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    exp = torch.autograd.grad(want, (q, k, v), dout)
    for a, e in zip(got, exp):
        assert (a - e).abs().max() < 5e-5


def test_flex_block_mask_is_read_and_matches_flex_attention():
    g = torch.Generator().manual_seed(5)
    B, H, L, D, bs_ = 1, 2, 512, 32, 128
    n = L // bs_
    # every row a permutation of the key blocks (unsorted, duplicate-free), 2..n of them listed
    idx = torch.stack([torch.randperm(n, generator=g) for _ in range(B * H * n)]).view(B, H, n, n).to(torch.int32)
    num = torch.randint(2, n + 1, (B, H, n), generator=g, dtype=torch.int32)
    num[0, 0, 0] = 0  # an empty query block
    listed = torch.zeros(B, H, n, n, dtype=torch.bool)
    for h in range(H):
        for i in range(n):
            listed[0, h, i, idx[0, h, i, :num[0, h, i]].long()] = True
    # FlexAttention in eager mode evaluates mask_mod on every pair and does not consult the
    # block lists: the block membership is part of its mask_mod here
    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=bs_,
                                  mask_mod=lambda b, h, qi, ki: (ki <= qi) & listed[b, h, qi // bs_, ki // bs_])
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = flex_attention(q, k, v, block_mask=bm)  # (FlexAttention has no backward on CPU)
    got = attncc.compile(CAUSAL)(q, k, v, block_mask=bm)
    allowed = _dense_allowed(BlockSparse.from_flex(bm), B, H, L, L, lambda qi, ki: ki <= qi)
    rows = allowed.any(-1)
    assert (~rows).any()
    assert (got - want)[rows].abs().max() < 2e-5  # flex_attention's empty rows are not specified as 0
    assert got[~rows].abs().max() == 0
    assert (got - _sdpa(q, k, v, allowed)).abs().max() < 2e-5


def test_from_dense_to_dense_roundtrip_and_full_lists():
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(2, 3, 5, 7, generator=g) < 0.4
    full = blocks & (torch.rand(2, 3, 5, 7, generator=g) < 0.5)
    bs = BlockSparse.from_dense(blocks, 64)
    assert bs.block_size == (64, 64)
    assert torch.equal(bs.to_dense(7), blocks)
    assert torch.equal(bs.kv_num_blocks, blocks.sum(-1).to(torch.int32))
    two = BlockSparse.from_dense(blocks, (64, 32), full=full)
    assert torch.equal(two.to_dense(7), blocks)
    assert torch.equal(two.full_kv_num_blocks, full.sum(-1).to(torch.int32))
    # listed indices ascending
    first = two.kv_indices[..., 0].long()
    assert bool(((first < 7) | (two.kv_num_blocks == 0)).all())


def test_tile_stats_equal_the_schedule_block_count():
    """With blocks equal to the CPU tiles and the full pattern, the tiles visited are the
    blocks listed; with causal, those not above the diagonal."""
    kern = attncc.compile(FULL)
    cfg = attncc.runtime.CPU_CONFIG
    L, H = 256, 2
    g = torch.Generator().manual_seed(2)
    n_m, n_n = L // cfg.block_m, L // cfg.block_n
    blocks = torch.rand(1, H, n_m, n_n, generator=g) < 0.3
    bs = BlockSparse.from_dense(blocks, (cfg.block_m, cfg.block_n))
    st = kern.tile_stats(L, L, H=H, block_mask=bs)
    assert st["visited"] == int(blocks.sum())
    assert st["full"] == int(blocks.sum())  # no mask, whole tiles: every listed tile runs unmasked
    causal = attncc.compile(CAUSAL).tile_stats(L, L, H=H, block_mask=bs)
    qt, kt = torch.arange(n_m)[:, None] * cfg.block_m, torch.arange(n_n)[None, :] * cfg.block_n
    lower = kt <= qt + cfg.block_m - 1
    assert causal["visited"] == int((blocks & lower).sum())


def test_block_read_mask_in_a_spec_builds_no_dense_mask(monkeypatch):
    spec = """
pattern blocky:
    \"\"\"Causal inside the 32 x 32 blocks that blk sets (a run-time block mask written in the spec).\"\"\"
    tensor blk: bool[B, H, (Lq + 31) // 32, (Lk + 31) // 32]
    mask: kv <= q and blk[b, h, q // 32, kv // 32]
"""
    kern = attncc.compile(spec, backend="interpret")
    assert kern.plan.path == "table" and kern.plan.blocks is not None
    assert kern.plan.blocks.intervals is not None  # the closed form of kv <= q
    assert "block table from the block tensor blk" in kern.plan.describe()

    def dense(*a, **k):
        raise AssertionError("a block-read mask must not be evaluated per (q, kv) pair")

    monkeypatch.setattr(tiles, "tile_classes", dense)
    g = torch.Generator().manual_seed(3)
    B, H, L = 1, 2, 80
    blk = torch.rand(B, H, 3, 3, generator=g) < 0.6
    q, k, v = (torch.randn(B, H, L, 16, generator=g) for _ in range(3))
    out = kern(q, k, v, blk=blk)
    qi, ki = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = blk[:, :, qi // 32, ki // 32] & (ki <= qi)
    assert (out - _sdpa(q, k, v, allowed)).abs().max() < 2e-5


def test_grid_pattern_takes_a_block_mask():
    spec = attncc.pattern_path("neighborhood_2d")
    kern = attncc.compile(spec, backend="interpret")
    g = torch.Generator().manual_seed(4)
    B, H, Y, X, D = 1, 2, 8, 8, 16
    q, k, v = (torch.randn(B, H, Y, X, D, generator=g) for _ in range(3))
    L = Y * X
    blocks = torch.rand(B, H, L // 16, L // 16, generator=g) < 0.5
    bs = BlockSparse.from_dense(blocks, 16)
    out = kern(q, k, v, block_mask=bs)
    ref = attncc.reference(spec, q, k, v, block_mask=bs)
    assert (out - ref).abs().max() < 2e-5
    plain = attncc.reference(spec, q, k, v)
    assert (out - plain).abs().max() > 1e-3  # the block mask changed the result


@pytest.mark.parametrize("make, err, match", [
    (lambda: BlockSparse(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2), 32), TypeError,
     "kv_indices must be an integer tensor"),
    (lambda: BlockSparse(torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32), 32),
     ValueError, "kv_num_blocks must have 3 dims"),
    (lambda: BlockSparse(torch.zeros(1, 1, 3, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32), 32),
     ValueError, "must start with the shape of kv_num_blocks"),
    (lambda: BlockSparse(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32), (0, 32)),
     ValueError, "block_size must be"),
])
def test_bad_schedules_are_refused_on_construction(make, err, match):
    with pytest.raises(err, match=match):
        make()


@pytest.mark.parametrize("num, idx, match", [
    ([[[1, 1]]], [[[[5, 0], [0, 0]]]], r"kv_indices\[0, 0, 0, 0\] = 5 is outside \[0, 2\)"),
    ([[[1]]], [[[[0]]]], "has 1 query blocks; Lq = 64 with BQ = 32 needs 2"),
    ([[[1, 1]], [[1, 1]], [[1, 1]]], [[[[0], [0]]]] * 3, "batch dim 3; expected 1 or B = 1"),
])
def test_bad_block_masks_are_refused_before_launch(num, idx, match):
    kern = attncc.compile(CAUSAL)
    q = torch.randn(1, 2, 64, 16)
    bs = BlockSparse(torch.tensor(num, dtype=torch.int32), torch.tensor(idx, dtype=torch.int32), 32)
    with pytest.raises(ValueError, match=match):
        kern(q, q, q, block_mask=bs)
    with pytest.raises(ValueError, match=match):
        attncc.reference(CAUSAL, q, q, q, block_mask=bs)


def test_block_mask_of_another_type_is_refused():
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(TypeError, match="block_mask must be an attncc.BlockSparse"):
        attncc.compile(CAUSAL)(q, q, q, block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool))


def test_block_size_not_dividing_the_tiles_is_exact():
    """Blocks of 24 keys under tiles of CPU_CONFIG.block_n keys: a tile with some listed block
    is visited, and the block test inside it keeps the result exact."""
    g = torch.Generator().manual_seed(6)
    B, H, L = 1, 1, 90
    blocks = torch.rand(B, H, math.ceil(L / 24), math.ceil(L / 24), generator=g) < 0.5
    bs = BlockSparse.from_dense(blocks, 24)
    q, k, v = (torch.randn(B, H, L, 16, generator=g) for _ in range(3))
    out = attncc.compile(FULL, backend="interpret")(q, k, v, block_mask=bs)
    qi, ki = torch.arange(L)[:, None], torch.arange(L)[None, :]
    assert (out - _sdpa(q, k, v, blocks[:, :, qi // 24, ki // 24])).abs().max() < 2e-5


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_routed_pattern_runs_producer_and_consumer(backend):
    """moba.attn (route: topk): the call routes with topk_blocks on q, k and attends inside the
    selected blocks; equal to SDPA with the routed blocks expanded here, forward and grads."""
    from attncc.runtime.routing import topk_blocks_reference

    spec = attncc.pattern_path("moba")
    kern = attncc.compile(spec, block=32, topk=3, backend=backend)
    assert kern.ir.route is not None and kern.ir.route.topk == 3
    g = torch.Generator().manual_seed(8)
    B, Hq, Hkv, L, D = 1, 4, 2, 160, 32
    q = torch.randn(B, Hq, L, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, generator=g, requires_grad=True)
    out = kern(q, k, v)
    bs = topk_blocks_reference(q, k, block_size=32, topk=3)  # share=kv_head: one list per KV head
    assert tuple(bs.kv_num_blocks.shape) == (B, Hkv, 5)
    allowed = _dense_allowed(bs, B, Hq, L, L, lambda qi, ki: ki <= qi)
    causal = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
    assert (allowed != causal).any()  # routing dropped some causal blocks (topk 3 of up to 5)
    want = _sdpa(q, k, v, allowed)
    assert (out - want).abs().max() < 2e-5
    assert (out.detach() - attncc.reference(spec, q.detach(), k.detach(), v.detach(), block=32, topk=3)).abs().max() < 2e-5
    dout = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        assert (a - e).abs().max() < 5e-5
    assert "== route (two kernels per call)" in attncc.explain(spec)


@pytest.mark.parametrize("clause, match", [
    ("route: topk(0)", "K and block must be >= 1"),
    ("route: topk(4, pool=median)", "pool must be one of mean, max"),
    ("route: topk(4, blocks=64)", "topk\\(\\) has no keyword 'blocks'"),
    ("route: topk(2, local=2, sink=1)", "local \\+ sink = 3 blocks are forced but K = 2"),
    ("route: top(4)", "route: must be topk"),
])
def test_route_clause_errors_point_at_the_spec(clause, match):
    spec = f"pattern r:\n    mask: kv <= q\n    {clause}\n"
    with pytest.raises(attncc.SpecError, match=match) as e:
        attncc.compile(spec)
    assert ":3:" in str(e.value)


def test_block_mass_is_the_softmax_mass_of_each_listed_block():
    """block_mass against the dense probabilities of the same call (computed here with SDPA's
    formula in float64): per listed block, the probability summed over its keys and averaged
    over its queries; the masses of a query block sum to 1 over its slots."""
    g = torch.Generator().manual_seed(9)
    B, Hq, Hkv, L, D, bq = 1, 4, 2, 100, 16, 32
    n = -(-L // bq)
    num, idx = _random_schedule(g, B, Hkv, n, n, max_blocks=3, p_empty=0.0)
    num = num.clamp(min=1)
    idx[..., 0] = torch.arange(n, dtype=torch.int32)  # the own block first: every row has a key
    idx = torch.where(torch.arange(3) < num[..., None], idx, 0)
    for i in range(n):  # duplicate-free rows
        for h in range(Hkv):
            row = idx[0, h, i, :int(num[0, h, i])].tolist()
            num[0, h, i] = len(dict.fromkeys(row))
            idx[0, h, i, :int(num[0, h, i])] = torch.tensor(list(dict.fromkeys(row)), dtype=torch.int32)
    bs = BlockSparse(num, idx, bq)
    q = torch.randn(B, Hq, L, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    kern = attncc.compile(CAUSAL)
    out, lse = kern(q, k, k, block_mask=bs, return_lse=True)
    mass = kern.block_mass(q, k, lse, bs)
    assert mass.shape == (B, Hq, n, 3)
    allowed = _dense_allowed(bs, B, Hq, L, L, lambda qi, ki: ki <= qi)
    sc = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(D)
    p = torch.softmax(sc.masked_fill(~allowed, float("-inf")), -1)
    for h in range(Hq):
        for i in range(n):
            rows = slice(i * bq, min(L, (i + 1) * bq))
            for s_ in range(3):
                j = int(idx[0, h // 2, i, s_])
                want = p[0, h, rows, j * bq:(j + 1) * bq].sum(-1).mean() if s_ < int(num[0, h // 2, i]) else 0.0
                assert abs(float(mass[0, h, i, s_]) - float(want)) < 1e-5
    assert torch.allclose(mass.sum(-1), torch.ones(B, Hq, n), atol=1e-5)


@pytest.mark.parametrize("spec, causal", [(CAUSAL, True), (FULL, False)])
def test_kv_index_call_is_token_level_topk(spec, causal):
    """kern(q, k, v, kv_index=...) (DeepSeek sparse attention): equal to SDPA with the listed
    keys (and the pattern's mask) built here, and to reference(kv_index=...)."""
    g = torch.Generator().manual_seed(10)
    B, Hq, Hkv, L, D, topk = 1, 4, 2, 40, 16, 6
    q = torch.randn(B, Hq, L, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    idx = torch.randint(-2, L + 2, (B, L, Hkv, topk), generator=g, dtype=torch.int32)
    kern = attncc.compile(spec)
    out = kern(q, k, v, kv_index=idx)
    allowed = torch.zeros(B, Hq, L, L, dtype=torch.bool)
    for i in range(L):
        for h in range(Hq):
            for j in idx[0, i, h // 2].tolist():
                if 0 <= j < L and (j <= i or not causal):
                    allowed[0, h, i, j] = True
    want = _sdpa(q, k, v, allowed)
    assert (out - want).abs().max() < 2e-5
    ref = attncc.reference(spec, q.detach(), k, v, kv_index=idx)
    assert (out.detach() - ref).abs().max() < 2e-5
    dq, = torch.autograd.grad(out.sum(), q)
    dq_want, = torch.autograd.grad(want.sum(), q)
    assert (dq - dq_want).abs().max() < 5e-5


def test_kv_index_refused_for_other_patterns():
    q = torch.randn(1, 2, 16, 8)
    idx = torch.zeros(1, 16, 2, 2, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="kv_index: token-level top-k"):
        attncc.compile(attncc.pattern_path("sliding_window"), window=4)(q, q, q, kv_index=idx)
    with pytest.raises(ValueError, match=r"kv_index must have shape \(B, Lq, Hkv, topk\)"):
        attncc.reference(CAUSAL, q, q, q, kv_index=idx[:, :8])


def test_repeated_calls_take_new_block_tensors_and_tables():
    """The direct call path (same signature again, no autograd): a block-mask call with new
    lists rebuilds its tile lists; a table plan whose mask reads no tensor reuses its table."""
    g = torch.Generator().manual_seed(11)
    B, H, L = 1, 2, 64
    q, k, v = (torch.randn(B, H, L, 16, generator=g) for _ in range(3))
    kern = attncc.compile(CAUSAL, backend="interpret")
    qi, ki = torch.arange(L)[:, None], torch.arange(L)[None, :]
    for _ in range(3):
        blocks = torch.rand(B, H, 2, 2, generator=g) < 0.6
        out = kern(q, k, v, block_mask=BlockSparse.from_dense(blocks, 32))
        assert (out - _sdpa(q, k, v, blocks[:, :, qi // 32, ki // 32] & (ki <= qi))).abs().max() < 2e-5
    spec = "pattern nonaffine:\n    mask: max(q, kv) < 2 * min(q, kv) + 3\n"
    table = attncc.compile(spec, backend="interpret")
    assert table.plan.path == "table" and not table.plan.mask_tensors
    want = _sdpa(q, k, v, (torch.maximum(qi, ki) < 2 * torch.minimum(qi, ki) + 3).expand(B, H, L, L))
    for _ in range(2):
        assert (table(q, k, v) - want).abs().max() < 2e-5
