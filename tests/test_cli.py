"""The attncc command line: check / explain / compile exit codes and outputs, and the
benchmark script's CPU dry run."""

import subprocess
import sys
from pathlib import Path

import attncc
from attncc.cli import main, tile_report
from attncc.inputs import example_inputs

ROOT = Path(__file__).resolve().parent.parent


def test_check_library_ok_and_bad_file(tmp_path, capsys):
    files = [str(p) for p in sorted((ROOT / "patterns").glob("*.attn"))]
    assert main(["check", *files]) == 0
    bad = tmp_path / "bad.attn"
    bad.write_text("pattern p:\n    param window: int = 4\n    mask: kv <= q and q - kv < windw\n")
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3:32: error: unknown name 'windw'" in err
    assert "^^^^^" in err
    assert main(["check", str(tmp_path / "missing.attn")]) == 1


def test_explain_prints_ir_path_map_and_source(capsys):
    assert main(["explain", str(ROOT / "patterns" / "sliding_window.attn"), "--lq", "256", "--param", "window=64",
                 "--source"]) == 0
    out = capsys.readouterr().out
    assert "closed form" in out and "visited (kernel) = " in out and "def attn_fwd" in out
    assert main(["explain", str(ROOT / "patterns" / "document_causal.attn"), "--lq", "128"]) == 0
    out = capsys.readouterr().out
    assert "block table" in out and "def attn_fwd" not in out


