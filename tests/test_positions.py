"""Position offsets and ragged KV lengths (``q_offset``, ``kv_offset``, ``q_total``,
``kv_total``, ``kv_lens``) on every 1-D pattern: a query / key shard of a sequence equals the
corresponding rows of the whole sequence's attention (forward, LSE, q / k / v and spec tensor
gradients), ragged KV caches equal per-row SDPA with the bottom-right mask written out and
FlexAttention (eager) with a mask_mod using the offsets, the closed forms visit exactly the
non-empty tiles of the dense mask, and bad keywords fail before any launch.

Independent implementations: a plain torch softmax over a mask / bias built here from the
patterns' formulas on global indices (``_naive``), ``scaled_dot_product_attention`` and
``flex_attention`` in eager mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attncc
from attncc.dense import nonempty_tiles
from attncc.runtime import capture

from conftest import max_err
from test_grid import _natten_window

B, H, HKV, L, D = 2, 4, 2, 40, 16
R0, R1 = 13, 31  # the query shard
PATTERNS = ["causal", "sliding_window", "alibi", "document_causal", "prefix_lm", "sink_window", "causal_bottom_right"]
PARAMS = {"sliding_window": dict(window=7), "prefix_lm": dict(prefix=9), "sink_window": dict(window=6)}
DOC = torch.tensor([0] * 10 + [1] * 17 + [-1] * 3 + [2] * 10, dtype=torch.int32)  # padding ids -1


def _tensors(name: str, grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "alibi":
        return {"slope": torch.rand(H, generator=g).requires_grad_(grad)}
    if name == "sink_window":
        return {"sink": torch.randn(H, generator=g).requires_grad_(grad)}
    if name == "document_causal":
        return {"doc": DOC}
    return {}


def _rule(name: str, qi: torch.Tensor, kj: torch.Tensor, Lq: int, Lk: int):
    """(allowed, bias) of pattern ``name`` at global query / key positions (broadcast int64
    tensors), written from the papers' formulas, not from attncc's IR."""
    p = PARAMS.get(name, {})
    causal = kj <= qi
    bias = torch.zeros(())
    if name in ("causal", "alibi"):
        allowed = causal
    elif name in ("sliding_window", "sink_window"):
        allowed = causal & (qi - kj < p["window"])
    elif name == "document_causal":
        d = DOC.long()
        allowed = causal & (d[qi.clamp(0, len(d) - 1)] == d[kj.clamp(0, len(d) - 1)]) & (d[kj.clamp(0, len(d) - 1)] >= 0)
    elif name == "prefix_lm":
        allowed = (kj < p["prefix"]) | causal
    elif name == "causal_bottom_right":
        allowed = kj <= qi + Lk - Lq
    else:
        raise KeyError(name)
    return allowed, bias


def _naive(name, q, k, v, tens, q_pos, k_pos, Lq_tot, Lk_tot, key_ok=None):
    """Plain torch attention at global positions ``q_pos`` (Lq,) / ``k_pos`` (Lk,) (float64
    softmax with the sink column; fully masked rows 0 / -inf). ``key_ok``: bool (B, Lk)."""
    qi, kj = q_pos.view(-1, 1), k_pos.view(1, -1)
    allowed, _ = _rule(name, qi, kj, Lq_tot, Lk_tot)
    allowed = allowed.view(1, 1, *allowed.shape).expand(q.shape[0], q.shape[1], -1, -1)
    if key_ok is not None:
        allowed = allowed & key_ok[:, None, None, :]
    g = q.shape[1] // k.shape[1]
    kd, vd = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    sc = q.double() @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if name == "alibi":
        sc = sc + tens["slope"].double().view(1, -1, 1, 1) * (kj - qi).double()
    sc = sc.masked_fill(~allowed, -math.inf)
    if name == "sink_window":
        sc = torch.cat([sc, tens["sink"].double().view(1, -1, 1, 1).expand(*sc.shape[:3], 1)], -1)
    lse = torch.logsumexp(sc, -1)
    p = torch.exp(sc - torch.where(lse.isinf(), 0, lse)[..., None])
    if name == "sink_window":
        p = p[..., :-1]
    return (p @ vd).to(q.dtype), lse.float()


def _qkv(Lq=L, Lk=L, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).requires_grad_(grad)  # noqa: E731
    return mk(B, H, Lq, D), mk(B, HKV, Lk, D), mk(B, HKV, Lk, D)


@pytest.mark.parametrize("name", PATTERNS)
def test_query_shard_equals_rows_of_the_whole_sequence(name):
    """q_offset: the kernel on query rows [R0, R1) (all keys) equals those rows of the whole
    sequence (kernel and naive), and the reference with the same keywords; LSE too; q / k / v
    (and slope / sink) gradients equal the whole sequence's with the loss on those rows."""
    path, params = attncc.pattern_path(name), PARAMS.get(name, {})
    kern = attncc.compile(path, **params)
    tens = _tensors(name, grad=True)
    q, k, v = _qkv(grad=True)
    out, lse = kern(q[:, :, R0:R1], k, v, return_lse=True, q_offset=R0, **tens)
    full, full_lse = kern(q, k, v, return_lse=True, **tens)
    pos = torch.arange(L)
    nv, nv_lse = _naive(name, q[:, :, R0:R1], k, v, tens, pos[R0:R1], pos, L, L)
    ref, ref_lse = attncc.reference(path, q[:, :, R0:R1], k, v, return_lse=True, q_offset=R0, **params, **tens)
    _assert_rows_of_whole((out, lse), (full, full_lse), (nv, nv_lse), (ref, ref_lse), R0, R1,
                          [q, k, v, *[x for x in tens.values() if x.requires_grad]])


