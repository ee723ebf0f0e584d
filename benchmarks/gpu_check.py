#!/usr/bin/env python
"""One-command GPU check: correctness of every library pattern, then the benchmarks.

Run on a CUDA machine (torch 2.11-2.13, Triton 3.6-3.9; no internet needed)::

    python benchmarks/gpu_check.py

It prints one progress line per check, and starts no check after ``--budget-s`` seconds
(default 450, counted from the script's start) so that it ends within 8 minutes (a check
or case already running when its section's time is up still finishes). Four sections:

(a) **correctness**: every library pattern (``attncc.library_patterns()``, 1-D and grid),
    compiled and run

    * at small shapes (B=2, Hq=4, Hkv=2, 300 tokens, ragged against the 64-token tiles;
      grids 300, 17 x 19, 6 x 7 x 8; the tests' small windows / kernels), bf16 and fp16,
      head dims 64 and 128, forward (output and LSE;
      sigmoid patterns have no LSE) and backward (gradients of q, k, v and of every float
      spec tensor, through a loss on the output and the LSE) against the float64 dense
      reference (:func:`attncc.reference`, autograd in float64), with a fixed 64 x 64 launch
      config (the default backward config);
    * at one realistic shape (B=1, H=16, L=4096 tokens: 64 x 64 and 16 x 16 x 16 grids,
      D=128, bf16, library default params, autotuned forward), forward and backward
      against ``scaled_dot_product_attention`` in float32 (``is_causal=True`` for
      ``causal``; otherwise the mask materialised from the IR, additive score terms and
      low-rank biases as a float mask, a sink as an extra key column, a gate applied to
      SDPA's output), or, for scores SDPA cannot express (softcap, a temperature), against
      FlexAttention compiled with mods built from the IR (bench_forward.py's), or, for
      sigmoid attention, against the float64 reference.

    The checks of a pattern run in one worker process; ``--jobs`` workers (spawned) share
    the GPU, so Triton compilation, which dominates, runs in parallel.
(b) **forward benchmark**: ``bench_forward.py``'s cases (attncc vs compiled flex vs SDPA
    causal, correctness checked first) for causal, sliding_window, document_causal, alibi,
    neighborhood_2d (a 64 x 64 / 128 x 128 grid) and gated_causal at L = 4096 and 16384.
(c) **forward + backward benchmark**: the same with ``--backward`` for causal and
    sliding_window.
(d) **decode benchmark**: ``bench_decode.py``'s cases (one query per sequence against a
    KV cache; attncc's split-KV decode kernel, split count autotuned, vs compiled
    FlexAttention vs SDPA, outputs checked against SDPA first; GB/s of KV read against the
    device's copy bandwidth) for causal, sliding window and ALiBi at B = 8, a 32k cache,
    Hq / Hkv = 32 / 8, D = 128, bf16, contiguous and paged (page 16).

Each section gets a share of the budget (a: until 45 %, b: until 70 %, c: until 85 %, d: until 100 %;
time a section leaves unused carries over): a check or case that would start after its
section's deadline is skipped and marked ``skipped (budget)`` in the report. The report,
one Markdown file with the date (UTC), device, torch / CUDA / triton / attncc versions and
the command line, failures first, goes to
``benchmarks/results/gpu_check_<device-slug>_<date>.md`` (or ``--output``). Exit status 1
if any correctness check (or a benchmark's check) fails.

``--dry-run`` runs the same code on the CPU under the Triton interpreter at tiny sizes
(small shapes: every pattern, bf16, D=64, L=80 / 8 x 10 / 4 x 4 x 5 grids; the "realistic"
part: L=64 / 8 x 8, D=32, for one pattern per kind of baseline; benchmarks at L=64, fp32,
flex eager, which has no CPU backward), writes the report to a temporary file (or
``--output``), and is what ``tests/test_gpu_check.py`` runs.
"""

from __future__ import annotations

import os
import sys
import time

#: when this script started: the budget counts its imports too
STARTED = time.time()

# Under --dry-run the kernels must run under the Triton interpreter, which has to be
# switched on before triton is first imported (see bench_forward.py).
if "--dry-run" in sys.argv[1:] and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

# bench_forward.py and results_file.py live next to this script (benchmarks/ is no package)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import attncc  # noqa: E402  (first: it decides TRITON_INTERPRET before triton is imported)
import sympy  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

import bench_decode as bd  # noqa: E402
import bench_forward as bf  # noqa: E402
from attncc import ir as I  # noqa: E402
from attncc.dense import dense_mask, eval_expr, gate_values, index_env, lowrank_factors, sink_values  # noqa: E402
from attncc.inputs import example_inputs  # noqa: E402
from results_file import results_path, write_results  # noqa: E402

#: section (b): bench_forward.py forward cases
BENCH_PATTERNS = ("causal", "sliding_window", "document_causal", "alibi", "neighborhood_2d", "gated_causal")
#: section (c): bench_forward.py --backward cases
BACKWARD_PATTERNS = ("causal", "sliding_window")
BENCH_LENGTHS = (4096, 16384)
#: the end of each section's time, as a share of --budget-s (unused time carries over)
SECTION_END = {"a": 0.45, "b": 0.7, "c": 0.85, "d": 1.0}
#: section (d): bench_decode.py cases (patterns; batch, cache length, pages, heads Hq / Hkv, D)
DECODE_PATTERNS = ("causal", "window", "alibi")
DECODE_SHAPE = dict(batch=[8], cache=[32768], page=[0, 16], heads=[32, 8], dim=128, window=4096, max_gib=48.0)
#: GPU: assumed duration (s) of one decode pattern (flex compiles per shape; the split autotuner)
DECODE_CASE_S = 20.0
#: seconds the workers of (a) may run past their deadline (a check that started before it)
GRACE_S = 30.0
#: GPU: assumed duration (s) of a benchmark case before one has run (flex compiles per case;
#: forward, forward + backward), so that no case starts too close to its section's deadline
FIRST_CASE_S = {False: 20.0, True: 40.0}
#: fixed launch tile of the small-shape kernels (64 x 64, 4 warps, 2 stages: the default
#: backward config, so forward and backward compile once per dtype and head dim, no autotuning)
SMALL_TILE = 64

#: small-shape params of 1-D patterns (tests/test_backward.py): windows, prefixes, sinks that
#: keep the masks non-trivial at a few hundred tokens
SMALL_PARAMS_1D = {"window": 24, "prefix": 20, "sinks": 3, "dilation": 3}
#: small-shape params of grid patterns (tests/test_grid.py): kernels that fit small grids
SMALL_PARAMS_GRID = {"swin_window": {"P": 4}, "maxvit_grid": {"G": 3}, "neighborhood_2d": {"kernel": 5},
                     "neighborhood_2d_rpb": {"kernel": 5}, "dilated_neighborhood_2d": {"kernel": 3},
                     "strided_neighborhood_2d": {"kernel": 6, "stride": 3}, "neighborhood_1d": {"dilation": 2},
                     "video_causal_neighborhood_3d": {"kernel": 3}}

