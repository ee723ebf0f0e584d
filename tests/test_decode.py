"""Split-KV decode kernels (issue 16, section 1; ``attncc.runtime.decode``), under the Triton
interpreter: the decode path equals the normal forward and the dense reference for every
clause (masks with closed forms, run-time scalars and block tables, score mods, sinks, gates,
sigmoid, dot() terms), GQA ratios 1, 4 and 3, ``Lq`` = 1, 4, 16, any split count (1 split vs
many), fully masked rows (0 / -inf), and against SDPA, eager FlexAttention or a plain torch
statement where they express the pattern; the automatic choice (``Lq <= 16``, no gradient),
``decode=True`` / ``False``, the errors; a sliding window reads only its window. The kernels'
GPU compilation (sm_90a / sm_80, 0 spills) is in tests/test_aot.py."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.inputs import example_inputs
from attncc.runtime import capture
from attncc.runtime.decode import choose_splits, decode_attention, split_candidates
from conftest import TOL, max_err

# bottom-right (KV-cache) variants of the library patterns: query row i is at position
# Lk - Lq + i, so every query of a decode step sees the whole cache (the splits have work)
P = "(q + Lk - Lq)"
SPECS = {
    "causal_br": f"pattern causal_br:\n    mask: kv <= {P}\n",
    "window_br": f"pattern window_br:\n    param window: int = 24\n    mask: kv <= {P} and {P} - kv < window\n",
    "alibi_br": (f"pattern alibi_br:\n    tensor slope: float32[H]\n    mask: kv <= {P}\n"
                 f"    score: s + slope[h] * (kv - {P})\n"),
    "softcap_br": f"pattern softcap_br:\n    mask: kv <= {P}\n    score: 5 * tanh(s / 5)\n",
    "sink_window_br": (f"pattern sink_window_br:\n    param window: int = 30\n    tensor sink: float32[H]\n"
                       f"    mask: kv <= {P} and {P} - kv < window\n    sink: sink[h]\n"),
    "gated_br": (f"pattern gated_br:\n    tensor g: float32[B, Lq, H, Dv]\n    mask: kv <= {P}\n"
                 f"    gate: sigmoid(g[b, q, h, dv])\n"),
    "sigmoid_br": f"pattern sigmoid_br:\n    normalize: sigmoid\n    mask: kv <= {P}\n    score: s - log(Lk)\n",
    "document_br": (f"pattern document_br:\n    tensor doc: int32[Lk]\n"
                    f"    mask: doc[{P}] == doc[kv] and doc[kv] >= 0 and kv <= {P}\n"),
    "per_head_window_br": (f"pattern per_head_window_br:\n    tensor win: int32[H]\n"
                           f"    mask: kv <= {P} and {P} - kv < win[h]\n"),
}


def _inputs(kern, B, H, Hkv, Lq, Lk, D=32, dtype=torch.float32, seed=0):
    q, k, v, tens, _ = example_inputs(kern.ir, B, H, Hkv, Lq, Lk, D, dtype=dtype, seed=seed)
    if "win" in tens:  # per-head windows from 1 to Lk (one head sees a single key)
        tens["win"] = torch.linspace(1, Lk, H).round().to(torch.int32)
    if "doc" in tens:  # three documents and padding (-1): the last query's document is long
        doc = torch.full((Lk,), 2, dtype=torch.int32)
        doc[: Lk // 4], doc[Lk // 4: Lk // 2] = 0, 1
        doc[Lk // 2: Lk // 2 + 3] = -1
        tens["doc"] = doc
    return q, k, v, tens


def _independent(name, q, k, v, tens, window_default):
    """The pattern computed by SDPA, eager FlexAttention or plain torch (independent of the IR)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    pos = torch.arange(Lq)[:, None] + Lk - Lq
    kv = torch.arange(Lk)[None, :]
    causal = kv <= pos
    kx, vx = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    if name == "causal_br":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
    if name == "window_br":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal & (pos - kv < window_default),
                                              enable_gqa=True)
    if name in ("alibi_br", "softcap_br"):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        off = Lk - Lq
        if name == "alibi_br":
            slope = tens["slope"]

            def score_mod(sc, b, h, qi, ki):
                return sc + slope[h] * (ki - qi - off)
        else:
            def score_mod(sc, b, h, qi, ki):
                return 5 * torch.tanh(sc / 5)
        bm = create_block_mask(lambda b, h, qi, ki: ki <= qi + off, None, None, Lq, Lk, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kx.double()) / math.sqrt(D)
    if name == "sink_window_br":  # gpt-oss: a sink column joins the softmax, its weight dropped
        allowed = causal & (pos - kv < window_default)
        s = s.masked_fill(~allowed, float("-inf"))
        sink = tens["sink"].double().view(1, H, 1, 1).expand(B, H, Lq, 1)
        p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
        return p @ vx.double()
    if name == "gated_br":
        o = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ vx.double()
        return o * torch.sigmoid(tens["g"].double().permute(0, 2, 1, 3))
    if name == "sigmoid_br":  # FlashSigmoid: no row normalisation
        return (torch.sigmoid(s - math.log(Lk)) * causal) @ vx.double()
    if name == "document_br":
        doc = tens["doc"].long()
        allowed = (doc[pos] == doc[kv]) & (doc[kv] >= 0) & causal
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    if name == "per_head_window_br":
        allowed = causal & (pos - kv < tens["win"].view(H, 1, 1).long())
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None], enable_gqa=True)
    raise KeyError(name)


