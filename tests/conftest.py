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


def max_err(a, b):
    """max |a - b| in float64."""
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(autouse=True, scope="module")
def _fresh_compile_memo():
    """Each test module compiles its own kernels: attncc.compile's in-process memo (same spec,
    same object) is cleared between modules, so no module sees another's kernel state."""
    import attncc.compiler

    attncc.compiler._COMPILED.clear()
    yield
