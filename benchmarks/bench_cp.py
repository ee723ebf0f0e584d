"""Context-parallel attention (:mod:`attncc.distributed`) on a multi-GPU machine.

For each pattern, mode (``ulysses``, ``allgather``, ``ring``) and layout (``contiguous``,
``zigzag``), every rank times the forward and forward + backward of
``attncc.distributed.context_parallel`` on its sequence shard, and rank 0 prints one line per
configuration: the slowest rank's median time (ms), the ring's launched / skipped chunk pairs
and the balance report (work per rank in key tiles from ``tile_stats`` at the pairs' offsets,
max / mean). The first configuration is also checked against an unsharded single-GPU run.

Usage (one process per GPU, NCCL)::

    torchrun --nproc-per-node 8 benchmarks/bench_cp.py --length 131072 --heads 32 --head-dim 128
    torchrun --nproc-per-node 8 benchmarks/bench_cp.py --patterns causal,sliding_window --modes ring

On CPU (no GPU: gloo, attncc's CPU executor, tiny shapes; a check that the script runs, not a
measurement)::

    python benchmarks/bench_cp.py --dry-run            # spawns 2 processes itself

Nothing here has run on a GPU yet: no GPU numbers are claimed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import attncc
from attncc import distributed as cp

PATTERNS = {"causal": {}, "sliding_window": {"window": 4096}, "alibi": {}, "document_causal": {}}


def _tensors(name, L, H, device):
    """Spec tensors of a pattern (global values, identical on every rank: seeded)."""
    g = torch.Generator().manual_seed(0)
    if name == "alibi":
        return {"slope": torch.exp2(-8.0 * torch.arange(1, H + 1) / H).to(device)}
    if name == "document_causal":  # 8 documents of random lengths
        cuts = torch.sort(torch.randperm(L - 1, generator=g)[:7] + 1).values
        doc = torch.zeros(L, dtype=torch.int32)
        for c in cuts.tolist():
            doc[c:] += 1
        return {"doc": doc.to(device)}
    return {}


def _time(fn, reps, device):
    fn()
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(ts)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() * 1e3


def run(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() and \
        not args.dry_run else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    L, H, Hkv, D = args.length, args.heads, args.kv_heads or args.heads, args.head_dim
    checked = False
    for name in args.patterns.split(","):
        params = dict(PATTERNS[name])
        if "window" in params:
            params["window"] = min(params["window"], max(1, L // 8))
        kern = attncc.compile(attncc.pattern_path(name), **params)
        tens = _tensors(name, L, H, device)
        g = torch.Generator().manual_seed(1)
        q = torch.randn(1, H, L, D, generator=g).to(device, dtype)
        k = torch.randn(1, Hkv, L, D, generator=g).to(device, dtype)
        v = torch.randn(1, Hkv, L, D, generator=g).to(device, dtype)
        for mode in args.modes.split(","):
            for layout in args.layouts.split(","):
                qs, ks, vs = (cp.shard(x, layout=layout).detach().requires_grad_() for x in (q, k, v))
                try:
                    fwd = _time(lambda: cp.context_parallel(kern, qs, ks, vs, mode=mode, layout=layout, **tens),
                                args.reps, device)

                    def fwd_bwd():
                        cp.context_parallel(kern, qs, ks, vs, mode=mode, layout=layout, **tens).sum().backward()

                    fb = _time(fwd_bwd, args.reps, device)
                except (ValueError, NotImplementedError) as e:
                    if rank == 0:
                        print(f"{name:16s} {mode:9s} {layout:10s} refused: {e}")
                    continue
                extra = ""
                if mode == "ring":
                    st = cp.context_parallel.last_stats
                    counts = torch.tensor([st.launched, st.skipped])
                    dist.all_reduce(counts)
                    classes = cp.pair_classes(kern, L, world, layout, H=H, Hkv=Hkv, D=D, **tens)
                    rep = cp.balance_report(classes, world, layout)
                    extra = (f" pairs launched {counts[0].item()} skipped {counts[1].item()};"
                             f" work/rank ({rep['unit']}) {rep['per_rank']} imbalance {rep['imbalance']:.2f}")
                if not checked:  # the sharded result against one unsharded run on this device
                    out = cp.unshard(cp.context_parallel(kern, qs, ks, vs, mode=mode, layout=layout, **tens),
                                     layout=layout)
                    ref = kern(q, k, v, **tens)
                    err = (out.float() - ref.float()).abs().max().item()
                    checked = True
                    extra += f" max|cp - single| {err:.2e}"
                if rank == 0:
                    print(f"{name:16s} {mode:9s} {layout:10s} fwd {fwd:9.2f} ms  fwd+bwd {fb:9.2f} ms{extra}",
                          flush=True)


def _spawned(rank, world, path, args):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patterns", default="causal,sliding_window,alibi,document_causal")
    p.add_argument("--modes", default="ulysses,allgather,ring")
    p.add_argument("--layouts", default="contiguous,zigzag")
    p.add_argument("--length", type=int, default=32768, help="whole sequence length L")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: spawn 2 gloo processes, tiny shapes, one repetition (checks the script runs)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.length, args.heads, args.kv_heads, args.head_dim, args.reps = 16, 2, 1, 16, 1
        args.patterns = "causal,alibi"
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_spawned, args=(2, os.path.join(d, "pg"), args), nprocs=2, join=True)
        return
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        run(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