def _assert_rows_of_whole(got, whole, naive, ref, r0, r1, inputs):
    """A query shard's ``(out, lse)`` equals rows ``[r0, r1)`` (dim 2) of the whole's, the naive
    and the reference (LSE ``-inf`` in the same rows); its gradients (``inputs``) under a random
    output gradient equal the whole's with that gradient on those rows, and the naive's."""
    out, lse = got
    full = whole[0]
    for want, want_lse in ((full[:, :, r0:r1], whole[1][:, :, r0:r1]), naive, ref):
        assert max_err(out, want) < 2e-5
        assert torch.equal(lse.isinf(), want_lse.isinf())
        assert max_err(lse.nan_to_num(0, 0, 0), want_lse.nan_to_num(0, 0, 0)) < 2e-5
    # gradients: the shard's loss == the whole's loss on those rows
    gout = torch.randn_like(out)
    grads = torch.autograd.grad((out * gout).sum(), inputs)
    gfull = torch.zeros_like(full)
    gfull[:, :, r0:r1] = gout
    want = torch.autograd.grad((full * gfull).sum(), inputs)
    indep = torch.autograd.grad((naive[0] * gout).sum(), inputs)
    for a, b, c in zip(grads, want, indep):
        assert max_err(a, b) < 1e-4 and max_err(a, c) < 1e-4


@pytest.mark.parametrize("name", ["causal", "alibi", "document_causal", "sink_window"])
def test_key_shards_merge_to_the_whole_sequence(name):
    """kv_offset / kv_total (context parallelism): a query shard against two key shards,
    merged by their LSEs (attncc.merge_state), equals those rows of the whole sequence;
    each part equals the reference with the same keywords. The sink joins once: patterns
    with a sink are compared part by part only."""
    path, params = attncc.pattern_path(name), PARAMS.get(name, {})
    kern = attncc.compile(path, **params)
    tens = _tensors(name)
    q, k, v = _qkv()
    cut, pos = 17, torch.arange(L)
    qs = q[:, :, R0:R1]
    parts = []
    for lo, hi in ((0, cut), (cut, L)):
        kw = dict(q_offset=R0, kv_offset=lo, q_total=L, kv_total=L)
        o, s = kern(qs, k[:, :, lo:hi], v[:, :, lo:hi], return_lse=True, **kw, **tens)
        ro, rs = attncc.reference(path, qs, k[:, :, lo:hi], v[:, :, lo:hi], return_lse=True, **kw, **params, **tens)
        no, ns = _naive(name, qs, k[:, :, lo:hi], v[:, :, lo:hi], tens, pos[R0:R1], pos[lo:hi], L, L)
        assert max_err(o, ro) < 2e-5 and max_err(o, no) < 2e-5
        assert torch.equal(s.isinf(), ns.isinf()) and max_err(s.nan_to_num(0, 0, 0), ns.nan_to_num(0, 0, 0)) < 2e-5
        parts.append((o, s))
    if name != "sink_window":
        out, lse = attncc.merge_state(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
        full, full_lse = _naive(name, qs, k, v, tens, pos[R0:R1], pos, L, L)
        assert max_err(out, full) < 2e-5 and torch.equal(lse.isinf(), full_lse.isinf())
        assert max_err(lse.nan_to_num(0, 0, 0), full_lse.nan_to_num(0, 0, 0)) < 2e-5


def _ragged_sdpa(q, k, v, lens, offset=0):
    """Per batch row: SDPA over the first lens[b] keys with the bottom-right causal mask built
    explicitly (query i at position lens[b] - Lq + i, keys at offset + j); empty rows 0."""
    Lq = q.shape[2]
    out = torch.zeros_like(q[..., : v.shape[-1]])
    for b in range(q.shape[0]):
        n = int(lens[b])
        if n == 0:
            continue
        i = torch.arange(Lq).view(-1, 1) + offset + n - Lq
        j = torch.arange(n).view(1, -1) + offset
        m = j <= i
        o = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                                             attn_mask=m, enable_gqa=True)
        out[b] = torch.where(m.any(-1).view(1, -1, 1), o[0], 0)
    return out


