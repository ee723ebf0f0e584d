#!/usr/bin/env python
"""Grid (multi-dimensional) attention benchmark: attncc vs NATTEN vs FlexAttention vs SDPA.

Cases (``--cases``; defaults sized like the issue's targets):

* ``flux2d`` — a FLUX-like image: 64 x 64 latent tokens (4096), 24 heads, head dim 128,
  2-D neighborhood attention with kernel 16 x 16;
* ``flux2d_gna`` — the same with stride 8 (generalized neighborhood attention, GNA);
* ``flux2d_dilated`` — kernel 8 x 8, dilation 4 (DiNAT-style);
* ``video3d`` — a video-like grid 16 x 32 x 32 (16384 tokens), 16 heads, head dim 128,
  3-D neighborhood attention with kernel 8 x 16 x 16;
* ``video3d_causal`` — the same, causal along time (first axis) only.

For each case: attncc (``neighborhood(...)`` compiled to a box plan: closed-form key boxes,
tokens permuted so boxes are contiguous), NATTEN (``natten.na2d/na3d``, when installed),
FlexAttention (``torch.compile(flex_attention)`` with a NATTEN-style ``mask_mod`` built from
the same IR, block mask from ``create_block_mask``), and dense SDPA (no mask: the cost of
full attention). Outputs are checked against each other first (and against the float64
reference when it fits); times are medians of ``triton.testing.do_bench``. A Markdown table
is printed and written to ``benchmarks/results/grid_<device>_<date>.md``.

``--dry-run`` runs tiny grids on the CPU (attncc under the Triton interpreter, NATTEN's CPU
backend when installed, eager flex) and writes nothing: a smoke test of this script.

Usage::

    python benchmarks/bench_grid.py                 # GPU, all cases, bf16
    python benchmarks/bench_grid.py --cases video3d --dtype fp16
    python benchmarks/bench_grid.py --dry-run
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:] and "triton" not in sys.modules:  # see bench_forward.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import attncc  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from attncc.ir import grid_sizes  # noqa: E402
from results_file import write_results  # noqa: E402  (benchmarks/, the script's folder)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}

SPEC = """
pattern na:
    grid: AXES
    mask: neighborhood(q, kv, kernel=KERNEL, dilation=DILATION, stride=STRIDE, causal=CAUSAL)