# (pattern, H, Hkv, Lq, splits): GQA ratios 1, 4, 3 (not a power of two) and Lq = 1, 4, 16 spread
# over the patterns; Lk = 72 keys = 5 key tiles of 16 under the interpreter
CASES = [("causal_br", 4, 4, 1, 3), ("window_br", 8, 2, 4, 2), ("alibi_br", 6, 2, 16, 3), ("softcap_br", 4, 1, 1, 4),
         ("sink_window_br", 6, 2, 4, 2), ("gated_br", 8, 2, 16, 2), ("sigmoid_br", 3, 1, 4, 3),
         ("document_br", 4, 4, 4, 3), ("per_head_window_br", 6, 2, 4, 2)]


@pytest.mark.parametrize("name,H,Hkv,Lq,splits", CASES, ids=[c[0] for c in CASES])
def test_decode_equals_forward_reference_and_independent(name, H, Hkv, Lq, splits):
    spec = SPECS[name]
    kern = attncc.compile(spec)
    q, k, v, tens = _inputs(kern, 2, H, Hkv, Lq, 72, seed=len(name))
    lse_ok = kern.ir.normalize != "sigmoid"
    got = decode_attention(kern, q, k, v, return_lse=lse_ok, num_splits=splits, **tens)
    fwd = kern(q, k, v, return_lse=lse_ok, decode=False, **tens)
    ref = attncc.reference(spec, q, k, v, return_lse=lse_ok, **tens)
    if lse_ok:
        (got, lse), (fwd, fwd_lse), (ref, ref_lse) = got, fwd, ref
        assert lse.dtype == torch.float32 and lse.shape == (2, H, Lq)
        assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
        fin = torch.isfinite(ref_lse)
        assert max_err(lse[fin], ref_lse[fin]) < 1e-4 and max_err(lse[fin], fwd_lse[fin]) < 1e-5
    assert got.shape == fwd.shape and got.dtype == q.dtype
    assert max_err(got, fwd) < 2e-6
    assert max_err(got, ref) < TOL[torch.float32]
    window = kern.ir.params.get("window") if isinstance(kern.ir.params, dict) else dict(kern.ir.params).get("window")
    assert max_err(got, _independent(name, q, k, v, tens, window)) < TOL[torch.float32]


#: the 1-D library patterns (top-left positions as written there) through the decode path
LIBRARY_1D = sorted(n for n, p in attncc.library_patterns().items()
                    if not attncc.lower(p, n).grid)


