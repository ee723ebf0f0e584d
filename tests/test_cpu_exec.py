"""The CPU executor (attncc.runtime.cpu, backend="torch"): every library pattern against the
dense float64 reference (forward, LSE and gradients of q, k, v and the float spec tensors),
against the Triton kernels under the interpreter on a few, fully masked rows, GQA, Lq != Lk,
the backend selection, the input checks, torch.compile and benchmarks/bench_cpu.py's dry run."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import attncc
from attncc.inputs import example_inputs
from attncc.runtime import cpu

from conftest import max_err

SMALL = dict(window=12, prefix=10, sinks=3, dilation=2)
#: grid patterns: small kernels (kernel * dilation must fit the axis)
GRID_SMALL = {1: dict(kernel=5, dilation=2), 2: dict(kernel=5, dilation=2, P=5, G=5), 3: dict(kernel=3, dilation=1)}
GRIDS = {1: [20], 2: [10, 10], 3: [4, 5, 6]}


def _setup(name, backend="torch"):
    path = attncc.pattern_path(name)
    ir = attncc.lower(path, name)
    small = dict(SMALL, **GRID_SMALL[len(ir.grid)]) if ir.grid else SMALL
    params = {k: small[k] for k, _ in ir.params if k in small}
    kern = attncc.compile(path, name, backend=backend, **params)
    grid = GRIDS[len(ir.grid)] if ir.grid else None
    # GQA (Hq = 4, Hkv = 2), Lq != Lk (1-D), D != Dv, B = 2
    q, k, v, t, _ = example_inputs(kern.ir, B=2, H=4, Hkv=2, Lq=40, Lk=70, D=16, Dv=8, grid=grid, seed=1)
    return path, params, kern, q, k, v, t


def _double(t: dict) -> dict:
    return {n: x.double() if x.is_floating_point() else x for n, x in t.items()}


@pytest.mark.parametrize("name", sorted(attncc.library_patterns()))
def test_executor_matches_reference(name):
    path, params, kern, q, k, v, t = _setup(name)
    sig = kern.ir.normalize == "sigmoid"
    grads = set(kern.grad_tensor_names())
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    ts = {n: x.clone().requires_grad_() if n in grads else x for n, x in t.items()}
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    td = {n: x.double().requires_grad_() if n in grads else x for n, x in _double(t).items()}
    if sig:
        out, ref = kern(qs, ks, vs, **ts), attncc.reference(path, qd, kd, vd, name, **params, **td)
        loss, rloss = out.sum(), ref.sum()
    else:
        (out, lse), (ref, rlse) = (kern(qs, ks, vs, return_lse=True, **ts),
                                   attncc.reference(path, qd, kd, vd, name, return_lse=True, **params, **td))
        assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
        fin = torch.isfinite(rlse)
        assert max_err(lse[fin], rlse[fin]) < 1e-5
        loss, rloss = out.sum() + lse[fin].sum(), ref.sum() + rlse[fin].sum()
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert max_err(out, ref) < 1e-5
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (loss + (out * w).sum()).backward()
    (rloss + (ref * w.double()).sum()).backward()
    pairs = [(qs, qd), (ks, kd), (vs, vd)] + [(ts[n], td[n]) for n in grads]
    for a, b in pairs:
        assert not torch.isnan(a.grad).any()
        assert max_err(a.grad, b.grad) < 1e-4 * max(1.0, b.grad.abs().max().item()), name


@pytest.mark.parametrize("name", ["sliding_window", "document_causal", "sink_window", "neighborhood_1d"])
def test_executor_matches_interpreter(name):
    path, params, kern, q, k, v, t = _setup(name)
    slow = attncc.compile(path, name, backend="interpret", **params)
    out, lse = kern(q, k, v, return_lse=True, **t)
    out_i, lse_i = slow(q, k, v, return_lse=True, **t)
    assert max_err(out, out_i) < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_i))
    fin = torch.isfinite(lse_i)
    assert max_err(lse[fin], lse_i[fin]) < 1e-5


SPEC = """
pattern late_keys:
    \"\"\"Rows q < 5 see no key (a test of fully masked rows).\"\"\"
    mask: kv <= q - 5
"""


def test_fully_masked_rows():
    kern = attncc.compile(SPEC, backend="torch")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g, requires_grad=True) for _ in range(3))
    out, lse = kern(q, k, v, return_lse=True)
    ref, rlse = attncc.reference(SPEC, q.double(), k.double(), v.double(), return_lse=True)
    assert torch.all(out[:, :, :5] == 0) and torch.all(lse[:, :, :5] == -math.inf)
    assert not torch.isnan(out).any() and max_err(out, ref) < 1e-5
    assert max_err(lse[:, :, 5:], rlse[:, :, 5:]) < 1e-5
    (out.sum() + lse[:, :, 5:].sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert torch.all(q.grad[:, :, :5] == 0)


def test_refusals_and_checks():
    sig = attncc.compile(attncc.pattern_path("sigmoid_attention"), "sigmoid_attention", backend="torch")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="return_lse"):
        sig(q, q, q, return_lse=True)
    kern = attncc.compile(attncc.pattern_path("causal"), "causal", backend="torch")
    with pytest.raises((ValueError, TypeError)):
        kern(q, torch.randn(1, 2, 8, 12), q)  # k's head dim differs from q's
    with pytest.raises(ValueError, match="backend"):
        attncc.compile(attncc.pattern_path("causal"), "causal", backend="cuda")


def test_backend_selection(monkeypatch):
    calls = []
    real = cpu.forward
    monkeypatch.setattr(cpu, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kern = attncc.compile(attncc.pattern_path("causal"), "causal")  # backend from ATTNCC_CPU
    q = torch.randn(1, 1, 16, 16)
    monkeypatch.setenv("ATTNCC_CPU", "torch")
    a = kern(q, q, q)
    assert calls == [1]
    monkeypatch.setenv("ATTNCC_CPU", "interpret")
    b = kern(q, q, q)
    assert calls == [1] and max_err(a, b) < 1e-5
    monkeypatch.setenv("ATTNCC_CPU", "numpy")
    with pytest.raises(ValueError, match="ATTNCC_CPU"):
        kern(q, q, q)


def test_torch_compile_cpu_call():
    kern = attncc.compile(attncc.pattern_path("sliding_window"), "sliding_window", window=8, backend="torch")
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda q, k, v: kern(q, k, v), fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    ref = attncc.reference(attncc.pattern_path("sliding_window"), q, k, v, "sliding_window", window=8)
    assert max_err(out, ref) < 1e-5
    out.sum().backward()
    g = torch.autograd.grad(ref.sum(), q)[0]
    assert max_err(q.grad, g) < 1e-5


def test_bench_cpu_dry_run(capsys):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu.py"
    spec = importlib.util.spec_from_file_location("bench_cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--dry-run"])
    assert res["snippet_speedup"] > 1 and res["causal_ratio"] > 0
    assert "executor" in capsys.readouterr().out