PASS, FAIL, ERROR, SKIPPED, NA = "PASS", "FAIL", "ERROR", "skipped (budget)", "n/a"


# ----------------------------------------------------------------------------- plan
@dataclass
class Shape:
    """Sizes of one family of checks: 1-D patterns use ``L``, grid patterns ``grids[rank]``;
    ``small_params``: compile with :func:`small_params` (else the library defaults)."""

    B: int
    H: int
    Hkv: int
    L: int
    grids: dict
    small_params: bool

    def grid(self, ir) -> tuple | None:
        """The grid shape for ``ir`` (``None`` for 1-D patterns)."""
        return tuple(self.grids[len(ir.grid)]) if ir.grid else None

    def describe(self, ir) -> str:
        """``B x H/Hkv x L`` (grid patterns: ``B x H/Hkv x Y x X``) for the report."""
        tokens = "x".join(map(str, self.grid(ir))) if ir.grid else str(self.L)
        return f"{self.B}x{self.H}/{self.Hkv}x{tokens}"


@dataclass
class CorrectnessPlan:
    """What section (a) checks, sent to every worker (picklable)."""

    device: str
    small: Shape
    dtypes: tuple
    head_dims: tuple
    backward: bool
    realistic: Shape | None
    realistic_dtype: str
    realistic_D: int
    flex_compile: bool
    deadline: float
    seed: int
    #: patterns checked at the realistic shape (``None``: all)
    realistic_patterns: tuple | None = None

    def runs_realistic(self, name: str) -> bool:
        """Whether ``name`` is checked at the realistic shape."""
        return self.realistic is not None and (self.realistic_patterns is None or name in self.realistic_patterns)


@dataclass
class CheckRow:
    """One correctness check of section (a) (``err``: max abs error, ``None`` if none)."""

    part: str
    pattern: str
    check: str
    dtype: str
    D: int
    shape: str
    baseline: str
    err: float | None = None
    status: str = NA
    seconds: float = 0.0
    detail: str = ""

    def progress(self) -> str:
        """The progress line printed when the check is done."""
        err = "-" if self.err is None else f"{self.err:.2e}"
        return (f"[a] {self.part:9s} {self.pattern:28s} {self.check} {self.dtype} D={self.D:<3d} "
                f"vs {self.baseline}: max err {err} {self.status} ({self.seconds:.1f} s)"
                + (f"  [{self.detail}]" if self.status in (FAIL, ERROR) else ""))


@dataclass
class BenchSection:
    """Rows of a benchmark section (b or c), the cases skipped for the budget, and its settings."""

    settings: bf.Settings
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    ran: bool = False


# ----------------------------------------------------------------------------- helpers
def small_params(name: str, path) -> dict:
    """Params for the small-shape checks (:data:`SMALL_PARAMS_1D`, :data:`SMALL_PARAMS_GRID`)."""
    ir = attncc.lower(path, name)
    if ir.grid:
        return dict(SMALL_PARAMS_GRID.get(name, {}))
    return {k: SMALL_PARAMS_1D[k] for k, _ in ir.params if k in SMALL_PARAMS_1D}


def short(ex: BaseException, n: int = 160) -> str:
    """``Type: first line of the message``, cut to ``n`` characters."""
    lines = [ln.strip() for ln in str(ex).splitlines() if ln.strip()]
    msg = f"{type(ex).__name__}: {lines[0] if lines else ''}"
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def finite(x: torch.Tensor) -> bool:
    """No NaN or infinity in ``x``."""
    return bool(torch.isfinite(x).all())