def test_every_library_pattern_decodes_like_the_reference():
    """Every 1-D library pattern (every clause: closed forms with one or several intervals,
    run-time scalars, block tables, routing, dot() terms, sink, gate, sigmoid), GQA ratio 3."""
    failures = []
    for name in LIBRARY_1D:
        path = attncc.pattern_path(name)
        kern = attncc.compile(path)
        q, k, v, tens, _ = example_inputs(kern.ir, 1, 6, 2, 3, 40, 16, seed=5)
        if kern.ir.route is not None:  # routed: the same block mask for both (topk on q, k)
            bm = attncc.topk_blocks(q, k, **kern.ir.route.kwargs())
            got = decode_attention(kern, q, k, v, num_splits=2, block_mask=bm, **tens)
            want = kern(q, k, v, decode=False, block_mask=bm, **tens)
        else:
            got = decode_attention(kern, q, k, v, num_splits=2, **tens)
            want = attncc.reference(path, q, k, v, **tens)
        if not max_err(got, want) < TOL[torch.float32]:
            failures.append((name, max_err(got, want)))
    assert len(LIBRARY_1D) >= 15 and not failures, failures


def test_split_invariance_and_more_splits_than_tiles():
    kern = attncc.compile(SPECS["alibi_br"])
    q, k, v, tens = _inputs(kern, 1, 4, 2, 2, 130, seed=3)  # 9 key tiles of 16
    one, one_lse = decode_attention(kern, q, k, v, return_lse=True, num_splits=1, **tens)
    ref = attncc.reference(SPECS["alibi_br"], q, k, v, **tens)
    assert max_err(one, ref) < TOL[torch.float32]
    for s in (4, 12):  # 12 > 9 tiles: empty splits (LSE -inf) merge with weight 0
        out, lse = decode_attention(kern, q, k, v, return_lse=True, num_splits=s, **tens)
        assert max_err(out, one) < 2e-6 and max_err(lse, one_lse) < 2e-6, s


def test_fully_masked_rows_give_zero_and_neg_inf():
    # rows whose position is below 40 see no key; the first query rows of a step are empty
    spec = f"pattern late:\n    mask: kv <= {P} - 40 and kv >= 10\n"
    kern = attncc.compile(spec)
    q, k, v, _ = _inputs(kern, 1, 4, 2, 16, 60)
    for s in (1, 3):
        out, lse = decode_attention(kern, q, k, v, return_lse=True, num_splits=s)
        rows = (torch.arange(16) + 60 - 16) - 40 < 10  # positions whose key range [10, pos - 40] is empty
        assert rows.any() and not rows.all()
        assert torch.equal(out[:, :, rows], torch.zeros_like(out[:, :, rows]))
        assert torch.isneginf(lse[:, :, rows]).all() and torch.isfinite(lse[:, :, ~rows]).all()
        assert not out.isnan().any()
        assert max_err(out, attncc.reference(spec, q, k, v)) < TOL[torch.float32]
    # nothing allowed anywhere; with a sink: output 0 and LSE = the sink logit (as the forward)
    none = attncc.compile("pattern none:\n    tensor sink: float32[H]\n    mask: kv < 0\n    sink: sink[h]\n")
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out, lse = decode_attention(none, q, k, v, return_lse=True, num_splits=2, sink=sink)
    assert torch.equal(out, torch.zeros_like(out))
    assert max_err(lse, sink.view(1, 4, 1).expand_as(lse)) == 0