@pytest.mark.parametrize("Lq", [1, 5])
@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_ragged_kv_lens_equal_sdpa_and_flex(Lq, backend):
    """kv_lens (0, 1, partial, full; per batch row), GQA, default q_offset = bottom_right:
    equals per-row SDPA with the bottom-right mask written out and FlexAttention (eager) with
    a mask_mod reading the offsets; kv_lens[b] == 0 gives 0 and LSE -inf (no NaN)."""
    Bn, Lk = 4, 37
    lens = torch.tensor([0, 1, 20, 37], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(Bn, h, n, D, generator=g) for h, n in ((H, Lq), (HKV, Lk), (HKV, Lk)))
    kern = attncc.compile(attncc.pattern_path("causal"), backend=backend)
    out, lse = kern(q, k, v, kv_lens=lens, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()
    assert max_err(out, _ragged_sdpa(q, k, v, lens)) < 2e-5
    ref, ref_lse = attncc.reference(attncc.pattern_path("causal"), q, k, v, kv_lens=lens, return_lse=True)
    assert max_err(out, ref) < 2e-5 and torch.equal(lse.isinf(), ref_lse.isinf())
    off = (lens.long() - Lq)

    def mask_mod(b, h, qi, kj):
        return (kj < lens[b]) & (kj <= qi + off[b])

    bm = create_block_mask(mask_mod, Bn, None, Lq, Lk, device="cpu")
    want = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    rows = lse > -math.inf  # flex_attention's empty rows are not specified as 0
    assert max_err(out.transpose(1, 2)[rows.transpose(1, 2)], want.transpose(1, 2)[rows.transpose(1, 2)]) < 2e-5


def test_ragged_gradients_and_window_with_offset():
    """Ragged sliding window with a kv_offset (a cache whose first keys were evicted): q / k / v
    gradients equal the reference's and naive's (rows with kv_lens 0 give zero gradients)."""
    Bn, Lq, Lk, off = 3, 5, 23, 100
    lens = torch.tensor([0, 9, 23], dtype=torch.int32)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(Bn, h, n, D, generator=g).requires_grad_() for h, n in ((H, Lq), (HKV, Lk), (HKV, Lk)))
    path = attncc.pattern_path("sliding_window")
    kern = attncc.compile(path, window=7)
    out = kern(q, k, v, kv_lens=lens, kv_offset=off)
    ref = attncc.reference(path, q, k, v, kv_lens=lens, kv_offset=off, window=7)
    nv = torch.cat([_naive("sliding_window", q[b:b + 1], k[b:b + 1], v[b:b + 1], {}, torch.arange(Lq) + off + int(n) - Lq,
                           torch.arange(Lk) + off, 0, 0, key_ok=(torch.arange(Lk) < n)[None])[0]
                    for b, n in enumerate(lens)])
    assert max_err(out, ref) < 2e-5 and max_err(out, nv) < 2e-5
    gout = torch.randn_like(out)
    grads = [torch.autograd.grad((y * gout).sum(), [q, k, v]) for y in (out, ref, nv)]
    for a, b_, c in zip(*grads):
        assert max_err(a, b_) < 1e-4 and max_err(a, c) < 1e-4
    assert (grads[0][0][0] == 0).all() and (grads[0][1][0] == 0).all()


