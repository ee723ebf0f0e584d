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

    python benchmarks/bench_sparse.py [--lengths 16384,65536,131072] [--topk 8,16] [--runs 3]

On a CUDA machine the same code runs on the GPU (``--device cuda``); the attention kernels'
own timing against compiled FlexAttention needs the GPU and is not part of this script.
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
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
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
    settings = (f"device {dev}, {torch.get_num_threads()} threads, median of {args.runs}; attncc tiles 128 x 64; "
                "ratios < 1: attncc faster")
    write_results("bench_sparse", "Run-time block sparsity: schedule build cost", "\n".join(rows), settings,
                  path=args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
