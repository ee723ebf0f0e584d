#!/usr/bin/env python
"""Decode (one new token per sequence against a KV cache): attncc's split-KV decode kernel
(:mod:`attncc.runtime.decode`, chosen automatically for ``Lq <= 16``) against compiled
FlexAttention (``flex_attention`` under ``torch.compile``: its ``flex_decoding`` path for short
queries) and SDPA, issue 16.

Grid: batch ``B`` in {1, 8, 64}, cache length 4k / 32k / 128k, ``Hq / Hkv = 32 / 8``, ``D = 128``,
bf16, one query per sequence at the cache's last position (bottom-right), patterns causal (the
whole cache), sliding window (``--window`` keys) and ALiBi (the whole cache, a per-head linear
bias). Reported per row: the median time of each contestant, the KV bytes it must read
(``B * Hkv * keys visited * (D + Dv) * 2``) divided by the time (GB/s), and that as a
fraction of the device's bandwidth (measured: a device-to-device copy, read + write), the
physical limit of decode. Outputs are checked against each other first (attncc vs SDPA).

``--page 16,64``: paged caches ``(num_pages, page, Hkv, D)`` read through a page table
(issue 16, section 2): attncc's paged decode (:mod:`attncc.runtime.paged`, a shuffled page
table, ``kv_lens`` = the cache length); flex / sdpa columns stay empty on paged rows.

    python benchmarks/bench_decode.py                     # on a GPU: the full grid, results file
    python benchmarks/bench_decode.py --batch 8 --cache 32768 --patterns window
    python benchmarks/bench_decode.py --dry-run           # CPU: tiny shapes through every contestant

``--dry-run`` runs on the CPU under the Triton interpreter with tiny shapes (the batches <= 2 of
``--batch``, else 1; cache 64,
4 / 2 heads, D 16), one repetition, and checks the plumbing (shapes, the decode kernel chosen,
results equal); no timings are meaningful there.
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:] and "triton" not in sys.modules:  # the interpreter (see bench_forward.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ATTNCC_CPU", "interpret")  # the kernels, not the CPU executor

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attncc  # noqa: E402
from results_file import write_results  # noqa: E402

F = torch.nn.functional
P = "(q + Lk - Lq)"  # the query's position in the cache (bottom-right)
SPECS = {
    "causal": f"pattern decode_causal:\n    mask: kv <= {P}\n",
    "window": f"pattern decode_window:\n    param window: int = 4096\n    mask: kv <= {P} and {P} - kv < window\n",
    "alibi": (f"pattern decode_alibi:\n    tensor slope: float32[H]\n    mask: kv <= {P}\n"
              f"    score: s + slope[h] * (kv - {P})\n"),
}


def time_ms(fn, dry: bool) -> float:
    """Median milliseconds (GPU: ``triton.testing.do_bench``; dry run: one wall-clock run)."""
    if dry:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth_gbs(device, dry: bool) -> float:
    """The device's bandwidth, measured: bytes read + written by a 1 GiB device-to-device copy
    per second (GB/s); 0 on the CPU dry run."""
    if dry:
        return 0.0
    x = torch.empty(1 << 29, dtype=torch.int16, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), False)
    return 2 * x.numel() * x.element_size() / ms / 1e6


def slopes(H: int, device) -> torch.Tensor:
    """ALiBi's slopes ``2^(-8 (h + 1) / H)`` (Press et al.)."""
    return torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float32, device=device)


