"""Compile latency: the kernel plan cached on disk (``plans/<key>.pkl``), and a one-directional
pipeline (the plan carries every analysis result; codegen only prints it).

A new process with a warm cache neither lowers nor plans: the plan it loads must be the plan,
which is checked field by field here, by the kernel it renders, and by running both: outputs
and every gradient (q, k, v and spec tensors) of a kernel built from a loaded plan in a fresh
process equal, bitwise, those of a freshly planned one."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import attncc
import attncc.compiler as C
from attncc import codegen

ROOT = Path(__file__).resolve().parents[1]

#: pattern -> shape (B, H, Hkv, L, D, Dv) (grid patterns: L per axis): a gate with padded Dv
#: lanes, a score tensor, a box plan with a gradient table, a block table
CASES = {"gated_causal": (1, 2, 1, 9, 16, 24), "alibi": (1, 2, 2, 9, 16, 16),
         "neighborhood_2d_rpb": (1, 2, 2, 8, 16, 16), "document_causal": (1, 2, 1, 11, 16, 16)}

_CHILD = r'''
import json, sys, torch
import attncc, attncc.compiler as C
from attncc.inputs import example_inputs

cases, out_file, warm = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "warm"
if warm:  # a warm cache: the plan comes from disk, nothing is lowered or planned here
    def refuse(*a, **k):
        raise AssertionError("lowered in a process with a warm plan cache")
    C.lower = C.make_plan = refuse
res = {}
for name, (B, H, Hkv, L, D, Dv) in cases.items():
    kern = attncc.compile(attncc.pattern_path(name), backend="interpret")
    grid = [L] * len(kern.ir.grid) or None
    q, k, v, tens, _ = example_inputs(kern.ir, B, H, Hkv, L, L, D, Dv, seed=1, grid=grid)
    qs = [x.clone().requires_grad_() for x in (q, k, v)]
    ts = {n: (x.clone().requires_grad_() if x.is_floating_point() else x) for n, x in tens.items()}
    out = kern(*qs, **ts)
    g = torch.Generator().manual_seed(2)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    res[name] = [out.detach()] + [x.grad for x in qs] + [x.grad for x in ts.values() if x.is_floating_point()]
torch.save(res, out_file)
'''


def _run_child(cache: Path, out: Path, warm: bool) -> dict:
    env = dict(os.environ, ATTNCC_CACHE_DIR=str(cache), ATTNCC_CPU="interpret")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", _CHILD, json.dumps(CASES), str(out), "warm" if warm else "cold"],
                   env=env, check=True, cwd=ROOT)
    import torch

    return torch.load(out)


def test_kernel_from_a_loaded_plan_computes_what_a_fresh_one_does(tmp_path):
    """Two fresh processes: one plans (cold cache), one loads every plan from disk (warm cache,
    lowering and planning made to fail); outputs and all gradients are bitwise equal, finite,
    and every spec tensor got a gradient."""
    cold = _run_child(tmp_path / "cache", tmp_path / "cold.pt", warm=False)
    assert len(list((tmp_path / "cache" / "plans").glob("*.pkl"))) == len(CASES)
    warm = _run_child(tmp_path / "cache", tmp_path / "warm.pt", warm=True)
    for name in CASES:
        a, b = cold[name], warm[name]
        assert len(a) == len(b) >= 5 - (name == "document_causal"), name
        for x, y in zip(a, b):
            assert x is not None and y is not None and x.isfinite().all(), name
            assert x.dtype == y.dtype and x.shape == y.shape and x.equal(y), name


@pytest.mark.parametrize("name", ["gated_causal", "alibi", "neighborhood_2d_rpb", "document_causal",
                                  "global_sliding_window", "query_temperature"])
def test_loaded_plan_is_the_plan(name, tmp_path, monkeypatch):
    """The pickled plan loads as an equal plan (every field, the IR's expressions printed
    exactly), renders the same module, the same backward support and explanation."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(C, "_COMPILED", {})
    fresh = attncc.compile(attncc.pattern_path(name))
    (pkl,) = (tmp_path / "plans").glob("*.pkl")
    loaded = C.load_plan(pkl)
    assert loaded is not None and loaded is not fresh.plan
    import dataclasses

    import sympy

    for f in dataclasses.fields(fresh.plan):
        assert getattr(loaded, f.name) == getattr(fresh.plan, f.name), f.name
    for f in ("mask", "score", "coord_mask", "coord_score", "gate", "sink"):
        assert sympy.srepr(getattr(loaded.ir, f)) == sympy.srepr(getattr(fresh.plan.ir, f)), f
    assert codegen.render_forward(loaded, "t") == codegen.render_forward(fresh.plan, "t")
    assert codegen.backward_support(loaded) == codegen.backward_support(fresh.plan)
    assert C.describe(loaded) == C.describe(fresh.plan)


