#!/usr/bin/env python
"""Run-time block sparsity: the cost of turning a schedule into what the kernels read,
attncc against FlexAttention on the same machine (CPU-measurable part of issue 15).

Two measurements, each the median of ``--runs`` runs, reported as ratios against the
FlexAttention anchor of the same run:

* **routed schedules** (MoBA / NSA-style: the key-block lists change every step): from
  per-query-block lists of ``topk`` key blocks of ``block`` tokens (random, causal) at
  ``L`` tokens, FlexAttention's ``BlockMask.from_kv_blocks`` (it builds the transposed
  lists its backward reads) against attncc's per-call work for ``kern(q, k, v,
  block_mask=...)`` with the causal pattern: the block tensor
  (:meth:`attncc.BlockSparse.block_tensor`) and the kernels' forward and transposed tile
  lists at 128 x 64 tiles (:func:`attncc.runtime.tiles.block_classes` and the scan /
  scatter of ``_lists``), the memory of what each produces in MiB;
* **document masks** (packed sequences of random lengths): ``create_block_mask`` of the
  document-causal ``mask_mod`` against attncc's block table of the ``document_causal``
  pattern on its first call for a document layout (a chunked evaluation of the mask per
  tile: both are O(L^2); attncc caches the table per document-id contents).

* **routed attention** (``--attn-lengths``; default on CUDA 16k / 64k / 128k, on CPU one
  small length as a smoke run): the forward of MoBA-style routed causal attention (bf16 on
  CUDA, D = 128, ``Hq`` heads sharing lists per KV head), attncc's producer
  (:func:`attncc.topk_blocks`) + consumer (``kern(q, k, v, block_mask=...)``) against compiled
  FlexAttention with ``BlockMask.from_kv_blocks`` on the same lists (the lists' producer not
  timed for flex: it has none) and dense causal SDPA; outputs checked equal first.

    python benchmarks/bench_sparse.py [--lengths 16384,65536,131072] [--topk 8,16] [--runs 3]
    python benchmarks/bench_sparse.py --attn-lengths 16384,65536,131072     # on a GPU

On a CUDA machine the same code runs on the GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attncc  # noqa: E402
from attncc.runtime import tiles  # noqa: E402
from results_file import write_results  # noqa: E402


def _median_s(fn, runs: int, device) -> float:
    out = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _mib(*xs) -> float:
    return sum(x.numel() * x.element_size() for x in xs) / 2**20


def routed_lists(L: int, block: int, topk: int, H: int, device, seed: int = 0):
    """Causal top-k lists: per (head, query block) the own block plus ``topk - 1`` random
    earlier blocks (int32 ``(1, H, n)`` counts, ``(1, H, n, n)`` indices, ascending, then 0)."""
    g = torch.Generator().manual_seed(seed)
    n = L // block
    i = torch.arange(n)[:, None]
    r = torch.rand(H, n, n, generator=g)
    r = torch.where(torch.arange(n)[None, :] < i, r, -1.0)  # earlier blocks only
    pick = r.topk(min(topk - 1, n), dim=-1).indices
    pick = torch.where(r.gather(-1, pick) >= 0, pick, i.expand(H, n, 1))
    idx = torch.cat([pick, i.expand(H, n, 1)], -1).sort(-1).values
    # FlexAttention reads the key-block count from the last dim: one slot per key block
    idx = torch.nn.functional.pad(idx, (0, n - idx.shape[-1]))
    num = torch.tensor([min(topk, int(x) + 1) for x in range(n)]).expand(H, n)
    return num[None].to(torch.int32).contiguous().to(device), idx[None].to(torch.int32).contiguous().to(device)


def attncc_schedule(kern, bs, L: int, H: int, block_m: int = 128, block_n: int = 64):
    """What a ``block_mask`` call builds before its launches: the block tensor and the kernels'
    forward and transposed tile lists (the table of the block-read plan)."""
    meta = torch.empty(1, H, L, 1, device="meta")
    twin, blocks = kern.with_blocks(bs, meta, meta)
    sizes = {"B": 1, "H": H, "Hkv": H, "Lq": L, "Lk": L, "D": 128, "Dv": 128, "G0": 1, "G1": 1, "G2": 1}
    tbl = tiles.block_table(twin.plan, sizes, {"blocks": blocks}, block_m, block_n, blocks.device, twin.key)
    return blocks, tbl


def doc_ids(L: int, n_docs: int, device, seed: int = 0) -> torch.Tensor:
    """int32 ``(L,)`` ascending document ids of ``n_docs`` random-length documents."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(L - 1, generator=g)[:n_docs - 1].sort().values + 1
    ids = torch.zeros(L, dtype=torch.int32)
    ids[cuts] = 1
    return ids.cumsum(0).to(torch.int32).to(device)