def test_explain_plot(tmp_path):
    png = tmp_path / "tiles.png"
    assert main(["explain", str(ROOT / "patterns" / "prefix_lm.attn"), "--lq", "128",
                 "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_writes_sources(tmp_path):
    assert main(["compile", str(ROOT / "patterns" / "alibi.attn"), "-o", str(tmp_path)]) == 0
    src = (tmp_path / "alibi.py").read_text()
    compile(src, "alibi.py", "exec")
    assert "def attn_fwd" in src and (tmp_path / "alibi.explain.txt").exists()


def test_kernel_full_tiles_match_mask_except_ragged_edges():
    """Per query tile, the kernel's visited counts equal the mask's non-empty counts, and its
    full tiles equal the mask's full tiles when lengths are multiples of the tile."""
    for name, path in attncc.library_patterns(grid=False).items():
        kern = attncc.compile(path, name)
        q, k, v, tens, sizes = example_inputs(kern.ir, 1, 1, 1, 256, 256, 16)
        rep = tile_report(kern, sizes, tens)
        assert rep["stats"]["visited"] == rep["stats"]["nonempty"], name
        if kern.plan.exact:
            assert rep["stats"]["full"] == rep["stats"]["ref_full"], (name, rep["stats"])


def test_benchmark_dry_run():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_forward.py"), "--dry-run",
                        "--patterns", "causal,document_causal"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| causal | 128 |" in r.stdout and "MISMATCH" not in r.stdout


def test_grid_benchmark_dry_run():
    # attncc (box plan) vs an independent NATTEN-rule flex mask_mod (and NATTEN when installed)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_grid.py"), "--dry-run",
                        "--cases", "flux2d_dilated,video3d_causal"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| flux2d_dilated |") or ln.startswith("| video3d_causal |")]
    assert len(rows) >= 2 and all(ln.rstrip().endswith("| ok |") and "| box," in ln for ln in rows), r.stdout


def test_epilogue_benchmark_dry_run():
    # fused gate / sink / sigmoid / folded low-rank vs their unfused torch compositions
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_epilogue.py"), "--dry-run"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for row in ("| gate | 64 |", "| sink | 64 |", "| sigmoid | 64 |", "| lowrank (rank 16) | 64 |"):
        assert row in r.stdout, r.stdout


def test_benchmark_backward_dry_run():
    # forward + backward: attncc's gradients (q, k, v, ALiBi slopes) checked against the float64
    # reference; flex has no CPU backward, so its cell records the exception
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_forward.py"), "--dry-run", "--backward",
                        "--patterns", "alibi"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forward + backward" in r.stdout and "| alibi | 128 |" in r.stdout and "MISMATCH" not in r.stdout


def test_explain_grid_pattern(capsys):
    from attncc.cli import main

    assert main(["explain", str(ROOT / "patterns" / "neighborhood_2d.attn"), "--grid", "16x24"]) == 0
    out = capsys.readouterr().out
    assert "grid 16 x 24 = 384 tokens" in out and "== tiles (Lq=384, Lk=384" in out
    # kernel visits equal the mask's non-empty tiles on every query-tile row
    rows = [ln for ln in out.splitlines() if " kernel " in ln and " visited " in ln]
    assert rows and all(ln.split("kernel")[1].split()[0] == ln.split("mask")[1].split()[0] for ln in rows)


def test_list_names_every_library_pattern(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split()[0] for ln in lines]
    assert set(names) == set(attncc.library_patterns())
    assert len(lines) == len(attncc.library_patterns())
    nb = next(ln for ln in lines if ln.split()[0] == "neighborhood_2d")
    assert " grid " in nb and "neighborhood_2d.attn" in nb


def test_cache_info_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    (tmp_path / "kernels" / "abc").mkdir(parents=True)
    (tmp_path / "kernels" / "abc" / "kernel.py").write_text("x = 1\n")
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "1 files" in out and "kernels/" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 files" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_help_check_and_list_do_not_import_torch():
    """The fast paths of the command line (python -m attncc, fresh interpreter): no torch or triton import."""
    code = ("import sys, attncc.cli; attncc.cli.main(sys.argv[1:]); "
            "print('HEAVY', sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    for argv in (["--help"], ["check", str(ROOT / "patterns" / "causal.attn")], ["list"]):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
        assert "HEAVY []" in r.stdout, (argv, r.stdout[-500:], r.stderr[-2000:])
    r = subprocess.run([sys.executable, "-m", "attncc", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"attncc {attncc.__version__}"


def test_explain_tensor_values_from_generator_and_file(tmp_path, capsys):
    """--tensor: the analysis runs on the user's values (documents of 64 tokens: 12 of 64 tiles of 32)."""
    import torch

    f = ROOT / "patterns" / "document_causal.attn"
    assert main(["explain", str(f), "--lq", "256", "--tensor", "doc=arange:64"]) == 0
    out = capsys.readouterr().out
    assert "doc = arange:64" in out and "visited (kernel) = 12, non-empty (reference mask) = 12" in out
    pt = tmp_path / "doc.pt"
    torch.save(torch.zeros(256, dtype=torch.int32), pt)  # one document: every causal tile
    assert main(["explain", str(f), "--lq", "256", "--tensor", f"doc={pt}"]) == 0
    assert "visited (kernel) = 36, non-empty (reference mask) = 36" in capsys.readouterr().out
    torch.save(torch.zeros(100, dtype=torch.int32), pt)
    assert main(["explain", str(f), "--lq", "256", "--tensor", f"doc={pt}"]) == 1
    err = capsys.readouterr()
    assert "has shape (100,), the pattern declares (256,)" in err.err and "== IR" not in err.out
    assert main(["explain", str(f), "--lq", "256", "--tensor", "doc=foo:1"]) == 1
    assert "unknown generator" in capsys.readouterr().err
    assert main(["explain", str(f), "--tensor", "nope=ones"]) == 1
    assert "has no tensor of that name" in capsys.readouterr().err


def test_explain_grid_argument_errors_and_query_key_map(capsys):
    f = str(ROOT / "patterns" / "neighborhood_2d.attn")
    assert main(["explain", f, "--grid", "12xa"]) == 2
    assert "argument --grid" in capsys.readouterr().err
    assert main(["explain", f, "--grid", "12x14", "--param", "kernel=5", "--query", "0,5"]) == 0
    out = capsys.readouterr().out
    block = out.split("on the 12x14 grid", 1)[1].splitlines()[1:13]
    # NATTEN's border rule: the 5x5 window of a query at the top edge is shifted inward (rows 0-4, cols 3-7)
    assert [i for i, r in enumerate(block) if set(r) != {"."}] == [0, 1, 2, 3, 4]
    assert all(r[3:8] in ("#####", "##Q##") and set(r[:3] + r[8:]) == {"."} for r in block[:5])
    assert main(["explain", f, "--grid", "12x14", "--query", "20,5"]) == 1
    assert "--query needs 2 coordinates inside the grid" in capsys.readouterr().err