def test_corrupt_plan_entry_is_planned_again(tmp_path, monkeypatch):
    """A truncated or garbage plan file (or one holding another object) is ignored: the
    compile plans again, works, and rewrites the entry."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    path = attncc.pattern_path("alibi")
    monkeypatch.setattr(C, "_COMPILED", {})
    first = attncc.compile(path)
    (pkl,) = (tmp_path / "plans").glob("*.pkl")
    good = pkl.read_bytes()
    import pickle

    planned = []
    real = C.make_plan
    monkeypatch.setattr(C, "make_plan", lambda ir: planned.append(ir) or real(ir))
    for bad in (good[: len(good) // 2], b"not a pickle", pickle.dumps({"a": 1})):
        pkl.write_bytes(bad)
        assert C.load_plan(pkl) is None
        monkeypatch.setattr(C, "_COMPILED", {})  # a new process
        C._plan_cached.cache_clear()
        again = attncc.compile(path)
        assert again.plan == first.plan and again.source == first.source
        assert pkl.read_bytes() != bad and C.load_plan(pkl) == first.plan
    assert len(planned) == 3
    # and a warm entry is used: no planning
    monkeypatch.setattr(C, "_COMPILED", {})
    C._plan_cached.cache_clear()
    attncc.compile(path)
    assert len(planned) == 3


def test_codegen_only_prints_the_plan(monkeypatch):
    """attncc.codegen imports neither attncc.passes nor attncc.gradients (at run time), and
    renders every kind of plan with their analysis functions made to fail."""
    tree = ast.parse((ROOT / "attncc" / "codegen.py").read_text())
    runtime_imports = set()
    for node in tree.body:  # module level, outside `if TYPE_CHECKING:`
        if isinstance(node, ast.ImportFrom):
            runtime_imports.add(node.module)
        elif isinstance(node, ast.Import):
            runtime_imports |= {a.name for a in node.names}
    assert not runtime_imports & {"passes", "gradients", "attncc.passes", "attncc.gradients"}
    plans = {}
    for name in ("gated_causal", "relative_position_bias", "neighborhood_2d_rpb", "document_causal", "sink_window"):
        ir = C.lower(attncc.pattern_path(name))
        plans[name] = C._plan_cached(ir.key(), ir)
    assert {p.path for p in plans.values()} == {"closed", "box", "table"}
    import attncc.gradients as G
    import attncc.passes as P

    def refuse(*a, **k):
        raise AssertionError("codegen ran an analysis")

    for mod, fns in ((P, ("read_in_bounds", "index_range", "plan", "box_analysis", "kv_sets", "read_bounds")),
                     (G, ("derivative", "grad_reads", "epilogue_reads", "backward_analysis"))):
        for fn in fns:
            monkeypatch.setattr(mod, fn, refuse)
    for name, kp in plans.items():
        src = codegen.render_forward(kp, "t")
        assert "def attn_bwd_dq" in src, name
        err, terr, reads, epi = codegen.backward_support(kp)
        assert err == "" and terr == {}, name
        assert len(reads) + len(epi) == (name != "document_causal"), name