@pytest.mark.parametrize("name,Lk,kw", [
    ("sliding_window", 4096, dict(q_offset=4000)),
    ("sliding_window", 1024, dict(q_offset=4000, kv_offset=3000, q_total=8192, kv_total=8192)),
    ("sliding_window", 1024, dict(q_offset=0, kv_offset=3000, q_total=8192, kv_total=8192)),  # an empty shard pair
    ("causal", 512, dict(kv_lens=torch.tensor([0, 70, 300], dtype=torch.int32))),
    ("prefix_lm", 512, dict(q_offset=700, kv_offset=100, kv_total=1000)),
    ("causal_bottom_right", 512, dict(q_offset=200, kv_total=900)),
])
def test_visited_tiles_are_the_nonempty_tiles(name, Lk, kw):
    """The closed form with offsets: tile_stats (the kernel's own iteration) visits exactly the
    (query tile, key tile) pairs where the mask written here at global positions allows a pair;
    a window far from 0 visits only its window's tiles; an empty shard pair visits none."""
    Lq = 48
    Bn = 3 if "kv_lens" in kw else 1
    params = dict(PARAMS.get(name, {}))
    if name == "sliding_window":
        params["window"] = 64
    kern = attncc.compile(attncc.pattern_path(name), **params)
    st = kern.tile_stats(Lq, Lk, B=Bn, **kw)
    assert st["visited"] == nonempty_tiles(_dense_mask(name, params, Bn, Lq, Lk, kw), st["block_m"], st["block_n"])
    if name == "sliding_window" and kw.get("q_offset"):
        assert st["visited"] <= -(-Lq // st["block_m"]) * (-(-(Lq + 64) // st["block_n"]) + 1)


def _dense_mask(name, params, Bn, Lq, Lk, kw):
    """bool (B, 1, Lq, Lk) of ``name`` at the positions of ``kw`` (written out here)."""
    lens = kw.get("kv_lens", torch.full((Bn,), Lk)).long()
    ko = kw.get("kv_offset", 0)
    qo = kw.get("q_offset", None)
    out = []
    for b in range(Bn):
        n = int(lens[b])
        qstart = qo if qo is not None else ko + n - Lq
        kt = kw.get("kv_total", ko + n)
        qt = kw.get("q_total", kt)
        qi = torch.arange(Lq).view(-1, 1) + qstart
        kj = torch.arange(Lk).view(1, -1) + ko
        p = params
        if name == "sliding_window":
            m = (kj <= qi) & (qi - kj < p["window"])
        elif name == "causal":
            m = kj <= qi
        elif name == "prefix_lm":
            m = (kj < p["prefix"]) | (kj <= qi)
        else:
            m = kj <= qi + kt - qt
        out.append(m & (torch.arange(Lk).view(1, -1) < n))
    return torch.stack(out)[:, None]


def test_bottom_right_and_totals():
    """q_offset="bottom_right" makes causal the KV-cache convention (== causal_bottom_right);
    causal_bottom_right on a query shard reads the totals (q_total = kv_total = Lk)."""
    q, k, v = _qkv(Lq=6, Lk=L)
    causal = attncc.compile(attncc.pattern_path("causal"))
    cbr = attncc.compile(attncc.pattern_path("causal_bottom_right"))
    assert max_err(causal(q, k, v, q_offset="bottom_right"), cbr(q, k, v)) < 2e-5
    # a query shard of cbr's (Lq = L) square problem: the rows of the whole
    qf, kf, vf = _qkv()
    assert max_err(cbr(qf[:, :, 3:9], kf, vf, q_offset=3), cbr(qf, kf, vf)[:, :, 3:9]) < 2e-5


def test_no_keyword_changes_nothing():
    """Without position keywords no twin is built and the call is the pattern's own kernel."""
    kern = attncc.compile(attncc.pattern_path("sliding_window"), window=11)  # not compiled by another test
    src = kern.source
    q, k, v = _qkv()
    out = kern(q, k, v)
    assert not [k for k in kern.__dict__.get("_twins", {}) if k[0] == "positions"] and kern.source == src
    assert max_err(out, attncc.reference(attncc.pattern_path("sliding_window"), q, k, v, window=11)) < 2e-5


def test_out_of_range_global_read_names_the_tensor():
    """doc shorter than the global positions read: a ValueError naming doc (kernel and reference)."""
    path = attncc.pattern_path("document_causal")
    kern = attncc.compile(path)
    q, k, v = _qkv(Lq=8, Lk=8)
    with pytest.raises(ValueError, match="'doc'"):
        kern(q, k, v, q_offset=35, kv_offset=35, doc=DOC)
    with pytest.raises(ValueError, match="'doc'"):
        attncc.reference(path, q, k, v, q_offset=35, kv_offset=35, doc=DOC)
    out = kern(q, k, v, q_offset=32, kv_offset=32, doc=DOC)  # the last 8 positions: in range
    assert max_err(out, attncc.reference(path, q, k, v, q_offset=32, kv_offset=32, doc=DOC)) < 2e-5


BAD = [
    (dict(kv_lens=torch.tensor([3, 41], dtype=torch.int32)), ValueError, r"kv_lens\[1\] = 41 is outside \[0, 40\]"),
    (dict(kv_lens=torch.tensor([-1, 4], dtype=torch.int32)), ValueError, r"kv_lens\[0\] = -1"),
    (dict(kv_lens=torch.tensor([3.0, 4.0])), ValueError, "kv_lens must be an int32 tensor"),
    (dict(kv_lens=torch.tensor([3], dtype=torch.int32)), ValueError, r"kv_lens must be an int32 tensor of shape \(B,\)"),
    (dict(kv_lens=[3, 4]), TypeError, "kv_lens must be an int32 tensor"),
    (dict(kv_lens=torch.tensor([3, 4], dtype=torch.int32, device="meta")), ValueError, "kv_lens is on meta"),
    (dict(q_offset=-2), ValueError, r"q_offset\[0\] = -2"),
    (dict(q_offset="top_left"), ValueError, "q_offset must be"),
    (dict(kv_offset=1.5), TypeError, "kv_offset must be an int"),
    (dict(kv_offset=torch.tensor([1, 2, 3])), ValueError, r"kv_offset must have shape \(B,\)"),
    (dict(kv_offset=5, kv_total=20), ValueError, "kv_total"),
    (dict(q_offset=30, q_total=31), ValueError, "q_total"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD)
def test_bad_keywords_fail_before_launch(kw, exc, msg):
    """Bad kv_lens / offsets / totals: a clear error naming the keyword, before any launch
    (nothing recorded by capture), from the kernel and the reference alike."""
    kern = attncc.compile(attncc.pattern_path("causal"))
    q, k, v = _qkv(Lq=6)
    with capture() as launches, pytest.raises(exc, match=msg):
        kern(q, k, v, **kw)
    assert launches == []
    with pytest.raises(exc, match=msg):
        attncc.reference(attncc.pattern_path("causal"), q, k, v, **kw)


# ----------------------------------------------------------------------------- grid patterns
#: grid pattern -> (params, whole grid): shards of the FIRST grid axis (offsets in its rows)
GRID_CASES = {
    "neighborhood_2d_rpb": (dict(kernel=3), (7, 4)),
    "swin_window": (dict(P=2), (6, 4)),
    "video_causal_neighborhood_3d": (dict(kernel_t=2, kernel=3), (5, 3, 3)),
}
GR0, GR1 = 2, 5  # the query shard: rows [GR0, GR1) of the first grid axis


def _grid_allowed(name, params, qc, kc, grid):
    """bool (Lq, Lk): pattern ``name`` on global grid coordinates ``qc`` (Lq, n) / ``kc`` (Lk, n),
    written from NATTEN's window rule (tests/test_grid.py) and Swin's windows, not from the IR."""
    n = len(grid)
    if name == "swin_window":
        P = params["P"]
        return ((qc[:, None, :] // P) == (kc[None, :, :] // P)).all(-1)
    causal = [name == "video_causal_neighborhood_3d"] + [False] * (n - 1)
    kern = [params["kernel"]] * n
    if causal[0]:
        kern[0] = params["kernel_t"]
    ok = torch.ones(len(qc), len(kc), dtype=torch.bool)
    for a in range(n):
        wins = [_natten_window(i, grid[a], kern[a], 1, 1, causal[a]) for i in range(grid[a])]
        ok &= torch.tensor([[int(y) in wins[int(x)] for y in kc[:, a]] for x in qc[:, a]], dtype=torch.bool)
    return ok


def _grid_coords(rows, rest):
    """Global coordinates (tokens, n) of whole rows ``rows`` of a grid whose other axes are ``rest``."""
    return torch.cartesian_prod(torch.as_tensor(list(rows)), *[torch.arange(r) for r in rest]).view(-1, 1 + len(rest))


def _grid_naive(name, params, q, k, v, q_rows, k_rows, grid, rpb=None):
    """Plain torch attention of query rows ``q_rows`` and key rows ``k_rows`` (of the first grid
    axis) at their global coordinates on ``grid``: float64 softmax, NAT's relative-position bias
    rpb[h, dy + k - 1, dx + k - 1]; empty rows 0 / -inf. Returns out (B, H, *q grid, D), lse."""
    n = len(grid)
    qc, kc = _grid_coords(q_rows, grid[1:]), _grid_coords(k_rows, grid[1:])
    allowed = _grid_allowed(name, params, qc, kc, grid)
    g = q.shape[1] // k.shape[1]  # GQA
    qf, kf, vf = (x.flatten(2, 1 + n).double().repeat_interleave(r, 1) for x, r in ((q, 1), (k, g), (v, g)))
    sc = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if rpb is not None:
        c = params["kernel"] - 1
        d = kc[None, :, :] - qc[:, None, :] + c
        sc = sc + rpb.double()[:, d[..., 0].clamp(0, 2 * c), d[..., 1].clamp(0, 2 * c)][None]
    sc = sc.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(sc, -1)
    p = torch.exp(sc - torch.where(lse.isinf(), 0, lse)[..., None])
    return (p @ vf).to(q.dtype).unflatten(2, q.shape[2:-1]), lse.float().unflatten(2, q.shape[2:-1])


def _grid_inputs(name, grad=False, seed=0):
    """params, grid, q, k, v (one batch row, 2 query heads sharing 1 KV head: GQA) and rpb."""
    params, grid = GRID_CASES[name]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, *grid, D, generator=g).requires_grad_(grad) for h in (2, 1, 1))
    tens = {"rpb": torch.randn(2, 5, 5, generator=g).requires_grad_(grad)} if name == "neighborhood_2d_rpb" else {}
    return params, grid, q, k, v, tens


@pytest.mark.parametrize("name", list(GRID_CASES))
def test_grid_query_shard_equals_rows_of_the_whole_grid(name):
    """q_offset on a grid pattern (rows of the first axis): the kernel on query rows [GR0, GR1)
    against the whole key grid equals those rows of the whole grid's result (kernel), the
    reference with the same keywords and a plain torch softmax written from NATTEN's window rule
    / Swin's windows at global coordinates (windows shifted inward at the GLOBAL borders); LSE
    too; q / k / v and rpb gradients equal the whole grid's with the loss on those rows."""
    path = attncc.pattern_path(name)
    params, grid, q, k, v, tens = _grid_inputs(name, grad=True)
    kern = attncc.compile(path, **params)
    out, lse = kern(q[:, :, GR0:GR1], k, v, return_lse=True, q_offset=GR0, **tens)
    assert out.shape == (1, 2, GR1 - GR0, *grid[1:], D) and lse.shape == out.shape[:-1]
    full, full_lse = kern(q, k, v, return_lse=True, **tens)
    nv, nv_lse = _grid_naive(name, params, q[:, :, GR0:GR1], k, v, range(GR0, GR1), range(grid[0]), grid,
                             tens.get("rpb"))
    ref, ref_lse = attncc.reference(path, q[:, :, GR0:GR1], k, v, return_lse=True, q_offset=GR0, **params, **tens)
    _assert_rows_of_whole((out, lse), (full, full_lse), (nv, nv_lse), (ref, ref_lse), GR0, GR1,
                          [q, k, v, *tens.values()])


@pytest.mark.parametrize("name", ["neighborhood_2d_rpb", "video_causal_neighborhood_3d"])
def test_grid_key_shards_merge_to_the_whole_grid(name):
    """kv_offset / q_total on a grid (context parallelism over image rows / video frames): a
    query shard against two key shards of rows, merged by their LSEs, equals those rows of the
    whole grid; each part equals the reference and the NATTEN-rule softmax (a part whose rows
    are all outside the window: 0 and LSE -inf, no NaN)."""
    path = attncc.pattern_path(name)
    params, grid, q, k, v, tens = _grid_inputs(name, seed=1)
    kern = attncc.compile(path, **params)
    Y, cut = grid[0], 1
    qs = q[:, :, GR0:GR1]
    parts = []
    for lo, hi in ((0, cut), (cut, Y)):
        kw = dict(q_offset=GR0, kv_offset=lo, q_total=Y)  # kv_total: the same first axis
        o, s_ = kern(qs, k[:, :, lo:hi], v[:, :, lo:hi], return_lse=True, **kw, **tens)
        ro, rs = attncc.reference(path, qs, k[:, :, lo:hi], v[:, :, lo:hi], return_lse=True, **kw, **params, **tens)
        no, ns = _grid_naive(name, params, qs, k[:, :, lo:hi], v[:, :, lo:hi], range(GR0, GR1), range(lo, hi), grid,
                             tens.get("rpb"))
        assert not o.isnan().any() and not s_.isnan().any()
        assert max_err(o, ro) < 2e-5 and max_err(o, no) < 2e-5
        assert torch.equal(s_.isinf(), ns.isinf()) and torch.equal(rs.isinf(), ns.isinf())
        assert max_err(s_.nan_to_num(0, 0, 0), ns.nan_to_num(0, 0, 0)) < 2e-5
        parts.append((o, s_))
    assert parts[0][1].isinf().any()  # query rows whose window misses row 0: empty there
    out, lse = attncc.merge_state(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    full, full_lse = kern(q, k, v, return_lse=True, **tens)
    assert max_err(out, full[:, :, GR0:GR1]) < 2e-5
    assert max_err(lse, full_lse[:, :, GR0:GR1]) < 2e-5


@pytest.mark.parametrize("name,params,grid,qr,kr", [
    ("neighborhood_2d", dict(kernel=3), (16, 8), (4, 8), (2, 12)),
    ("neighborhood_2d", dict(kernel=3), (16, 8), (0, 4), (8, 16)),   # a shard pair with no allowed pair
    ("swin_window", dict(P=4), (16, 8), (4, 12), (0, 16)),
    ("video_causal_neighborhood_3d", dict(kernel_t=2, kernel=3), (8, 4, 4), (4, 6), (0, 8)),
])
def test_grid_visited_tiles_are_the_nonempty_tiles(name, params, grid, qr, kr):
    """tile_stats of a grid shard pair (the twin's own iteration: its block table at global
    coordinates) visits exactly the (query tile, key tile) pairs of the flattened local tokens
    where the NATTEN / Swin rule written here allows a pair; an empty pair visits none."""
    kern = attncc.compile(attncc.pattern_path(name), **params)
    w = math.prod(grid[1:])
    kw = dict(q_offset=qr[0], kv_offset=kr[0], q_total=grid[0])
    st = kern.tile_stats((qr[1] - qr[0]) * w, (kr[1] - kr[0]) * w, grid=(qr[1] - qr[0], *grid[1:]), **kw)
    m = _grid_allowed(name, params, _grid_coords(range(*qr), grid[1:]), _grid_coords(range(*kr), grid[1:]), grid)
    assert st["visited"] == nonempty_tiles(m[None, None], st["block_m"], st["block_n"])
    assert (st["visited"] == 0) == (not m.any())


GRID_BAD = [
    (dict(kv_lens=torch.tensor([3, 3], dtype=torch.int32)), NotImplementedError, "kv_lens: pattern"),
    (dict(q_offset=1, q_total=7, kv_total=8), ValueError, r"q_total\[0\] = 7 and kv_total\[0\] = 8 differ"),
    (dict(q_offset=2, q_total=3), ValueError, "q_total"),                 # below q_offset + rows
    (dict(q_offset=-1), ValueError, r"q_offset\[0\] = -1"),
    (dict(q_offset=0, q_total=2), ValueError, "global grid"),             # 3 x 3 window on 2 rows
]


@pytest.mark.parametrize("kw,exc,msg", GRID_BAD)
def test_grid_bad_keywords_fail_before_launch(kw, exc, msg):
    """Grid patterns: ragged kv_lens refused, q_total != kv_total, totals below the shard,
    negative offsets and a neighborhood larger than the GLOBAL first axis: a clear error naming
    the keyword before any launch, kernel and reference alike; k whose other axes differ from
    q's, a 4-D q, and block_mask too."""
    path = attncc.pattern_path("neighborhood_2d")
    kern = attncc.compile(path, kernel=3)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, 2, 2, 5, D, generator=g) for _ in range(3))
    with capture() as launches:
        with pytest.raises(exc, match=msg):
            kern(q, k, v, **kw)
        with pytest.raises(exc, match=msg):
            attncc.reference(path, q, k, v, kernel=3, **kw)
        with pytest.raises(ValueError, match="every axis but the first"):
            kern(q, k[..., :4, :], v[..., :4, :], q_offset=1)
        with pytest.raises(ValueError, match="2-D grid"):
            kern(q.flatten(2, 3), k, v, q_offset=1)
        with pytest.raises(NotImplementedError, match="block_mask"):
            kern(q, k, v, q_offset=1, block_mask=attncc.BlockSparse.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool),
                                                                               16))
    assert launches == []