"""


@dataclass
class Case:
    """One grid attention problem (NATTEN's argument names)."""

    name: str
    grid: tuple
    kernel: tuple
    dilation: tuple
    stride: tuple
    causal: tuple
    heads: int
    head_dim: int

    def spec(self) -> str:
        """The ``.attn`` spec of this case."""
        tup = lambda xs: "(" + ", ".join(str(x) for x in xs) + ("," if len(xs) == 1 else "") + ")"  # noqa: E731
        axes = ["t", "y", "x"][3 - len(self.grid):]
        return (SPEC.replace("AXES", ", ".join(axes)).replace("KERNEL", tup(self.kernel))
                .replace("DILATION", tup(self.dilation)).replace("STRIDE", tup(self.stride))
                .replace("CAUSAL", tup(self.causal)))


CASES = {
    "flux2d": Case("flux2d", (64, 64), (16, 16), (1, 1), (1, 1), (False, False), 24, 128),
    "flux2d_gna": Case("flux2d_gna", (64, 64), (16, 16), (1, 1), (8, 8), (False, False), 24, 128),
    "flux2d_dilated": Case("flux2d_dilated", (64, 64), (8, 8), (4, 4), (1, 1), (False, False), 24, 128),
    "video3d": Case("video3d", (16, 32, 32), (8, 16, 16), (1, 1, 1), (1, 1, 1), (False, False, False), 16, 128),
    "video3d_causal": Case("video3d_causal", (16, 32, 32), (8, 16, 16), (1, 1, 1), (1, 1, 1),
                           (True, False, False), 16, 128),
}
DRY_CASES = {
    "flux2d": Case("flux2d", (8, 12), (3, 5), (1, 1), (1, 1), (False, False), 2, 32),
    "flux2d_gna": Case("flux2d_gna", (8, 12), (4, 4), (1, 1), (2, 2), (False, False), 2, 32),
    "flux2d_dilated": Case("flux2d_dilated", (8, 12), (3, 3), (2, 2), (1, 1), (False, False), 2, 32),
    "video3d": Case("video3d", (4, 6, 6), (2, 3, 3), (1, 1, 1), (1, 1, 1), (False, False, False), 2, 32),
    "video3d_causal": Case("video3d_causal", (4, 6, 6), (2, 3, 3), (1, 1, 1), (1, 1, 1), (True, False, False), 2, 32),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="tiny CPU run, no results file")
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    return p.parse_args(argv)


def time_ms(fn, dry: bool, warmup: int, rep: int) -> float:
    """Median milliseconds (GPU: ``do_bench``; dry run: one wall-clock run)."""
    if dry:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def natten_fn(case: Case):
    """``natten.na{n}d`` with this case's arguments, on (B, H, *grid, D) tensors; None without natten."""
    try:
        import natten
    except ImportError:
        return None
    n = len(case.grid)
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[n]
    to_nat = [0, *range(2, 2 + n), 1, 2 + n]
    back = [0, n + 1, *range(1, n + 1), n + 2]

    def run(q, k, v):
        return fn(*(x.permute(to_nat) for x in (q, k, v)), kernel_size=case.kernel, stride=case.stride,
                  dilation=case.dilation, is_causal=case.causal).permute(back)

    return run


def natten_mask_mod(case: Case):
    """A FlexAttention ``mask_mod`` over row-major flattened grid tokens implementing NATTEN's
    neighborhood rule directly in torch (written independently of attncc's IR): per axis,
    same dilation group, window of ``kernel`` group positions around the stride group's
    leader shifted inward at the borders (causal: ending at the query)."""
    n = len(case.grid)

    def coord(idx, i):
        inner = math.prod(case.grid[i + 1:])
        return (idx // inner) % case.grid[i]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        for i in range(n):
            L, k, d, st, causal = (case.grid[i], case.kernel[i], case.dilation[i], case.stride[i], case.causal[i])
            xq, xk = coord(q_idx, i), coord(kv_idx, i)
            g, iq, jk = xq % d, xq // d, xk // d
            lg = (L - g + d - 1) // d
            if causal:
                last = torch.minimum((iq // st) * st + st - 1, lg - 1)
                cond = (jk <= iq) & (last - jk < k)
            else:
                left, right = k // 2, k // 2 - (1 - k % 2)
                lead = torch.minimum((iq // st) * st + st // 2, lg - 1)
                centre = torch.minimum(torch.maximum(lead, torch.full_like(lead, left)), lg - 1 - right)
                cond = (jk >= centre - left) & (jk <= centre + right)
            cond = cond & (xk % d == g)
            ok = cond if ok is None else ok & cond
        return ok

    return mask_mod


def bench_case(case: Case, args, device, dtype) -> dict:
    """Check, then time, every implementation on one case; returns a table row."""
    row = {"case": case.name, "grid": "x".join(map(str, case.grid)), "kernel": "x".join(map(str, case.kernel))}
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, case.heads, *case.grid, case.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    kern = attncc.compile(case.spec())
    out = kern(q, k, v)
    L = math.prod(case.grid)
    sizes = {"B": args.batch, "H": case.heads, "Hkv": case.heads, "Lq": L, "Lk": L, "D": case.head_dim,
             "Dv": case.head_dim, **grid_sizes(case.grid)}
    lay = kern.layout_for(sizes)
    st = kern.tile_stats(L, L, D=case.head_dim, grid=case.grid, device=device)
    row["plan"] = f"{kern.plan.path}, tiles {'x'.join(map(str, lay.tm))} / {'x'.join(map(str, lay.tn))}"
    row["density"] = st["visited"] / st["total"]
    row["attncc_ms"] = time_ms(lambda: kern(q, k, v), args.dry_run, args.warmup, args.rep)
    if L * L * case.heads * args.batch <= (1 << 24):
        ref = attncc.reference(case.spec(), q.double(), k.double(), v.double())
        row["err_ref"] = (out.double() - ref).abs().max().item()
    nat = natten_fn(case)
    if nat is not None:
        try:
            on = nat(q, k, v)
            row["err_natten"] = (out.float() - on.float()).abs().max().item()
            row["natten_ms"] = time_ms(lambda: nat(q, k, v), args.dry_run, args.warmup, args.rep)
        except Exception as e:  # noqa: BLE001 - a NATTEN limitation is a table cell, not a crash
            row["natten_ms"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    else:
        row["natten_ms"] = "not installed"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bm = create_block_mask(natten_mask_mod(case), None, None, L, L, device=str(device))
            flex = flex_attention if args.dry_run else torch.compile(flex_attention)
            flat = [x.flatten(2, 1 + len(case.grid)) for x in (q, k, v)]
            of = flex(*flat, block_mask=bm).unflatten(2, case.grid)
            row["err_flex"] = (out.float() - of.float()).abs().max().item()
            row["flex_ms"] = time_ms(lambda: flex(*flat, block_mask=bm), args.dry_run, args.warmup, args.rep)
    except Exception as e:  # noqa: BLE001
        row["flex_ms"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    flat = [x.flatten(2, 1 + len(case.grid)) for x in (q, k, v)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row["sdpa_ms"] = time_ms(lambda: sdpa(*flat), args.dry_run, args.warmup, args.rep)
    worst = max(row.get(e, 0.0) for e in ("err_ref", "err_natten", "err_flex"))
    row["ok"] = worst <= TOL[dtype] * (10 if dtype != torch.float32 else 1)
    return row


COLUMNS = [("case", "case"), ("grid", "grid"), ("kernel", "kernel"), ("plan", "attncc plan"),
           ("density", "tiles visited"), ("attncc_ms", "attncc ms"), ("natten_ms", "NATTEN ms"),
           ("flex_ms", "flex ms"), ("sdpa_ms", "SDPA (dense) ms"), ("err_natten", "max err vs NATTEN"),
           ("err_flex", "max err vs flex"), ("ok", "check")]


def cell(key, val) -> str:
    if val is None:
        return "-"
    if key == "density":
        return f"{100 * val:.1f}%"
    if key == "ok":
        return "ok" if val else "MISMATCH"
    if isinstance(val, float):
        return f"{val:.3g}" if key.startswith("err") else f"{val:.3f}"
    return str(val)


def table(rows) -> str:
    head = "| " + " | ".join(t for _, t in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(cell(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.dry_run else DTYPES[args.dtype]
    cases = DRY_CASES if args.dry_run else CASES
    rows = []
    for name in args.cases.split(","):
        if name not in cases:
            print(f"error: unknown case {name!r} (known: {', '.join(cases)})", file=sys.stderr)
            return 2
        try:
            rows.append(bench_case(cases[name], args, device, dtype))
        except Exception:  # noqa: BLE001 - report and go on with the other cases
            traceback.print_exc()
            rows.append({"case": name, "ok": False})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    if not args.dry_run:
        write_results("grid", "Grid attention benchmark", text, f"{args.dtype}, batch {args.batch}")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
