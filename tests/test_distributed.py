"""attncc.distributed (issue 17): context-parallel attention on torch.distributed.

Real multi-process runs: one group of 2 and one of 4 CPU processes (``torch.multiprocessing``
spawn, gloo backend, kernels under the Triton interpreter), each running every case below
in one spawn; every rank saves its output / LSE shards and its gradients, and the tests
compare the unsharded results with a single-process attncc run and the dense reference
``attncc.reference`` (forward, LSE, q / k / v gradients and spec tensor gradients, the
latter summed over the ranks). A single-process simulation of the ring (the same per-rank
code, no collectives) is property-tested over random masks and over library patterns at
random windows, against dense attention and ``attncc.reference``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attncc
from attncc.distributed import (balance_report, chunk_ids, pair_classes, ring_schedule, simulate_ring)

D = 16


# ----------------------------------------------------------------------------- cases
def _tensors(name, L, H, grid=None):
    """The spec tensors of a case (global values, the same on every rank: seeded)."""
    g = torch.Generator().manual_seed(7)
    if name == "alibi":
        return {"slope": (torch.rand(H, generator=g) + 0.2).requires_grad_()}
    if name == "document_causal":
        cuts = sorted(torch.randperm(L - 1, generator=g)[:2].add(1).tolist())
        doc = torch.zeros(L, dtype=torch.int32)
        for c in cuts:
            doc[c:] += 1
        return {"doc": doc}
    if name == "neighborhood_2d_rpb":
        return {"rpb": torch.randn(H, 5, 5, generator=g).requires_grad_()}
    if name == "sink_window":
        return {"sink": torch.randn(H, generator=g).requires_grad_()}
    return {}


#: name -> (pattern, params, Hq, Hkv, {world size: [(mode, layout), ...]}): every mode and
#: layout over the two groups; the group of 4 (on 2 CPU cores) runs fewer, and 4 query heads
#: only where ulysses needs them (the interpreter's time grows with the heads)
CASES = {
    "causal": ("causal", {}, 1, 1, {2: [("ring", "contiguous"), ("ring", "zigzag"), ("allgather", "zigzag")],
                                    4: [("ring", "contiguous"), ("allgather", "contiguous")]}),
    "causal_gqa": ("causal", {}, 4, 1, {2: [("ulysses", "contiguous")], 4: [("ulysses", "zigzag")]}),
    "sliding_window": ("sliding_window", {"window": 5}, 2, 1, {2: [("allgather", "zigzag"), ("ulysses", "zigzag")],
                                                               4: [("ring", "contiguous")]}),
    "document_causal": ("document_causal", {}, 2, 2, {2: [("ring", "zigzag"), ("allgather", "contiguous"),
                                                          ("ulysses", "contiguous")]}),
    "alibi": ("alibi", {}, 2, 1, {2: [("ring", "contiguous"), ("allgather", "zigzag"), ("ulysses", "contiguous")]}),
    # a sink: clause on the ring (sink-free pairs merged by LSE, the sink merged once per row)
    "sink_window": ("sink_window", {"window": 5}, 2, 1, {2: [("ring", "zigzag")]}),
    "alibi_h4": ("alibi", {}, 4, 2, {4: [("ulysses", "contiguous")]}),
    "neighborhood_2d_rpb": ("neighborhood_2d_rpb", {"kernel": 3}, 4, 4, {2: [("ulysses", "contiguous")],
                                                                        4: [("ulysses", "zigzag")]}),
    # a grid pattern with a trained table at global grid coordinates (rows of the first axis
    # sharded, attncc.grid_positions): ring (empty row-chunk pairs skipped) and allgather
    "neighborhood_2d_rpb_cp": ("neighborhood_2d_rpb", {"kernel": 3}, 1, 1,
                               {2: [("ring", "zigzag"), ("allgather", "contiguous")], 4: [("ring", "contiguous")]}),
}


def _shape(case, W):
    """Sequence (or grid) of a case: chunks of 4 tokens (zigzag over W ranks: 2W chunks)."""
    if case.startswith("neighborhood_2d_rpb"):
        return (2 * W, 3)   # Y sharded (zigzag: chunks of one grid row), kernel 3 x 3
    return (8 * W,)


def _inputs(case, W):
    pat, params, Hq, Hkv, _ = CASES[case]
    seq = _shape(case, W)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, Hq, *seq, D, generator=g)
    k = torch.randn(1, Hkv, *seq, D, generator=g)
    v = torch.randn(1, Hkv, *seq, D, generator=g)
    dout = torch.randn(1, Hq, *seq, D, generator=g)
    dlse = torch.randn(1, Hq, *seq, generator=g)
    return q, k, v, dout, dlse, _tensors(pat, math.prod(seq), Hq)


def _kern(case):
    pat, params, *_ = CASES[case]
    return attncc.compile(attncc.pattern_path(pat), backend="interpret", **params)


def _shard_of(x, r, W, layout, dim=2):
    n = W if layout == "contiguous" else 2 * W
    parts = x.chunk(n, dim)
    return torch.cat([parts[c] for c in chunk_ids(r, W, layout)], dim)


def _unshard(shards, W, layout, dim=2):
    n = W if layout == "contiguous" else 2 * W
    chunks = [None] * n
    for r, s in enumerate(shards):
        ids = chunk_ids(r, W, layout)
        for c, part in zip(ids, s.chunk(len(ids), dim)):
            chunks[c] = part
    return torch.cat(chunks, dim)


# ----------------------------------------------------------------------------- worker
def _errors(W):
    """Bad calls, each refused on every rank before any collective (a collective on some ranks
    only would hang): (label, callable)."""
    from attncc.distributed import context_parallel

    causal = _kern("causal")
    x = torch.randn(1, 3, 8, D)
    sigmoid = attncc.compile(attncc.pattern_path("sigmoid_attention"), backend="interpret")
    nb = _kern("neighborhood_2d_rpb")
    return [
        ("heads", lambda: context_parallel(causal, x, x, x, mode="ulysses")),
        ("mode", lambda: context_parallel(causal, x, x, x, mode="tree")),
        ("layout", lambda: context_parallel(causal, x, x, x, mode="ring", layout="striped")),
        ("sigmoid_lse", lambda: context_parallel(sigmoid, x, x, x, mode="ring", return_lse=True)),
        ("grid", lambda: context_parallel(nb, x, x, x, mode="allgather", rpb=torch.zeros(3, 5, 5))),
        ("zigzag_odd", lambda: context_parallel(causal, x[:, :, :3], x[:, :, :3], x[:, :, :3], mode="ring",
                                                layout="zigzag")),
    ]


#: the group of 2 that runs each case's W = 2 runs: ranks {0, 1} or {2, 3} (both at once)
_PAIR_OF = {"causal": 0, "sliding_window": 0, "causal_gqa": 0, "document_causal": 1, "alibi": 1, "alibi_h4": 1,
            "neighborhood_2d_rpb": 1, "neighborhood_2d_rpb_cp": 0,
            "sink_window": 1}


def _run_cases(rank, W, group, which, res):
    """This rank's part of the runs for world size ``W`` over ``group``: shard / unshard, the
    refused calls, then every case (``which(case)``: whether this group runs it)."""
    from attncc.distributed import context_parallel, shard, unshard

    for layout in ("contiguous", "zigzag"):  # round trip; unshard's backward reduce-scatters
        x = torch.arange(2 * 4 * W * 3, dtype=torch.float32).reshape(2, 4 * W, 3)
        s = shard(x, group, layout=layout, dim=1).requires_grad_()
        full = unshard(s, group, layout=layout, dim=1)
        (full * (rank + 1)).sum().backward()
        res[f"W{W}:shard:{layout}"] = (s.detach(), full.detach(), s.grad)
    for label, fn in _errors(W):
        try:
            fn()
            res[f"W{W}:error:{label}"] = None
        except Exception as e:  # noqa: BLE001 - the test checks type and message
            res[f"W{W}:error:{label}"] = (type(e).__name__, str(e))
    for case, (pat, params, Hq, Hkv, per_world) in CASES.items():
        runs = per_world.get(W, [])
        if not runs or not which(case):
            continue
        kern = _kern(case)
        q, k, v, dout, dlse, tens = _inputs(case, W)
        for mode, layout in runs:
            t0 = time.time()
            qs, ks, vs = (_shard_of(x, rank, W, layout).requires_grad_() for x in (q, k, v))
            tl = {n: (t.detach().clone().requires_grad_() if t.requires_grad else t) for n, t in tens.items()}
            out, lse = context_parallel(kern, qs, ks, vs, group=group, mode=mode, layout=layout, return_lse=True,
                                        **tl)
            loss = (out * _shard_of(dout, rank, W, layout)).sum() + (lse * _shard_of(dlse, rank, W, layout)).sum()
            loss.backward()
            stats = context_parallel.last_stats if mode == "ring" else None
            res[f"time:W{W}:{case}:{mode}:{layout}"] = time.time() - t0
            res[f"W{W}:{case}:{mode}:{layout}"] = {
                "out": out.detach(), "lse": lse.detach(), "dq": qs.grad, "dk": ks.grad, "dv": vs.grad,
                "tgrads": {n: t.grad for n, t in tl.items() if isinstance(t, torch.Tensor) and t.requires_grad},
                "skipped": stats.skipped if stats else None, "launched": stats.launched if stats else None}
            context_parallel.last_stats = None


def _worker(rank, path, out_dir):
    """One of 4 processes: first two groups of 2 at once (ranks {0, 1} and {2, 3}, process
    groups made by ``new_group``), then the group of 4 (the default group)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=4)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    res = {"pair": rank // 2, "sub_rank": rank % 2}
    try:
        _run_cases(rank % 2, 2, pairs[rank // 2], lambda case: _PAIR_OF[case] == rank // 2, res)
        _run_cases(rank, 4, None, lambda case: True, res)
    except Exception:  # noqa: BLE001 - reported to the parent
        res["crash"] = traceback.format_exc()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


_RESULTS: list = []


def _results() -> list:
    """Every process's results (the 4 processes are spawned once per test session)."""
    if not _RESULTS:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(os.path.join(d, "pg"), d), nprocs=4, join=True)
            _RESULTS.extend(torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(4))
        for r in _RESULTS:
            assert "crash" not in r, r.get("crash")
    return _RESULTS


def _group(W, pair=0):
    """The results of the group of ``W`` (W = 2: the pair of processes ``pair``), by rank."""
    res = _results()
    if W == 4:
        return res
    return sorted((r for r in res if r["pair"] == pair), key=lambda r: r["sub_rank"])


def _runs(W, key):
    """The per-rank results of run ``key`` in the group of ``W`` that ran it."""
    for pair in ((0, 1) if W == 2 else (0,)):
        g = _group(W, pair)
        if f"W{W}:{key}" in g[0]:
            return [r[f"W{W}:{key}"] for r in g]
    raise KeyError(key)


@pytest.fixture(scope="module", params=[2, 4], ids=["W2", "W4"])
def group(request):
    return request.param, [{k[len(f"W{request.param}:"):]: v for k, v in r.items() if k.startswith(f"W{request.param}:")}
                           for r in _group(request.param)]


# ----------------------------------------------------------------------------- single process
_SINGLE: dict = {}


def _single(case, W):
    """The single-process attncc run and the dense reference of a case: out, lse and gradients."""
    key = (case, W)
    if key not in _SINGLE:
        pat, params, *_ = CASES[case]
        q, k, v, dout, dlse, tens = _inputs(case, W)
        kern = _kern(case)
        results = {}
        for name, fn in (("attncc", lambda *a, **kw: kern(*a, return_lse=True, **kw)),
                         ("reference", lambda *a, **kw: attncc.reference(attncc.pattern_path(pat), *a, return_lse=True,
                                                                         **params, **kw))):
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            tl = {n: (t.detach().clone().requires_grad_() if t.requires_grad else t) for n, t in tens.items()}
            out, lse = fn(qq, kk, vv, **tl)
            ((out * dout).sum() + (lse * dlse).sum()).backward()
            results[name] = {"out": out.detach(), "lse": lse.detach(), "dq": qq.grad, "dk": kk.grad, "dv": vv.grad,
                             "tgrads": {n: t.grad for n, t in tl.items() if isinstance(t, torch.Tensor)
                                        and t.requires_grad}}
        _SINGLE[key] = results
    return _SINGLE[key]


def _close(a, b, what, tol=2e-4):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert torch.isfinite(a).all() or torch.equal(torch.isneginf(a), torch.isneginf(b)), what
    err = (a.double() - b.double()).nan_to_num(0.0, 0.0, 0.0).abs().max().item()
    scale = max(1.0, b.double().nan_to_num(0.0, 0.0, 0.0).abs().max().item())
    assert err <= tol * scale, f"{what}: max |diff| {err:.3g}"


RUNS = [(W, case, mode, layout) for case, (*_, per_world) in CASES.items() for W, runs in per_world.items()
        for mode, layout in runs]


@pytest.mark.parametrize("W,case,mode,layout", RUNS, ids=[f"W{r[0]}-" + ":".join(r[1:]) for r in RUNS])
def test_context_parallel_matches_single_process_and_reference(W, case, mode, layout):
    """Unsharded output, LSE and q / k / v gradients of every rank equal a single-process
    attncc run and the dense reference; spec tensor gradients summed over the ranks too."""
    per_rank = _runs(W, f"{case}:{mode}:{layout}")
    got = {n: _unshard([p[n] for p in per_rank], W, layout) for n in ("out", "lse", "dq", "dk", "dv")}
    for name, want in _single(case, W).items():
        for n in ("out", "lse", "dq", "dk", "dv"):
            _close(got[n], want[n], f"{case} {mode} {layout} W={W} {n} vs {name}")
        for t, g in want["tgrads"].items():
            summed = sum(p["tgrads"][t] for p in per_rank)
            _close(summed, g, f"{case} {mode} {layout} W={W} d{t} vs {name}")
    if mode == "ring":  # skipped: exactly the chunk pairs the dense mask has no allowed pair in
        from attncc.dense import dense_mask

        from attncc.ir import grid_sizes

        pat, params, Hq, Hkv, _ = CASES[case]
        q, k, v, _, _, tens = _inputs(case, W)
        L = math.prod(q.shape[2:-1])  # tokens (grid: chunks of whole rows are chunks of tokens)
        M = dense_mask(attncc.lower(attncc.pattern_path(pat), **params),
                       {"B": 1, "H": Hq, "Hkv": Hkv, "Lq": L, "Lk": L, "D": D, "Dv": D,
                        **grid_sizes(q.shape[2:-1] if q.dim() > 4 else None)},
                       {n: t.detach() for n, t in tens.items()}, "cpu")
        empty = pair_classes(None, L, W, layout, mask=M).count("empty")
        assert sum(p["skipped"] for p in per_rank) == empty
        assert sum(p["launched"] for p in per_rank) == len(chunk_ids(0, W, layout)) ** 2 * W * W - empty


def _empty_chunk_pairs(W, layout):
    """Empty (query chunk, key chunk) pairs of a causal mask: the chunks strictly above the diagonal."""
    n = W if layout == "contiguous" else 2 * W
    return n * (n - 1) // 2


def test_ring_skips_empty_pairs(group):
    """Causal ring: the pairs the analysis proves empty are skipped without a launch, counted per
    rank (contiguous W = 4: 6 of 16 shard pairs; zigzag: every chunk pair above the diagonal),
    and the counts are those of an independent dense classification."""
    W, res = group
    for layout in ("contiguous", "zigzag"):
        if f"causal:ring:{layout}" not in res[0]:
            continue
        per_rank = [r[f"causal:ring:{layout}"] for r in res]
        n = W if layout == "contiguous" else 2 * W
        skipped = sum(p["skipped"] for p in per_rank)
        launched = sum(p["launched"] for p in per_rank)
        assert skipped == _empty_chunk_pairs(W, layout)
        assert skipped + launched == n * n
        L = 8 * W
        dense = torch.ones(L, L, dtype=torch.bool).tril()
        assert pair_classes(None, L, W, layout, mask=dense).count("empty") == skipped
        if layout == "contiguous":  # rank r skips the W - 1 - r shards after its own
            assert [p["skipped"] for p in per_rank] == [W - 1 - r for r in range(W)]
    if W == 4:
        assert sum(r["causal:ring:contiguous"]["skipped"] for r in res) == 6


def test_shard_unshard(group):
    """shard / unshard round trip in both layouts; unshard's backward reduce-scatters (each rank's
    loss weighs the whole tensor by rank + 1: the shard's gradient is the sum of the weights)."""
    W, res = group
    for layout in ("contiguous", "zigzag"):
        x = torch.arange(2 * 4 * W * 3, dtype=torch.float32).reshape(2, 4 * W, 3)
        for r, rr in enumerate(res):
            s, full, grad = rr[f"shard:{layout}"]
            assert torch.equal(full, x)
            assert torch.equal(s, _shard_of(x, r, W, layout, dim=1))
            assert torch.equal(grad, torch.full_like(s, W * (W + 1) / 2))
        assert torch.equal(_unshard([rr[f"shard:{layout}"][0] for rr in res], W, layout, dim=1), x)


def test_bad_calls_refused_on_every_rank(group):
    W, res = group
    want = {"heads": ("ValueError", "not divisible"), "mode": ("ValueError", "mode must be"),
            "layout": ("ValueError", "layout must be"), "sigmoid_lse": ("ValueError", "return_lse=False"),
            "grid": ("ValueError", "2-D grid"), "zigzag_odd": ("ValueError", "even")}
    for r in res:
        for label, (typ, text) in want.items():
            got = r[f"error:{label}"]
            assert got is not None and got[0] == typ and text in got[1], (label, got)


# ----------------------------------------------------------------------------- simulation
def _dense(q, k, v, M):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~M, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(M, torch.exp(s - torch.where(torch.isneginf(lse), 0, lse)[..., None]), 0)
    return p @ v, lse.float()


def test_ring_schedule_visits_every_shard_once():
    for W in range(1, 7):
        sched = ring_schedule(W)
        for r in range(W):
            assert sorted(sched[r]) == list(range(W)) and sched[r][0] == r
        for s in range(1, W):  # what rank r holds at step s is what rank r - 1 held at step s - 1
            assert all(sched[r][s] == sched[(r - 1) % W][s - 1] for r in range(W))


def test_zigzag_balances_causal_work():
    """Balance report from tile counts (tile_stats at the pairs' offsets): zigzag evens out
    causal work, contiguous does not; the counts agree with the dense mask's."""
    kern = attncc.compile(attncc.pattern_path("causal"), backend="interpret")
    L, W = 128, 4
    cont = balance_report(pair_classes(kern, L, W, "contiguous"), W, "contiguous")
    zig = balance_report(pair_classes(kern, L, W, "zigzag"), W, "zigzag")
    assert cont["unit"] == zig["unit"] == "tiles"
    assert zig["imbalance"] == pytest.approx(1.0, abs=0.1) and cont["imbalance"] > 1.5
    assert cont["skipped"] == 6 and zig["skipped"] == 28
    dense = pair_classes(None, L, W, "zigzag", mask=torch.ones(L, L, dtype=torch.bool).tril())
    assert dense.cls == pair_classes(kern, L, W, "zigzag").cls
    assert pair_classes(kern, L, W, "contiguous").count("full") == 6   # below the diagonal


hyp = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(W=st.integers(1, 4), layout=st.sampled_from(["contiguous", "zigzag"]), c=st.integers(1, 4),
       density=st.floats(0.0, 1.0), tril=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_simulated_ring_random_masks(W, layout, c, density, tril, seed):
    """The ring's per-rank code (schedule, skipping, LSE merge, backward with travelling dK /
    dV accumulators) over a random mask equals dense masked attention, forward and backward;
    exactly the empty chunk pairs are skipped."""
    g = torch.Generator().manual_seed(seed)
    L = c * (W if layout == "contiguous" else 2 * W)
    M = torch.rand(L, L, generator=g) < density
    if tril:
        M &= torch.ones(L, L, dtype=torch.bool).tril()
    q, k, v = (torch.randn(1, 2, L, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    out_ref, lse_ref = _dense(q, k, v, M)
    do = torch.randn(out_ref.shape, generator=g, dtype=torch.float64)
    dl = torch.randn(lse_ref.shape, generator=g).masked_fill(torch.isneginf(lse_ref), 0)
    want = torch.autograd.grad([out_ref, lse_ref], [q, k, v], [do, dl], allow_unused=True)

    def pair(qc, kc, vc, qo, ko):
        return _dense(qc, kc, vc, M[qo:qo + qc.shape[2], ko:ko + kc.shape[2]])

    cl = pair_classes(None, L, W, layout, mask=M)
    out, lse, stats, grads = simulate_ring(pair, q.detach(), k.detach(), v.detach(), W, layout, cl, grads=(do, dl))
    assert torch.allclose(out, out_ref.detach(), atol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    assert torch.allclose(lse.nan_to_num(0, 0, 0), lse_ref.nan_to_num(0, 0, 0), atol=1e-5)
    for a, b in zip(grads, want):
        assert torch.allclose(a, torch.zeros_like(a) if b is None else b, atol=1e-5)
    assert sum(s.skipped for s in stats) == cl.count("empty")
    nonempty = M.reshape(len(cl.cls), c, len(cl.cls), c).any(3).any(1)
    assert sum(s.launched for s in stats) == int(nonempty.sum())


@settings(max_examples=4, deadline=None)
@given(name=st.sampled_from(["causal", "sliding_window", "sliding_window_bidirectional", "prefix_lm"]),
       w=st.integers(1, 12), W=st.integers(2, 4), layout=st.sampled_from(["contiguous", "zigzag"]),
       seed=st.integers(0, 2 ** 16))
def test_simulated_ring_library_patterns(name, w, W, layout, seed):
    """The ring simulated with the real kernel (PyTorch executor) at the pairs' global offsets,
    pairs classified by tile_stats at those offsets: equals attncc.reference over the whole
    sequence, and the skipped pairs are the dense mask's empty ones."""
    params = {"window": w} if "window" in name else {"prefix": w} if name == "prefix_lm" else {}
    kern = attncc.compile(attncc.pattern_path(name), backend="torch", **params)
    L = 8 * W
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, L, 8, generator=g) for _ in range(3))

    def pair(qc, kc, vc, qo, ko):
        return kern(qc, kc, vc, return_lse=True, q_offset=qo, kv_offset=ko, q_total=L, kv_total=L)

    cl = pair_classes(kern, L, W, layout, H=2, D=8)
    ref, lref = attncc.reference(attncc.pattern_path(name), q, k, v, return_lse=True, **params)
    out, lse, stats = simulate_ring(pair, q, k, v, W, layout, cl)
    assert torch.allclose(out, ref, atol=2e-5)
    assert torch.allclose(lse, lref, atol=2e-5)
    ir = attncc.lower(attncc.pattern_path(name), **params)
    from attncc.dense import dense_mask

    M = dense_mask(ir, {"B": 1, "H": 1, "Hkv": 1, "Lq": L, "Lk": L, "D": 8, "Dv": 8}, {}, "cpu")[0, 0]
    assert sum(s.skipped for s in stats) == pair_classes(None, L, W, layout, mask=M).count("empty")


_SINK_STRICT = ("pattern sink_strict:\n    tensor sink: float32[H]\n    mask: kv < q\n    sink: sink[h] + 0.25 * h\n")


@pytest.mark.parametrize("name,W,layout", [("sink_window", 2, "zigzag"), ("sink_window", 4, "contiguous"),
                                           ("sink_strict", 2, "contiguous"), ("sigmoid_attention", 2, "zigzag"),
                                           ("sigmoid_attention", 3, "contiguous")])
def test_simulated_ring_sinks_and_sigmoid(name, W, layout):
    """The ring with a sink: clause (pairs run by the sink-free twin, merged by LSE, the sink
    merged once per row as a state of output 0 and LSE sink) and with normalize: sigmoid (the
    pairs' outputs add): output, LSE and q / k / v / sink gradients equal a single-process
    attncc run and attncc.reference; sink_strict's first row has no key (output 0, LSE = sink)."""
    from attncc import dense
    from attncc.distributed import _kernel_pair, _sink_free

    spec = _SINK_STRICT if name == "sink_strict" else attncc.pattern_path(name)
    params = {"window": 5} if name == "sink_window" else {}
    kern = attncc.compile(spec, backend="torch", **params)
    sigmoid = kern.ir.normalize == "sigmoid"
    L, H = 8 * W, 2
    g = torch.Generator().manual_seed(5 + W)
    q, k, v, do = (torch.randn(1, H, L, 8, generator=g) for _ in range(4))
    dl = None if sigmoid else torch.randn(1, H, L, generator=g)
    tens = {} if sigmoid else {"sink": torch.randn(H, generator=g)}
    sizes = {"B": 1, "H": H, "Hkv": H, "Lq": L, "Lk": L, "D": 8, "Dv": 8}
    tp = {n: t.clone().requires_grad_() for n, t in tens.items()}
    rows = dense.sink_values(kern.ir, tp, sizes, "cpu", torch.float32) if tens else None
    pair = _kernel_pair(kern if sigmoid else _sink_free(kern), None, L, tens)
    cl = pair_classes(kern, L, W, layout, H=H, D=8)
    out, lse, stats, grads = simulate_ring(pair, q, k, v, W, layout, cl, grads=(do, dl),
                                           normalize=kern.ir.normalize, sink=None if rows is None else rows.detach())
    got = {"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if not sigmoid:
        got["lse"] = lse
        got["dsink"] = torch.autograd.grad(rows, tp["sink"], grads[3])[0]
    assert sum(s.skipped for s in stats) == cl.count("empty") and (cl.count("empty") > 0) == (not sigmoid)
    for label, fn in (("attncc", kern), ("reference", lambda *a, **kw: attncc.reference(spec, *a, **params, **kw))):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        tl = {n: t.clone().requires_grad_() for n, t in tens.items()}
        if sigmoid:
            o = fn(qq, kk, vv)
            (o * do).sum().backward()
        else:
            o, l = fn(qq, kk, vv, return_lse=True, **tl)
            ((o * do).sum() + (l * dl).sum()).backward()
            _close(got["lse"], l.detach().float(), f"{name} lse vs {label}")
            _close(got["dsink"], tl["sink"].grad, f"{name} dsink vs {label}")
        for n_, want in (("out", o.detach()), ("dq", qq.grad), ("dk", kk.grad), ("dv", vv.grad)):
            _close(got[n_], want, f"{name} W={W} {layout} {n_} vs {label}")
    if name == "sink_strict":  # row 0 has no key: output 0 and LSE = its sink logit
        assert torch.equal(got["out"][:, :, 0], torch.zeros_like(got["out"][:, :, 0]))
        assert torch.allclose(got["lse"][:, :, 0], rows.detach()[:, :, 0])
