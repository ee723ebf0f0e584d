#!/usr/bin/env python
"""Epilogue benchmark: what FlexAttention cannot fuse, against the unfused torch way.

Rows (forward, causal unless noted; B=1, H=16, D=128, bf16 on CUDA):

* ``gate``: attncc ``gated_causal`` (sigmoid gate fused in the epilogue) vs SDPA then
  ``* sigmoid(g)`` (a second pass over the output);
* ``sink``: attncc ``sink_window`` vs softmax over an explicit sink column (dense, in torch);
* ``sigmoid``: attncc ``sigmoid_attention`` vs attncc's own softmax kernel (same mask) and
  the explicit torch ``sigmoid(QK^T) V``;
* ``lowrank``: attncc ``lowrank_bias`` (rank 16, folded into QK^T) vs SDPA with the
  materialised ``U @ W^T`` bias tensor (``Lq x Lk`` in memory).

Each row checks attncc against the torch composition first (max abs error), then times
both with ``triton.testing.do_bench`` (median ms). Results go to
``benchmarks/results/epilogue_<device>_<date>.md``. ``--dry-run``: tiny CPU run (Triton
interpreter), no file.

Usage::

    python benchmarks/bench_epilogue.py --lengths 4096,16384
    python benchmarks/bench_epilogue.py --dry-run
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:] and "triton" not in sys.modules:  # see bench_forward.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import attncc  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from results_file import write_results  # noqa: E402  (benchmarks/, the script's folder)

F = torch.nn.functional


def time_ms(fn, dry: bool) -> float:
    """Median milliseconds (GPU: ``do_bench``; dry run: one wall-clock run)."""
    if dry:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _causal(L, device):
    i = torch.arange(L, device=device)
    return i[None, :] <= i[:, None]


def cases(L: int, H: int, D: int, device, dtype):
    """(name, attncc kernel call, torch composition call, attncc pattern) per row."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = rnd(1, H, L, D), rnd(1, H, L, D), rnd(1, H, L, D)
    scale = 1.0 / math.sqrt(D)
    out = []
    gate = rnd(1, L, H, D).float()
    kg = attncc.compile(attncc.pattern_path("gated_causal"))
    out.append(("gate", lambda: kg(q, k, v, g=gate),
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True) * torch.sigmoid(gate.permute(0, 2, 1, 3)).to(dtype)))
    sink = torch.randn(H, generator=g).to(device)
    window = max(16, L // 8)
    ks = attncc.compile(attncc.pattern_path("sink_window"), window=window)

    def sink_torch():
        i = torch.arange(L, device=device)
        m = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        sc = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~m, -math.inf)
        sc = torch.cat([sc, sink.view(1, H, 1, 1).expand(1, H, L, 1)], -1)
        return (torch.softmax(sc, -1)[..., :-1] @ v.float()).to(dtype)

    out.append(("sink", lambda: ks(q, k, v, sink=sink), sink_torch))
    ksig = attncc.compile(attncc.pattern_path("sigmoid_attention"))
    out.append(("sigmoid", lambda: ksig(q, k, v),
                lambda: (torch.sigmoid(q.float() @ k.float().transpose(-1, -2) * scale - math.log(L)) @ v.float()).to(dtype)))
    kdense = attncc.compile("pattern dense:\n    score: s - log(Lk)\n")
    out.append(("softmax (same kernel family, for the sigmoid row)", lambda: kdense(q, k, v),
                lambda: F.scaled_dot_product_attention(q, k, v)))
    R = 16
    U, W = rnd(1, H, L, R).float() * 0.3, rnd(1, H, L, R).float() * 0.3
    klr = attncc.compile(attncc.pattern_path("lowrank_bias"))  # R: free dim, read from U and W
    out.append(("lowrank (rank 16)", lambda: klr(q, k, v, U=U, W=W),
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=(U @ W.transpose(-1, -2)).to(dtype))))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096,16384")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    lengths = [64] if dry else [int(x) for x in args.lengths.split(",")]
    H, D = (2, 32) if dry else (16, 128)
    lines = ["| row | L | attncc ms | torch composition ms | speedup | max abs err |", "|---|---|---|---|---|---|"]
    ok = True
    for L in lengths:
        for name, ours, theirs in cases(L, H, D, device, dtype):
            a, b = ours(), theirs()
            err = (a.float() - b.float()).abs().max().item()
            ok &= err < (1e-4 if dtype == torch.float32 else 5e-2)
            ta, tb = time_ms(ours, dry), time_ms(theirs, dry)
            lines.append(f"| {name} | {L} | {ta:.3f} | {tb:.3f} | {tb / ta:.2f}x | {err:.2e} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if not dry:
        write_results("epilogue", "Epilogue benchmark", text, "bf16")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