def test_grid_shard_too_large_for_exact_coordinate_reads():
    """A grid shard of more than 2**18 tokens whose score reads rpb at coordinates: refused
    before any launch (the reads' index arithmetic would no longer be exact), naming the limit."""
    from attncc.grid_positions import EXACT_READ_TOKENS

    kern = attncc.compile(attncc.pattern_path("neighborhood_2d_rpb"), kernel=3)
    x = torch.zeros(1, 2, EXACT_READ_TOKENS // 256 + 1, 256, 1)
    with capture() as launches, pytest.raises(ValueError, match=f"more than {EXACT_READ_TOKENS} tokens"):
        kern(x, x, x, q_offset=0, rpb=torch.zeros(2, 5, 5))
    assert launches == []


def test_torch_compile_through_the_op():
    """torch.compile (aot_eager, fullgraph) of a ragged call: forward and gradients equal eager."""
    kern = attncc.compile(attncc.pattern_path("causal"))
    lens = torch.tensor([3, 40], dtype=torch.int32)
    q, k, v = _qkv(Lq=5, grad=True)

    def f(q, k, v, lens):
        return kern(q, k, v, kv_lens=lens, kv_offset=2)

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, lens)
    want = attncc.reference(attncc.pattern_path("causal"), q, k, v, kv_lens=lens, kv_offset=2)
    assert max_err(got, want) < 2e-5
    gout = torch.randn_like(got)
    for a, b_ in zip(*(torch.autograd.grad((y * gout).sum(), [q, k, v]) for y in (got, want))):
        assert max_err(a, b_) < 1e-4


