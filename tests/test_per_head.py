"""Per-head patterns without block tables (issue 15 §4): mask reads indexed by ``b`` / ``h``
only (per-head windows, sink counts, retrieval flags, spans ``alpha[h] + beta[h] * Lk``) are
run-time scalars of the closed form. The plan is "closed" (no table), the kernels (Triton under
the interpreter, and the torch executor) equal the dense reference and SDPA with the expanded
mask (forward, dq / dk / dv), and ``tile_stats`` counts exactly the non-empty tiles."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.dense import dense_mask, nonempty_tiles, tile_classes

WINDOW = attncc.pattern_path("per_head_window")
DUO = attncc.pattern_path("duo_attention")
SINKS = """
pattern per_head_sinks:
    \"\"\"Per-(batch, head) sink counts and per-head windows.\"\"\"
    tensor sinks: int32[B, H]
    tensor win: int32[H]
    mask: kv <= q and (kv < sinks[b, h] or q - kv < win[h])
"""
SPAN = """
pattern elastic_span:
    \"\"\"MoA-style elastic span alpha[h] + beta[h] * Lk.\"\"\"
    tensor alpha: float32[H]
    tensor beta: float32[H]
    mask: kv <= q and q - kv < alpha[h] + beta[h] * Lk
"""
H, HKV = 4, 2


def _tensors(name, B=1):
    i32 = dict(dtype=torch.int32)
    return {
        "window": dict(win=torch.tensor([1, 9, 40, 1000], **i32)),
        "duo": dict(is_retrieval=torch.tensor([False, True, False, True])),
        "sinks": dict(win=torch.tensor([3, 17, 1, 200], **i32),
                      sinks=torch.tensor([[0, 4, 70, 1]] * B, **i32)),
        "span": dict(alpha=torch.tensor([3.5, 7.3, -40.2, 1000.0]), beta=torch.tensor([0.0, 0.13, 0.51, -0.2])),
    }[name]


SPECS = {"window": WINDOW, "duo": DUO, "sinks": SINKS, "span": SPAN}


def _compile(name, backend="interpret"):
    if name == "duo":  # small sink / window so that the tiles of a short sequence differ per head
        return attncc.compile(DUO, sinks=5, window=20, backend=backend)
    return attncc.compile(SPECS[name], backend=backend)


def _sizes(B, Lq, Lk, D):
    return dict(B=B, H=H, Hkv=HKV, Lq=Lq, Lk=Lk, D=D, Dv=D)


def _sdpa(q, k, v, allowed):
    """SDPA with a bool mask; rows with no allowed key give 0 (attncc's convention)."""
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                           attn_mask=allowed)
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))


