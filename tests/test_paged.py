"""Paged KV caches (issue 16 section 2, attncc.runtime.paged): kern(q, k_cache, v_cache,
block_table=, kv_lens=) in the decode (Lq <= 16) and forward (prefill) kernels under the
interpreter, against the dense reference on the gathered cache, the contiguous-cache call with
kv_lens, a pure-torch gather + SDPA, and FlexAttention's PagedAttention in eager mode on CPU."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc
from attncc.runtime.paged import gather_cache

B, HQ, HKV, D = 3, 4, 2, 32


def _page(k, v, lens, page_size, seed=0, num_pages=None):
    """Page the contiguous caches ``k`` / ``v`` ``(B, Hkv, Lk, D)``: row ``b``'s first
    ``lens[b]`` keys on shuffled pages (unused page-table entries -1, unused slots NaN: never
    read). Returns ``(k_cache, v_cache, block_table, kv_lens)``."""
    g = torch.Generator().manual_seed(seed)
    n_pages = [-(-n // page_size) for n in lens]
    P = num_pages or sum(n_pages) + 2
    kc = torch.full((P, page_size, k.shape[1], k.shape[3]), float("nan"), dtype=k.dtype)
    vc = torch.full((P, page_size, v.shape[1], v.shape[3]), float("nan"), dtype=v.dtype)
    perm, used = torch.randperm(P, generator=g), 0
    bt = torch.full((len(lens), max(1, max(n_pages))), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        bt[b, : n_pages[b]] = perm[used: used + n_pages[b]]
        used += n_pages[b]
        for j in range(n):
            kc[bt[b, j // page_size], j % page_size] = k[b, :, j]
            vc[bt[b, j // page_size], j % page_size] = v[b, :, j]
    return kc, vc, bt, torch.tensor(lens, dtype=torch.int32)


def _cache(page_size, lens, num_pages=None, seed=0, Lq=1, dtype=torch.float32):
    """q and a shuffled paged cache holding each row's lens[b] random keys (see :func:`_page`),
    the page table and kv_lens."""
    g = torch.Generator().manual_seed(seed)
    Lk = max(1, max(lens))
    k = torch.randn(len(lens), HKV, Lk, D, generator=g).to(dtype)
    v = torch.randn(len(lens), HKV, Lk, D, generator=g).to(dtype)
    q = torch.randn(len(lens), HQ, Lq, D, generator=g).to(dtype)
    return (q, *_page(k, v, lens, page_size, seed, num_pages))


def _spec(name):
    return attncc.library.pattern_path(name)


def _kern(name):
    return attncc.compile(_spec(name), **({"window": 20} if name == "sliding_window" else {}))


def _tensors(name):
    return {"slope": -torch.linspace(0.1, 0.8, HQ)} if name == "alibi" else {}


def _sdpa(name, q, kc, vc, bt, lens, tens):
    """Pure torch: gather by hand, a bottom-right causal / window / ALiBi bias, SDPA per row."""
    P, S = kc.shape[:2]
    outs = []
    for b in range(q.shape[0]):
        n, Lq = int(lens[b]), q.shape[2]
        if n == 0:
            outs.append(torch.zeros_like(q[b]))
            continue
        rows = [int(bt[b, j // S]) * S + j % S for j in range(n)]
        k = kc.flatten(0, 1)[rows].transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        v = vc.flatten(0, 1)[rows].transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        qi = torch.arange(Lq)[:, None] + n - Lq
        kj = torch.arange(n)[None, :]
        allow = kj <= qi
        if name == "sliding_window":
            allow &= qi - kj < 20
        bias = torch.where(allow, 0.0, float("-inf")).expand(HQ, Lq, n).clone()
        if name == "alibi":
            bias = bias + tens["slope"][:, None, None] * (kj - qi)
        o = torch.nn.functional.scaled_dot_product_attention(q[b].double(), k.double(), v.double(),
                                                             attn_mask=bias.double())
        outs.append(torch.nan_to_num(o, nan=0.0).to(q.dtype))  # rows with no key: 0
    return torch.stack(outs)


CASES = [  # (pattern, Lq, page size)
    ("causal", 1, 16), ("causal", 4, 64), ("causal", 40, 16), ("causal", 40, 64),
    ("sliding_window", 1, 64), ("sliding_window", 40, 16),
    ("alibi", 4, 16), ("alibi", 40, 64),
]


@pytest.mark.parametrize("name,Lq,page", CASES)
def test_paged_equals_reference_contiguous_and_sdpa(name, Lq, page):
    lens = [70, 1, 0] if Lq == 1 else [70, 45, 0]
    q, kc, vc, bt, kl = _cache(page, lens, Lq=Lq, seed=Lq + page)
    kern, tens = _kern(name), _tensors(name)
    out, lse = kern(q, kc, vc, block_table=bt, kv_lens=kl, return_lse=True, **tens)
    assert torch.isfinite(out).all()
    params = {"window": 20} if name == "sliding_window" else {}
    ref, ref_lse = attncc.reference(_spec(name), q, kc, vc, block_table=bt, kv_lens=kl, return_lse=True,
                                    **params, **tens)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()  # kv_lens 0: output 0, LSE -inf
    k, v = gather_cache(kc, vc, bt, kl)  # the contiguous cache (zero past kv_lens)
    torch.testing.assert_close(out, kern(q, k, v, kv_lens=kl, **tens), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, _sdpa(name, q, kc, vc, bt, kl, tens), atol=2e-5, rtol=2e-5)


def test_decode_and_forward_kernels_both_page():
    """Lq = 4 through the decode kernel (several splits) and through the forward; pages of 8
    and 24 slots (one page lookup per key: not a multiple of the key tile)."""
    kern = _kern("causal")
    for page in (8, 24):
        q, kc, vc, bt, kl = _cache(page, [70, 33, 1], Lq=4, seed=page)
        ref = attncc.reference(_spec("causal"), q, kc, vc, block_table=bt, kv_lens=kl)
        dec = attncc.runtime.paged.paged_attention(kern, q, kc, vc, bt, kl, decode=True, num_splits=3)
        fwd = kern(q, kc, vc, block_table=bt, kv_lens=kl, decode=False)
        torch.testing.assert_close(dec, ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(fwd, ref, atol=2e-5, rtol=2e-5)


def test_paged_forward_is_autotuned(monkeypatch, tmp_path):
    """The CUDA path's paged-forward tuner (the forward's own ``_tune``), run under the
    interpreter with a substitute device name, arch and clock: every candidate (no TMA / warp
    specialisation: rows come through the page table) is launched on the call's paged inputs
    and gives the reference's numbers, the fastest is kept in autotune.json under its page
    size's family, and the next call launches it untimed."""
    import triton.testing

    from attncc.runtime import cache as acache
    from attncc.runtime import capture
    from attncc.runtime import decode as dmod
    from attncc.runtime import kernel as kmod
    from attncc.runtime import paged as pmod

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dmod, "_tunes", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "pretend-gpu")
    monkeypatch.setattr(kmod, "_arch", lambda device: 90)
    runs = []
    launch = pmod._run_forward

    def recording(*args):
        out = launch(*args)
        runs.append((args[-1], out[0].clone()))
        return out

    monkeypatch.setattr(pmod, "_run_forward", recording)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0 / runs[-1][0].block_m)[1])
    kern = attncc.compile(_spec("causal"), backend="interpret")
    q, kc, vc, bt, kl = _cache(8, [70, 33, 1], Lq=20, seed=3)
    ref = attncc.reference(_spec("causal"), q, kc, vc, block_table=bt, kv_lens=kl)
    out = kern(q, kc, vc, block_table=bt, kv_lens=kl, decode=False)
    tried = {cfg for cfg, _ in runs}
    assert tried == set(pmod.paged_candidates(D, 90, torch.float32)) and len(tried) > 1
    for cfg, o in runs:
        torch.testing.assert_close(o, ref, atol=2e-5, rtol=2e-5, msg=lambda m, cfg=cfg: f"{cfg}: {m}")
    best = max(tried, key=lambda c: c.block_m)                  # the pretend clock favours tall tiles
    assert runs[-1][0] == best
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    saved = {k: v for k, v in acache.read_json("autotune.json").items() if "|fwd:paged8|" in k}
    assert list(saved.values()) == [best.__dict__]
    runs.clear()
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: pytest.fail("timed again"))
    kern(q, kc, vc, block_table=bt, kv_lens=kl, decode=False)
    assert [cfg for cfg, _ in runs] == [best]
    runs.clear()
    q2, kc2, vc2, bt2, kl2 = _cache(16, [70, 33, 1], Lq=20, seed=4)
    with capture() as rec:  # a new bucket (page 16) where nothing may be timed: the first candidate, not saved
        kern(q2, kc2, vc2, block_table=bt2, kv_lens=kl2, decode=False)
    assert [cfg for cfg, _ in runs] == [pmod.paged_candidates(D, 90, torch.float32)[0]]
    assert [ln.kernel for _, ln in rec] == ["attn_fwd"]
    assert not any("|fwd:paged16|" in k for k in acache.read_json("autotune.json"))


