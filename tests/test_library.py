"""Every library pattern vs the dense reference and vs independent implementations
(FlexAttention in eager mode with hand-written mods, SDPA), across edge shapes;
tile_stats visited == non-empty tiles of the reference mask."""

import math
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attncc
from attncc.dense import dense_mask, nonempty_tiles
from attncc.inputs import example_inputs

from conftest import TOL, max_err

# (B, Hq, Hkv, Lq, Lk, D, Dv): square, decode (Lq=1), ragged + GQA + D=80, Lq > Lk, L=1, Dv != D
SHAPES = [
    (1, 2, 2, 64, 64, 32, 32),
    (1, 2, 1, 1, 45, 32, 32),
    (1, 4, 2, 77, 130, 80, 80),
    (2, 2, 2, 130, 45, 16, 16),
    (1, 1, 1, 1, 1, 16, 16),
    (1, 2, 1, 50, 61, 32, 48),
]
SMALL = dict(window=24, prefix=20, sinks=3, dilation=3)


def _params(name):
    ir = attncc.lower(attncc.pattern_path(name), name)
    return {k: SMALL[k] for k, _ in ir.params if k in SMALL}


def _shape_ok(name, shape):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    return not (name == "document_causal" and Lq > Lk)  # doc[q] needs Lq <= Lk


LIB = sorted(attncc.library_patterns(grid=False))  # grid patterns: tests/test_grid.py


def _ir(name):
    return attncc.lower(attncc.pattern_path(name), name)


#: patterns FlexAttention can express (the others -- sigmoid, sinks, gates, dot() -- are
#: checked against unfused torch compositions in tests/test_epilogue.py; routed patterns
#: against SDPA with the routed blocks expanded in tests/test_block_sparse.py)
LIB_FLEX = [n for n in LIB if _ir(n).normalize == "softmax" and _ir(n).sink is None and _ir(n).gate is None
            and not _ir(n).lowrank and _ir(n).route is None]


@pytest.mark.parametrize("name", LIB)
def test_library_pattern_matches_reference(name):
    path = attncc.pattern_path(name)
    params = _params(name)
    kern = attncc.compile(path, name, **params)
    for i, shape in enumerate(SHAPES):
        if not _shape_ok(name, shape):
            continue
        B, H, Hkv, Lq, Lk, D, Dv = shape
        q, k, v, tens, sizes = example_inputs(kern.ir, B, H, Hkv, Lq, Lk, D, Dv, seed=i)
        if kern.ir.normalize == "sigmoid":  # no LSE
            out = kern(q, k, v, **tens)
            ref = attncc.reference(path, q, k, v, pattern=name, **params, **tens)
            assert out.shape == (B, H, Lq, Dv) and not torch.isnan(out).any()
            assert max_err(out, ref) < TOL[torch.float32], (shape, max_err(out, ref))
            continue
        out, lse = kern(q, k, v, return_lse=True, **tens)
        ref, rlse = attncc.reference(path, q, k, v, pattern=name, return_lse=True, **params, **tens)
        assert out.shape == (B, H, Lq, Dv) and lse.shape == (B, H, Lq)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert max_err(out, ref) < TOL[torch.float32], (shape, max_err(out, ref))
        assert torch.equal(torch.isinf(lse), torch.isinf(rlse)), shape
        fin = torch.isfinite(rlse)
        if fin.any():
            assert max_err(lse[fin], rlse[fin]) < 1e-4
        # the kernel visits exactly the non-empty tiles of the reference mask
        st = kern.tile_stats(Lq, Lk, B=B, H=H, **{n: tens[n] for n in kern.plan.mask_tensors})
        ne = nonempty_tiles(dense_mask(kern.ir, sizes, tens, "cpu"), st["block_m"], st["block_n"])
        assert st["visited"] == ne, (shape, st, ne)
        assert st["full"] + st["partial"] == st["visited"] <= st["total"]


@pytest.mark.parametrize("name", ["causal", "sliding_window", "document_causal", "global_sliding_window"])
def test_tile_stats_skip_at_larger_length(name):
    """Sparse patterns visit far fewer tiles than dense; counts equal the reference's non-empty tiles."""
    params = {k: (100 if k == "window" else v) for k, v in _params(name).items()}
    kern = attncc.compile(attncc.pattern_path(name), name, **params)
    L = 512
    q, k, v, tens, sizes = example_inputs(kern.ir, 1, 1, 1, L, L, 16)
    st = kern.tile_stats(L, L, **{n: tens[n] for n in kern.plan.mask_tensors})
    ne = nonempty_tiles(dense_mask(kern.ir, sizes, tens, "cpu"), st["block_m"], st["block_n"])
    assert st["visited"] == ne
    assert st["visited"] < 0.6 * st["total"]
    assert st["full"] > 0