def _inputs(B, Lq, Lk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(B, HKV, Lk, D, generator=g, dtype=torch.float64).float().requires_grad_()
    v = torch.randn(B, HKV, Lk, D, generator=g, dtype=torch.float64).float().requires_grad_()
    dout = torch.randn(B, H, Lq, D, generator=g)
    return q, k, v, dout


def _check_against_reference(kern, spec, tensors, B=1, Lq=100, Lk=100, D=16, params=None):
    q, k, v, dout = _inputs(B, Lq, Lk, D)
    out = kern(q, k, v, **tensors)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = attncc.reference(spec, q, k, v, **tensors, **(params or {}))
    rgrads = torch.autograd.grad(ref, (q, k, v), dout)
    allowed = dense_mask(kern.ir, _sizes(B, Lq, Lk, D), tensors, "cpu")
    sd = _sdpa(q, k, v, allowed)
    sgrads = torch.autograd.grad(sd, (q, k, v), dout)
    torch.testing.assert_close(out, ref.to(out.dtype), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, sd, atol=2e-5, rtol=2e-5)
    for a, r, s in zip(grads, rgrads, sgrads):
        torch.testing.assert_close(a, r.to(a.dtype), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a, s, atol=1e-4, rtol=1e-4)
    return allowed


@pytest.mark.parametrize("name", sorted(SPECS))
def test_plan_is_closed(name):
    plan = _compile(name).plan
    assert plan.path == "closed" and plan.blocks is None and plan.exact
    assert plan.scalars and all(not (set(map(str, r.free_symbols)) & {"q", "kv"}) for r in plan.scalars)
    assert "run-time scalars" in plan.describe()


@pytest.mark.parametrize("backend", ["torch", "interpret"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_matches_reference_and_sdpa(name, backend):
    kern = _compile(name, backend)
    params = dict(sinks=5, window=20) if name == "duo" else None
    B = 2 if name == "sinks" else 1
    _check_against_reference(kern, SPECS[name], _tensors(name, B), B=B, Lq=100, Lk=100, params=params)


@pytest.mark.parametrize("name", ["window", "duo", "sinks"])
def test_tile_stats_visit_exactly_the_nonempty_tiles(name):
    """Windows that differ strongly between heads: each (batch, head) visits its own tiles."""
    kern = _compile(name)
    B, L = 2, 257
    tensors = _tensors(name, B)
    st = kern.tile_stats(L, L, B=B, H=H, Hkv=HKV, D=16, **tensors)
    sizes = _sizes(B, L, L, 16)
    mask = dense_mask(kern.ir, sizes, tensors, "cpu")
    assert st["visited"] == nonempty_tiles(mask, st["block_m"], st["block_n"])
    nonempty, full = tile_classes(kern.ir, sizes, tensors, st["block_m"], st["block_n"], "cpu", B, H)
    assert st["full"] == int(full.sum())
    # per head: strongly different (the widest window visits far more tiles than the narrowest)
    per = kern.tile_stats(L, L, B=B, H=H, Hkv=HKV, D=16, per_query_tile=True, **tensors)["per_query_tile"]
    per_head = per[..., 0].view(B, H, -1).sum(-1)[0]
    assert per_head.max() > 1.5 * per_head.min()


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_out_of_range_windows_behave_as_the_reference(backend):
    """Empty windows (0, negative), windows past the sequence, int32 extremes; sink counts
    below 0 and past Lk: the int64 bounds never wrap, rows with no key give 0."""
    i32 = dict(dtype=torch.int32)
    kern = _compile("window", backend)
    t = dict(win=torch.tensor([0, -7, 2**31 - 1, -2**31], **i32))
    allowed = _check_against_reference(kern, WINDOW, t, Lq=70, Lk=90)
    # empty windows visit nothing (the closed form tests win[h] > 0), the others exactly their tiles
    st = kern.tile_stats(70, 90, B=1, H=H, Hkv=HKV, D=16, **t)
    assert st["visited"] == nonempty_tiles(allowed, st["block_m"], st["block_n"])
    kern = _compile("sinks", backend)
    t = dict(win=torch.tensor([-2**31, 0, 2**31 - 1, 5], **i32), sinks=torch.tensor([[-3, 2**31 - 1, 0, -2**31]], **i32))
    _check_against_reference(kern, SINKS, t, Lq=70, Lk=90)


def test_new_values_same_kernel():
    """The torch executor caches its schedules: keyed by the scalars' values too."""
    kern = _compile("window", "torch")
    for w in ([1, 2, 3, 4], [64, 1, 64, 1], [1, 2, 3, 4]):
        _check_against_reference(kern, WINDOW, dict(win=torch.tensor(w, dtype=torch.int32)), Lq=80, Lk=80)


def test_kernel_source_loads_scalars_once():
    """The forward loads win[h] as int64 before its key ranges, no block table reads."""
    src = _compile("window").source
    fwd = src[src.index("def attn_fwd("):src.index("def count_tiles(")]
    assert fwd.count("tl.load(t_win") == 1  # once per program (the partial tiles' mask code is in _attn_tile)
    assert ".to(tl.int64)" in fwd and "KV_NUM + tbl" not in fwd


def test_reads_of_q_or_kv_keep_the_table():
    spec = """
pattern doc_window:
    tensor doc: int32[Lk]
    tensor win: int32[H]
    mask: doc[q] == doc[kv] and kv <= q and q - kv < win[h]
"""
    kern = attncc.compile(spec)
    assert kern.plan.path == "table" and not kern.plan.scalars


# ------------------------------------------------------------------ head order (issue 15)
def _launched_orders(kern, monkeypatch):
    """The HEAD_ORDER argument of every forward launch of ``kern`` (the launches still run)."""
    orders, run = [], kern._run

    def record(device, *launches):
        for ln in launches:
            if ln.kernel == "attn_fwd":
                names = kern.module(device).attn_fwd.arg_names
                orders.append(ln.args[names.index("HEAD_ORDER")].clone())
        return run(device, *launches)

    monkeypatch.setattr(kern, "_run", record)
    return orders


def _expected_order(kern, L, B, tensors):
    """The (batch*head) indices by visited key tiles (as count_tiles counts them), descending,
    ties in index order."""
    per = kern.tile_stats(L, L, B=B, H=H, Hkv=HKV, D=16, per_query_tile=True, **tensors)["per_query_tile"]
    counts = per[..., 0].view(B * H, -1).sum(-1)
    return sorted(range(B * H), key=lambda i: (-int(counts[i]), i)), counts


@pytest.mark.parametrize("name", ["window", "duo", "sinks"])
def test_heads_run_longest_range_first(name, monkeypatch):
    """Plans with run-time scalars launch with HEAD_ORDER: the descending (stable) sort of
    the heads' visited tile counts; the outputs (both launch paths) equal the reference."""
    kern = _compile(name)
    assert "HEAD_ORDER" in kern.source
    orders = _launched_orders(kern, monkeypatch)
    B, L = 2, 160
    tensors = _tensors(name, B)
    params = dict(sinks=5, window=20) if name == "duo" else None
    _check_against_reference(kern, SPECS[name], tensors, B=B, Lq=L, Lk=L, params=params)  # launch()
    expected, counts = _expected_order(kern, L, B, tensors)
    assert expected != list(range(B * H))  # the heads' ranges differ: a real permutation
    q, k, v, _ = _inputs(B, L, L, 16)
    ref = attncc.reference(SPECS[name], q, k, v, **tensors, **(params or {}))
    with torch.no_grad():
        for _ in range(2):  # the direct path (the second call: its remembered argument list)
            torch.testing.assert_close(kern(q, k, v, **tensors), ref, atol=2e-5, rtol=2e-5)
    assert len(orders) == 3
    for o in orders:
        assert o.dtype == torch.int32 and o.tolist() == expected
        assert (counts[o.long()].diff() <= 0).all()


def test_head_order_follows_new_values(monkeypatch):
    """New window values (a new tensor, or the same tensor changed in place) reorder the heads."""
    kern = _compile("window")
    orders = _launched_orders(kern, monkeypatch)
    B, L = 1, 160
    q, k, v, _ = _inputs(B, L, L, 16)
    win = torch.tensor([1, 9, 40, 1000], dtype=torch.int32)
    expected = []
    with torch.no_grad():
        for change in (None, "new", "in place", None):
            if change == "new":
                win = torch.tensor([1000, 1, 40, 9], dtype=torch.int32)
            elif change == "in place":
                win.numpy()[:] = [9, 40, 1000, 1]  # no version-counter bump
            out = kern(q, k, v, win=win)
            torch.testing.assert_close(out, attncc.reference(WINDOW, q, k, v, win=win), atol=2e-5, rtol=2e-5)
            expected.append(_expected_order(kern, L, B, dict(win=win))[0])
    assert [o.tolist() for o in orders] == expected
    assert expected[:3] == [[3, 2, 1, 0], [0, 2, 3, 1], [2, 1, 0, 3]]


def test_plans_without_scalars_have_no_head_order():
    assert "HEAD_ORDER" not in attncc.compile(attncc.pattern_path("sliding_window")).source
