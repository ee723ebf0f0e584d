"""The full ahead-of-time sweep: every library pattern's kernels, every dtype, head dim and
target, at every launch config the autotuner may try, summarised in one Markdown file.

This is ``attncc aot --all`` over a matrix of targets, dtypes and head dims (the same
:mod:`attncc.aot` jobs: the runtime's own launches, the JIT's specialisation, Triton's
default options), made resumable: each finished (target, dtype, head dim, pattern) appends
its records to a JSON-lines file, and a rerun skips what is there, so a sweep of thousands
of compiles can be run in pieces on a small machine. The summary
(``benchmarks/results/aot_sweep.md``) has one row per (target, dtype, head dim) — kernels,
spill-free, problems, largest register count, wgmma / mma use — and lists every problem.

    python benchmarks/aot_sweep.py                                   # the default matrix
    python benchmarks/aot_sweep.py --targets sm_90a --dtypes bf16 --head-dims 64,128,256
    python benchmarks/aot_sweep.py --summary-only                    # rewrite the summary

Exit status 1 when a kernel does not compile, spills, exceeds shared memory or lacks the
tensor-core MMA it should use (:func:`attncc.aot.problems`).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # compile for real targets (before triton is imported)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

import attncc  # noqa: E402
from attncc import aot  # noqa: E402

HERE = Path(__file__).resolve().parent


def _key(target: str, dtype: str, head_dim: int, pattern: str) -> str:
    return f"{target}|{dtype}|{head_dim}|{pattern}"


def load(path: Path) -> tuple[list, set]:
    """Records of a JSON-lines file and the (target, dtype, head dim, pattern) keys done."""
    records, done = [], set()
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            done.add(item["key"])
            records += item["records"]
    return records, done


def summary_text(records: list, command: str) -> str:
    """The Markdown summary of a sweep's records."""
    groups = {}
    for r in records:
        groups.setdefault((r["target"], r["dtype"], r["head_dim"]), []).append(r)
    rows = ["| target | dtype | D | patterns | kernels | spill-free | problems | max regs | tensor cores "
            "(fwd / dQ / dK,dV) |", "|---|---|---|---|---|---|---|---|---|"]
    problems = []
    for (t, d, hd), recs in sorted(groups.items()):
        ok = [r for r in recs if not r.get("error")]
        spill_free = sum(1 for r in ok if not r["spill_bytes"] and not r["local_stores"])
        bad = [r for r in recs if aot.problems(r)]
        problems += [f"{t} {d} D={hd} {r['pattern']} {r['kernel']} {r['launch']}: {'; '.join(aot.problems(r))}"
                     for r in bad]

        def mma(kernel):
            kinds = {("wgmma" if r["wgmma"] else "mma" if r["mma"] else "FMA") for r in ok if r["kernel"] == kernel}
            return "+".join(sorted(kinds)) or "-"

        rows.append(f"| {t} | {d} | {hd} | {len({r['pattern'] for r in recs})} | {len(recs)} | {spill_free} "
                    f"| {len(bad)} | {max((r['registers'] for r in ok), default=0)} "
                    f"| {mma('attn_fwd')} / {mma('attn_bwd_dq')} / {mma('attn_bwd_dkdv')} |")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "# GPU kernels compiled ahead of time: the sweep",
        "",
        f"- date: {date}; compiled on a machine without a GPU (`triton.compile` for each target, Triton's "
        "default options; resources from the bundled `cuobjdump`)",
        f"- versions: attncc {attncc.__version__}, triton {triton.__version__}, torch {torch.__version__}",
        f"- command: `{command}`",
        f"- launches: the runtime's own (`attncc.runtime.capture`) on B={aot.EXAMPLE_SHAPE['B']}, "
        f"Hq={aot.EXAMPLE_SHAPE['H']}, Hkv={aot.EXAMPLE_SHAPE['Hkv']}, L={aot.EXAMPLE_SHAPE['L']} "
        "(grids 32x32, 8x16x16), with the JIT's specialisation; every config the autotuner may try "
        "(`attncc.runtime.configs`) for each target, dtype and head dim",
        f"- {aot.summary(records)}",
        "- fp32 computes exact fp32 products (`input_precision=\"ieee\"`, torch's default fp32 matmul "
        "precision): FMA by design. Backward kernels at D > 128 use mma.sync 32-row tiles by design "
        "(wgmma's 64-row tiles spill there).",
        "",
        *rows,
        "",
        "## Problems",
        "",
        "\n".join(f"- {p}" for p in problems) or "none: every kernel compiles, 0 spill bytes at every config, "
                                                 "shared memory within the target, tensor cores where expected",
        "",
    ])


def main(argv=None) -> int:
    """Run (or resume) the sweep and write its summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="sm_90a,sm_80")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--patterns", default=None, help="comma-separated library patterns (default: all)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--records", default=str(HERE / "results" / "aot_sweep.jsonl"),
                    help="JSON-lines file of finished records (resumed from)")
    ap.add_argument("--output", default=str(HERE / "results" / "aot_sweep.md"))
    ap.add_argument("--summary-only", action="store_true", help="only rewrite the summary from --records")
    args = ap.parse_args(argv)
    targets, dtypes = aot.parse_targets(args.targets), aot.parse_dtypes(args.dtypes)
    head_dims = [int(x) for x in args.head_dims.split(",")]
    lib = attncc.library_patterns()
    names = args.patterns.split(",") if args.patterns else list(lib)
    path = Path(args.records)
    path.parent.mkdir(parents=True, exist_ok=True)
    records, done = load(path)
    if not args.summary_only:
        for target in targets:
            for dtype in dtypes:
                for hd in head_dims:
                    todo = [n for n in names if _key(target, dtype, hd, n) not in done]
                    if not todo:
                        continue
                    t0 = time.perf_counter()
                    jobs = [j for n in todo for j in aot.plan_jobs(str(lib[n]), targets=(target,), dtypes=(dtype,),
                                                                   head_dims=(hd,))]
                    recs = aot.run_jobs(jobs, workers=args.workers)
                    with path.open("a") as f:
                        for n in todo:
                            mine = [r for r in recs if r["pattern"] == n]
                            f.write(json.dumps({"key": _key(target, dtype, hd, n), "records": mine}) + "\n")
                    records += recs
                    print(f"{target} {dtype} D={hd}: {aot.summary(recs)} ({time.perf_counter() - t0:.0f} s)",
                          flush=True)
    text = summary_text(records, "python " + " ".join(["benchmarks/aot_sweep.py"] + (argv if argv is not None
                                                                                      else sys.argv[1:])))
    Path(args.output).write_text(text)
    print(text)
    return 1 if any(aot.problems(r) for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