def grad_ok(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """One gradient within tolerance: bench_forward's rule (:func:`bench_forward.grads_close`:
    finite, ``max |a - b| <= (atol + rtol) * (1 + max |b|)`` with the dtype's tolerances)."""
    return bf.grads_close([types.SimpleNamespace(grad=a)], [types.SimpleNamespace(grad=b)], dtype)


def compare_grads(names: list, got: list, want: list, dtype: torch.dtype) -> tuple:
    """Compare gradients by name; ``(max abs err, all ok, detail text)``. A missing gradient
    is fine where the reference's is missing or zero (tensors only the mask reads)."""
    worst, ok, parts = 0.0, True, []
    for nm, a, b in zip(names, got, want):
        if a is None:
            if b is not None and float(b.abs().max()) != 0.0:
                ok = False
                parts.append(f"d{nm} missing!")
            continue
        if b is None:
            ok = False
            parts.append(f"d{nm} unexpected!")
            continue
        e = bf.max_abs_err(a, b)
        good = grad_ok(a, b, dtype)
        ok &= good
        worst = math.nan if math.isnan(e) or math.isnan(worst) else max(worst, e)
        parts.append(f"d{nm} {e:.2e}" + ("" if good else "!"))
    return worst, ok, ", ".join(parts)


def emit(row: CheckRow) -> CheckRow:
    """Print ``row``'s progress line (flushed: workers share the terminal) and return it."""
    print(row.progress(), flush=True)
    return row


# ----------------------------------------------------------------------------- (a) small shapes
def finish_rows(kern, fwd: CheckRow, bwd: CheckRow | None, t0: float, run_backward) -> list:
    """Time and emit the forward row (started at ``t0``), then, when a backward row is
    planned, run ``run_backward()`` (which fills ``bwd``) unless the forward failed or the
    pattern has no backward, time and emit it. Returns the rows."""
    fwd.seconds = time.perf_counter() - t0
    rows = [emit(fwd)]
    if bwd is None:
        return rows
    t1 = time.perf_counter()
    if fwd.status == ERROR:
        bwd.status, bwd.detail = ERROR, "forward failed"
    elif kern.backward_error:
        bwd.detail = f"no backward: {kern.backward_error}"
    else:
        try:
            run_backward()
        except Exception as ex:  # noqa: BLE001 - one broken check must not hide the others
            bwd.status, bwd.detail = ERROR, short(ex)
            traceback.print_exc(file=sys.stderr)
    bwd.seconds = time.perf_counter() - t1
    rows.append(emit(bwd))
    return rows


def check_small(kern, path, name: str, params: dict, dtype_name: str, D: int, shape: Shape, device: str,
                backward: bool, seed: int) -> list:
    """Forward (output, LSE) and backward (q, k, v and float spec tensor gradients) of
    ``kern`` at a small shape against autograd through the float64 reference of
    ``path``/``name`` with ``params``; returns the ``fwd`` and (``backward``) ``bwd`` rows.

    ``kern`` is passed in (not compiled here) so that a test can hand in a wrong kernel and
    see the check fail.
    """
    dtype = bf.DTYPES[dtype_name]
    ir = kern.ir
    desc = shape.describe(ir)
    base = "float64 reference"
    fwd = CheckRow("small", name, "fwd", dtype_name, D, desc, base)
    bwd = CheckRow("small", name, "bwd", dtype_name, D, desc, base) if backward else None
    t0 = time.perf_counter()
    try:
        q, k, v, tens, _ = example_inputs(ir, shape.B, shape.H, shape.Hkv, shape.L, shape.L, D, dtype=dtype,
                                          device=device, seed=seed, grid=shape.grid(ir))
        lse_ok = ir.normalize != "sigmoid"  # sigmoid attention has no LSE (return_lse is refused)
        want_grad = backward and not kern.backward_error
        float_names = [n for n, t in tens.items() if t.is_floating_point()]

        def leaves(cast=None):
            """q, k, v and the float spec tensors as fresh leaves (cast to ``cast`` if given)."""
            qkv = [x.detach().clone().to(cast or x.dtype).requires_grad_(want_grad) for x in (q, k, v)]
            ts = {n: (t.detach().clone().to(cast or t.dtype).requires_grad_(want_grad) if n in float_names else t)
                  for n, t in tens.items()}
            return qkv, ts

        qkv, ts = leaves()
        res = kern(*qkv, return_lse=lse_ok, **ts)
        out, lse = res if lse_ok else (res, None)
        rqkv, rts = leaves(torch.float64)
        ref = attncc.reference(path, *rqkv, pattern=name, return_lse=lse_ok, **params, **rts)
        rout, rlse = ref if lse_ok else (ref, None)

        fwd.err = bf.max_abs_err(out, rout)
        ok = finite(out) and bf.close(out, rout, dtype)
        fwd.detail = f"out {fwd.err:.2e}"
        if lse_ok:
            same_inf = torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
            fin = torch.isfinite(rlse)
            err_lse = bf.max_abs_err(lse[fin], rlse[fin]) if bool(fin.any()) else 0.0
            ok &= same_inf and not bool(torch.isnan(lse).any()) and bf.close(lse[fin], rlse[fin], dtype)
            fwd.err = max(fwd.err, err_lse) if not math.isnan(fwd.err) else fwd.err
            fwd.detail += f", lse {err_lse:.2e}" + ("" if same_inf else ", -inf rows differ!")
        fwd.status = PASS if ok else FAIL
    except Exception as ex:  # noqa: BLE001 - one broken check must not hide the others
        fwd.status, fwd.detail = ERROR, short(ex)
        traceback.print_exc(file=sys.stderr)
    def run_backward():
        g = torch.Generator().manual_seed(seed + 1)
        go = torch.randn(out.shape, generator=g).to(dtype)  # dout in the input dtype, exact in float64
        gl = torch.randn(lse.shape, generator=g) if lse_ok else None

        def loss(o, lse_, dt):
            """A fixed linear function of the output and the finite LSE entries."""
            val = (o.to(dt) * go.to(o.device, dt)).sum()
            if lse_ is not None:
                val = val + (torch.where(torch.isfinite(lse_), lse_, 0).to(dt) * gl.to(lse_.device, dt)).sum()
            return val

        loss(out, lse, torch.float32).backward()
        loss(rout, rlse, torch.float64).backward()
        names = ["q", "k", "v"] + float_names
        got = [x.grad for x in qkv] + [ts[n].grad for n in float_names]
        want = [x.grad for x in rqkv] + [rts[n].grad for n in float_names]
        bwd.err, ok, bwd.detail = compare_grads(names, got, want, dtype)
        bwd.status = PASS if ok else FAIL

    return finish_rows(kern, fwd, bwd, t0, run_backward)


# ----------------------------------------------------------------------------- (a) realistic shape
def baseline_kind(ir) -> str:
    """Which independent implementation checks ``ir`` at the realistic shape: ``"sdpa"`` (softmax
    with a score ``s + bias``, any mask, low-rank terms, sink or gate), ``"flex"`` (other
    softmax scores without sink / gate / dot() terms), else ``"reference"`` (float64)."""
    if ir.normalize == "sigmoid":
        return "reference"
    if sympy.simplify(sympy.diff(ir.score, I.s)) == 1:
        return "sdpa"
    if ir.sink is None and ir.gate is None and not ir.lowrank:
        return "flex"
    return "reference"


def sdpa_baseline(ir, q, k, v, tens: dict, sizes: dict, dout, need_grad: bool, causal: bool):
    """``scaled_dot_product_attention`` in float32 computing the pattern: ``is_causal=True`` when
    ``causal``, else a float mask ``where(mask, bias, -inf)`` from the IR (bias: the additive
    score terms and ``U W^T`` of dot() terms; a bool mask when there is none), a sink as an
    extra key column (zero key and value, logit ``sink``), the gate multiplied into the output.
    Rows without any allowed key (SDPA would give NaN) are excluded: their output is set to 0
    (what attncc gives) and their output gradient to 0.

    Returns:
        ``(out, [dq, dk, dv] or None, dout used, label)``, shaped like q / k / v / out.
    """
    F = torch.nn.functional
    dev = q.device
    qf, kf, vf = (bf.flat(x).detach().float().requires_grad_(need_grad) for x in (q, k, v))
    do = bf.flat(dout).float()
    B, H, L, D = qf.shape
    Hkv, Dv = kf.shape[1], vf.shape[-1]
    kw = dict(scale=1.0 / math.sqrt(D), enable_gqa=H != Hkv)
    if causal:
        out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, **kw)
        label = "SDPA fp32 is_causal"
    else:
        parts = ["mask"]
        mask = dense_mask(ir, sizes, tens, dev)
        bias = None
        if ir.score != I.s:
            env = index_env(B, H, L, L, Hkv, D, Dv, dev, grid=I.grid_of(sizes))
            env[I.s] = torch.zeros((), dtype=torch.float64, device=dev)
            bias = eval_expr(ir.score, env, tens, reads=[]).float()  # out-of-range reads (masked pairs) give 0
            parts.append("bias")
        for U, W in lowrank_factors(ir, tens, sizes):
            lr = U.float() @ W.float().transpose(-1, -2)
            bias = lr if bias is None else bias + lr
            parts.append("U W^T")
        sink = sink_values(ir, tens, sizes, dev).float() if ir.sink is not None else None
        dead = ~mask.any(-1) if sink is None else torch.zeros(B, H, L, dtype=torch.bool, device=dev)
        allowed = mask | dead[..., None]
        if bias is None and sink is None:
            attn = allowed
        else:
            zero = torch.zeros((), device=dev)
            attn = torch.broadcast_to(torch.where(allowed, zero if bias is None else bias, -math.inf), (B, H, L, L))
        if sink is not None:
            pad = 8  # the sink column and 7 never-allowed ones (mask rows stay 16-byte aligned)
            extra = torch.full((B, H, L, pad), -math.inf, device=dev)
            extra[..., 0] = sink
            attn = torch.cat([attn, extra], dim=-1)
            kf2 = torch.cat([kf, kf.new_zeros(B, Hkv, pad, D)], dim=2)
            vf2 = torch.cat([vf, vf.new_zeros(B, Hkv, pad, Dv)], dim=2)
            parts.append("sink column")
        else:
            kf2, vf2 = kf, vf
        out = F.scaled_dot_product_attention(qf, kf2, vf2, attn_mask=attn, **kw)
        if ir.gate is not None:
            out = out * gate_values(ir, tens, sizes, dev).float()
            parts.append("gate")
        if bool(dead.any()):
            out = torch.where(dead[..., None], 0.0, out)
            do = torch.where(dead[..., None], 0.0, do)
            parts.append(f"{int(dead.sum())} empty rows excluded")
        label = "SDPA fp32 (" + ", ".join(parts) + ")"
    grads = None
    if need_grad:
        (out * do).sum().backward()
        grads = [x.grad.reshape(y.shape) for x, y in zip((qf, kf, vf), (q, k, v))]
    return out.detach().reshape(*q.shape[:-1], Dv), grads, do.reshape(dout.shape).to(dout.dtype), label


