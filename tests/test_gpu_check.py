"""benchmarks/gpu_check.py: the CPU dry run end to end (every library pattern checked, every
section in the report, all passing), the budget skipping, a wrong kernel failing the
small-shape check, and the SDPA baselines of the realistic-shape check equal to the float64
reference (so that a failure on a GPU points at attncc, not at the baseline)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attncc
from attncc.inputs import example_inputs

from conftest import max_err

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """benchmarks/gpu_check.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _rows(text: str, start: str) -> list:
    """Cells of the table rows of the report part that begins with ``start`` (up to the next heading)."""
    part = text.split(start, 1)[1].split("\n#", 1)[0]
    return [[c.strip() for c in ln.split("|")[1:-1]] for ln in part.splitlines()
            if ln.startswith("| ") and not ln.startswith("| pattern")]


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "gpu_check.md"
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--output", str(out)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = out.read_text()
    for part in ("- date (UTC): ", "- device: ", "- command: `python ", "triton ", "attncc ", "**Result: PASS**",
                 "## Failures\n\nnone", "## (a) Correctness", "### Small shapes vs the float64 reference",
                 "### Realistic shape vs SDPA / FlexAttention", "## (b) Forward benchmark",
                 "## (c) Forward + backward benchmark", "## (d) Decode benchmark"):
        assert part in text, part
    # a forward and a backward row for every library pattern (1-D and grid), all passing
    small = _rows(text, "### Small shapes")
    for name in attncc.library_patterns():
        mine = [row for row in small if row[0] == name]
        assert sorted(row[1] for row in mine) == ["bwd", "fwd"], (name, mine)
        assert all(row[7] == "PASS" for row in mine), mine
    # the realistic-shape part: every kind of baseline ran and passed
    real = _rows(text, "### Realistic shape")
    assert real and all(row[7] == "PASS" for row in real), real
    baselines = " ".join(row[5] for row in real)
    for kind in ("SDPA fp32 is_causal", "bias", "U W^T", "sink column", "gate", "empty rows excluded",
                 "float64 reference"):
        assert kind in baselines, kind
    # the benchmarks: bench_forward.py's table rows, grid pattern included, no mismatch
    fwd = {row[0]: row for row in _rows(text, "## (b)")}
    assert set(fwd) == {"causal", "sliding_window", "document_causal", "alibi", "neighborhood_2d", "gated_causal"}
    float(fwd["neighborhood_2d"][6]), float(fwd["neighborhood_2d"][10])  # flex ran on the grid pattern, and was checked
    assert {row[0] for row in _rows(text, "## (c)")} == {"causal", "sliding_window"}
    # the decode benchmark (bench_decode.py): contiguous and paged (page 16) rows per pattern, the
    # decode kernel ran for attncc (its split count recorded), flex and SDPA on the contiguous rows
    dec = [row for row in _rows(text, "## (d)") if not row[0].startswith("---")]
    assert [(row[0], row[3]) for row in dec] == [(p, pg) for p in ("causal", "window", "alibi") for pg in ("-", "16")]
    assert all(int(row[12]) >= 1 for row in dec)
    assert all(float(row[8]) > 0 and float(row[10]) > 0 for row in dec if row[3] == "-")
    assert "MISMATCH" not in text and "| skipped (budget) |" not in text and "skipped (budget):" not in text
    # progress lines
    assert "[a] small     causal" in r.stdout and "== (b)" in r.stdout and "[c] sliding_window" in r.stdout
    assert "== (d) decode benchmark" in r.stdout


def test_budget_skips_and_marks(gpu_check, tmp_path):
    out = tmp_path / "skipped.md"
    assert gpu_check.main(["--dry-run", "--budget-s", "0", "--jobs", "1", "--output", str(out)]) == 0
    text = out.read_text()
    small = _rows(text, "### Small shapes")
    assert small and all(row[7] == "skipped (budget)" for row in small)
    assert "skipped (budget): causal L=64" in text and "skipped (budget)." in text
    assert "- skipped (budget): window" in text.split("## (d)")[1]


def test_decode_failure_fails_the_check(gpu_check, tmp_path, monkeypatch):
    """A decode case whose outputs disagree (bench_decode.py's check raises) fails the run."""
    def mismatch(args):
        raise AssertionError(("window", 8, 32768, "attncc", 0.5))

    monkeypatch.setattr(gpu_check.bd, "run", mismatch)
    out = tmp_path / "decode.md"
    assert gpu_check.main(["--dry-run", "--sections", "d", "--output", str(out)]) == 1
    text = out.read_text()
    assert "**Result: FAIL**" in text and "- (d) decode window: AssertionError" in text


def test_small_check_fails_for_a_wrong_kernel(gpu_check):
    path = attncc.pattern_path("causal")
    shape = gpu_check.Shape(1, 2, 1, 80, {}, True)
    wrong = attncc.compile(attncc.pattern_path("sliding_window"), "sliding_window", window=8)
    rows = gpu_check.check_small(wrong, path, "causal", {}, "bf16", 32, shape, "cpu", True, 0)
    assert [r.status for r in rows] == ["FAIL", "FAIL"], rows
    right = attncc.compile(path, "causal")
    rows = gpu_check.check_small(right, path, "causal", {}, "bf16", 32, shape, "cpu", True, 0)
    assert [r.status for r in rows] == ["PASS", "PASS"], rows


@pytest.mark.parametrize("name", ["document_causal", "alibi", "lowrank_bias", "sink_window", "gated_causal",
                                  "neighborhood_2d_rpb", "causal"])
def test_sdpa_baselines_equal_the_reference(gpu_check, name):
    path = attncc.pattern_path(name)
    params = gpu_check.small_params(name, path)
    ir = attncc.lower(path, name, **params)
    grid = (7, 9) if ir.grid else None
    q, k, v, tens, sizes = example_inputs(ir, 2, 4, 2, 50, 50, 16, seed=3, grid=grid)
    dout = torch.randn(*q.shape[:-1], 16, generator=torch.Generator().manual_seed(4))
    out, grads, dout_used, label = gpu_check.sdpa_baseline(ir, q, k, v, tens, sizes, dout, True,
                                                           causal=(name == "causal"))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = attncc.reference(path, *leaves, pattern=name, **params, **tens)
    ref.backward(dout_used.double())
    assert max_err(out, ref) < 1e-5, (label, max_err(out, ref))
    for g, leaf in zip(grads, leaves):
        assert max_err(g, leaf.grad) < 1e-4, (label, max_err(g, leaf.grad))
    if name == "document_causal":
        assert "empty rows excluded" in label  # the padded tail (doc id -1) has no allowed key