def routed_attention_rows(lengths, topks, block: int, runs: int, device, Hq: int = 16, Hkv: int = 4,
                          D: int = 128) -> list:
    """Table rows: routed causal attention, attncc (producer + consumer) vs compiled
    FlexAttention on the same lists vs dense causal SDPA (forward, seconds, median)."""
    import warnings

    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flex = torch.compile(flex_attention, dynamic=False)
    out = ["| routed attention (fwd) | L | topk | attncc (producer + consumer) s | flex s | SDPA causal s "
           "| attncc / flex | attncc / SDPA | max err vs flex |", "|---|---|---|---|---|---|---|---|---|"]
    for L in lengths:
        g = torch.Generator(device="cpu").manual_seed(L)
        q, k, v = (torch.randn(1, h, L, D, generator=g).to(device, dtype) for h in (Hq, Hkv, Hkv))
        for topk in topks:
            kern = attncc.compile(attncc.pattern_path("moba"), block=block, topk=topk)
            bs = attncc.topk_blocks(q, k, block_size=block, topk=topk)  # (1, Hkv, nQ, topk)
            n = -(-L // block)
            idx = torch.nn.functional.pad(bs.kv_indices, (0, n - bs.kv_indices.shape[-1]))
            num = bs.kv_num_blocks.repeat_interleave(Hq // Hkv, 1)
            bm = BlockMask.from_kv_blocks(num, idx.repeat_interleave(Hq // Hkv, 1).contiguous(), BLOCK_SIZE=block,
                                          mask_mod=lambda b, h, qi, ki: ki <= qi)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = flex(q, k, v, block_mask=bm, enable_gqa=True)
                got = kern(q, k, v)
                err = float((got.float() - ref.float()).abs().max())
                t_ours = _median_s(lambda: kern(q, k, v), runs, device)
                t_flex = _median_s(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True), runs, device)
                t_sdpa = _median_s(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True), runs, device)
            out.append(f"| moba (block {block}, Hq={Hq}, Hkv={Hkv}, D={D}, {str(dtype)[6:]}) | {L} | {topk} "
                       f"| {t_ours:.4f} | {t_flex:.4f} | {t_sdpa:.4f} | {t_ours / t_flex:.2f}x | {t_ours / t_sdpa:.2f}x "
                       f"| {err:.2e} |")
            print(out[-1], flush=True)
    return out


def main(argv=None) -> int:
    """Run both measurements and write ``results/bench_sparse_<device>_<date>.md``."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="16384,65536,131072", help="token counts (comma-separated)")
    ap.add_argument("--doc-lengths", default="32768,65536,131072", help="document-mask token counts")
    ap.add_argument("--topk", default="8,16", help="blocks per query block")
    ap.add_argument("--block", type=int, default=64, help="routing block size (tokens)")
    ap.add_argument("--heads", type=int, default=8, help="heads with their own lists")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn-lengths", default=None,
                    help="routed-attention token counts (default: 16384,65536,131072 on CUDA, 1024 on CPU; '' to skip)")
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if args.attn_lengths is None:
        args.attn_lengths = "16384,65536,131072" if dev.type == "cuda" else "1024"
    causal = attncc.compile(attncc.pattern_path("causal"))
    rows = ["| schedule | L | topk | FlexAttention s | attncc s | attncc / flex | flex MiB | attncc MiB |",
            "|---|---|---|---|---|---|---|---|"]
    for L in (int(x) for x in args.lengths.split(",")):
        for topk in (int(x) for x in args.topk.split(",")):
            num, idx = routed_lists(L, args.block, topk, args.heads, dev)
            bs = attncc.BlockSparse(num, idx, args.block)
            t_flex = _median_s(lambda: BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=args.block), args.runs, dev)
            t_ours = _median_s(lambda: attncc_schedule(causal, bs, L, args.heads), args.runs, dev)
            bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=args.block)
            blocks, tbl = attncc_schedule(causal, bs, L, args.heads)
            flex_mib = _mib(*[x for x in bm.as_tuple() if isinstance(x, torch.Tensor)])
            ours_mib = _mib(blocks, tbl.kv_num, tbl.kv_idx, tbl.full_num, tbl.full_idx, tbl.q_num, tbl.q_idx,
                            tbl.qfull_num, tbl.qfull_idx)
            rows.append(f"| routed (block {args.block}, H={args.heads}) | {L} | {topk} | {t_flex:.4f} | {t_ours:.4f} "
                        f"| {t_ours / t_flex:.2f}x | {flex_mib:.1f} | {ours_mib:.1f} |")
            print(rows[-1], flush=True)
    doc_kern = attncc.compile(attncc.pattern_path("document_causal"))
    rows += ["", "| document mask | L | documents | create_block_mask s | attncc table s | attncc / flex |",
             "|---|---|---|---|---|---|"]
    for L in (int(x) for x in args.doc_lengths.split(",")):
        n_docs = max(2, L // 2048)
        doc = doc_ids(L, n_docs, dev)

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

        sizes = {"B": 1, "H": 1, "Hkv": 1, "Lq": L, "Lk": L, "D": 128, "Dv": 128, "G0": 1, "G1": 1, "G2": 1}

        def ours_table():
            tiles._CACHE.clear()  # the first call of a new document layout: no cached table
            tiles._DIGESTS.clear()
            return tiles.block_table(doc_kern.plan, sizes, {"doc": doc}, 128, 64, dev, doc_kern.key)

        t_flex = _median_s(lambda: create_block_mask(mask_mod, 1, 1, L, L, device=str(dev)), args.runs, dev)
        t_tab = _median_s(ours_table, args.runs, dev)
        rows.append(f"| document causal | {L} | {n_docs} | {t_flex:.3f} | {t_tab:.3f} | {t_tab / t_flex:.2f}x |")
        print(rows[-1], flush=True)
    if args.attn_lengths:
        rows += ["", *routed_attention_rows([int(x) for x in args.attn_lengths.split(",")],
                                            [int(x) for x in args.topk.split(",")], args.block, args.runs, dev)]
    settings = (f"device {dev}, {torch.get_num_threads()} threads, median of {args.runs}; attncc tiles 128 x 64; "
                "ratios < 1: attncc faster")
    write_results("bench_sparse", "Run-time block sparsity: schedule build cost", "\n".join(rows), settings,
                  path=args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