def test_block_mask_with_positions_stays_local():
    """block_mask with q_offset: the block lists index the call's local rows / keys, the
    pattern's mask the global positions (kernel, reference and a plain torch softmax agree)."""
    Lq, Lk, off = 16, 40, 20
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, D, generator=g) for n in (Lq, Lk, Lk))
    blocks = torch.rand(1, 2, 2, 5, generator=g) > 0.4
    bs = attncc.BlockSparse.from_dense(blocks, 8)
    kern = attncc.compile(attncc.pattern_path("causal"))
    out = kern(q, k, v, block_mask=bs, q_offset=off)
    ref = attncc.reference(attncc.pattern_path("causal"), q, k, v, block_mask=bs, q_offset=off)
    m = (torch.arange(Lk)[None] <= torch.arange(Lq)[:, None] + off)
    m = m & blocks.repeat_interleave(8, 2).repeat_interleave(8, 3)[..., :Lq, :Lk]
    p = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~m, -math.inf), -1).nan_to_num(0)
    assert max_err(out, ref) < 2e-5 and max_err(out, p @ v) < 2e-5


def test_ragged_twin_compiles_for_gpus_without_spills():
    """The twin a kv_lens call runs (causal), forward, backward and counting kernels at the first
    candidate of each family, compiled with real Triton for sm_90a and sm_80: 0 spill bytes, no
    local memory, wgmma / mma (attncc.aot.problems). Every candidate of causal, sliding_window,
    alibi (ragged and offset) and document_causal (offset) was compiled the same way (README)."""
    from attncc import aot

    jobs = aot.plan_jobs(str(attncc.pattern_path("causal")), targets=("sm_90a", "sm_80"), dtypes=("bf16",),
                         head_dims=(128,), positions="ragged")
    first = {}
    for j in jobs:
        first.setdefault((j.target, j.family), j)
    recs = aot.run_jobs(list(first.values()), workers=2)
    assert {r["kernel"] for r in recs} == {"attn_fwd", "attn_bwd_pre", "attn_bwd_dq", "attn_bwd_dkdv", "count_tiles"}
    assert all(r["pattern"] == "causal[ragged]" for r in recs)
    bad = [f"{r['target']} {r['kernel']} {r['launch']}: {'; '.join(aot.problems(r))}" for r in recs if aot.problems(r)]
    assert not bad, "\n".join(bad)
