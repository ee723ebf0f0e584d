#!/usr/bin/env python
"""Host overhead per call: attncc with the kernel launch stubbed out vs SDPA's dispatch.

What is timed, per pattern (``--patterns``; default causal, sliding_window,
document_causal, alibi, gated_causal, neighborhood_2d) at B=1, H=8, L=128 (a 16 x 16 grid
for grid patterns), D=64, bf16:

* **attncc cached**: ``kern(q, k, v, **tensors)`` repeated with the same inputs inside
  :func:`attncc.runtime.capture`, which records the launches instead of running them, so
  everything but the kernel is timed: the per-signature fast path of
  ``CompiledAttention.__call__`` (the cache key, the spec tensors, box permutations, the
  torch custom op dispatch, output allocations, the launch's argument list).
* **attncc checked**: the same with ``CompiledAttention.cache_calls = False``: every argument check,
  shape function, layout choice and launch-argument computation runs on every call (the
  path a new signature takes, and every call before the per-signature cache existed).
* **op floor**: a no-op ``torch.library.custom_op`` with the schema of attncc's forward op
  (returns three empty tensors): what the custom op dispatch itself costs (it is kept:
  ``torch.compile`` traces through it).
* **SDPA meta**: ``scaled_dot_product_attention(q, k, v, is_causal=True)`` on ``meta``
  tensors of the same shape (grid patterns: the grid flattened): dispatch and shape logic,
  no math. This is the number the ratio column divides by, as the issue asks. Caveat: in
  recent torch the meta path runs SDPA's math decomposition through Python reference
  ops on meta tensors (about 20 aten/prims calls), so it is much slower than the C++
  dispatch of a CUDA SDPA call; the next column is the stricter yardstick.
* **SDPA cpu tiny**: the same call on CPU tensors with one query/key token (B, H, 1, D):
  the C++ dispatch, the kernel choice, the allocations and a negligible amount of math
  (no launch). Closest CPU stand-in for the host time of a CUDA SDPA call without its
  launch; ``ratio/tiny`` divides by it.
* ``--device cuda`` (on a GPU) adds **SDPA cuda**: the real host time of SDPA on the same
  CUDA inputs (asynchronous launches, one synchronize per run), and attncc is timed on
  CUDA tensors (after one real call, so autotuning is done).

Each function is warmed up, then timed with ``time.perf_counter`` over ``--runs`` runs
(default 5) of N calls, N chosen so a run lasts about ``--run-time`` seconds (at most
``--calls``, default 2000); the median per-call time of the runs is reported, in
microseconds. Interpreter machines are noisy: compare columns of one run, not runs.
Runs on the CPU in well under a minute (``--quick``: a few seconds); writes nothing unless
``--output`` is given.

Usage::

    python benchmarks/bench_host.py
    python benchmarks/bench_host.py --quick
    python benchmarks/bench_host.py --patterns causal,neighborhood_2d --dtype fp32 --output host.md
"""

from __future__ import annotations

import os
import sys

if not any("cuda" in a for a in sys.argv[1:]) and "triton" not in sys.modules:
    # CPU tensors: the CPU launch config (no autotuning); nothing is launched
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Tuple  # noqa: E402

import attncc  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from attncc.inputs import example_inputs  # noqa: E402
from attncc.runtime import CompiledAttention, capture  # noqa: E402

DEFAULT_PATTERNS = "causal,sliding_window,document_causal,alibi,gated_causal,neighborhood_2d"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def per_call_us(fn, runs: int = 5, max_calls: int = 2000, run_time: float = 0.1, warmup: int = 20) -> float:
    """Median over ``runs`` runs of the mean time of one ``fn()`` call, in microseconds
    (each run: N calls, N sized from a first estimate so a run lasts about ``run_time``
    seconds, between 5 and ``max_calls``)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    est = (time.perf_counter() - t0) / warmup
    n = max(5, min(max_calls, int(run_time / max(est, 1e-9))))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return 1e6 * statistics.median(times)


@torch.library.custom_op("attncc_bench::host_probe", mutates_args=())
def _probe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: List[torch.Tensor], scale: float,
           layout: List[int], lowrank: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A no-op op with the schema of attncc's forward op: the custom op dispatch floor."""
    return q.new_empty(0), q.new_empty(0), q.new_empty(0)


@_probe.register_fake
def _probe_fake(q, k, v, tensors, scale, layout, lowrank):
    return q.new_empty(0), q.new_empty(0), q.new_empty(0)


_probe.register_autograd(lambda ctx, *grads: (None,) * 7, setup_context=lambda ctx, inputs, output: None)


