"""CPU speed of the PyTorch executor (:mod:`attncc.runtime.cpu`), as ratios measured in one run.

1. The README's Python API snippet (sliding window 128, B=1, Hq=8, Hkv=2, L=1024, D=64,
   float32): the executor (``backend="torch"``) against the same kernel under the Triton
   interpreter (``backend="interpret"``). Goal: >= 50x.
2. Dense causal attention at L=4096 (B=1, H=8, D=64, float32): the executor against
   ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on CPU. Goal:
   within 2x (ratio executor / SDPA <= 2).

Usage::

    python benchmarks/bench_cpu.py            # the full measurement (about a minute)
    python benchmarks/bench_cpu.py --dry-run  # tiny shapes, one repetition (seconds)

Times are medians of ``--reps`` calls (the interpreter: one call) with ``time.perf_counter``;
the machine's other load changes them, so the ratios, measured back to back, are what
is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import attncc


def _time(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after one warm-up call (seconds)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> dict:
    """Run both measurements and print them; returns ``{"snippet_speedup", "causal_ratio", ...}``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, one repetition (for the test suite)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per measurement (default 5)")
    args = ap.parse_args(argv)
    L1, L2, reps = (64, 128, 1) if args.dry_run else (1024, 4096, args.reps)
    torch.manual_seed(0)
    path = attncc.pattern_path("sliding_window")
    fast = attncc.compile(path, "sliding_window", window=128, backend="torch")
    slow = attncc.compile(path, "sliding_window", window=128, backend="interpret")
    q = torch.randn(1, 8, L1, 64)
    k, v = torch.randn(1, 2, L1, 64), torch.randn(1, 2, L1, 64)
    t_fast = _time(lambda: fast(q, k, v), reps)
    t_slow = _time(lambda: slow(q, k, v), 1)
    err = (fast(q, k, v) - slow(q, k, v)).abs().max().item()
    print(f"README snippet (sliding_window 128, B=1 Hq=8 Hkv=2 L={L1} D=64 fp32): executor {t_fast * 1e3:.1f} ms, "
          f"Triton interpreter {t_slow * 1e3:.0f} ms -> {t_slow / t_fast:.1f}x (goal >= 50x); max |diff| {err:.1e}")
    causal = attncc.compile(attncc.pattern_path("causal"), "causal", backend="torch")
    q, k, v = (torch.randn(1, 8, L2, 64) for _ in range(3))
    t_exec = _time(lambda: causal(q, k, v), reps)
    t_sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps)
    err = (causal(q, k, v) - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max().item()
    print(f"dense causal (B=1 H=8 L={L2} D=64 fp32): executor {t_exec * 1e3:.0f} ms, SDPA {t_sdpa * 1e3:.0f} ms "
          f"-> {t_exec / t_sdpa:.2f}x SDPA's time (goal <= 2x); max |diff| {err:.1e}; "
          f"torch threads {torch.get_num_threads()}")
    return {"snippet_speedup": t_slow / t_fast, "causal_ratio": t_exec / t_sdpa,
            "t_exec_snippet": t_fast, "t_interp_snippet": t_slow, "t_exec_causal": t_exec, "t_sdpa_causal": t_sdpa}


if __name__ == "__main__":
    main()
