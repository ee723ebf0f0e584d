"""Shared fixtures: a private kernel cache per test session, tolerances, library access."""

import os
import shutil
import tempfile

import pytest

# the suite checks the Triton kernels (under the interpreter on CPU); tests/test_cpu_exec.py
# forces the PyTorch executor with backend="torch"
os.environ.setdefault("ATTNCC_CPU", "interpret")
# a fresh on-disk cache for the whole run (the cache tests check rebuilds in it), removed at the end
_OWN_CACHE = None if "ATTNCC_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="attncc-test-cache-")
if _OWN_CACHE:
    os.environ["ATTNCC_CACHE_DIR"] = _OWN_CACHE


def pytest_sessionfinish(session, exitstatus):
    """Remove the run's private kernel cache (not a directory the user set)."""
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

import attncc  # noqa: E402  (sets TRITON_INTERPRET=1 on machines without a GPU)
import torch  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="session")
def library():
    """name -> path of every library pattern."""
    return attncc.library_patterns()


def compiled_resources(script: str, timeout: int = 300) -> list:
    """Run ``script`` (it compiles launches with :func:`attncc.aot.compile_launch` and prints a
    JSON list of :func:`attncc.aot.resource_usage` records as its last line) in a separate
    process with the Triton interpreter off (real compilation, no GPU needed); return the
    records after checking each has no spills, no local stores and no local memory."""
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    recs = json.loads(res.stdout.strip().splitlines()[-1])
    for rec in recs:
        assert rec["spill_bytes"] == 0 and rec["local_stores"] == 0 and rec["local_bytes"] == 0, rec
    return recs


def max_err(a, b):
    """max |a - b| in float64."""
    return (a.double() - b.double()).abs().max().item()


def assert_grads_close(out, ref, inputs, atol=1e-4, rtol=1e-4):
    """The gradients of ``out`` and ``ref`` with respect to ``inputs`` agree under one random
    output gradient; returns ``ref``'s."""
    import torch

    g = torch.randn_like(out)
    got, want = (torch.autograd.grad(y, inputs, g) for y in (out, ref))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    return want


@pytest.fixture(autouse=True, scope="module")
def _fresh_compile_memo():
    """Each test module compiles its own kernels: attncc.compile's in-process memo (same spec,
    same object) is cleared between modules, so no module sees another's kernel state."""
    import attncc.compiler

    attncc.compiler._COMPILED.clear()
    yield