def contestants(pat: str, q, k, v, window: int, compiled_flex):
    """``{name: fn}`` computing the decode step for pattern ``pat`` (attncc, flex, SDPA)."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    kern = attncc.compile(SPECS[pat], **({"window": window} if pat == "window" else {}))
    tens = {"slope": slopes(Hq, q.device)} if pat == "alibi" else {}
    off = Lk - Lq
    pos = torch.arange(Lq, device=q.device)[:, None] + off
    kv = torch.arange(Lk, device=q.device)[None, :]
    out = {"attncc": lambda: kern(q, k, v, **tens)}
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if pat == "window":
        def mask_mod(b, h, qi, ki):
            return (ki <= qi + off) & (qi + off - ki < window)
    else:
        def mask_mod(b, h, qi, ki):
            return ki <= qi + off
    score_mod = None
    if pat == "alibi":
        sl = tens["slope"]

        def score_mod(sc, b, h, qi, ki):
            return sc + sl[h] * (ki - qi - off)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = create_block_mask(mask_mod, None, None, Lq, Lk, device=str(q.device))
    flex = compiled_flex or flex_attention
    out["flex"] = lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True)
    if pat == "window":
        m = (kv <= pos) & (pos - kv < window)
        out["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    elif pat == "alibi":
        bias = (tens["slope"].view(Hq, 1, 1) * (kv - pos)).to(q.dtype)
        out["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    else:  # one query at the last position sees every key: no mask
        out["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return out


def run(args) -> str:
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    Hq, Hkv = (4, 2) if dry else args.heads
    D = 16 if dry else args.dim
    bw = copy_bandwidth_gbs(device, dry)
    compiled_flex = None
    if not dry:
        from torch.nn.attention.flex_attention import flex_attention

        compiled_flex = torch.compile(flex_attention, dynamic=False)
    rows = ["| pattern | B | cache | page | keys read | attncc ms | GB/s | of peak | flex ms | GB/s | sdpa ms | GB/s | "
            "splits |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for pat in args.patterns:
        for B in ([b for b in args.batch if b <= 2] or [1] if dry else args.batch):
            for Lk in ([64] if dry else args.cache):
                for page in ([0, 16] if dry else args.page):
                    need = 2 * B * Hkv * Lk * D * (2 if dtype != torch.float32 else 4) / 2 ** 30
                    if need > args.max_gib:
                        rows.append(f"| {pat} | {B} | {Lk} | {page or '-'} | skipped: {need:.0f} GiB of cache > "
                                    f"--max-gib {args.max_gib} | | | | | | | | |")
                        continue
                    g = torch.Generator(device=device).manual_seed(0)
                    q = torch.randn(B, Hq, 1, D, generator=g, device=device).to(dtype)
                    k = torch.randn(B, Hkv, Lk, D, generator=g, device=device).to(dtype)
                    v = torch.randn(B, Hkv, Lk, D, generator=g, device=device).to(dtype)
                    window = 8 if dry else args.window
                    keys = min(window, Lk) if pat == "window" else Lk
                    kv_bytes = B * Hkv * keys * 2 * D * k.element_size()
                    fns = contestants(pat, q, k, v, window, compiled_flex)
                    kern = attncc.compile(SPECS[pat], **({"window": window} if pat == "window" else {}))
                    from attncc.runtime import capture

                    fns["attncc"]()  # on a GPU: the first call autotunes the split count
                    with capture() as rec:  # the decode kernel is what runs (and its split count)
                        fns["attncc"]()
                    assert rec and rec[0][1].kernel == "attn_decode", [ln.kernel for _, ln in rec]
                    splits = rec[0][1].grid[0]
                    ref = fns["sdpa"]().float()
                    for name in ("attncc", "flex"):
                        err = (fns[name]().float() - ref).abs().max().item()
                        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), (pat, B, Lk, name, err)
                    cells = []
                    if page:  # the same keys in a shuffled paged cache (num_pages, page, Hkv, D)
                        n = -(-Lk // page)
                        perm = torch.randperm(B * n, generator=torch.Generator().manual_seed(0)).to(device)
                        bt = perm.view(B, n).to(torch.int32)
                        kc = k.new_zeros(B * n, page, Hkv, D)
                        vc = v.new_zeros(B * n, page, Hkv, D)
                        pad = n * page - Lk
                        kp = F.pad(k, (0, 0, 0, pad)).transpose(1, 2).reshape(B * n, page, Hkv, D)
                        vp = F.pad(v, (0, 0, 0, pad)).transpose(1, 2).reshape(B * n, page, Hkv, D)
                        kc[perm], vc[perm] = kp, vp
                        lens = torch.full((B,), Lk, dtype=torch.int32, device=device)
                        tens = {"slope": slopes(Hq, device)} if pat == "alibi" else {}
                        paged = lambda: kern(q, kc, vc, block_table=bt, kv_lens=lens, **tens)  # noqa: E731
                        err = (paged().float() - fns["attncc"]().float()).abs().max().item()
                        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), (pat, B, Lk, page, err)
                        ms = time_ms(paged, dry)
                        gbs = kv_bytes / ms / 1e6
                        cells += [f"{ms:.3f}", f"{gbs:.0f}", f"{gbs / bw:.0%}" if bw else "-"]
                    else:
                        ms = time_ms(fns["attncc"], dry)
                        gbs = kv_bytes / ms / 1e6
                        cells += [f"{ms:.3f}", f"{gbs:.0f}", f"{gbs / bw:.0%}" if bw else "-"]
                    for name in ("flex", "sdpa"):
                        if page:
                            cells += ["", ""]
                            continue
                        ms = time_ms(fns[name], dry)
                        cells += [f"{ms:.3f}", f"{kv_bytes / ms / 1e6:.0f}"]
                    rows.append(f"| {pat} | {B} | {Lk} | {page or '-'} | {keys} | " + " | ".join(cells)
                                + f" | {splits} |")
                    print(rows[-1], flush=True)
                    del q, k, v, fns
    table = "\n".join(rows)
    if bw:
        table += f"\n\nDevice bandwidth (device-to-device copy, read + write): {bw:.0f} GB/s."
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--batch", type=ints, default=[1, 8, 64])
    ap.add_argument("--cache", type=ints, default=[4096, 32768, 131072], help="cache lengths (keys)")
    ap.add_argument("--heads", type=ints, default=[32, 8], help="Hq,Hkv")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--page", type=ints, default=[0, 16, 64], help="0 = contiguous cache; else page sizes")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--patterns", type=lambda s: s.split(","), default=["causal", "window", "alibi"])
    ap.add_argument("--max-gib", type=float, default=48.0, help="skip shapes whose K + V exceed this")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, one repetition (plumbing only)")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/decode_<device>_<date>.md)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_decode.py measures GPU kernels: run it on a CUDA machine, or --dry-run here", file=sys.stderr)
        return 2
    for p in args.patterns:
        if p not in SPECS:
            ap.error(f"unknown pattern {p!r} (known: {', '.join(SPECS)})")
    table = run(args)
    print(table)
    if not args.dry_run:
        write_results("decode", "Decode: attncc split-KV vs compiled FlexAttention vs SDPA", table,
                      f"Hq/Hkv {args.heads[0]}/{args.heads[1]}, D {args.dim}, bf16, window {args.window}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
