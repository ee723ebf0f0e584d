#!/usr/bin/env python
"""Forward (or forward+backward) benchmark: attncc vs compiled FlexAttention vs dense-causal SDPA.

For every library pattern and sequence length this script

1. compiles the pattern with :func:`attncc.compile` and draws inputs with
   :func:`attncc.inputs.example_inputs` (grid patterns, run when named in ``--patterns``:
   on a square / cubic grid of L tokens, e.g. 64 x 64 for L = 4096);
2. builds FlexAttention ``score_mod`` / ``mask_mod`` functions *from the same IR*
   (evaluated with :func:`attncc.dense.eval_expr`), so both libraries compute the
   same function by construction;
3. checks correctness first (max abs difference attncc vs flex, and vs the dense
   float64 reference where that fits in memory);
4. times attncc, flex (``torch.compile(flex_attention)``), flex's
   ``create_block_mask`` and ``scaled_dot_product_attention(is_causal=True)``
   with ``triton.testing.do_bench(warmup=25, rep=100, return_mode="median")``;
5. prints a Markdown table and writes it to
   ``benchmarks/results/forward_<device-slug>_<YYYY-MM-DD>.md``.

``--backward`` times a training step instead: forward plus ``out.backward(dout)``
for q, k, v and every float tensor the score reads (ALiBi slopes, relative-position
tables; flex adds their gradients with atomics, attncc by default reduces
per-program partials), checks every gradient against flex's (and the float64
reference's), and writes ``fwdbwd_<device-slug>_<date>.md``.

``--dry-run`` runs the same code path on the CPU with tiny sizes (L=128, D=64,
H=2, float32; attncc under the Triton interpreter, flex eager, one
``time.perf_counter`` run per timing) and writes no results file.

Usage::

    python benchmarks/bench_forward.py                       # GPU, all patterns, L=4096,16384
    python benchmarks/bench_forward.py --patterns causal,alibi --lengths 8192
    python benchmarks/bench_forward.py --dry-run             # CPU smoke test
    python benchmarks/bench_forward.py --backward            # forward + backward
"""

from __future__ import annotations

import os
import sys