def test_routed_pages_block_mask():
    """Paged cache + run-time block sparsity over the logical cache (routed pages, issue 16 s2):
    key block j of 16 covers cache keys [16 j, 16 j + 16) of each row; decode (Lq = 1, several
    splits) and forward (Lq = 20) equal the reference on the gathered cache with the same block
    mask and kv_lens, and a torch softmax over the explicitly built mask."""
    kern = _kern("causal")
    g = torch.Generator().manual_seed(7)
    for Lq in (1, 20):
        q, kc, vc, bt, kl = _cache(16, [70, 45], Lq=Lq, seed=Lq)
        cap = bt.shape[1] * 16
        blocks = torch.rand(2, HKV, -(-Lq // 16), cap // 16, generator=g) < 0.5
        blocks[..., -1] = True
        bs = attncc.BlockSparse.from_dense(blocks, (16, 16))
        k, v = gather_cache(kc, vc, bt, kl)
        ref = attncc.reference(_spec("causal"), q, k, v, kv_lens=kl, block_mask=bs)
        got = kern(q, kc, vc, block_table=bt, kv_lens=kl, block_mask=bs)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
        if Lq == 1:
            dec = attncc.runtime.paged.paged_attention(kern, q, kc, vc, bt, kl, decode=True, num_splits=3,
                                                       block_mask=bs)
            torch.testing.assert_close(dec, ref, atol=2e-5, rtol=2e-5)
        # independent: bottom-right causal, kv < lens[b], the listed blocks (per KV head)
        G = HQ // HKV
        for b in range(2):
            n = int(kl[b])
            qi = torch.arange(Lq)[:, None] + n - Lq
            ki = torch.arange(cap)[None, :]
            for h in range(HQ):
                allow = (ki <= qi) & (ki < n) & blocks[b, h // G][torch.arange(Lq) // 16][:, torch.arange(cap) // 16]
                s = (q[b, h].double() @ k[b, h // G].double().nan_to_num().T) / math.sqrt(D)
                s = s.masked_fill(~allow, float("-inf"))
                p = torch.softmax(s, -1).nan_to_num()
                want = p @ v[b, h // G].double().nan_to_num()
                torch.testing.assert_close(got[b, h].double(), want, atol=2e-5, rtol=2e-5)


def test_page_table_is_read():
    """Swapping two pages in the table (and their contents) gives the same result; swapping only
    the table entries changes it."""
    kern = _kern("causal")
    q, kc, vc, bt, kl = _cache(16, [64, 40, 17], seed=3)
    out = kern(q, kc, vc, block_table=bt, kv_lens=kl)
    a, b = int(bt[0, 1]), int(bt[1, 0])
    kc2, vc2, bt2 = kc.clone(), vc.clone(), bt.clone()
    kc2[[a, b]], vc2[[a, b]] = kc[[b, a]], vc[[b, a]]
    bt2[0, 1], bt2[1, 0] = b, a
    torch.testing.assert_close(kern(q, kc2, vc2, block_table=bt2, kv_lens=kl), out, atol=0, rtol=0)
    assert not torch.allclose(kern(q, kc2, vc2, block_table=bt, kv_lens=kl)[:2], out[:2])


def test_flex_paged_attention_eager_cpu():
    """FlexAttention's PagedAttention (eager, CPU) on the same physical cache and page table."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    page, n_pages, lens, Lq = 16, 12, [50, 21], 4
    pa = PagedAttention(n_pages, page, len(lens), device="cpu")
    kflex = torch.zeros(1, HKV, n_pages * page, D)
    vflex = torch.zeros(1, HKV, n_pages * page, D)
    g = torch.Generator().manual_seed(5)
    L = max(lens)
    K, V = torch.randn(len(lens), HKV, L, D, generator=g), torch.randn(len(lens), HKV, L, D, generator=g)
    for b, n in enumerate(lens):
        pa.reserve(torch.tensor(b), torch.tensor(n))
        pa.assign(torch.tensor([b]), torch.arange(n)[None], K[b:b + 1, :, :n], V[b:b + 1, :, :n], kflex, vflex)
    q = torch.randn(len(lens), HQ, Lq, D, generator=g)
    kl = torch.tensor(lens, dtype=torch.int32)
    off = kl - Lq

    def causal_br(b, h, qi, kv):
        return (kv <= qi + off[b]) & (kv < kl[b])

    Lpad = -(-L // page) * page
    bm = create_block_mask(causal_br, len(lens), None, Lq, Lpad, device="cpu", BLOCK_SIZE=page)
    ref = flex_attention(q, kflex, vflex, block_mask=pa.convert_logical_block_mask(bm), enable_gqa=True)
    kc = kflex[0].view(HKV, n_pages, page, D).permute(1, 2, 0, 3)  # (num_pages, page, Hkv, D): a view
    vc = vflex[0].view(HKV, n_pages, page, D).permute(1, 2, 0, 3)
    bt = pa.page_table[: len(lens), : -(-L // page)].to(torch.int32)
    out = _kern("causal")(q, kc, vc, block_table=bt, kv_lens=kl)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_torch_executor_gathers():
    kern = attncc.compile(_spec("sliding_window"), window=20, backend="torch")
    q, kc, vc, bt, kl = _cache(16, [50, 9, 0], Lq=4, seed=9)
    ref = attncc.reference(_spec("sliding_window"), q, kc, vc, block_table=bt, kv_lens=kl, window=20)
    torch.testing.assert_close(kern(q, kc, vc, block_table=bt, kv_lens=kl), ref, atol=2e-5, rtol=2e-5)


def test_errors_before_launch():
    kern = _kern("causal")
    q, kc, vc, bt, kl = _cache(16, [40, 20], seed=1)
    bad = bt.clone()
    bad[0, 1] = kc.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        kern(q, kc, vc, block_table=bad, kv_lens=kl)
    bad[0, 1] = -1
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        kern(q, kc, vc, block_table=bad, kv_lens=kl)
    bad = bt.clone()
    bad[1, 2] = 10 ** 6  # a page past kv_lens[1]: not in use, not read
    torch.testing.assert_close(kern(q, kc, vc, block_table=bad, kv_lens=kl), kern(q, kc, vc, block_table=bt, kv_lens=kl))
    with pytest.raises(ValueError, match="kv_lens.*outside"):
        kern(q, kc, vc, block_table=bt, kv_lens=torch.tensor([bt.shape[1] * 16 + 1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_lens is required"):
        kern(q, kc, vc, block_table=bt)
    with pytest.raises(ValueError, match="k_cache must be"):
        kern(q, kc.flatten(0, 1), vc, block_table=bt, kv_lens=kl)
    with pytest.raises(ValueError, match="v_cache must"):
        kern(q, kc, vc[:, :8], block_table=bt, kv_lens=kl)
    with pytest.raises(ValueError, match="k_cache must have q's dtype"):
        kern(q, kc.half(), vc, block_table=bt, kv_lens=kl)
    with pytest.raises(ValueError, match="block_table must be an int32"):
        kern(q, kc, vc, block_table=bt.float(), kv_lens=kl)
    with pytest.raises(ValueError, match="block_table must be an int32"):
        kern(q, kc, vc, block_table=bt[:1], kv_lens=kl)
    with pytest.raises(ValueError, match="multiple of the cache's KV heads"):
        kern(q[:, :3], kc, vc, block_table=bt, kv_lens=kl)
    with pytest.raises(NotImplementedError, match="forward only"):
        kern(q.requires_grad_(), kc, vc, block_table=bt, kv_lens=kl)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):  # the reference refuses as the kernel
        bad = bt.clone()
        bad[0, 1] = 99
        attncc.reference(_spec("causal"), q.detach(), kc, vc, block_table=bad, kv_lens=kl)
    assert math.isfinite(float(kern(q.detach(), kc, vc, block_table=bt, kv_lens=kl).sum()))


_PROPERTY_PATTERNS = ["causal", "sliding_window", "alibi", "sink_window", "softcap", "prefix_lm", "relative_position_bias",
                      "per_head_window", "duo_attention", "global_sliding_window"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(_PROPERTY_PATTERNS), Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 3]),
       Lq=st.sampled_from([1, 3, 16, 17, 33]), page=st.sampled_from([1, 3, 8, 16, 24, 64, 128, 256]),
       lens=st.lists(st.integers(0, 96), min_size=1, max_size=3), mode=st.sampled_from(["auto", "decode", "forward"]),
       splits=st.sampled_from([None, 1, 2, 5]), seed=st.integers(0, 10 ** 6))
def test_paged_property(name, Hkv, G, Lq, page, lens, mode, splits, seed):
    """Random page sizes (1 .. 256, multiples of the key tile or not), ragged lengths (0, 1, ...,
    several pages), GQA ratios, query counts on both sides of the decode threshold, the decode
    kernel at any split count and the forward kernel: output and LSE equal the dense reference
    on the gathered cache, finite everywhere (rows without keys: 0 / -inf)."""
    from attncc.inputs import example_inputs
    from attncc.runtime.paged import paged_attention

    kern = attncc.compile(_spec(name), backend="interpret")
    H, Lk = Hkv * G, max(1, max(lens))
    q, k, v, tens, _ = example_inputs(kern.ir, len(lens), H, Hkv, Lq, Lk, 16, seed=seed)
    kc, vc, bt, kl = _page(k, v, lens, page, seed)
    ref, ref_lse = attncc.reference(_spec(name), q, kc, vc, block_table=bt, kv_lens=kl, return_lse=True, **tens)
    decode = {"auto": None, "decode": True, "forward": False}[mode]
    out, lse = paged_attention(kern, q, kc, vc, bt, kl, return_lse=True, decode=decode,
                               num_splits=splits if mode == "decode" else None, **tens)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(lse, ref_lse, atol=5e-5, rtol=5e-5)