# --- independent implementations: hand-written FlexAttention mods (not from our IR)
def _flex_mods(name, p, tens, Lq, Lk):
    if name == "causal":
        return None, lambda b, h, q, kv: kv <= q
    if name == "causal_bottom_right":
        return None, lambda b, h, q, kv: kv <= q + (Lk - Lq)
    if name == "sliding_window":
        w = p["window"]
        return None, lambda b, h, q, kv: (kv <= q) & (q - kv < w)
    if name == "sliding_window_bidirectional":
        w = p["window"]
        return None, lambda b, h, q, kv: (q - kv).abs() <= w
    if name == "dilated_sliding_window":
        w, d = p["window"], p["dilation"]
        return None, lambda b, h, q, kv: ((q - kv).abs() <= w * d) & ((q - kv).abs() % d == 0)
    if name == "prefix_lm":
        n = p["prefix"]
        return None, lambda b, h, q, kv: (kv < n) | (kv <= q)
    if name == "global_sliding_window":
        w, s = p["window"], p["sinks"]
        return None, lambda b, h, q, kv: (kv <= q) & ((kv < s) | (q - kv < w))
    if name == "document_causal":
        doc = tens["doc"]
        return None, lambda b, h, q, kv: (doc[q] == doc[kv]) & (doc[kv] >= 0) & (kv <= q)
    if name == "per_head_window":
        win = tens["win"]
        return None, lambda b, h, q, kv: (kv <= q) & (q - kv < win[h])
    if name == "duo_attention":
        ret, w, s = tens["is_retrieval"], p["window"], p["sinks"]
        return None, lambda b, h, q, kv: (kv <= q) & (ret[h] | (kv < s) | (q - kv < w))
    if name == "alibi":
        slope = tens["slope"]
        return (lambda sc, b, h, q, kv: sc + slope[h] * (kv - q)), (lambda b, h, q, kv: kv <= q)
    if name == "softcap":
        cap = 50.0
        return (lambda sc, b, h, q, kv: cap * torch.tanh(sc / cap)), (lambda b, h, q, kv: kv <= q)
    if name == "relative_position_bias":
        table = tens["table"]
        return (lambda sc, b, h, q, kv: sc + table[h, kv - q + Lq - 1]), None
    if name == "query_temperature":
        tau, c = tens["tau"], tens["kbias"]
        return (lambda sc, b, h, q, kv: tau[b, h, q] * sc + c[b, h, kv]), (lambda b, h, q, kv: kv <= q)
    raise KeyError(name)


@pytest.mark.parametrize("name", LIB_FLEX)
def test_library_pattern_matches_flex_attention(name):
    params = _params(name)
    full_params = dict(attncc.lower(attncc.pattern_path(name), name, **params).params)
    kern = attncc.compile(attncc.pattern_path(name), name, **params)
    B, H, Hkv, Lq, Lk, D = 1, 4, 2, 96, 96, 32
    q, k, v, tens, _ = example_inputs(kern.ir, B, H, Hkv, Lq, Lk, D, seed=7)
    score_mod, mask_mod = _flex_mods(name, full_params, tens, Lq, Lk)
    bm = create_block_mask(mask_mod, None, None, Lq, Lk, device="cpu") if mask_mod else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, return_lse=True)
    out, lse = kern(q, k, v, return_lse=True, **tens)
    assert max_err(out, ref) < TOL[torch.float32]
    fin = torch.isfinite(aux)
    assert max_err(lse[fin], aux[fin]) < 1e-4


def test_causal_matches_sdpa_top_left_and_bottom_right():
    B, H, Lq, Lk, D = 1, 2, 40, 70, 32
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Lq, Lk, Lk))
    tl_ = attncc.compile(attncc.pattern_path("causal"))(q, k, v)
    # SDPA's is_causal is top-left aligned
    assert max_err(tl_, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)) < 2e-5
    br = attncc.compile(attncc.pattern_path("causal_bottom_right"))(q, k, v)
    mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(diagonal=Lk - Lq)
    assert max_err(br, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    name = "softcap"
    kern = attncc.compile(attncc.pattern_path(name))
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 1, 70, 70, 80, dtype=dtype, seed=1)
    out = kern(q, k, v, **tens)
    assert out.dtype == dtype
    ref = attncc.reference(attncc.pattern_path(name), q.double(), k.double(), v.double(), **tens)
    assert max_err(out, ref) < TOL[dtype] * 4  # output rounding to the half type dominates


def test_fully_masked_rows_give_zero_and_neg_inf():
    # the first 5 query rows have no allowed key; docs with id -1 are padding
    src = "pattern late:\n    mask: kv <= q - 5\n"
    kern = attncc.compile(src)
    q, k, v, _, _ = example_inputs(kern.ir, 1, 2, 2, 40, 40, 32)
    out, lse = kern(q, k, v, return_lse=True)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.isinf(lse[:, :, :5]).all() and (lse[:, :, :5] < 0).all()
    assert torch.isfinite(lse[:, :, 5:]).all()
    assert max_err(out, attncc.reference(src, q, k, v)) < 2e-5
    # all keys masked everywhere
    none = attncc.compile("pattern none:\n    mask: kv < 0\n")
    out, lse = none(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    assert none.tile_stats(40, 40)["visited"] == 0


def test_scale_and_strided_inputs():
    kern = attncc.compile(attncc.pattern_path("sliding_window"), window=10)
    g = torch.Generator().manual_seed(0)
    # (B, L, H, D) memory layout viewed as (B, H, L, D)
    q = torch.randn(1, 50, 2, 32, generator=g).transpose(1, 2)
    k = torch.randn(1, 50, 2, 32, generator=g).transpose(1, 2)
    v = torch.randn(1, 50, 2, 32, generator=g).transpose(1, 2)
    out = kern(q, k, v, scale=0.3)
    ref = attncc.reference(attncc.pattern_path("sliding_window"), q, k, v, scale=0.3, window=10)
    assert max_err(out, ref) < 2e-5
    mask = torch.ones(50, 50, dtype=torch.bool).tril() & ~torch.ones(50, 50, dtype=torch.bool).tril(-10)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert max_err(out, sdpa) < 2e-5


def test_default_scale_is_inverse_sqrt_head_dim():
    kern = attncc.compile("pattern dense:\n    score: s\n")
    q, k, v, _, _ = example_inputs(kern.ir, 1, 2, 2, 20, 20, 48)
    a = kern(q, k, v)
    b = kern(q, k, v, scale=1 / math.sqrt(48))
    assert torch.equal(a, b)
    assert max_err(a, torch.nn.functional.scaled_dot_product_attention(q, k, v)) < 2e-5
