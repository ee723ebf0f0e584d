"""Host overhead: the per-signature call cache of CompiledAttention gives the checked path's
results, notices every change of shape, stride, dtype or requires_grad, and keeps raising
the checked path's errors. (No timings are asserted; benchmarks/bench_host.py prints them.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attncc
from attncc.inputs import example_inputs
from attncc.runtime import CompiledAttention, capture
from attncc.runtime import kernel as rk

from conftest import TOL, max_err

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = ["causal", "sliding_window", "document_causal", "alibi", "gated_causal", "lowrank_bias", "neighborhood_2d"]


def _inputs(kern, dtype=torch.float32, L=40, seed=0):
    grid = [8, 8] if kern.ir.grid else None
    return example_inputs(kern.ir, 1, 2, 1, L, D=16, dtype=dtype, seed=seed, grid=grid)


def _lse_err(a, b):
    """max |a - b| of two logsumexps over finite entries (rows with no key: -inf in both)."""
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(a)
    return max_err(a[fin], b[fin]) if fin.any() else 0.0


def _ref(name, q, k, v, **kw):
    return attncc.reference(attncc.pattern_path(name), q, k, v, **kw)


@pytest.fixture
def checked_path(monkeypatch):
    """Every call takes the checked path (no per-signature caches, on every kernel instance)."""
    monkeypatch.setattr(CompiledAttention, "cache_calls", False)


@pytest.mark.parametrize("name", PATTERNS)
def test_cached_call_matches_checked_call_and_reference(name, monkeypatch):
    kern = attncc.compile(attncc.pattern_path(name))
    q, k, v, tens, _ = _inputs(kern)
    kern._calls.clear()
    out1, lse1 = kern(q, k, v, return_lse=True, **tens)  # checked path, remembered
    plan = dict(kern._calls)
    out2, lse2 = kern(q, k, v, return_lse=True, **tens)  # cache hit
    assert len(kern._calls) == 1 and dict(kern._calls) == plan
    monkeypatch.setattr(CompiledAttention, "cache_calls", False)
    out3, lse3 = kern(q, k, v, return_lse=True, **tens)
    assert torch.equal(out1, out2) and torch.equal(out2, out3)
    assert torch.equal(lse1, lse2) and torch.equal(lse2, lse3)
    ref, rlse = _ref(name, q, k, v, return_lse=True, **tens)
    assert max_err(out2, ref) < TOL[torch.float32]
    assert _lse_err(lse2, rlse) < 1e-4


def test_cached_launch_records_match_checked_launch_records(monkeypatch):
    for name in PATTERNS:
        kern = attncc.compile(attncc.pattern_path(name))
        q, k, v, tens, _ = _inputs(kern, torch.bfloat16, L=100)
        with capture() as fast:
            kern(q, k, v, **tens)
            kern(q, k, v, **tens)
        monkeypatch.setattr(CompiledAttention, "cache_calls", False)
        with capture() as slow:
            kern(q, k, v, **tens)
        monkeypatch.undo()
        for (_, a), (_, b) in ((fast[0], slow[0]), (fast[1], slow[0])):
            assert (a.kernel, a.grid, a.kwargs) == (b.kernel, b.grid, b.kwargs), name
            assert len(a.args) == len(b.args), name
            # the kernel reads a tensor argument through its pointer and the strides in the list:
            # a cached call may pass a grid pattern's q, k, v (and allocate out, lse) in the grid's
            # shape, viewed by the checked path as (B, H, L, D) (dot() terms: k, v expanded per call)
            if not kern.ir.lowrank:
                assert [x.data_ptr() for x in a.args[:3]] == [x.data_ptr() for x in b.args[:3]] == \
                    [x.data_ptr() for x in (q, k, v)], name
            for x, y in zip(a.args, b.args):
                if isinstance(x, torch.Tensor):
                    assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.numel() == y.numel(), name
                    assert x.is_contiguous() and y.is_contiguous(), name
                else:
                    assert x == y, name


def test_shape_stride_dtype_changes_are_new_signatures():
    name = "document_causal"
    kern = attncc.compile(attncc.pattern_path(name))
    kern._calls.clear()
    for L, dtype in ((40, torch.float32), (40, torch.float32), (33, torch.float32), (40, torch.float16)):
        q, k, v, tens, _ = _inputs(kern, dtype, L=L, seed=L)
        out = kern(q, k, v, **tens)
        assert max_err(out, _ref(name, q, k, v, **tens)) < TOL[dtype]
    assert len(kern._calls) == 3
    # the same sizes with other strides: q as a transposed copy's view, k sliced from a bigger tensor
    q, k, v, tens, _ = _inputs(kern, L=40, seed=1)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kb = torch.cat([k, torch.randn_like(k)], dim=-1)[..., :16]
    assert qt.stride() != q.stride() and kb.stride() != k.stride()
    for _ in range(2):
        out = kern(qt, kb, v, **tens)
        assert max_err(out, _ref(name, q, k, v, **tens)) < TOL[torch.float32]
    # a non-contiguous spec tensor is copied on every call, as the checked path does
    kern = attncc.compile(attncc.pattern_path("alibi"))
    q, k, v, tens, _ = _inputs(kern)
    slope = torch.stack([tens["slope"], torch.zeros_like(tens["slope"])], dim=1)[:, 0]
    assert not slope.is_contiguous()
    for _ in range(2):
        assert max_err(kern(q, k, v, slope=slope), _ref("alibi", q, k, v, slope=slope)) < TOL[torch.float32]


def test_grid_pattern_strides_and_grid_change():
    name = "neighborhood_2d"
    kern = attncc.compile(attncc.pattern_path(name))
    for grid in ([8, 8], [8, 8], [9, 8]):
        q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 1, D=16, grid=grid, seed=grid[0])
        qn = q.transpose(2, 3).contiguous().transpose(2, 3)  # not viewable as (B, H, L, D)
        for x in (q, qn, q):
            assert max_err(kern(x, k, v), _ref(name, q, k, v)) < TOL[torch.float32]


def test_errors_after_a_good_call_are_the_checked_errors():
    name = "document_causal"
    kern = attncc.compile(attncc.pattern_path(name))
    q, k, v, tens, _ = _inputs(kern)
    kern(q, k, v, **tens)
    bad = [
        dict(doc=tens["doc"][:-1]),                       # wrong shape
        dict(doc=tens["doc"].float()),                    # wrong dtype kind
        dict(doc=tens["doc"], extra=tens["doc"]),         # unexpected tensor
        dict(),                                           # missing tensor
        dict(doc=tens["doc"].tolist()),                   # not a tensor
    ]
    fresh = attncc.compile(attncc.pattern_path(name))
    fresh.cache_calls = False
    calls = [((q, k, v), kw) for kw in bad]
    calls += [(qkv, tens) for qkv in ((q.double(), k.double(), v.double()), (q[:, :, :, :8], k, v), (q, k[:, :, :30], v))]
    for args, kw in calls:
        for _ in range(2):
            with pytest.raises((TypeError, ValueError)) as got:
                kern(*args, **kw)
            with pytest.raises(type(got.value)) as want:
                fresh(*args, **kw)
            assert str(got.value) == str(want.value)
    kern(q, k, v, **tens)  # and the good signature still works


def test_requires_grad_and_grad_mode_changes():
    name = "alibi"
    kern = attncc.compile(attncc.pattern_path(name))
    q, k, v, tens, _ = _inputs(kern)
    kern(q, k, v, **tens)
    qg, slope = q.clone().requires_grad_(), tens["slope"].clone().requires_grad_()
    with torch.no_grad():
        assert not kern(qg, k, v, slope=slope).requires_grad
    for _ in range(2):
        out = kern(qg, k, v, slope=slope)
        (gq, gs) = torch.autograd.grad(out.sum(), (qg, slope))
        ref = _ref(name, qg, k, v, slope=slope)
        rq, rs = torch.autograd.grad(ref.sum(), (qg, slope))
        assert max_err(out, ref) < TOL[torch.float32]
        assert max_err(gq, rq) < 1e-4 and max_err(gs, rs) < 1e-3
    # a kernel whose backward cannot be generated still raises when grad is requested later
    # (its own spec text: attncc.compile returns the same object for the same spec in a process)
    kern = attncc.compile("pattern causal_backward_probe:\n    mask: kv <= q\n")
    kern.backward_error = "probe: no backward"
    kern(q, k, v)
    with torch.no_grad():
        kern(qg, k, v)
    for _ in range(2):
        with pytest.raises(NotImplementedError, match="probe: no backward"):
            kern(qg, k, v)


def test_scale_and_return_lse_are_part_of_the_signature():
    kern = attncc.compile(attncc.pattern_path("causal"))
    q, k, v, _, _ = _inputs(kern)
    for scale in (None, 0.5, None, 0.5):
        out, lse = kern(q, k, v, scale=scale, return_lse=True)
        ref, rlse = _ref("causal", q, k, v, scale=scale, return_lse=True)
        assert max_err(out, ref) < TOL[torch.float32] and _lse_err(lse, rlse) < 1e-4
        assert isinstance(kern(q, k, v, scale=scale), torch.Tensor)
    sig = attncc.compile(attncc.pattern_path("sigmoid_attention"))
    sig(q, k, v)
    for _ in range(2):
        with pytest.raises(ValueError, match="no log-sum-exp"):
            sig(q, k, v, return_lse=True)


DOC_CHANGES = {
    "numpy": lambda doc: doc.numpy().__setitem__(slice(None), 0),  # no version bump
    "data": lambda doc: doc.data.zero_(),                            # no version bump
    "in_place": lambda doc: doc.zero_(),
    "one_entry": lambda doc: doc.__setitem__(20, doc[0]),           # token 20 joins document 0
}


@pytest.mark.parametrize("change", sorted(DOC_CHANGES))
def test_direct_call_sees_mask_tensor_changes(change):
    """A block-table pattern's direct calls reuse the last table only while the mask tensor
    equals its snapshot: an in-place change (with or without a version bump) after the
    table was memoised by a direct call gets a new table. (16 x 16 tiles and documents of
    16 tokens: every change here turns an empty key tile into a visited one, so a stale
    table gives a wrong output.)"""
    name = "document_causal"
    kern = attncc.compile(attncc.pattern_path(name), block_m=16, block_n=16)
    q, k, v, _, _ = _inputs(kern, L=64, seed=3)
    doc = (torch.arange(64) // 16).to(torch.int32)
    for _ in range(2):  # checked call, then a direct call that memoises the table
        assert max_err(kern(q, k, v, doc=doc), _ref(name, q, k, v, doc=doc)) < TOL[torch.float32]
    key = kern._call_key(q, k, v, None, False, {"doc": doc})
    assert kern._direct[key].memo is not None
    before = doc.clone()
    DOC_CHANGES[change](doc)
    assert not torch.equal(doc, before)
    for _ in range(2):
        out = kern(q, k, v, doc=doc)
        assert max_err(out, _ref(name, q, k, v, doc=doc)) < TOL[torch.float32]
    # another tensor holding the first values gets their table back
    out = kern(q, k, v, doc=before)
    assert max_err(out, _ref(name, q, k, v, doc=before)) < TOL[torch.float32]


def test_direct_call_copies_a_non_contiguous_tensor_every_call():
    kern = attncc.compile(attncc.pattern_path("alibi"))
    q, k, v, tens, _ = _inputs(kern)
    base = torch.stack([tens["slope"], torch.zeros_like(tens["slope"])], dim=1)
    slope = base[:, 0]
    assert not slope.is_contiguous()
    for scale in (1.0, 2.0, 3.0):  # the values change between calls, the signature does not
        base[:, 0] = tens["slope"] * scale
        out = kern(q, k, v, slope=slope)
        assert max_err(out, _ref("alibi", q, k, v, slope=slope.contiguous())) < TOL[torch.float32]
    assert len([d for d in kern._direct.values() if d]) >= 1


def test_last_signature_check_misses_on_any_metadata_change():
    """After direct calls of one signature (the fast check of _Direct.guards), a call that
    differs in stride, dtype, requires_grad, device or tensor type takes the key path (a
    new signature, or the checked path's error)."""
    name = "causal"
    kern = attncc.compile(attncc.pattern_path(name))
    q, k, v, _, _ = _inputs(kern, seed=5)
    for _ in range(3):
        kern(q, k, v)
    assert kern._last is not None and kern._last.guards is not None
    guards = kern._last.guards
    assert guards.check(q, k, v) and guards.check(q.clone(), k, v)  # metadata, not identity
    assert not guards.check(torch.nn.Parameter(q, requires_grad=False), k, v)  # the exact type
    assert not guards.check(q[..., :8], k, v) and not guards.check(q, k, v.detach().requires_grad_())
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    for args in ((qt, k, v), (q.half(), k.half(), v.half())):
        for _ in range(2):
            out = kern(*args)
            assert out.dtype == args[0].dtype
            assert max_err(out, _ref(name, *(x.float() for x in args))) < TOL[args[0].dtype]
    with pytest.raises(TypeError, match="same dtype"):
        kern(q, k.half(), v.half())
    with pytest.raises(ValueError, match="same device"):
        kern(q, k.to("meta"), v)
    qg = q.clone().requires_grad_()
    out = kern(qg, k, v)
    assert out.requires_grad
    (g,) = torch.autograd.grad(out.sum(), qg)
    rq = q.clone().requires_grad_()
    (rg,) = torch.autograd.grad(_ref(name, rq, k, v).sum(), rq)
    assert max_err(g, rg) < 1e-4


def test_direct_call_leaves_for_the_cpu_executor(monkeypatch):
    """A direct signature recorded under capture() is not reused when the next call runs the
    CPU executor (ATTNCC_CPU=torch, no capture)."""
    kern = attncc.compile(attncc.pattern_path("causal"))
    q, k, v, _, _ = _inputs(kern, seed=7)
    with capture() as rec:
        for _ in range(3):
            kern(q, k, v)
    assert len(rec) == 3 and kern._last is not None
    ran = []
    forward = rk.cpu.forward
    monkeypatch.setattr(rk.cpu, "forward", lambda *a, **kw: ran.append(1) or forward(*a, **kw))
    monkeypatch.setenv("ATTNCC_CPU", "torch")
    for _ in range(2):
        assert max_err(kern(q, k, v), _ref("causal", q, k, v)) < TOL[torch.float32]
    assert len(ran) == 2


def test_call_cache_is_bounded():
    kern = attncc.compile("pattern host_cache_bound_probe:\n    mask: kv <= q\n")  # owns its op (launch cache)
    with capture():
        for L in range(1, rk.CALL_CACHE_SIZE + 20):
            q = torch.randn(1, 1, L, 16)
            kern(q, q, q)
    assert len(kern._calls) == rk.CALL_CACHE_SIZE
    assert len(kern._launches) == rk.CALL_CACHE_SIZE
    assert len(kern._direct) == rk.CALL_CACHE_SIZE


def test_bench_host_quick_runs():
    env = dict(os.environ)
    # the attncc this test imported (an overlay or a checkout), first on the child's path
    env["PYTHONPATH"] = os.pathsep.join([str(Path(attncc.__file__).parent.parent)]
                                        + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host.py"), "--quick", "--grad",
                          "--patterns", "causal,document_causal,neighborhood_2d"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ratio/meta" in res.stdout and "neighborhood_2d" in res.stdout and "grad/tiny" in res.stdout
    assert "ratio/tiny (attncc cached / SDPA cpu tiny, goal <= 1.5): max" in res.stdout
    assert f"attncc from {Path(attncc.__file__).parent.parent}" in res.stdout  # the attncc under test ran
