#!/usr/bin/env python
"""Compile latency in a new process: ``attncc.compile`` with an empty disk cache (cold) vs
with the cache a previous process left (warm: the kernel plan and the generated module are
loaded, nothing is lowered, planned or rendered).

Each measurement is its own Python process (``--runs`` of each, the median is reported);
the time is that of the ``attncc.compile(path)`` call only, after ``import attncc.compiler``
(torch, Triton and sympy imported: they cost the same cold or warm). Cold runs get a fresh
``ATTNCC_CACHE_DIR`` each; warm runs share one that a first process filled.

    python benchmarks/bench_compile.py [--patterns gated_causal,alibi,...] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

DEFAULT = "gated_causal,alibi,neighborhood_2d,document_causal"
_CHILD = ("import time, attncc.compiler, attncc\n"
          "p = attncc.pattern_path({name!r})\n"
          "t = time.perf_counter(); attncc.compile(p); print(time.perf_counter() - t)\n")


def compile_seconds(name: str, cache_dir: str) -> float:
    """Seconds of one ``attncc.compile`` of library pattern ``name`` in a new process whose
    cache dir is ``cache_dir``."""
    env = dict(os.environ, ATTNCC_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", _CHILD.format(name=name)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main(argv=None) -> int:
    """Print cold and warm compile times (medians) and their ratio per pattern."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", default=DEFAULT)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"{'pattern':<20} {'cold s':>8} {'warm s':>8} {'warm/cold':>10}")
    for name in args.patterns.split(","):
        cold = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="attncc-bench-cold-") as d:
                cold.append(compile_seconds(name, d))
        with tempfile.TemporaryDirectory(prefix="attncc-bench-warm-") as d:
            compile_seconds(name, d)  # fills the cache
            warm = [compile_seconds(name, d) for _ in range(args.runs)]
        c, w = statistics.median(cold), statistics.median(warm)
        print(f"{name:<20} {c:8.3f} {w:8.3f} {100 * w / c:9.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