def flex_baseline(ir, q, k, v, tens: dict, sizes: dict, dout, need_grad: bool, s: bf.Settings):
    """FlexAttention (compiled when ``s.flex_compile``) with mods built from the IR
    (:func:`bench_forward.flex_mods`), in the inputs' dtype, on the flattened tokens.

    Returns:
        ``(out, [dq, dk, dv] or None, dout, label)``.

    Raises:
        whatever flex raises (e.g. no CPU backward); the caller falls back to the reference.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    try:
        if s.flex_compile:
            torch._dynamo.reset()
            flex_fn = torch.compile(flex_attention, dynamic=False, fullgraph=True)
            cbm = torch.compile(create_block_mask, dynamic=False)
        else:
            flex_fn, cbm = flex_attention, create_block_mask
        sm, mm = bf.flex_mods(ir, sizes, tens, s)
        L = sizes["Lq"]
        block_mask = None if mm is None else cbm(mm, *bf.mask_batch_heads(ir, s), L, L, device=s.device)
        qf, kf, vf = (bf.flat(x).detach().clone().requires_grad_(need_grad) for x in (q, k, v))
        out = flex_fn(qf, kf, vf, score_mod=sm, block_mask=block_mask, scale=s.scale, enable_gqa=s.gqa)
        grads = None
        if need_grad:
            out.backward(bf.flat(dout))
            grads = [x.grad.reshape(y.shape) for x, y in zip((qf, kf, vf), (q, k, v))]
        label = f"FlexAttention ({'compiled' if s.flex_compile else 'eager'}, {str(q.dtype).replace('torch.', '')})"
        return out.detach().reshape(*q.shape[:-1], out.shape[-1]), grads, dout, label
    finally:
        if s.flex_compile:
            torch._dynamo.reset()


def reference_baseline(path, name: str, params: dict, q, k, v, tens: dict, dout, need_grad: bool):
    """The float64 dense reference (:func:`attncc.reference`) with autograd in float64.

    Returns:
        ``(out, [dq, dk, dv] or None, dout, label)``.
    """
    qd, kd, vd = (x.detach().double().requires_grad_(need_grad) for x in (q, k, v))
    out = attncc.reference(path, qd, kd, vd, pattern=name, **params, **tens)
    grads = None
    if need_grad:
        out.backward(dout.double())
        grads = [x.grad for x in (qd, kd, vd)]
    return out.detach(), grads, dout, "float64 reference"


def check_realistic(name: str, path, plan: CorrectnessPlan, seed: int) -> list:
    """Forward and backward (q, k, v gradients) of the default-compiled (autotuned) kernel at
    the realistic shape against the pattern's independent baseline (:func:`baseline_kind`);
    flex failing falls back to the float64 reference (noted in the row). Returns the rows."""
    shape, dtype_name, D = plan.realistic, plan.realistic_dtype, plan.realistic_D
    dtype = bf.DTYPES[dtype_name]
    t0 = time.perf_counter()
    fwd = CheckRow("realistic", name, "fwd", dtype_name, D, "-", "-")
    bwd = CheckRow("realistic", name, "bwd", dtype_name, D, "-", "-") if plan.backward else None
    note = ""
    try:
        params = small_params(name, path) if shape.small_params else {}
        kern = attncc.compile(path, name, **params)
        ir = kern.ir
        fwd.shape = shape.describe(ir)
        q, k, v, tens, sizes = example_inputs(ir, shape.B, shape.H, shape.Hkv, shape.L, shape.L, D, dtype=dtype,
                                              device=plan.device, seed=seed, grid=shape.grid(ir))
        g = torch.Generator().manual_seed(seed + 2)
        dout = torch.randn(*q.shape[:-1], D, generator=g).to(dtype).to(plan.device)
        need_grad = bwd is not None and not kern.backward_error
        kind = baseline_kind(ir)
        base = None
        if kind == "sdpa":
            base = sdpa_baseline(ir, q, k, v, tens, sizes, dout, need_grad, causal=(name == "causal"))
        elif kind == "flex":
            s = bf.Settings(torch.device(plan.device), dtype, [sizes["Lq"]], shape.B, shape.H, shape.Hkv, D,
                            plan.device == "cpu", plan.flex_compile, torch.float32, 0, 0, seed, need_grad)
            try:
                base = flex_baseline(ir, q, k, v, tens, sizes, dout, need_grad, s)
            except Exception as ex:  # noqa: BLE001 - e.g. flex has no CPU backward: use the reference
                note = f"flex failed ({short(ex, 100)}), float64 reference instead"
        if base is None:
            base = reference_baseline(path, name, params, q, k, v, tens, dout, need_grad)
        ref_out, ref_grads, dout_used, label = base
        fwd.baseline = label
        leaves = [x.detach().clone().requires_grad_(need_grad) for x in (q, k, v)]
        out = kern(*leaves, **tens)
        fwd.err = bf.max_abs_err(out, ref_out)
        fwd.status = PASS if finite(out) and bf.close(out, ref_out, dtype) else FAIL
        fwd.detail = note
    except Exception as ex:  # noqa: BLE001
        fwd.status, fwd.detail = ERROR, short(ex)
        traceback.print_exc(file=sys.stderr)
    if bwd is not None:
        bwd.shape, bwd.baseline = fwd.shape, fwd.baseline

    def run_backward():
        out.backward(dout_used)
        bwd.err, ok, bwd.detail = compare_grads(["q", "k", "v"], [x.grad for x in leaves], ref_grads, dtype)
        bwd.status = PASS if ok else FAIL
        bwd.detail += f"; {note}" if note else ""

    return finish_rows(kern, fwd, bwd, t0, run_backward)


# ----------------------------------------------------------------------------- (a) driver
def planned_rows(name: str, plan: CorrectnessPlan, status: str, detail: str = "") -> list:
    """The rows :func:`check_pattern` would produce for ``name``, all with ``status`` (for
    checks skipped for the budget or lost with a worker)."""
    ir = attncc.lower(attncc.pattern_path(name), name)
    checks = ("fwd", "bwd") if plan.backward else ("fwd",)
    rows = [CheckRow("small", name, c, dt, D, plan.small.describe(ir), "float64 reference", status=status,
                     detail=detail) for dt in plan.dtypes for D in plan.head_dims for c in checks]
    if plan.runs_realistic(name):
        rows += [CheckRow("realistic", name, c, plan.realistic_dtype, plan.realistic_D,
                          plan.realistic.describe(ir), "-", status=status, detail=detail) for c in checks]
    return rows


def check_pattern(name: str, plan: CorrectnessPlan) -> list:
    """All section (a) checks of one library pattern (one worker task): the small shapes for
    every dtype and head dim, then the realistic shape; checks that would start after
    ``plan.deadline`` are marked skipped. Returns the :class:`CheckRow` list."""
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    path = attncc.pattern_path(name)
    seed = plan.seed + zlib.crc32(name.encode()) % 100000
    params = small_params(name, path)
    todo = planned_rows(name, plan, SKIPPED)
    if time.time() > plan.deadline:
        return [emit(r) for r in todo]
    rows = []
    try:
        kern = attncc.compile(path, name, block_m=SMALL_TILE, block_n=SMALL_TILE, num_warps=4, num_stages=2,
                              **params)
    except Exception as ex:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return [emit(r) for r in planned_rows(name, plan, ERROR, f"compile failed: {short(ex)}")]
    for dt in plan.dtypes:
        for D in plan.head_dims:
            if time.time() > plan.deadline:
                rows += [emit(r) for r in todo[len(rows):len(rows) + (2 if plan.backward else 1)]]
                continue
            rows += check_small(kern, path, name, params, dt, D, plan.small, plan.device, plan.backward, seed + D)
    if plan.runs_realistic(name):
        if time.time() > plan.deadline:
            rows += [emit(r) for r in todo[len(rows):]]
        else:
            rows += check_realistic(name, path, plan, seed)
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def warm_bench_case(name: str, L: int, s: bf.Settings, deadline: float) -> str:
    """Pre-compile one benchmark case of (b) / (c) (a worker task after the correctness checks,
    best effort): :func:`bench_forward.bench_case` with minimal timing, which compiles and
    autotunes attncc's kernels and compiles flex at the benchmark's shape, so that the Triton,
    inductor FX-graph and AOT-autograd caches on disk hold them when the benchmark runs in
    the main process. Returns ``"ok"``, ``"skipped"`` or the error; its output is dropped."""
    if time.time() > deadline:
        return "skipped"
    try:
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            path = attncc.pattern_path(name)
            bf.bench_case(attncc.compile(path, name), path, L, dataclasses.replace(s, warmup=1, rep=1), None, s.seed)
        return "ok"
    except Exception as ex:  # noqa: BLE001 - best effort: the benchmark itself reports errors
        return short(ex)
    finally:
        if s.device.type == "cuda":
            torch.cuda.empty_cache()


def run_correctness(names: list, plan: CorrectnessPlan, jobs: int, warm: list = ()) -> tuple:
    """Section (a): :func:`check_pattern` for every name, in ``jobs`` spawned worker processes
    (``jobs <= 1``: in this process), then the ``warm`` tasks (``(name, L, settings)``, see
    :func:`warm_bench_case`; skipped with ``jobs <= 1``). Workers get a private attncc cache
    directory (their autotuning, timed while they share the GPU, is not remembered for the
    benchmarks), one inductor compile thread and one OpenMP thread each (their CPU work,
    compilation aside, is small). Workers still running ``GRACE_S`` after the deadline are
    terminated and their patterns marked skipped; a crashed worker's patterns are errors.

    Returns:
        ``(rows in library order, warm task results)``.
    """
    if jobs <= 1:
        return [r for n in names for r in check_pattern(n, plan)], []
    cache_dir = tempfile.mkdtemp(prefix="attncc-gpu-check-")
    env = {"ATTNCC_CACHE_DIR": cache_dir, "TORCHINDUCTOR_COMPILE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    results: dict = {}
    pending = set()
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        # the slowest patterns first (flex compile / float64 reference at the realistic shape; 3-D grids)
        slow = {"softcap", "query_temperature", "sigmoid_attention", "neighborhood_3d", "video_causal_neighborhood_3d"}
        futures = {pool.submit(check_pattern, n, plan): n for n in sorted(names, key=lambda n: n not in slow)}
        warming = [pool.submit(warm_bench_case, n, L, s, plan.deadline) for n, L, s in warm]
        done, pending = concurrent.futures.wait(list(futures) + warming,
                                                timeout=max(1.0, plan.deadline + GRACE_S - time.time()))
        for f in futures:
            name = futures[f]
            if f not in done:
                results[name] = [emit(r) for r in planned_rows(name, plan, SKIPPED, "worker stopped")]
                continue
            try:
                results[name] = f.result()
            except Exception as ex:  # noqa: BLE001 - a crashed worker (BrokenProcessPool, ...)
                results[name] = [emit(r) for r in planned_rows(name, plan, ERROR, f"worker failed: {short(ex)}")]
        warmed = [(f.result() if f in done and f.exception() is None else "not finished") for f in warming]
    finally:
        if pending:
            for p in list(getattr(pool, "_processes", {}).values()):
                p.terminate()
        pool.shutdown(wait=not pending, cancel_futures=True)
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val
        shutil.rmtree(cache_dir, ignore_errors=True)
    return [r for n in names for r in results[n]], warmed


# ----------------------------------------------------------------------------- (b), (c)
def run_benchmark(sec: BenchSection, names: tuple, deadline: float, tag: str) -> None:
    """bench_forward.py's per-case machinery (:func:`bench_forward.bench_case`, SDPA causal per
    length) for ``names`` at ``sec.settings.lengths``; a case is skipped when it would not end
    before ``deadline`` (estimated by the longest case so far). Fills ``sec``."""
    s = sec.settings
    lib = attncc.library_patterns()
    kernels: dict = {}
    longest = 0.0 if s.dry_run else FIRST_CASE_S[s.backward]
    sec.ran = True
    for L in s.lengths:
        if time.time() + longest > deadline:
            sec.skipped += [(n, L) for n in names]
            print(f"[{tag}] L={L}: skipped (budget)", flush=True)
            continue
        sdpa_ms = bf.bench_sdpa(L, s)
        print(f"[{tag}] L={L}: SDPA causal {sdpa_ms:.3f} ms", flush=True)
        for i, name in enumerate(names):
            if time.time() + longest > deadline:
                sec.skipped.append((name, L))
                print(f"[{tag}] {name:28s} L={L}: skipped (budget)", flush=True)
                continue
            t0 = time.perf_counter()
            if name not in kernels:
                kernels[name] = attncc.compile(lib[name], name)
            row = bf.bench_case(kernels[name], lib[name], L, s, sdpa_ms, s.seed + 1000 * i + L)
            sec.rows.append(row)
            dt = time.perf_counter() - t0
            longest = max(longest, dt)
            print(f"[{tag}] {name:28s} L={L}: attncc {bf.fmt(row.attncc_ms, '.3f')} ms, flex "
                  f"{row.flex_error or bf.fmt(row.flex_ms, '.3f')} ms, max|attncc-flex| {bf.fmt(row.err_flex, '.2e')}, "
                  f"max|attncc-ref| {bf.fmt(row.err_ref, '.2e')}{'  MISMATCH' if row.mismatch else ''}"
                  f"{'  ERROR ' + row.attncc_error if row.attncc_error else ''} ({dt:.1f} s)", flush=True)


# ----------------------------------------------------------------------------- report
CHECK_COLUMNS = ("pattern", "check", "dtype", "D", "shape (B x H/Hkv x tokens)", "baseline", "max abs err", "status",
                 "s", "detail")


@dataclass
class DecodeSection:
    """Section (d)'s outcome: bench_decode.py's table rows, the patterns whose check failed
    (``(pattern, error)``) and those skipped for the budget."""

    rows: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


def run_decode(dry_run: bool, deadline: float) -> DecodeSection:
    """bench_decode.py's :func:`bench_decode.run` per pattern of :data:`DECODE_PATTERNS` at
    :data:`DECODE_SHAPE` (its tiny CPU shapes on a dry run); a pattern that would start after
    ``deadline`` (minus :data:`DECODE_CASE_S` on a GPU) is skipped; one whose outputs disagree
    with SDPA's (or that raises) is a failure."""
    sec = DecodeSection()
    for pat in DECODE_PATTERNS:
        if time.time() + (0.0 if dry_run else DECODE_CASE_S) > deadline:
            sec.skipped.append(pat)
            print(f"   [d] {pat}: {SKIPPED}", flush=True)
            continue
        args = argparse.Namespace(dry_run=dry_run, patterns=[pat], **DECODE_SHAPE)
        try:
            table = bd.run(args)
        except Exception as ex:  # noqa: BLE001 - reported as a failed check, the others still run
            sec.failures.append((pat, short(ex)))
            print(f"   [d] {pat}: FAIL {short(ex)}", flush=True)
            continue
        lines = table.splitlines()
        if not sec.rows:
            sec.rows += lines[:2]
        sec.rows += [ln for ln in lines[2:] if ln.startswith("|")]
        sec.rows += [ln for ln in lines if ln.startswith("Device bandwidth") and ln not in sec.rows]
    return sec


