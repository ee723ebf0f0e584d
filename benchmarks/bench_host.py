#!/usr/bin/env python
"""Host overhead per call: attncc with the kernel launch stubbed out vs SDPA's dispatch.

What is timed, per pattern (``--patterns``; default causal, sliding_window,
document_causal, alibi, gated_causal, neighborhood_2d) at B=1, H=8, L=128 (a 16 x 16 grid
for grid patterns), D=64, bf16:

* **attncc cached**: ``kern(q, k, v, **tensors)`` repeated with the same inputs inside
  :func:`attncc.runtime.capture`, which records the launches instead of running them, so
  everything but the kernel is timed: the per-signature fast path of
  ``CompiledAttention.__call__`` (eager, nothing to differentiate: the check of the last
  signature or the cache key, the block table's snapshot comparison, the output
  allocations, the remembered argument list with the call's tensors put in).
* **attncc checked**: the same with ``CompiledAttention.cache_calls = False``: every argument check,
  shape function, layout choice and launch-argument computation runs on every call (the
  path a new signature takes, and every call before the per-signature cache existed).
* **capture**: ``with capture(): pass``: what the stub itself costs per call (entering and
  leaving the context; a real call has Triton's launch instead). It is included in
  attncc cached; ``net/tiny`` subtracts it.
* **op floor**: a no-op ``torch.library.custom_op`` with the schema of attncc's forward op
  (returns three empty tensors): what the custom op dispatch itself costs (it is kept:
  ``torch.compile`` traces through it).
* **SDPA meta**: ``scaled_dot_product_attention(q, k, v, is_causal=True)`` on ``meta``
  tensors of the same shape (grid patterns: the grid flattened): dispatch and shape logic,
  no math; ``ratio/meta`` divides by it. Caveat: in
  recent torch the meta path runs SDPA's math decomposition through Python reference
  ops on meta tensors (about 20 aten/prims calls), so it is much slower than the C++
  dispatch of a CUDA SDPA call; the next column is the stricter yardstick.
* **SDPA cpu tiny**: the same call on CPU tensors with one query/key token (B, H, 1, D):
  the C++ dispatch, the kernel choice, the allocations and a negligible amount of math
  (no launch). Closest CPU stand-in for the host time of a CUDA SDPA call without its
  launch; ``ratio/tiny`` divides by it.
* ``--grad`` adds **attncc grad** and **SDPA tiny grad**: the same calls with q requiring
  grad (the forward's host time: autograd graph built, no backward run), and
  ``grad/tiny``, their ratio. attncc's go through the custom op's autograd registration.
* ``--device cuda`` (on a GPU) adds **SDPA cuda**: the real host time of SDPA on the same
  CUDA inputs (asynchronous launches, one synchronize per run), and attncc is timed on
  CUDA tensors (after one real call, so autotuning is done).

Each function is warmed up, then timed with ``time.perf_counter`` over ``--runs`` rounds
(default 9); a round times N calls of every column in turn (interleaved, so a change of
the machine's load hits all columns alike), N chosen per column so a run lasts about
``--run-time`` seconds (at most ``--calls``, default 2000). Each column reports the median
per-call time of its runs, in microseconds; ``ratio/tiny`` and ``net/tiny`` are the
medians of the per-round ratios (attncc cached and SDPA cpu tiny of the same round).
Shared machines are noisy: compare columns of one run, not runs.
Runs on the CPU in well under a minute (``--quick``: a few seconds); writes nothing unless
``--output`` is given.

The output ends with a line comparing the largest ``ratio/tiny`` with the issue's goal
(:data:`GOAL`) and one naming the attncc that was imported: run from a checkout's root
with ``PYTHONPATH=.`` (the script's own folder, not the checkout, is first on the path, so
an editable install elsewhere would be measured otherwise).

Usage::

    PYTHONPATH=. python benchmarks/bench_host.py
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
import contextlib  # noqa: E402
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
#: the issue's goal for ratio/tiny (a repeated call's host time over SDPA's)
GOAL = 1.5
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def interleaved_us(fns: dict, runs: int = 9, max_calls: int = 2000, run_time: float = 0.05,
                   warmup: int = 20) -> dict:
    """Per-call times (microseconds) of every ``fns`` entry, timed in interleaved rounds.

    Args:
        fns: name -> ``fn`` (called with no arguments) or ``(fn, ctx)``, ``ctx`` a context
            manager factory entered around each of ``fn``'s timed runs (not per call).
        runs: rounds; each times one run of N calls of every function in turn.
        max_calls / run_time: N is sized per function from a first estimate so a run lasts
            about ``run_time`` seconds (between 5 and ``max_calls``).

    Returns:
        name -> list of ``runs`` per-call times, in round order.
    """
    fns = {n: f if isinstance(f, tuple) else (f, contextlib.nullcontext) for n, f in fns.items()}
    counts = {}
    for name, (fn, ctx) in fns.items():
        with ctx():
            t0 = time.perf_counter()
            for _ in range(warmup):
                fn()
            est = (time.perf_counter() - t0) / warmup
        counts[name] = max(5, min(max_calls, int(run_time / max(est, 1e-9))))
    times = {n: [] for n in fns}
    for _ in range(runs):
        for name, (fn, ctx) in fns.items():
            n = counts[name]
            with ctx():
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                times[name].append(1e6 * (time.perf_counter() - t0) / n)
    return times


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
            side: int = 16, grad: bool = False) -> dict:
    """Host times (microseconds) of one pattern: attncc cached / checked (launch stubbed),
    the op floor, SDPA meta / cpu tiny (and cuda with ``device="cuda"``; with ``grad``:
    attncc cached and SDPA cpu tiny with q requiring grad, the forward only)."""
    kern = attncc.compile(attncc.pattern_path(name))
    grid = [side] * len(kern.ir.grid) if kern.ir.grid else None
    q, k, v, tens, sizes = example_inputs(kern.ir, B, H, H, L, D=D, dtype=dtype, device=device, grid=grid)
    if device != "cpu":
        kern(q, k, v, **tens)  # one real call: compiles and autotunes outside the timed loop

    def call():
        with capture():
            kern(q, k, v, **tens)

    def stub():
        with capture():
            pass

    @contextlib.contextmanager
    def checked_path():
        CompiledAttention.cache_calls = False  # on the class: also the kernel the custom op launches on
        try:
            yield
        finally:
            CompiledAttention.cache_calls = True

    row = {"pattern": name, "shape": f"B{B} H{H} " + (f"grid {'x'.join(map(str, grid))}" if grid else f"L{L}")
           + f" D{D}"}
    lay = [1] * 15
    Lt = sizes["Lq"]
    qm, km, vm = (torch.empty(B, H, Lt, D, dtype=dtype, device="meta") for _ in range(3))
    qt, kt, vt = (torch.randn(B, H, 1, D).to(dtype) for _ in range(3))
    fns = {"checked": (call, checked_path), "cached": call, "capture": stub,
           "op_floor": lambda: _probe(q, k, v, list(tens.values()), 0.125, lay, []),
           "sdpa_meta": lambda: F.scaled_dot_product_attention(qm, km, vm, is_causal=True),
           "sdpa_tiny": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)}
    if device != "cpu":
        qc, kc, vc = (x.flatten(2, -2) if grid else x for x in (q, k, v))

        def sdpa_cuda():
            F.scaled_dot_product_attention(qc, kc, vc, is_causal=True)

        sdpa_cuda()
        torch.cuda.synchronize()
        fns["sdpa_cuda"] = sdpa_cuda
    if grad:  # calls that build an autograd graph (the forward's host time; no backward)
        qg, qtg = q.detach().requires_grad_(), qt.detach().requires_grad_()

        def call_grad():
            with capture():
                kern(qg, k, v, **tens)

        fns["grad"] = call_grad
        fns["sdpa_tiny_grad"] = lambda: F.scaled_dot_product_attention(qtg, kt, vt, is_causal=True)
    times = interleaved_us(fns, **timing)
    row.update({n: statistics.median(t) for n, t in times.items()})
    tiny = times["sdpa_tiny"]
    row["ratio_tiny"] = statistics.median(a / b for a, b in zip(times["cached"], tiny))
    row["net_tiny"] = statistics.median((a - c) / b for a, c, b in zip(times["cached"], times["capture"], tiny))
    if grad:
        row["grad_tiny"] = statistics.median(a / b for a, b in zip(times["grad"], times["sdpa_tiny_grad"]))
    return row


def table(rows: list) -> str:
    """The rows as a Markdown table (times in microseconds)."""
    cuda = any("sdpa_cuda" in r for r in rows)
    grad = any("grad" in r for r in rows)
    head = ["pattern", "shape", "attncc cached", "attncc checked", "capture", "op floor", "SDPA meta", "SDPA cpu tiny"]
    head += ["SDPA cuda"] if cuda else []
    head += ["ratio/meta", "ratio/tiny", "net/tiny"] + (["ratio/cuda"] if cuda else [])
    head += ["attncc grad", "SDPA tiny grad", "grad/tiny"] if grad else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["pattern"], r["shape"]] + [f"{r[c]:.1f}" for c in
                                              ("cached", "checked", "capture", "op_floor", "sdpa_meta", "sdpa_tiny")]
        cells += [f"{r['sdpa_cuda']:.1f}"] if cuda else []
        cells += [f"{r['cached'] / r['sdpa_meta']:.2f}", f"{r['ratio_tiny']:.2f}", f"{r['net_tiny']:.2f}"]
        cells += [f"{r['cached'] / r['sdpa_cuda']:.2f}"] if cuda else []
        cells += [f"{r['grad']:.1f}", f"{r['sdpa_tiny_grad']:.1f}", f"{r['grad_tiny']:.2f}"] if grad else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_summary(rows: list, goal: float = GOAL) -> str:
    """One line: the largest ``ratio/tiny`` (and ``net/tiny``) of the rows against the goal."""
    worst = max(rows, key=lambda r: r["ratio_tiny"])
    over = [r["pattern"] for r in rows if r["ratio_tiny"] > goal]
    return (f"ratio/tiny (attncc cached / SDPA cpu tiny, goal <= {goal}): max {worst['ratio_tiny']:.2f} "
            f"({worst['pattern']}), net/tiny max {max(r['net_tiny'] for r in rows):.2f}; "
            + (f"above the goal: {', '.join(over)}" if over else "every pattern within the goal"))


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
    p.add_argument("--runs", type=int, default=9, help="interleaved rounds (one run of every column each)")
    p.add_argument("--calls", type=int, default=2000, help="most calls per run")
    p.add_argument("--run-time", type=float, default=0.05, help="seconds per run (sets the calls per run)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: tiny CPU ops with a thread pool are very noisy)")
    p.add_argument("--grad", action="store_true",
                   help="also time calls whose q requires grad (attncc grad, SDPA tiny grad, grad/tiny)")
    p.add_argument("--quick", action="store_true", help="3 short rounds (a smoke test)")
    p.add_argument("--output", type=Path, help="also write the table (Markdown) to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    timing = dict(runs=args.runs, max_calls=args.calls, run_time=args.run_time)
    if args.quick:
        timing = dict(runs=3, max_calls=200, run_time=0.01, warmup=5)
    rows = []
    for name in [n.strip() for n in args.patterns.split(",") if n.strip()]:
        rows.append(measure(name, DTYPES[args.dtype], args.device, timing, args.batch, args.heads, args.length,
                            args.head_dim, args.side, args.grad))
    text = table(rows)
    settings = (f"attncc from {Path(attncc.__file__).parent.parent}, runtime from "
                f"{Path(sys.modules['attncc.runtime'].__file__).parent}; "
                f"torch {torch.__version__}, {args.dtype}, device {args.device}, {torch.get_num_threads()} threads, "
                f"medians of {timing['runs']} interleaved rounds; times in microseconds per call, launch stubbed "
                f"(capture)")
    print(text)
    summary = ratio_summary(rows)
    print(f"\n{summary}\n{settings}")
    if args.output:
        args.output.write_text(f"# attncc host overhead\n\n`python {' '.join(sys.argv)}`\n\n{settings}\n\n{text}\n\n"
                               f"{summary}\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