# attncc switches Triton to its CPU interpreter only when no GPU is present, and
# that must happen before triton is first imported. A dry run on a GPU machine
# still runs on the CPU, so ask for the interpreter here, before any import that
# pulls in triton (attncc, flex_attention).
if "--dry-run" in sys.argv[1:] and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import attncc  # noqa: E402  (first: it decides TRITON_INTERPRET before triton is imported)
import torch  # noqa: E402
import triton  # noqa: E402
import attncc.flex as attncc_flex  # noqa: E402
from attncc import ir as I  # noqa: E402
from attncc.dense import eval_expr, index_env  # noqa: E402
from attncc.inputs import example_inputs  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: dense reference check only when B*H*Lq*Lk is at most this (it materialises float64 scores)
REF_MAX_ELEMS = 1 << 22
#: query rows per chunk when counting allowed (q, kv) pairs
COUNT_CHUNK_ROWS = 1024
#: (atol, rtol) used to flag a mismatch between attncc and flex / the reference
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything that fixes one benchmark run (sizes, device, modes)."""

    device: torch.device
    dtype: torch.dtype
    lengths: list
    B: int
    H: int
    Hkv: int
    D: int
    dry_run: bool
    flex_compile: bool
    flex_mod_float: torch.dtype
    warmup: int
    rep: int
    seed: int
    backward: bool = False

    @property
    def scale(self) -> float:
        """The softmax scale passed to every implementation (``1/sqrt(D)``)."""
        return 1.0 / math.sqrt(self.D)

    @property
    def gqa(self) -> bool:
        """True when query heads outnumber key/value heads (``enable_gqa`` for flex/SDPA)."""
        return self.H != self.Hkv


@dataclass
class Row:
    """One line of the results table (``None`` prints as ``-``)."""

    pattern: str
    L: int
    tiles: str = "-"
    allowed_frac: float | None = None
    attncc_ms: float | None = None
    attncc_tflops: float | None = None
    flex_ms: float | None = None
    block_mask_ms: float | None = None
    sdpa_ms: float | None = None
    err_flex: float | None = None
    err_ref: float | None = None
    attncc_error: str | None = None
    flex_error: str | None = None
    mismatch: bool = False

    @property
    def speedup(self) -> float | None:
        """flex time over attncc time (> 1: attncc is faster)."""
        if self.attncc_ms and self.flex_ms:
            return self.flex_ms / self.attncc_ms
        return None


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patterns", default=None,
                   help="comma-separated library pattern names (default: the 1-D patterns of "
                        "attncc.library_patterns(); grid patterns such as neighborhood_2d run when named, on a "
                        "square (cubic) grid of L tokens)")
    p.add_argument("--lengths", default=None,
                   help="comma-separated sequence lengths L (Lq = Lk = L; default 4096,16384, --dry-run: 128)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim D (= Dv)")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--heads", type=int, default=16, help="query heads Hq")
    p.add_argument("--kv-heads", type=int, default=16, help="key/value heads Hkv (GQA when < Hq)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="q/k/v dtype")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time (ms)")
    p.add_argument("--seed", type=int, default=0, help="base seed for the random inputs")
    p.add_argument("--flex-compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile flex_attention and create_block_mask (auto: on for GPU runs, off for "
                        "--dry-run; 'on' with --dry-run exercises the compiled path on the CPU)")
    p.add_argument("--flex-mod-float", choices=("float32", "float64"), default="float32",
                   help="float dtype of the score_mod/mask_mod arithmetic built from the IR (eval_expr computes in "
                        "float64; float32 is what a hand-written score_mod and the attncc kernel use)")
    p.add_argument("--output", default=None,
                   help="results file (default: benchmarks/results/forward_<device>_<date>.md)")
    p.add_argument("--backward", action="store_true",
                   help="time forward + backward (gradients of q, k, v and the score's float tensors)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test: L=128 (unless --lengths), D=64, H=Hkv=2, fp32, flex eager, one perf_counter "
                        "run per timing, no results file")
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    """Turn the parsed arguments into :class:`Settings` (dry run: tiny CPU sizes).

    Raises:
        SystemExit: a GPU run was asked for on a machine without CUDA.
    """
    compile_flex = {"on": True, "off": False, "auto": not args.dry_run}[args.flex_compile]
    mod_float = torch.float32 if args.flex_mod_float == "float32" else torch.float64
    lengths = [int(x) for x in (args.lengths or ("128" if args.dry_run else "4096,16384")).split(",") if x.strip()]
    if args.dry_run:
        return Settings(torch.device("cpu"), torch.float32, lengths, 1, 2, 2, 64, True, compile_flex, mod_float,
                        0, 0, args.seed, args.backward)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device found: run on a GPU machine, or use --dry-run for a CPU smoke test")
    return Settings(torch.device("cuda"), DTYPES[args.dtype], lengths, args.batch, args.heads, args.kv_heads,
                    args.head_dim, False, compile_flex, mod_float, args.warmup, args.rep, args.seed, args.backward)


def select_patterns(spec: str | None) -> dict:
    """The library patterns to run: ``{name: path}``, in library order (default: the 1-D
    patterns; grid patterns run when named, on square / cubic grids of L tokens, see
    :func:`grid_for`).

    Raises:
        SystemExit: an unknown pattern name.
    """
    if not spec:
        return attncc.library_patterns(grid=False)
    lib = attncc.library_patterns()
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in lib]
    if unknown:
        raise SystemExit(f"unknown pattern(s) {', '.join(unknown)}; library patterns: {', '.join(lib)}")
    return {n: lib[n] for n in names}


def grid_for(ir, L: int):
    """The grid shape of a grid pattern at ``L`` tokens: equal axes (``64 x 64`` for L = 4096
    on a 2-D grid); ``None`` for 1-D patterns.

    Raises:
        ValueError: ``L`` is not a square (cube) for a 2-D (3-D) grid.
    """
    n = len(ir.grid)
    if not n:
        return None
    side = round(L ** (1.0 / n))
    if side ** n != L:
        raise ValueError(f"grid pattern {ir.name!r} has {n} axes: L={L} is not a perfect "
                         f"{'square' if n == 2 else 'cube'} (e.g. {side ** n} is)")
    return (side,) * n


def check_lengths(patterns: dict, lengths: list) -> None:
    """Every grid pattern can run at every length (see :func:`grid_for`).

    Raises:
        SystemExit: a length that is not a square (cube) for a 2-D (3-D) grid pattern.
    """
    for name, path in patterns.items():
        ir = attncc.lower(path, name)
        for L in lengths:
            try:
                grid_for(ir, L)
            except ValueError as ex:
                raise SystemExit(str(ex)) from None


def flat(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, *grid, D)`` as ``(B, H, L, D)`` (the row-major token order of grid patterns;
    4-D tensors unchanged)."""
    return x.flatten(2, -2) if x.dim() > 4 else x


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, s: Settings) -> float:
    """Time ``fn`` in milliseconds.

    GPU: median of ``triton.testing.do_bench(fn, warmup, rep)`` (CUDA events, L2
    flushed between calls). Dry run: one ``time.perf_counter`` run. Callers have
    already called ``fn`` at least once (compilation, autotuning, correctness
    check), so one-time costs stay out of the number.
    """
    if s.dry_run:
        synchronize(s.device)
        t0 = time.perf_counter()
        fn()
        synchronize(s.device)
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=s.warmup, rep=s.rep, return_mode="median"))