def measure(name: str, dtype, device: str, timing: dict, B: int = 1, H: int = 8, L: int = 128, D: int = 64,
            side: int = 16) -> dict:
    """Host times (microseconds) of one pattern: attncc cached / checked (launch stubbed),
    the op floor, SDPA meta / cpu tiny (and cuda with ``device="cuda"``)."""
    kern = attncc.compile(attncc.pattern_path(name))
    grid = [side] * len(kern.ir.grid) if kern.ir.grid else None
    q, k, v, tens, sizes = example_inputs(kern.ir, B, H, H, L, D=D, dtype=dtype, device=device, grid=grid)
    if device != "cpu":
        kern(q, k, v, **tens)  # one real call: compiles and autotunes outside the timed loop

    def call():
        with capture():
            kern(q, k, v, **tens)

    row = {"pattern": name, "shape": f"B{B} H{H} " + (f"grid {'x'.join(map(str, grid))}" if grid else f"L{L}")
           + f" D{D}"}
    CompiledAttention.cache_calls = False  # on the class: also the kernel the custom op launches on
    try:
        row["checked"] = per_call_us(call, **timing)
    finally:
        CompiledAttention.cache_calls = True
    row["cached"] = per_call_us(call, **timing)
    lay = [1] * 15
    row["op_floor"] = per_call_us(lambda: _probe(q, k, v, list(tens.values()), 0.125, lay, []), **timing)
    Lt = sizes["Lq"]
    qm, km, vm = (torch.empty(B, H, Lt, D, dtype=dtype, device="meta") for _ in range(3))
    row["sdpa_meta"] = per_call_us(lambda: F.scaled_dot_product_attention(qm, km, vm, is_causal=True), **timing)
    qt, kt, vt = (torch.randn(B, H, 1, D).to(dtype) for _ in range(3))
    row["sdpa_tiny"] = per_call_us(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), **timing)
    if device != "cpu":
        qc, kc, vc = (x.flatten(2, -2) if grid else x for x in (q, k, v))

        def sdpa_cuda():
            F.scaled_dot_product_attention(qc, kc, vc, is_causal=True)

        sdpa_cuda()
        torch.cuda.synchronize()
        row["sdpa_cuda"] = per_call_us(sdpa_cuda, **timing)
    return row


def table(rows: list) -> str:
    """The rows as a Markdown table (times in microseconds)."""
    cuda = any("sdpa_cuda" in r for r in rows)
    head = ["pattern", "shape", "attncc cached", "attncc checked", "op floor", "SDPA meta", "SDPA cpu tiny"]
    head += ["SDPA cuda"] if cuda else []
    head += ["ratio/meta", "ratio/tiny"] + (["ratio/cuda"] if cuda else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["pattern"], r["shape"]] + [f"{r[c]:.1f}" for c in
                                              ("cached", "checked", "op_floor", "sdpa_meta", "sdpa_tiny")]
        cells += [f"{r['sdpa_cuda']:.1f}"] if cuda else []
        cells += [f"{r['cached'] / r['sdpa_meta']:.2f}", f"{r['cached'] / r['sdpa_tiny']:.2f}"]
        cells += [f"{r['cached'] / r['sdpa_cuda']:.2f}"] if cuda else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Parse the arguments, time every pattern, print the table (and write it with ``--output``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patterns", default=DEFAULT_PATTERNS, help="comma-separated library pattern names")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--length", type=int, default=128, help="1-D patterns: Lq = Lk")
    p.add_argument("--side", type=int, default=16, help="grid patterns: tokens per grid axis")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--calls", type=int, default=2000, help="most calls per run")
    p.add_argument("--run-time", type=float, default=0.1, help="seconds per run (sets the calls per run)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: tiny CPU ops with a thread pool are very noisy)")
    p.add_argument("--quick", action="store_true", help="3 short runs per column (a smoke test)")
    p.add_argument("--output", type=Path, help="also write the table (Markdown) to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    timing = dict(runs=args.runs, max_calls=args.calls, run_time=args.run_time)
    if args.quick:
        timing = dict(runs=3, max_calls=200, run_time=0.01, warmup=5)
    rows = []
    for name in [n.strip() for n in args.patterns.split(",") if n.strip()]:
        rows.append(measure(name, DTYPES[args.dtype], args.device, timing, args.batch, args.heads, args.length,
                            args.head_dim, args.side))
    text = table(rows)
    settings = (f"torch {torch.__version__}, {args.dtype}, device {args.device}, {torch.get_num_threads()} threads, "
                f"median of {timing['runs']} runs; times in microseconds per call, launch stubbed (capture)")
    print(text)
    print(f"\n{settings}")
    if args.output:
        args.output.write_text(f"# attncc host overhead\n\n`python {' '.join(sys.argv)}`\n\n{settings}\n\n{text}\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
