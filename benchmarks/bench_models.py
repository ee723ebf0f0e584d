#!/usr/bin/env python
"""Forward pass of a Mistral-architecture model: eager vs SDPA vs attncc (both ways).

Random weights (no download): hidden 1024, 8 layers, 16 query / 4 KV heads of 64,
sliding window 4096, bf16, B=1, seq 8192 by default. Times, with
``triton.testing.do_bench(warmup=5, rep=20, return_mode="median")`` on CUDA:

* ``eager``: ``attn_implementation="eager"`` (materialised scores);
* ``sdpa``: ``attn_implementation="sdpa"`` (the mask is built and passed to SDPA);
* ``sdpa + inductor``: ``torch.compile(model)`` (default backend);
* ``attncc backend``: ``torch.compile(model, backend="attncc")`` (graph pass + inductor);
* ``attncc hf``: ``attn_implementation="attncc"`` (no torch.compile).

Checks logits against the sdpa model first (max abs difference). Writes a Markdown
table to ``benchmarks/results/models_<device-slug>_<YYYY-MM-DD>.md``.
``--dry-run``: tiny sizes on the CPU (Triton interpreter), one timed run each, no file.

Usage::

    python benchmarks/bench_models.py                   # GPU
    python benchmarks/bench_models.py --seq 16384 --layers 4
    python benchmarks/bench_models.py --dry-run         # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import re
import time
from pathlib import Path

import torch


def build(args, impl):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                        sliding_window=args.window, max_position_embeddings=max(args.seq, 128))
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).to(args.device, args.dtype).eval()
    model.set_attn_implementation(impl)
    return model


def bench(fn, dry):
    fn()
    if dry:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.dry_run:
        args.seq, args.hidden, args.layers, args.heads, args.kv_heads, args.window, args.vocab = 64, 64, 2, 4, 2, 16, 128
        args.device, args.dtype = "cpu", torch.float32
    else:
        args.device, args.dtype = "cuda", torch.bfloat16
    import attncc.fx
    import attncc.hf

    attncc.hf.register()
    ids = torch.randint(0, args.vocab, (1, args.seq), device=args.device)
    rows, ref = [], None
    with torch.no_grad():
        for name, impl, compile_backend in (("sdpa", "sdpa", None), ("eager", "eager", None),
                                            ("sdpa + inductor", "sdpa", "inductor"),
                                            ("attncc backend", "sdpa", "attncc"), ("attncc hf", "attncc", None)):
            model = build(args, impl)
            fn = torch.compile(model, backend=compile_backend) if compile_backend else model
            try:
                out = fn(ids).logits.float()
            except torch.OutOfMemoryError:
                rows.append((name, "OOM", ""))
                continue
            ref = out if ref is None else ref
            diff = (out - ref).abs().max().item()
            ms = bench(lambda: fn(ids), args.dry_run)
            rows.append((name, f"{ms:.2f}", f"{diff:.2e}"))
            del model, fn
    dev = "cpu (interpreter)" if args.dry_run else torch.cuda.get_device_name()
    lines = [f"Mistral-architecture forward, hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} "
             f"heads, window {args.window}, seq {args.seq}, {str(args.dtype).replace('torch.', '')}, {dev}, "
             f"{datetime.date.today()}", "", "| variant | ms | max abs logit diff vs sdpa |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    print("\n".join(lines))
    if not args.dry_run:
        slug = re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")
        out = Path(__file__).parent / "results" / f"models_{slug}_{datetime.date.today()}.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