# ----------------------------------------------------------------------------- IR -> flex
def size_values(sizes: dict) -> dict:
    """Map the IR's size symbols (``attncc.ir.SIZES``) to their integer values."""
    return {sym: int(sizes[name]) for name, sym in I.SIZES.items()}


def flex_mods(ir, sizes: dict, tensors: dict, s: Settings):
    """FlexAttention ``(score_mod, mask_mod)`` from the IR (:func:`attncc.flex.flex_mods`),
    evaluated in ``--flex-mod-float`` precision with constants on the attention device."""
    return attncc_flex.flex_mods(ir, sizes, tensors, device=s.device, float_dtype=s.flex_mod_float)


def mask_batch_heads(ir, s: Settings):
    """``(B, H)`` arguments for ``create_block_mask``: ``None`` where the mask does not depend on them."""
    free = ir.mask.free_symbols
    return (s.B if I.b in free else None), (s.H if I.h in free else None)


# ----------------------------------------------------------------------------- counting
def count_allowed_pairs(ir, sizes: dict, tensors: dict, device) -> int:
    """Exact number of allowed ``(b, h, q, kv)`` quadruples of ``ir.mask``.

    Evaluates the mask with :func:`attncc.dense.eval_expr` on ``device`` in chunks
    of up to :data:`COUNT_CHUNK_ROWS` query rows (fewer when the mask depends on the
    batch or head index, to bound memory). A chunk's result broadcasts to
    ``(B, H, rows, Lk)``; each element of the un-broadcast result stands for
    ``numel(target) / numel(result)`` pairs, so nothing is materialised at full size.
    """
    B, H, Lq, Lk = sizes["B"], sizes["H"], sizes["Lq"], sizes["Lk"]
    free = ir.mask.free_symbols
    bh = (B if I.b in free else 1) * (H if I.h in free else 1)
    rows_per = max(1, min(COUNT_CHUNK_ROWS, (1 << 26) // max(1, bh * Lk)))
    total = 0
    for r0 in range(0, Lq, rows_per):
        rows = torch.arange(r0, min(Lq, r0 + rows_per), device=device)
        env = index_env(B, H, Lq, Lk, sizes["Hkv"], sizes["D"], sizes["Dv"], device, q_rows=rows,
                        grid=I.grid_of(sizes))
        m = eval_expr(ir.mask, env, tensors)
        target = (B, H, rows.numel(), Lk)
        if tuple(torch.broadcast_shapes(m.shape, target)) != target:
            raise ValueError(f"mask evaluates to shape {tuple(m.shape)}, not broadcastable to {target}")
        n_target = B * H * rows.numel() * Lk
        total += int(m.to(torch.int64).sum()) * (n_target // m.numel())
    return total


def launch_config(kern, q, k, v, tensors: dict, scale: float):
    """The tile config the attncc kernel launches with for these inputs (fixed, CPU, or autotuned)."""
    return kern.config_for(q, k, v, scale=scale, **tensors)


def kernel_tile_stats(kern, sizes: dict, tensors: dict, cfg, s: Settings) -> dict:
    """Visited / total (query tile, key tile) pairs of the attncc kernel at launch tile size ``cfg``
    (the kernel's own ``count_tiles`` iteration, run on the attention device; grid patterns: in
    the permuted token layout the kernel runs on)."""
    mask_tensors = {n: tensors[n] for n in kern.plan.mask_tensors}
    grid = I.grid_of(sizes)[:len(kern.ir.grid)] or None
    return kern.tile_stats(sizes["Lq"], sizes["Lk"], B=s.B, H=s.H, Hkv=s.Hkv, D=s.D, Dv=s.D, config=cfg,
                           device=s.device, grid=grid, **mask_tensors)


# ----------------------------------------------------------------------------- checks
def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float32 (NaN if either holds a NaN)."""
    d = (a.detach().float() - b.detach().float()).abs()
    if torch.isnan(d).any():
        return float("nan")
    return float(d.max())


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """``allclose`` with the :data:`TOLERANCES` of ``dtype``; NaN never passes."""
    atol, rtol = TOLERANCES[dtype]
    return bool(torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol, equal_nan=False))


# ----------------------------------------------------------------------------- backward
def grad_leaves(ir, q, k, v, tensors: dict) -> tuple[list, dict]:
    """Leaves that take gradients in ``--backward`` runs: q, k, v and the float tensors the
    score reads, as ``(leaves, tensors with those replaced)`` (detached copies, requires_grad)."""
    qkv = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    score_reads = {t.name for t in ir.tensors_in(ir.score)}
    tens = {n: (t.detach().clone().requires_grad_() if t.is_floating_point() and n in score_reads else t)
            for n, t in tensors.items()}
    return qkv + [t for t in tens.values() if t.requires_grad], tens


def step_fn(forward, leaves: list, dout: torch.Tensor | None):
    """``forward`` alone, or (``dout`` given) a training step: clear the leaves' grads, run
    ``forward()`` and backpropagate ``dout``; returns the output."""
    if dout is None:
        return forward

    def step():
        """One forward + backward."""
        for x in leaves:
            x.grad = None
        out = forward()
        out.backward(dout)
        return out

    return step


def grad_err(a: list, b: list) -> float:
    """Largest max-abs difference over paired gradient lists (NaN if any is missing or NaN)."""
    errs = [float("nan") if x.grad is None or y.grad is None else max_abs_err(x.grad, y.grad) for x, y in zip(a, b)]
    return max(errs) if errs else 0.0


def grads_close(a: list, b: list, dtype: torch.dtype) -> bool:
    """Every gradient of ``a`` within tolerance of ``b``'s, scaled by its magnitude."""
    atol, rtol = TOLERANCES[dtype]
    for x, y in zip(a, b):
        if x.grad is None or y.grad is None:
            return False
        scale = 1.0 + float(y.grad.float().abs().max())
        if not bool(torch.isfinite(x.grad).all()) or max_abs_err(x.grad, y.grad) > (atol + rtol) * scale:
            return False
    return True


# ----------------------------------------------------------------------------- benchmark
def bench_sdpa(L: int, s: Settings) -> float:
    """Time ``scaled_dot_product_attention(q, k, v, is_causal=True)`` at length ``L`` (ms)."""
    g = torch.Generator().manual_seed(s.seed + 7919 * L)
    q = torch.randn(s.B, s.H, L, s.D, generator=g).to(s.dtype).to(s.device).requires_grad_(s.backward)
    k = torch.randn(s.B, s.Hkv, L, s.D, generator=g).to(s.dtype).to(s.device).requires_grad_(s.backward)
    v = torch.randn(s.B, s.Hkv, L, s.D, generator=g).to(s.dtype).to(s.device).requires_grad_(s.backward)
    dout = torch.randn_like(q) if s.backward else None

    def forward():
        """One SDPA causal forward."""
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s.scale,
                                                                enable_gqa=s.gqa)

    fn = step_fn(forward, [q, k, v], dout)
    fn()
    synchronize(s.device)
    return time_ms(fn, s)


def bench_flex(row: Row, ir, q, k, v, tensors: dict, sizes: dict, ref_out: torch.Tensor | None,
               s: Settings, dout: torch.Tensor | None = None, ref_leaves: list | None = None) -> None:
    """Build flex mods from the IR, check flex against attncc's output (and, with ``dout``,
    against attncc's gradients ``ref_leaves``), time flex (forward, or forward + backward)
    and its block mask.

    Fills ``row.flex_ms``, ``row.block_mask_ms``, ``row.err_flex`` (and
    ``row.mismatch``); on any exception records its class in ``row.flex_error``
    and prints the traceback instead of raising. Grid patterns: flex runs on the
    row-major flattened tokens (its output unflattened to the grid for the checks).
    """
    try:
        if s.flex_compile:
            torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no stale guards
            flex_fn = torch.compile(flex_attention, dynamic=False, fullgraph=True)
            cbm_fn = torch.compile(create_block_mask, dynamic=False)
        else:
            flex_fn, cbm_fn = flex_attention, create_block_mask
        if dout is not None:
            leaves, tensors = grad_leaves(ir, q, k, v, tensors)
            q, k, v = leaves[:3]
        sm, mm = flex_mods(ir, sizes, tensors, s)
        L = sizes["Lq"]
        block_mask = None
        if mm is not None:
            Bm, Hm = mask_batch_heads(ir, s)

            def build():
                """One ``create_block_mask`` call for this pattern and shape."""
                return cbm_fn(mm, Bm, Hm, L, L, device=s.device)

            block_mask = build()
            synchronize(s.device)

        def forward():
            """One flex_attention forward (grid patterns: on the flattened tokens)."""
            out = flex_fn(flat(q), flat(k), flat(v), score_mod=sm, block_mask=block_mask, scale=s.scale,
                          enable_gqa=s.gqa)
            return out.unflatten(2, q.shape[2:-1]) if q.dim() > 4 else out

        run = step_fn(forward, leaves if dout is not None else [], dout)
        out = run()
        synchronize(s.device)
        if ref_out is not None:
            row.err_flex = max_abs_err(out, ref_out)
            if not close(out, ref_out, s.dtype):
                row.mismatch = True
        if dout is not None and ref_leaves is not None:
            row.err_flex = max(row.err_flex or 0.0, grad_err(ref_leaves, leaves))
            if not grads_close(ref_leaves, leaves, s.dtype):
                row.mismatch = True
        del out
        row.flex_ms = time_ms(run, s)
        if mm is not None:
            row.block_mask_ms = time_ms(build, s)
    except Exception as ex:  # noqa: BLE001 - report flex failures in the table, keep going
        row.flex_error = type(ex).__name__
        print(f"  flex failed for {row.pattern} L={row.L}: {type(ex).__name__}: {str(ex).splitlines()[0][:300]}",
              file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)
    finally:
        if s.flex_compile:
            torch._dynamo.reset()


def bench_case(kern, path, L: int, s: Settings, sdpa_ms: float | None, case_seed: int) -> Row:
    """Benchmark one (pattern, length): correctness first, then attncc and flex timings.

    ``kern`` is the pattern's :class:`~attncc.runtime.CompiledAttention`, compiled
    once per pattern and reused for every length (so it is the object the custom op
    launches through, and its in-memory autotuning choices are the ones used).
    Grid patterns run on the equal-axes grid of ``L`` tokens (:func:`grid_for`).
    """
    name = kern.ir.name
    row = Row(name, L, sdpa_ms=sdpa_ms)
    ir = kern.ir
    q, k, v, tensors, sizes = example_inputs(ir, B=s.B, H=s.H, Hkv=s.Hkv, Lq=L, Lk=L, D=s.D, Dv=s.D,
                                             dtype=s.dtype, device=s.device, seed=case_seed, grid=grid_for(ir, L))
    total_pairs = s.B * s.H * L * L
    allowed = count_allowed_pairs(ir, sizes, tensors, s.device)
    row.allowed_frac = allowed / total_pairs
    flops = 2.0 * allowed * (sizes["D"] + sizes["Dv"])  # QK^T and PV over the allowed pairs
    if s.backward:
        flops *= 3.5  # the backward recomputes QK^T and adds dV, dP, dQ, dK: 5 matmuls to the forward's 2

    out = None
    dout = torch.randn(*q.shape[:-1], s.D, generator=torch.Generator().manual_seed(case_seed)).to(s.dtype).to(
        s.device) if s.backward else None
    leaves, tens = grad_leaves(ir, q, k, v, tensors) if s.backward else ([], tensors)
    qq, kk, vv = leaves[:3] if s.backward else (q, k, v)
    try:
        def forward():
            """One attncc forward through the public call (argument checks included)."""
            return kern(qq, kk, vv, scale=s.scale, **tens)

        run = step_fn(forward, leaves, dout)
        out = run()  # first call: autotunes on CUDA (kept out of the timing)
        synchronize(s.device)
        if not bool(torch.isfinite(out).all()):
            row.mismatch = True
        if total_pairs <= REF_MAX_ELEMS:
            ref_leaves, ref_tens = grad_leaves(ir, q, k, v, tensors) if s.backward else ([], tensors)
            rq, rk, rv = ref_leaves[:3] if s.backward else (q, k, v)
            ref = attncc.reference(path, rq, rk, rv, pattern=name, scale=s.scale, **ref_tens)
            row.err_ref = max_abs_err(out, ref)
            if not close(out, ref, s.dtype):
                row.mismatch = True
            if s.backward:
                ref.backward(dout)
                row.err_ref = max(row.err_ref, grad_err(leaves, ref_leaves))
                if not grads_close(leaves, ref_leaves, s.dtype):
                    row.mismatch = True
            del ref
        cfg = launch_config(kern, q, k, v, tensors, s.scale)
        stats = kernel_tile_stats(kern, sizes, tensors, cfg, s)
        row.tiles = (f"{stats['visited']}/{stats['total']} ({100.0 * stats['visited'] / stats['total']:.1f}%, "
                     f"{stats['block_m']}x{stats['block_n']})")
        row.attncc_ms = time_ms(run, s)
        row.attncc_tflops = flops / (row.attncc_ms * 1e-3) / 1e12
    except Exception as ex:  # noqa: BLE001 - report, keep going; counted as a failure in the exit code
        row.attncc_error = type(ex).__name__
        print(f"  attncc failed for {name} L={L}: {type(ex).__name__}: {ex}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)

    bench_flex(row, ir, q, k, v, tensors, sizes, None if out is None else out.detach(), s, dout,
               leaves if s.backward and out is not None else None)
    del out, q, k, v, tensors
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- report
def fmt(x, spec: str) -> str:
    """Format a number with ``spec``; ``None`` as ``-``."""
    return "-" if x is None else format(x, spec)


COLUMNS = ("pattern", "L", "tiles visited/total (BMxBN)", "allowed", "attncc ms", "attncc TFLOP/s", "flex ms",
           "block mask ms", "speedup vs flex", "SDPA causal ms", "max err vs flex", "max err vs ref")


def row_cells(r: Row) -> list:
    """The table cells of one row."""
    flex_ms = r.flex_error if r.flex_error else fmt(r.flex_ms, ".3f")
    attncc_ms = r.attncc_error if r.attncc_error else fmt(r.attncc_ms, ".3f")
    err_flex = fmt(r.err_flex, ".2e")
    if r.mismatch:
        err_flex += " MISMATCH"
    return [r.pattern, str(r.L), r.tiles, fmt(None if r.allowed_frac is None else 100 * r.allowed_frac, ".1f") + "%",
            attncc_ms, fmt(r.attncc_tflops, ".1f"), flex_ms, fmt(r.block_mask_ms, ".3f"),
            fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else ""), fmt(r.sdpa_ms, ".3f"), err_flex,
            fmt(r.err_ref, ".2e")]


def markdown_table(rows: list) -> str:
    """The results as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(row_cells(r)) + " |")
    return "\n".join(lines)


def device_name(s: Settings) -> str:
    """Human-readable name of the benchmark device."""
    if s.device.type == "cuda":
        return torch.cuda.get_device_name(s.device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


def slug(text: str) -> str:
    """Lower-case ``text`` with runs of other characters replaced by ``-`` (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def command_line() -> str:
    """The command line this script was started with, shell-quoted."""
    return "python " + shlex.join(sys.argv)


def report(rows: list, s: Settings, date: str) -> str:
    """The Markdown report: header (date, device, versions, command, settings), table and legend."""
    dtype_name = {v: k for k, v in DTYPES.items()}[s.dtype]
    timing = ("one time.perf_counter run (dry run)" if s.dry_run else
              f"triton.testing.do_bench(warmup={s.warmup}, rep={s.rep}, return_mode=\"median\")")
    cuda = torch.version.cuda or "-"
    header = [
        f"# attncc {'forward + backward' if s.backward else 'forward'} benchmark",
        "",
        f"- date: {date}",
        f"- device: {device_name(s)}",
        f"- torch {torch.__version__} (CUDA {cuda}), triton {triton.__version__}, attncc {attncc.__version__}",
        f"- command: `{command_line()}`",
        f"- shapes: B={s.B}, Hq={s.H}, Hkv={s.Hkv}, D=Dv={s.D}, Lq=Lk=L, {dtype_name}, "
        f"{'forward + backward (dout random; grads of q, k, v and the float tensors the score reads)' if s.backward else 'forward only'}, "
        f"scale=1/sqrt(D)",
        f"- timing: {timing}; ms",
        f"- flex: {'torch.compile(flex_attention, dynamic=False, fullgraph=True)' if s.flex_compile else 'eager'}, "
        f"score_mod/mask_mod from the IR via eval_expr ({str(s.flex_mod_float).replace('torch.', '')} float math); "
        f"block mask from {'torch.compile(create_block_mask)' if s.flex_compile else 'create_block_mask'}",
        "",
    ]
    legend = [
        "",
        "Columns: tiles = (query tile, key tile) pairs the attncc kernel visits / all pairs, summed over batch "
        "and heads, at the kernel's launch tile size; allowed = share of (q, kv) pairs the mask allows (exact "
        "count); attncc TFLOP/s = 2 * allowed pairs * (D + Dv) / time (times 3.5 for forward + backward); speedup = flex ms / attncc ms; block "
        "mask ms = create_block_mask time (not included in flex ms; '-' for patterns without a mask); SDPA "
        "causal = dense causal scaled_dot_product_attention at the same shape (one value per L); max err = max "
        "|attncc - flex| and |attncc - float64 dense reference| (reference only for small shapes). A flex "
        "cell holding an exception name means flex failed for that pattern.",
    ]
    return "\n".join(header) + "\n" + markdown_table(rows) + "\n" + "\n".join(legend) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    """Run the benchmark; returns the process exit code (1 if attncc failed or mismatched)."""
    args = parse_args(argv)
    s = make_settings(args)
    patterns = select_patterns(args.patterns)
    check_lengths(patterns, s.lengths)
    if s.dry_run:
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    date = datetime.date.today().isoformat()
    print(f"device: {device_name(s)}; torch {torch.__version__}; triton {triton.__version__}; "
          f"{'DRY RUN (CPU, tiny sizes)' if s.dry_run else 'GPU run'}", flush=True)

    kernels = {name: attncc.compile(path, name) for name, path in patterns.items()}
    rows = []
    for L in s.lengths:
        sdpa_ms = bench_sdpa(L, s)
        print(f"L={L}: SDPA causal {sdpa_ms:.3f} ms", flush=True)
        for i, (name, path) in enumerate(patterns.items()):
            t0 = time.perf_counter()
            row = bench_case(kernels[name], path, L, s, sdpa_ms, s.seed + 1000 * i + L)
            rows.append(row)
            print(f"  {name:30s} L={L}: attncc {fmt(row.attncc_ms, '.3f')} ms, flex "
                  f"{row.flex_error or fmt(row.flex_ms, '.3f')} ms, max|attncc-flex| {fmt(row.err_flex, '.2e')}, "
                  f"max|attncc-ref| {fmt(row.err_ref, '.2e')}{'  MISMATCH' if row.mismatch else ''} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)

    text = report(rows, s, date)
    print()
    print(text)
    if not s.dry_run:
        out = Path(args.output) if args.output else RESULTS_DIR / (f"{'fwdbwd' if s.backward else 'forward'}_"
                                                                     f"{slug(device_name(s))}_{date}.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    bad = [r for r in rows if r.attncc_error or r.mismatch]
    if bad:
        print("FAILED: " + ", ".join(f"{r.pattern} L={r.L}" for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
