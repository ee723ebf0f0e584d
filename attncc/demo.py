"""Run the pattern library on a realistic workload and check it.

For every library pattern: compile it, run it, compare it with the dense float64
reference (:func:`attncc.reference`) and with PyTorch FlexAttention (its
``score_mod`` / ``mask_mod`` built automatically from the IR), count the tiles the
kernel visits and time it. One table row per pattern, then PASS/FAIL.

* CPU (Triton interpreter): B=1, Hq=4, Hkv=2, L=384, D=64, float32.
* CUDA: B=1, Hq=16, Hkv=8, L=8192, D=128, bfloat16; the float64 reference is too
  big at L=8192, so the error against it is measured at L=2048 (same other sizes);
  the error against FlexAttention, the tiles and the timings are at L=8192.

Run ``python -m attncc.demo`` or ``attncc demo [--patterns a,b] [--device cpu|cuda]``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

import attncc

from .flex import block_mask_for, flex_mods
from .inputs import example_inputs


@dataclass(frozen=True)
class Setup:
    """Sizes and dtype of a demo run (``ref_L``: length of the reference check)."""

    device: str
    B: int
    Hq: int
    Hkv: int
    L: int
    D: int
    dtype: torch.dtype
    ref_L: int
    tol: float


CPU_SETUP = Setup("cpu", B=1, Hq=4, Hkv=2, L=384, D=64, dtype=torch.float32, ref_L=384, tol=1e-4)
CUDA_SETUP = Setup("cuda", B=1, Hq=16, Hkv=8, L=8192, D=128, dtype=torch.bfloat16, ref_L=2048, tol=2e-2)


def grid_for(rank: int, L: int) -> list[int]:
    """The grid a grid pattern of ``rank`` axes runs on for a demo length of ``L`` tokens:
    about ``L`` tokens, 2-D sides a multiple of 8 (so the library's windows, Swin's ``P = 8``
    and MaxViT's ``G = 4``, divide them), 3-D sides ``round(L ** (1/3))``; 1-D: ``[L]``."""
    if rank == 1:
        return [L]
    if rank == 2:
        return [max(8, round(L ** 0.5 / 8) * 8)] * 2
    return [max(2, round(L ** (1.0 / 3.0)))] * 3


# ----------------------------------------------------------------------------- FlexAttention
def flex_runner(kern, q, k, v, tensors: dict, sizes: dict, compiled: bool):
    """A zero-argument callable running FlexAttention on the pattern (block mask built once).

    Raises:
        whatever FlexAttention raises for patterns it cannot express.
    """
    from torch.nn.attention.flex_attention import flex_attention

    score_mod, mask_mod = flex_mods(kern.ir, sizes, tensors, device=q.device)
    block_mask = block_mask_for(kern.ir, mask_mod, sizes, q.device)
    fn = torch.compile(flex_attention) if compiled else flex_attention
    gqa = sizes["H"] != sizes["Hkv"]

    def run():
        """One FlexAttention call (warnings silenced)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)

    return run


# ----------------------------------------------------------------------------- helpers
def _short(e: BaseException, n: int = 90) -> str:
    """``Type: first line of the message``, cut to ``n`` characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def _bench_cuda(fn) -> float:
    """Median milliseconds of ``fn`` on CUDA."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _time_cpu(fn, runs: int = 1) -> float:
    """Median milliseconds of ``runs`` calls of ``fn`` (already warmed up)."""
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


class _Table:
    """Plain aligned text table printed row by row (fixed column widths)."""

    def __init__(self, columns: list[tuple[str, int, str]]):
        """``columns``: (title, width, alignment ``<`` or ``>``)."""
        self.columns = columns

    def line(self, cells) -> str:
        """One row, cells padded to the column widths."""
        return "  ".join(f"{str(c):{a}{w}}" for c, (_, w, a) in zip(cells, self.columns)).rstrip()

    def header(self) -> str:
        """The column titles and a rule."""
        head = self.line([t for t, _, _ in self.columns])
        return head + "\n" + "-" * len(head)


def _resolve(patterns, device, length) -> tuple[dict, Setup]:
    """The patterns to run (name -> path) and the :class:`Setup` for the device."""
    from attncc.runtime import cache

    lib = attncc.library_patterns()
    if patterns:
        unknown = [p for p in patterns if p not in lib]
        if unknown:
            raise KeyError(f"no library pattern {unknown[0]!r} (have: {', '.join(lib)})")
        lib = {p: lib[p] for p in patterns}
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not cache.interpreting() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine")
        if cache.interpreting():
            raise ValueError("--device cuda: TRITON_INTERPRET=1 is set, kernels run on the CPU only")
        setup = CUDA_SETUP
    elif device == "cpu":
        if not cache.interpreting():
            raise ValueError("--device cpu on a machine with a GPU: set TRITON_INTERPRET=1 in the environment "
                             "(attncc kernels run on CPU tensors only under the Triton interpreter)")
        setup = CPU_SETUP
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if length is not None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        setup = Setup(setup.device, setup.B, setup.Hq, setup.Hkv, length, setup.D, setup.dtype,
                      min(length, setup.ref_L) if setup.device == "cuda" else length, setup.tol)
    return lib, setup


# ----------------------------------------------------------------------------- the demo
def run(patterns=None, device=None, length: int | None = None) -> int:
    """Compile and run every library pattern, check it and print a table.

    Args:
        patterns: library pattern names (default: all of them).
        device: ``"cpu"`` or ``"cuda"`` (default: CUDA when available).
        length: sequence length override (default 384 on CPU, 8192 on CUDA).

    Returns:
        0 when every pattern's output is within the tolerance of the reference
        (``|out - ref| <= tol * (1 + |ref|)`` elementwise; tol float32: 1e-4,
        bfloat16: 2e-2), else 1.

    Raises:
        KeyError: an unknown pattern name. ValueError: an unusable device.
    """
    lib, st = _resolve(patterns, device, length)
    cuda = st.device == "cuda"
    dt = str(st.dtype).replace("torch.", "")
    print(f"attncc {attncc.__version__} demo on {st.device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else " (Triton interpreter)")
          + f": B={st.B}, Hq={st.Hq}, Hkv={st.Hkv}, L={st.L}, D={st.D}, {dt}")
    if cuda:
        print(f"error vs reference measured at L={st.ref_L} (the float64 reference is too big at L={st.L}); "
              f"error vs FlexAttention (torch.compile), tiles and times at L={st.L}")
    else:
        print("FlexAttention: eager; kernel time: one warm-up run, then one timed run")
    print(f"check: |out - ref| <= {st.tol:g} * (1 + |ref|) elementwise; columns give the max abs error")

    sdpa_ms = None
    if cuda:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(st.B, st.Hq, st.L, st.D, generator=g).to(st.dtype).to("cuda")
        k, v = (torch.randn(st.B, st.Hkv, st.L, st.D, generator=g).to(st.dtype).to("cuda") for _ in range(2))
        F = torch.nn.functional
        sdpa_ms = _bench_cuda(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        sdpa_full = _bench_cuda(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        print(f"SDPA baseline (dense): causal {sdpa_ms:.3f} ms, non-causal {sdpa_full:.3f} ms")
        del q, k, v
        dcfg = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
        setattr(dcfg, limit, max(64, getattr(dcfg, limit)))

    wname = max(len("pattern"), *(len(n) for n in lib))
    cols = [("pattern", wname, "<"), ("path", 6, "<"), ("tiles vis/total", 15, ">"), ("density", 7, ">"),
            ("err vs ref", 10, ">"), ("err vs flex", 11, ">"), ("time ms", 9, ">")]
    if cuda:
        cols += [("tile", 7, ">"), ("TFLOP/s*", 8, ">"), ("vs flex", 7, ">"), ("vs SDPA-causal", 14, ">")]
    table = _Table(cols)
    print()
    print(table.header())
    notes: list[str] = []
    worst = {}
    failed = []
    t_start = time.perf_counter()
    bar = tqdm(lib.items(), total=len(lib), desc="demo", unit="pattern", leave=False, file=sys.stderr,
               disable=not sys.stderr.isatty())
    for name, path in bar:
        bar.set_postfix_str(name)
        try:
            row, err, ok = _run_one(name, path, st, sdpa_ms, notes)
        except Exception as e:  # noqa: BLE001 - one broken pattern must not hide the others
            notes.append(f"{name}: {_short(e, 200)}")
            row, err, ok = [name, "?", f"error [{len(notes)}]"], math.inf, False
        finally:
            if cuda:
                torch._dynamo.reset()  # a fresh FlexAttention compile per pattern (no recompile limit)
                torch.cuda.empty_cache()
        worst[name] = err
        if not ok:
            failed.append(name)
        bar.write(table.line(row), file=sys.stdout)
        sys.stdout.flush()
    bar.close()
    print()
    if cuda:
        print("tile: the autotuned BLOCK_M x BLOCK_N the tiles are counted for; "
              "* TFLOP/s of the visited tiles: 4*B*Hq*D*L*L*(visited/total) / time; "
              "'vs' columns: their time / attncc time (>1 = attncc faster)")
    for i, n in enumerate(notes, 1):
        print(f"[{i}] {n}")
    print(f"({len(lib)} patterns in {time.perf_counter() - t_start:.1f} s)")
    if failed:
        print(f"FAIL: {', '.join(failed)}: |out - ref| > {st.tol:g} * (1 + |ref|) somewhere (or an error)")
        return 1
    print(f"PASS: {len(lib)} patterns, |out - ref| <= {st.tol:g} * (1 + |ref|) everywhere "
          f"(max abs err {max(worst.values(), default=0):.2e})")
    return 0


def _compare(out: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[float, bool]:
    """``(max |out - ref|, every |out - ref| <= tol * (1 + |ref|))``.

    The tolerance grows with ``|ref|`` because a bfloat16 output is rounded to 8
    significant bits: one unit in the last place is 0.03 for ``|x|`` in [4, 8), so no
    absolute bound of 2e-2 can hold for the larger outputs.
    """
    diff = (out.double() - ref.double()).abs()
    return float(diff.max()), bool((diff <= tol * (1 + ref.double().abs())).all())


def _run_one(name: str, path, st: Setup, sdpa_ms, notes: list) -> tuple[list, float, bool]:
    """One table row: compile, run, compare, count tiles, time; also ``(max err, within tolerance)``."""
    cuda = st.device == "cuda"
    kern = attncc.compile(path, name)
    rank = len(kern.ir.grid)
    grid = grid_for(rank, st.L) if rank else None
    q, k, v, tensors, sizes = example_inputs(kern.ir, B=st.B, H=st.Hq, Hkv=st.Hkv, Lq=st.L, Lk=st.L, D=st.D,
                                             dtype=st.dtype, device=st.device, grid=grid)
    L = sizes["Lq"]
    mask_tensors = {n: tensors[n] for n in kern.plan.mask_tensors}

    out = kern(q, k, v, **tensors)  # warm-up (and autotuning on CUDA)
    if cuda:
        ms = _bench_cuda(lambda: kern(q, k, v, **tensors))
    else:
        ms = _time_cpu(lambda: kern(q, k, v, **tensors))

    # error vs the dense reference
    if st.ref_L >= L:
        ref = attncc.reference(path, q, k, v, pattern=name, **tensors)
        err, ok = _compare(out, ref, st.tol)
        del ref
    else:
        q2, k2, v2, t2, _ = example_inputs(kern.ir, B=st.B, H=st.Hq, Hkv=st.Hkv, Lq=st.ref_L, Lk=st.ref_L,
                                           D=st.D, dtype=st.dtype, device=st.device, seed=1,
                                           grid=grid_for(rank, st.ref_L) if rank else None)
        out2 = kern(q2, k2, v2, **t2)
        ref = attncc.reference(path, q2, k2, v2, pattern=name, **t2)
        err, ok = _compare(out2, ref, st.tol)
        del q2, k2, v2, t2, out2, ref

    # tiles
    # the launch config (autotuned on CUDA, remembered) and the tiles that kernel visits
    cfg = kern.config_for(q, k, v, **tensors)
    stats = kern.tile_stats(L, L, B=st.B, H=st.Hq, Hkv=st.Hkv, D=st.D, config=cfg, device=q.device, grid=grid,
                            **mask_tensors)
    frac = stats["visited"] / stats["total"]

    # FlexAttention
    flex_err, flex_ms = "n/a", None
    try:
        flat = [x.flatten(2, -2) for x in (q, k, v)]  # grid patterns: FlexAttention sees the flat token index
        runner = flex_runner(kern, *flat, tensors, sizes, compiled=cuda)
        fout = runner()
        flex_err = f"{float((out.float().flatten(2, -2) - fout.float()).abs().max()):.2e}"
        if cuda:
            flex_ms = _bench_cuda(runner)
        del fout, runner
    except NotImplementedError as e:  # beyond score_mod / mask_mod (attncc.flex says what): not a failure
        notes.append(f"{name}: {_short(e, 200)}")
        flex_err = f"cannot [{len(notes)}]"
    except Exception as e:  # noqa: BLE001 - a FlexAttention error must not hide the other columns
        notes.append(f"{name}: FlexAttention failed: {_short(e)}")
        flex_err = f"error [{len(notes)}]"

    row = [name, kern.plan.path, f"{stats['visited']}/{stats['total']}", f"{100 * frac:.1f}%",
           f"{err:.2e}", flex_err, f"{ms:.3f}" if cuda else f"{ms:.0f}"]
    if cuda:
        tflops = 4 * st.B * st.Hq * st.D * L * L * frac / (ms * 1e-3) / 1e12
        row += [f"{stats['block_m']}x{stats['block_n']}", f"{tflops:.1f}", f"{flex_ms / ms:.2f}x" if flex_ms else "n/a", f"{sdpa_ms / ms:.2f}x"]
    return row, err, ok