def decode_block(sec: DecodeSection | None, dry_run: bool = False) -> list:
    """Report lines of section (d)."""
    lines = ["## (d) Decode benchmark (bench_decode.py)", ""]
    if sec is None:
        return lines + ["not run (--sections)", ""]
    shape = DECODE_SHAPE
    lines += ["Dry run: bench_decode.py's tiny CPU shapes (B 1, cache 64, Hq / Hkv 4 / 2, D 16, window 8, fp32), "
              "one repetition; no timing is meaningful." if dry_run else
              f"B {shape['batch']}, cache {shape['cache']}, pages {shape['page']} (0: contiguous), "
              f"Hq / Hkv {shape['heads'][0]} / {shape['heads'][1]}, D {shape['dim']}, window {shape['window']}; "
              "columns: see benchmarks/README.md (`bench_decode.py`).", ""]
    table = [r for r in sec.rows if r.startswith("|")]
    lines += table if len(table) > 2 else ["no case ran"]
    lines += [""] + [r for r in sec.rows if not r.startswith("|")]
    lines += [f"- FAILED {p}: {e}" for p, e in sec.failures]
    lines += [f"- skipped (budget): {p}" for p in sec.skipped]
    return lines + [""]


def check_table(rows: list) -> str:
    """Section (a) rows as a Markdown table."""
    lines = ["| " + " | ".join(CHECK_COLUMNS) + " |", "|" + "|".join("---" for _ in CHECK_COLUMNS) + "|"]
    for r in rows:
        cells = [r.pattern, r.check, r.dtype, str(r.D), r.shape, r.baseline, bf.fmt(r.err, ".2e"), r.status,
                 f"{r.seconds:.1f}", r.detail.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_failures(sec: BenchSection) -> list:
    """The rows of a benchmark section whose attncc run failed or whose check mismatched."""
    return [r for r in sec.rows if r.attncc_error or r.mismatch]


def bench_settings_text(s: bf.Settings) -> str:
    """One line describing a benchmark section's shapes and timing."""
    dtype = {v: k for k, v in bf.DTYPES.items()}[s.dtype]
    timing = ("one time.perf_counter run (dry run)" if s.dry_run else
              f"triton.testing.do_bench(warmup={s.warmup}, rep={s.rep}, return_mode=\"median\"), ms")
    flex = "torch.compile(flex_attention)" if s.flex_compile else "flex eager"
    return (f"B={s.B}, Hq={s.H}, Hkv={s.Hkv}, D=Dv={s.D}, {dtype}, L = {', '.join(map(str, s.lengths))} "
            f"(neighborhood_2d: a square grid of L tokens); {flex}; timing: {timing}")


def bench_block(title: str, sec: BenchSection | None, why_not: str) -> list:
    """The Markdown lines of a benchmark section."""
    lines = [f"## {title}", ""]
    if sec is None or not sec.ran:
        return lines + [why_not, ""]
    lines += [bench_settings_text(sec.settings), ""]
    if sec.rows:
        lines += [bf.markdown_table(sec.rows), ""]
    if sec.skipped:
        lines += ["skipped (budget): " + ", ".join(f"{n} L={L}" for n, L in sec.skipped), ""]
    return lines


def command_line(argv: list | None) -> str:
    """The command line, shell-quoted (``argv`` when main was called with one)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return "python " + shlex.join([os.path.relpath(__file__) if Path(__file__).exists() else __file__] + args)


def report(meta: dict, checks: list | None, plan: CorrectnessPlan | None, fwd: BenchSection | None,
           fwdbwd: BenchSection | None, dec: DecodeSection | None = None) -> str:
    """The body of the results file: summary, failures first, then the four sections."""
    failed = [r for r in checks or [] if r.status in (FAIL, ERROR)]
    bad_bench = [("b", r) for r in bench_failures(fwd)] if fwd else []
    bad_bench += [("c", r) for r in bench_failures(fwdbwd)] if fwdbwd else []
    bad_decode = dec.failures if dec else []
    skipped = [r for r in checks or [] if r.status == SKIPPED]
    n_skip = len(skipped) + sum(len(s.skipped) for s in (fwd, fwdbwd, dec) if s)
    verdict = "FAIL" if failed or bad_bench or bad_decode else "PASS"
    lines = [f"- date (UTC): {meta['started']}",
             f"- device: {meta['device']}",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda or '-'}), triton {triton.__version__}, "
             f"attncc {attncc.__version__}, Python {platform.python_version()}",
             f"- command: `{meta['command']}`",
             f"- mode: {meta['mode']}; budget {meta['budget']:.0f} s, elapsed {meta['elapsed']:.0f} s; "
             f"(a) in {meta['jobs']} worker process(es)",
             f"- section times: {meta['section_times']}; benchmark cases pre-compiled by the workers of (a): "
             f"{meta['warmed']}",
             "",
             f"**Result: {verdict}**: {sum(r.status == PASS for r in checks or [])} correctness checks passed, "
             f"{len(failed)} failed, {len(bad_bench) + len(bad_decode)} benchmark check(s) failed, "
             f"{n_skip} skipped (budget).",
             "", "## Failures", ""]
    if failed or bad_bench or bad_decode:
        if failed:
            lines += [check_table(failed), ""]
        for tag, r in bad_bench:
            what = (f"attncc error {r.attncc_error}" if r.attncc_error else
                    f"mismatch (max err vs flex {bf.fmt(r.err_flex, '.2e')}, vs ref {bf.fmt(r.err_ref, '.2e')})")
            lines.append(f"- ({tag}) {r.pattern} L={r.L}: {what}")
        lines += [f"- (d) decode {p}: {e}" for p, e in bad_decode]
        lines.append("")
    else:
        lines += ["none", ""]
    lines += ["## (a) Correctness", ""]
    if checks is None:
        lines += ["not run (--sections)", ""]
    else:
        small = [r for r in checks if r.part == "small"]
        real = [r for r in checks if r.part == "realistic"]
        tol = ", ".join(f"{k}: atol {a:g}, rtol {r:g}" for k, (a, r) in
                        ((n, bf.TOLERANCES[bf.DTYPES[n]]) for n in ("bf16", "fp16")))
        lines += ["Tolerances (bench_forward.py's): outputs and LSE `allclose` with " + tol +
                  "; gradients `max |a - b| <= (atol + rtol) * (1 + max |b|)`. A `!` in the detail marks the "
                  "failing quantity.", ""]
        lines += ["### Small shapes vs the float64 reference", "",
                  f"Every library pattern, {', '.join(plan.dtypes)}, D in {', '.join(map(str, plan.head_dims))}; "
                  f"fixed {SMALL_TILE} x {SMALL_TILE} tiles (4 warps, 2 stages); small params (windows, kernels); "
                  "fwd: output and LSE (sigmoid: output), bwd: gradients of q, k, v and the float spec tensors "
                  "through `sum(out * dout) + sum(lse * dlse)`, vs autograd of `attncc.reference` in float64.", "",
                  check_table(small), ""]
        if plan.realistic is not None:
            which = ("every library pattern" if plan.realistic_patterns is None else
                     "patterns " + ", ".join(plan.realistic_patterns))
            params = "small params" if plan.realistic.small_params else "library default params"
            lines += ["### Realistic shape vs SDPA / FlexAttention", "",
                      f"{which}; {plan.realistic_dtype}, D={plan.realistic_D}, {params}, default compile "
                      "(autotuned forward on CUDA); fwd: output, bwd: q, k, v gradients of `sum(out * dout)`.", "",
                      check_table(real), ""]
    lines += bench_block("(b) Forward benchmark (bench_forward.py)", fwd, "not run (--sections)")
    lines += bench_block("(c) Forward + backward benchmark (bench_forward.py --backward)", fwdbwd,
                         "not run (--sections)")
    lines += ["Benchmark columns: see benchmarks/README.md (`bench_forward.py`). A flex cell holding an exception "
              "name means flex failed or cannot express the pattern (gated_causal's gate).", ""]
    lines += decode_block(dec, meta["mode"].startswith("DRY"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="time budget in seconds from the script's start (default 450); checks and cases that "
                        "would start after their section's share of it are skipped and marked 'skipped (budget)'")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes for the correctness checks (default: GPU min(12, CPUs - 2, free GiB / 6); "
                        "--dry-run 2; 1: in this process)")
    p.add_argument("--sections", default="a,b,c,d", help="comma-separated sections to run (a, b, c, d)")
    p.add_argument("--output", default=None,
                   help="results file (default: benchmarks/results/gpu_check_<device>_<date>.md; --dry-run: a "
                        "temporary file)")
    p.add_argument("--seed", type=int, default=0, help="base seed for the random inputs")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test under the Triton interpreter at tiny sizes (results to a temporary file)")
    return p.parse_args(argv)


def default_jobs(dry_run: bool) -> int:
    """Worker processes for section (a): 2 for a dry run; on a GPU one per spare CPU (up to 12),
    at most one per 6 GiB of free GPU memory."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if dry_run:
        return min(2, cpus)
    free_gib = torch.cuda.mem_get_info()[0] / 2 ** 30
    return max(1, min(12, cpus - 2, int(free_gib // 6)))


def make_plans(args: argparse.Namespace, t0: float) -> tuple:
    """The correctness plan and the two benchmark settings for a GPU run or a dry run.

    Raises:
        SystemExit: a GPU run without CUDA, or with the Triton interpreter switched on.
    """
    budget = args.budget_s
    if args.dry_run:
        device = "cpu"
        small = Shape(1, 2, 1, 80, {1: (80,), 2: (8, 10), 3: (4, 4, 5)}, True)
        realistic = Shape(1, 2, 2, 64, {1: (64,), 2: (8, 8), 3: (4, 4, 4)}, True)
        dtypes, dims, rdtype, rD = ("bf16",), (64,), "bf16", 32
        # one pattern per baseline branch (SDPA is_causal / mask / empty rows / bias / U W^T / sink /
        # gate, grid masks and biases, flex (its CPU backward fails: the reference fallback), reference)
        real_names = ("causal", "document_causal", "alibi", "lowrank_bias", "sink_window", "gated_causal",
                      "softcap", "sigmoid_attention", "swin_window", "neighborhood_2d_rpb")
        base = bf.Settings(torch.device("cpu"), torch.float32, [64], 1, 2, 2, 64, True, False, torch.float32, 0, 0,
                           args.seed)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device found: run on a GPU machine, or use --dry-run for a CPU smoke test")
        from attncc.runtime import cache

        if cache.interpreting():
            raise SystemExit("TRITON_INTERPRET=1 is set: unset it for a GPU run (or use --dry-run)")
        device = "cuda"
        small = Shape(2, 4, 2, 300, {1: (300,), 2: (17, 19), 3: (6, 7, 8)}, True)
        realistic = Shape(1, 16, 16, 4096, {1: (4096,), 2: (64, 64), 3: (16, 16, 16)}, False)
        dtypes, dims, rdtype, rD = ("bf16", "fp16"), (64, 128), "bf16", 128
        real_names = None
        base = bf.Settings(torch.device("cuda"), torch.bfloat16, list(BENCH_LENGTHS), 1, 16, 16, 128, False, True,
                           torch.float32, 25, 100, args.seed)
    plan = CorrectnessPlan(device, small, dtypes, dims, True, realistic, rdtype, rD, not args.dry_run,
                           t0 + SECTION_END["a"] * budget, args.seed, real_names)
    fwd = bf.Settings(**{**base.__dict__, "backward": False})
    fwdbwd = bf.Settings(**{**base.__dict__, "backward": True})
    return plan, fwd, fwdbwd


def main(argv=None) -> int:
    """Run the check; returns the exit status (1 if any correctness check failed). The budget
    counts from the script's start (:data:`STARTED`, imports included) when run as a script,
    from this call when ``argv`` is given."""
    args = parse_args(argv)
    t0 = STARTED if argv is None else time.time()
    started = datetime.datetime.fromtimestamp(t0, datetime.timezone.utc)
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    if not sections <= set(SECTION_END):
        raise SystemExit(f"--sections: unknown section(s) {', '.join(sorted(sections - set(SECTION_END)))}")
    plan, s_fwd, s_fwdbwd = make_plans(args, t0)
    jobs = args.jobs if args.jobs is not None else default_jobs(args.dry_run)
    if args.dry_run:
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    device = (torch.cuda.get_device_name() if plan.device == "cuda" else
              f"CPU ({platform.machine()}), Triton interpreter")
    print(f"attncc GPU check{' (DRY RUN)' if args.dry_run else ''}: {device}; torch {torch.__version__} "
          f"(CUDA {torch.version.cuda or '-'}), triton {triton.__version__}, attncc {attncc.__version__}; "
          f"budget {args.budget_s:.0f} s", flush=True)
    names = list(attncc.library_patterns())
    times = {}

    def elapsed() -> float:
        """Seconds since the budget's start."""
        return time.time() - t0

    checks, warmed = None, []
    if "a" in sections:
        print(f"== (a) correctness: {len(names)} patterns, {jobs} worker(s) (elapsed {elapsed():.0f} s)", flush=True)
        ta = time.time()
        warm = [(n, L, s) for key, pats, s in (("b", BENCH_PATTERNS, s_fwd), ("c", BACKWARD_PATTERNS, s_fwdbwd))
                if key in sections for L in s.lengths for n in pats]
        if args.dry_run:  # exercise the pre-compiling path on two cases only (flex is eager here anyway)
            warm = [w for w in warm if (w[0], w[2].backward) in (("causal", False), ("sliding_window", True))]
        checks, warmed = run_correctness(names, plan, jobs, warm)
        if warmed:
            print(f"   benchmark cases pre-compiled: {sum(w == 'ok' for w in warmed)}/{len(warmed)}", flush=True)
        times["a"] = time.time() - ta
    fwd = fwdbwd = None
    for key, tag, pats, s in (("b", "b", BENCH_PATTERNS, s_fwd), ("c", "c", BACKWARD_PATTERNS, s_fwdbwd)):
        if key not in sections:
            continue
        print(f"== ({key}) {'forward' if key == 'b' else 'forward + backward'} benchmark: {', '.join(pats)} "
              f"(elapsed {elapsed():.0f} s)", flush=True)
        tb = time.time()
        sec = BenchSection(s)
        run_benchmark(sec, pats, t0 + SECTION_END[key] * args.budget_s, tag)
        times[key] = time.time() - tb
        if key == "b":
            fwd = sec
        else:
            fwdbwd = sec
    dec = None
    if "d" in sections:
        print(f"== (d) decode benchmark: {', '.join(DECODE_PATTERNS)} (elapsed {elapsed():.0f} s)", flush=True)
        td = time.time()
        dec = run_decode(args.dry_run, t0 + SECTION_END["d"] * args.budget_s)
        times["d"] = time.time() - td
    print(f"== done (elapsed {elapsed():.0f} s)", flush=True)

    meta = {"started": started.strftime("%Y-%m-%d %H:%M:%S"), "device": device, "command": command_line(argv),
            "mode": "DRY RUN (CPU, Triton interpreter, tiny sizes)" if args.dry_run else "GPU",
            "budget": args.budget_s, "elapsed": elapsed(), "jobs": jobs,
            "section_times": ", ".join(f"({k}) {v:.0f} s" for k, v in times.items()) or "-",
            "warmed": f"{sum(w == 'ok' for w in warmed)}/{len(warmed)}"}
    body = report(meta, checks, plan, fwd, fwdbwd, dec)
    date = started.date().isoformat()
    if args.output:
        out = Path(args.output)
    elif args.dry_run:
        fd, name = tempfile.mkstemp(prefix="gpu_check_dry_run_", suffix=".md")
        os.close(fd)
        out = Path(name)
    else:
        out = results_path("gpu_check", date)
    write_results("gpu_check", "attncc GPU check", body,
                  f"attncc {attncc.__version__}, CUDA {torch.version.cuda or '-'}", path=out, date=date,
                  command=meta["command"])
    failed = [r for r in checks or [] if r.status in (FAIL, ERROR)]
    failed_bench = (bench_failures(fwd) if fwd else []) + (bench_failures(fwdbwd) if fwdbwd else [])
    for r in failed:
        print(f"FAILED: (a) {r.part} {r.pattern} {r.check} {r.dtype} D={r.D}: {r.status} {r.detail}", file=sys.stderr)
    for r in failed_bench:
        print(f"FAILED: benchmark {r.pattern} L={r.L}", file=sys.stderr)
    for pat, err in dec.failures if dec else []:
        print(f"FAILED: decode benchmark {pat}: {err}", file=sys.stderr)
    bad = failed or failed_bench or (dec and dec.failures)
    print(f"{'FAIL' if bad else 'PASS'} ({elapsed():.0f} s)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