def test_sliding_window_reads_only_its_window():
    """Keys before the window's first key tile are never read: NaN there changes nothing."""
    kern = attncc.compile(SPECS["window_br"], window=24)
    q, k, v, _ = _inputs(kern, 1, 4, 1, 4, 160)
    ref = attncc.reference(SPECS["window_br"], q, k, v, window=24)
    first = (160 - 4) - 24 + 1  # the smallest key any query of the step sees
    k[:, :, : first // 16 * 16] = float("nan")
    v[:, :, : first // 16 * 16] = float("nan")
    out = decode_attention(kern, q, k, v, num_splits=3)
    assert not out.isnan().any() and max_err(out, ref) < TOL[torch.float32]


def test_half_precision():
    for dtype in (torch.float16, torch.bfloat16):
        kern = attncc.compile(SPECS["softcap_br"])
        q, k, v, _ = _inputs(kern, 1, 8, 2, 4, 90, D=64, dtype=dtype)
        out = decode_attention(kern, q, k, v, num_splits=3)
        assert out.dtype == dtype
        ref = attncc.reference(SPECS["softcap_br"], q.double(), k.double(), v.double())
        assert max_err(out, ref) < TOL[dtype] * 4


def test_run_time_block_mask_packs_one_head_a_program():
    """A per-head run-time block mask (block-read table plan): one head per program, the
    forward's table at the decode's tiles; equal to the forward and to eager FlexAttention."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kern = attncc.compile(SPECS["causal_br"])
    q, k, v, _ = _inputs(kern, 1, 4, 2, 4, 128)
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(1, 4, 1, 4, generator=g) < 0.6
    blocks[..., -1] = True  # the last block (the current position) always
    bs = attncc.BlockSparse.from_dense(blocks, (32, 32))
    got = kern(q, k, v, block_mask=bs, decode=True)
    assert max_err(got, kern(q, k, v, block_mask=bs, decode=False)) < 2e-6

    def mask_mod(b, h, qi, ki):
        return (ki <= qi + 124) & blocks[b, h, qi // 32, ki // 32]

    bm = create_block_mask(mask_mod, 1, 4, 4, 128, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    assert max_err(got, want) < TOL[torch.float32]


def test_automatic_choice_and_explicit_flag():
    kern = attncc.compile(SPECS["causal_br"])
    q, k, v, _ = _inputs(kern, 1, 4, 2, 16, 64)

    def kernels(**kw):
        with capture() as rec:
            kern(*kw.pop("qkv", (q, k, v)), **kw)
        return [ln.kernel for _, ln in rec]

    assert kernels()[0] == "attn_decode"                       # Lq <= 16, no gradient: decode
    assert kernels(decode=False) == ["attn_fwd"]
    assert kernels(qkv=(torch.cat([q, q[:, :, :1]], 2), k, v)) == ["attn_fwd"]    # Lq = 17
    assert kernels(qkv=(torch.cat([q, q], 2), k, v), decode=True)[0] == "attn_decode"  # any Lq when asked
    qg = q.clone().requires_grad_()
    # a gradient is needed: the custom op's forward (its backward reads the output and LSE)
    assert kernels(qkv=(qg, k, v))[0] == "attn_decode"
    assert kernels(qkv=(qg, k, v), decode=False) == ["attn_fwd"]
    with torch.no_grad():
        assert kernels(qkv=(qg, k, v))[0] == "attn_decode"
    with pytest.raises(ValueError, match="forward only.*q require grad"):
        kern(qg, k, v, decode=True)
    # the automatic path gives the forward's result
    assert max_err(kern(q, k, v), kern(q, k, v, decode=False)) < 2e-6
    # ... and, through the op, the forward kernel's gradients
    grads = []
    for flag in (None, False):
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        out, lse = kern(qg, kg, vg, return_lse=True, decode=flag)
        (out.square().sum() + lse.sum()).backward()
        grads.append((out, lse, qg.grad, kg.grad, vg.grad))
    for a, b in zip(*grads):
        assert max_err(a, b) < 2e-6


def test_errors_before_launch():
    kern = attncc.compile(SPECS["causal_br"])
    q, k, v, _ = _inputs(kern, 1, 4, 2, 4, 64)
    with capture() as rec:
        with pytest.raises(ValueError, match="num_splits"):
            decode_attention(kern, q, k, v, num_splits=0)
        with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
            kern(q[:, :3], k, v, decode=True)
        with pytest.raises(TypeError, match="no tensor or param 'bogus'"):
            kern(q, k, v, decode=True, bogus=torch.zeros(1))
    assert rec == []
    grid = attncc.compile(attncc.pattern_path("neighborhood_2d"))
    qg = torch.randn(1, 2, 8, 8, 16)
    with pytest.raises(NotImplementedError, match="grid pattern"):
        grid(qg, qg, qg, decode=True)
    # a grid pattern takes the forward automatically (q has 5 dims)
    assert max_err(grid(qg, qg, qg), attncc.reference(attncc.pattern_path("neighborhood_2d"), qg, qg, qg)) < 1e-4


def test_split_count_rule():
    assert choose_splits(1, 8, 132) == 1
    assert choose_splits(1000, 8, 132) == 33            # ~2 programs per SM
    assert choose_splits(6, 8, 132) == 3                # at least 2 tiles a split
    assert choose_splits(10 ** 6, 1, 132) == 64         # at most 64
    assert choose_splits(1000, 10 ** 4, 132) == 1       # enough programs already


def test_split_candidates():
    assert split_candidates(4, 100) == (2, 4, 8)
    assert split_candidates(1, 100) == (1, 2)
    assert split_candidates(3, 4) == (1, 3, 4)          # at most one tile a split
    assert split_candidates(64, 10 ** 6) == (32, 64)    # at most MAX_SPLITS


def test_split_count_is_autotuned(monkeypatch, tmp_path):
    """The CUDA path's split autotuner, run under the interpreter with a substitute clock: the
    first launch of a shape bucket times every candidate on the call's inputs and keeps the
    fastest (its output is the forward's), a second compile of the same pattern reads the
    choice from autotune.json without timing, an explicit num_splits is never tuned."""
    from attncc.runtime import cache as acache
    from attncc.runtime import decode as dmod

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dmod, "_tunes", lambda device: True)
    seen = []
    launch = dmod._launch_decode

    def recording(kern, dp, *args, **kwargs):
        seen.append(dp.splits)
        return launch(kern, dp, *args, **kwargs)

    monkeypatch.setattr(dmod, "_launch_decode", recording)
    timed = {}

    def clock(fn):  # more splits are faster on this pretend device
        fn()
        timed[seen[-1]] = 1.0 / seen[-1]
        return timed[seen[-1]]

    monkeypatch.setattr(dmod, "_bench", clock)
    spec = SPECS["causal_br"]
    kern = attncc.compile(spec, backend="interpret")
    q, k, v, _ = _inputs(kern, 1, 4, 1, 1, 256)
    want = kern(q, k, v, decode=False)
    out = kern(q, k, v, decode=True)
    # rule: 16 key tiles of 16 (interpreter config), 1 program, 2 "SMs" -> 4 splits; tried 2, 4, 8
    assert sorted(timed) == [2, 4, 8]
    assert seen[-1] == 8
    assert max_err(out, want) < TOL[torch.float32]
    saved = [v for key, v in acache.read_json("autotune.json").items() if "|decode|" in key]
    assert saved == [{"split_factor": 2.0}]
    seen.clear()
    kern(q, k, v, decode=True)                          # the call's remembered plan: no timing
    assert seen == [8]

    def no_clock(fn):
        raise AssertionError("timed again")

    monkeypatch.setattr(dmod, "_bench", no_clock)
    fresh = attncc.compile(spec, backend="interpret")
    seen.clear()
    assert max_err(fresh(q, k, v, decode=True), want) < TOL[torch.float32]
    assert seen == [8]                                  # the saved factor, not timed
    seen.clear()
    assert max_err(fresh(q, k, v, decode=True, num_splits=3), want) < TOL[torch.float32]
    assert seen == [3]
    q2, k2, v2, _ = _inputs(kern, 1, 4, 1, 1, 512)
    with capture() as rec:                              # a new bucket inside capture(): nothing runs,
        fresh(q2, k2, v2, decode=True)                  # so nothing is timed: the rule's count
    assert rec[0][1].kernel == "attn_decode" and rec[0][1].grid[0] == choose_splits(32, 1, 2) == 4


def test_bench_decode_dry_run():
    """benchmarks/bench_decode.py --dry-run: the plumbing on tiny CPU shapes (the decode kernel
    is what runs for attncc, and its output equals SDPA's and FlexAttention's)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_decode.py"
    r = subprocess.run([sys.executable, str(script), "--dry-run", "--patterns", "window", "--batch", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| window | 2 | 64 |")]
    # contiguous and paged (page 16) caches, each printed as measured and in the final table
    assert [r.split("|")[4].strip() for r in rows] == ["-", "16", "-", "16"], rows


RAGGED = ("pattern ragged_window:\n    tensor kv_len: int32[B]\n    tensor win: int32[B, H]\n"
          "    mask: kv < kv_len[b] and kv <= q + kv_len[b] - Lq and q + kv_len[b] - Lq - kv < win[b, h]\n")


def test_run_time_scalars_per_batch_and_per_batch_head():
    """Masks reading run-time scalars t[b] (ragged cache lengths: query i at position
    kv_len[b] - Lq + i, as the positions twin IR writes them) and t[b, h] (a window per batch
    and head): lengths 0 and 1 included (rows with no key: 0 and -inf)."""
    kern = attncc.compile(RAGGED)
    assert kern.plan.path == "closed" and kern.plan.scalars
    B, H, Hkv, Lq, Lk = 4, 6, 2, 2, 90
    q, k, v, _ = _inputs(kern, B, H, Hkv, Lq, Lk, seed=9)
    lens = torch.tensor([90, 0, 1, 57], dtype=torch.int32)
    g = torch.Generator().manual_seed(2)
    win = torch.randint(1, 80, (B, H), generator=g, dtype=torch.int32)
    got, lse = decode_attention(kern, q, k, v, return_lse=True, num_splits=3, kv_len=lens, win=win)
    fwd, fwd_lse = kern(q, k, v, return_lse=True, decode=False, kv_len=lens, win=win)
    ref, ref_lse = attncc.reference(RAGGED, q, k, v, return_lse=True, kv_len=lens, win=win)
    pos = lens.view(B, 1, 1, 1) - Lq + torch.arange(Lq).view(1, 1, Lq, 1)
    kv = torch.arange(Lk).view(1, 1, 1, Lk)
    allowed = (kv < lens.view(B, 1, 1, 1)) & (kv <= pos) & (pos - kv < win.view(B, H, 1, 1))
    empty = ~allowed.any(-1)
    assert empty.any()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True).nan_to_num()
    assert torch.equal(got[empty], torch.zeros_like(got[empty])) and torch.isneginf(lse[empty]).all()
    assert max_err(got, fwd) < 2e-6 and max_err(got, ref) < TOL[torch.float32]
    assert max_err(got, want) < TOL[torch.float32]
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse)) and max_err(lse[fin], fwd_lse[fin]) < 1e-5


@pytest.mark.parametrize("name", ["causal", "document_causal", "per_head_window"])
def test_positions_twin_runs_through_the_decode_kernel(name):
    """kern(q, k_cache, v_cache, kv_lens=lens): the positions twin (bottom-right query positions
    in each row's own length, run-time scalars P[b, :]) is chosen for decode automatically and
    equals the forward, the reference and (causal) SDPA on the ragged mask."""
    path = attncc.pattern_path(name)
    kern = attncc.compile(path)
    B, H, Hkv, Lq, Lk = 3, 6, 2, 2, 70
    q, k, v, tens, _ = example_inputs(kern.ir, B, H, Hkv, Lq, Lk, 32, seed=1)
    if "doc" in tens:
        tens["doc"] = (torch.arange(Lk) // 25).to(torch.int32)
    lens = torch.tensor([Lk, 5 if name == "document_causal" else 0, 33], dtype=torch.int32)
    with capture() as rec:
        kern(q, k, v, kv_lens=lens, **tens)
    assert rec[0][1].kernel == "attn_decode"
    got, lse = decode_attention(kern, q, k, v, return_lse=True, num_splits=3, kv_lens=lens, **tens)
    fwd, fwd_lse = kern(q, k, v, return_lse=True, decode=False, kv_lens=lens, **tens)
    ref, ref_lse = attncc.reference(path, q, k, v, return_lse=True, kv_lens=lens, **tens)
    assert max_err(got, fwd) < 2e-6 and max_err(got, ref) < TOL[torch.float32]
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse)) and max_err(lse[fin], ref_lse[fin]) < 1e-4
    if name == "causal":
        pos = lens.view(B, 1, 1, 1) - Lq + torch.arange(Lq).view(1, 1, Lq, 1)
        kv = torch.arange(Lk).view(1, 1, 1, Lk)
        allowed = (kv < lens.view(B, 1, 1, 1)) & (kv <= pos)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True).nan_to_num()
        assert max_err(got, want) < TOL[torch.float32]
