"""Block tables for masks the closed form cannot bound (data-dependent masks).

The mask is evaluated with torch on broadcast index grids, one chunk of query
tiles at a time (never the whole ``Lq x Lk`` matrix at once), and reduced per
(query tile, key tile) to non-empty / full. The result lists, per query tile,
its partial key tiles and its full key tiles (like FlexAttention's BlockMask),
and is cached per (pattern, shape, block sizes, device, mask tensor contents).

Block-read masks (``rest and blk[..., q // BQ, kv // BK]``, the masks of run-time block
sparsity) take another way: :func:`block_classes` builds the classes per call from the
block tensor and the closed form of the rest in O(blocks + tiles), never per (q, kv) pair.
The closed-form tile classes (:func:`closed_tile_classes`) are shared with the CPU executor.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import sympy as sp
import torch

from attncc import ir as I
from attncc.dense import eval_expr, index_env, tile_classes

_CACHE: "OrderedDict[tuple, BlockTable]" = OrderedDict()
_CACHE_SIZE = 64


@dataclass(frozen=True)
class BlockTable:
    """Per query tile: partial key tiles and full key tiles.

    Attributes:
        kv_num: int32 ``(TB, TH, n_m)``: number of partial key tiles.
        kv_idx: int32 ``(TB, TH, n_m, n_n)``: their indices (ascending, padded).
        full_num / full_idx: the same for full tiles (mask true on the whole tile).
        q_num / q_idx / qfull_num / qfull_idx: the transposed lists, per key tile: its
            partial / full query tiles ``(TB, TH, n_n[, n_m])`` (for the dK/dV backward).
        TB / TH: 1 when the mask does not depend on the batch / head index.
    """

    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor
    q_num: torch.Tensor = None
    q_idx: torch.Tensor = None
    qfull_num: torch.Tensor = None
    qfull_idx: torch.Tensor = None

    def strides(self) -> tuple[int, int, int, int]:
        """(stride_tb, stride_th, stride_tm, stride_tn) as the kernel reads them."""
        TB, TH, n_m, n_n = self.kv_idx.shape
        return (TH * n_m if TB > 1 else 0, n_m if TH > 1 else 0, 1, n_n)

    def strides_t(self) -> tuple[int, int, int, int]:
        """(stride_tb, stride_th, stride_tn, stride_tm) of the transposed lists."""
        TB, TH, n_n, n_m = self.q_idx.shape
        return (TH * n_n if TB > 1 else 0, n_n if TH > 1 else 0, 1, n_m)


_DIGESTS: dict = {}  # id(tensor) -> (weakref, data_ptr, snapshot, digest)


def tensor_digest(t: torch.Tensor) -> str:
    """Content hash of a tensor (shape, dtype and bytes): the block-table cache's key for a
    mask tensor, so a table is reused exactly when the mask tensor holds the same values.

    The hash of a tensor seen before is reused only after an exact on-device comparison
    with a snapshot taken when it was hashed (``torch.equal``: no copy to the host, one
    scalar result). Every in-place change is caught, also those that do not bump the
    version counter (``t.numpy()[:] = 0``, ``t.data.zero_()``), and inference tensors
    (``torch.inference_mode()``, which have no version counter) work the same way. The
    snapshot costs one copy of each mask tensor passed, freed with the tensor.
    """
    seen = _DIGESTS.get(id(t))
    if (seen is not None and seen[0]() is t and seen[1] == t.data_ptr() and seen[2].shape == t.shape
            and seen[2].dtype == t.dtype and torch.equal(seen[2], t.detach())):
        return seen[3]
    snap = t.detach().clone()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(snap.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    d = h.hexdigest()
    key = id(t)
    _DIGESTS[key] = (weakref.ref(t, lambda _r, key=key: _DIGESTS.pop(key, None)), t.data_ptr(), snap, d)
    return d


def tensor_snapshot(t: torch.Tensor) -> torch.Tensor:
    """The private copy of ``t``'s values that :func:`tensor_digest` keeps (taken or checked
    equal to ``t`` now; the same shape, dtype and device). Never written: a tensor that
    compares equal to it (``torch.equal``) holds the values a cached block table was built
    from, without hashing."""
    tensor_digest(t)
    return _DIGESTS[id(t)][2]


def size_env(sizes: dict, device) -> dict:
    """Sizes and broadcast ``b`` ``(B, 1, 1)``, ``h`` ``(1, H, 1)`` for evaluating a plan's
    closed forms (the last axis: query tiles or chunks)."""
    env = index_env(sizes["B"], sizes["H"], 1, 1, sizes["Hkv"], sizes["D"], sizes["Dv"], device,
                    grid=I.grid_of(sizes))
    env[I.Lq], env[I.Lk] = sizes["Lq"], sizes["Lk"]
    env[I.b], env[I.h] = env[I.b].view(-1, 1, 1), env[I.h].view(1, -1, 1)
    return env


@functools.lru_cache(maxsize=1024)
def _clamped(iv) -> tuple:
    """An interval's bounds clamped to ``[0, Lk]`` as the kernels clamp them (sympy, built once)."""
    return sp.Max(iv.lo, 0), sp.Min(iv.hi, I.Lk), sp.Max(iv.flo, 0), sp.Max(sp.Min(iv.fhi, I.Lk), 0)


def closed_tile_classes(intervals, sizes: dict, starts: torch.Tensor, lasts: torch.Tensor, block_n: int, device,
                        tensors: dict | None = None):
    """Visited / full key tiles of the closed-form ``intervals`` (:class:`attncc.passes.Interval`)
    for query row ranges ``[starts, lasts]`` (int64 ``(n,)``), rounded to key tiles of
    ``block_n`` exactly as the kernels' ``interval_bounds`` macro rounds them. ``tensors``
    (name -> tensor) holds the run-time scalars the intervals read (``win[h]``: per-head
    windows, see :attr:`attncc.passes.KernelPlan.scalars`), evaluated at the broadcast
    ``b`` / ``h`` grids.

    Returns:
        ``(visit, full)``: bool ``(TB, TH, n, n_n)`` (TB / TH: ``B`` / ``H`` where an interval
        depends on the batch / head index, else 1); full tiles are visited tiles.
    """
    from attncc.passes import q_hi, q_lo

    Lk = sizes["Lk"]
    n_n = -(-Lk // block_n)
    env = size_env(sizes, device)
    env[q_lo], env[q_hi] = starts.view(1, 1, -1), lasts.view(1, 1, -1)
    n = torch.arange(n_n, device=device)
    visit = torch.zeros(1, 1, starts.numel(), n_n, dtype=torch.bool, device=device)
    full = torch.zeros_like(visit)

    def ev(e):
        x = eval_expr(e, env, tensors or {}, device=device)
        x = torch.as_tensor(x, device=device).to(torch.int64)
        return torch.broadcast_to(x, torch.broadcast_shapes(x.shape, (1, 1, starts.numel())))[..., None]

    for iv in intervals:
        lo, hi, flo, fhi = (ev(e) for e in _clamped(iv))
        t_lo = torch.div(lo, block_n, rounding_mode="floor")
        t_hi = torch.where(hi > lo, torch.div(hi + block_n - 1, block_n, rounding_mode="floor"), t_lo)
        f_lo = torch.div(flo + block_n - 1, block_n, rounding_mode="floor")
        f_hi = torch.div(fhi, block_n, rounding_mode="floor")
        visit = visit | ((n >= t_lo) & (n < t_hi))
        full = full | ((n >= f_lo) & (n < f_hi))
    return visit, full & visit


def _lists(sel: torch.Tensor) -> tuple:
    """``(num, idx)`` of a bool ``(..., n)``: the count of True entries and their positions,
    ascending, then padding (int32). A scan and a scatter on the device (no host sync, no
    atomics, no sort: deterministic)."""
    n = sel.shape[-1]
    pos = torch.cumsum(sel.contiguous(), -1, dtype=torch.int32)
    num = pos[..., -1].contiguous()
    idx = torch.zeros(*sel.shape[:-1], n + 1, dtype=torch.int32, device=sel.device)
    cols = torch.arange(n, dtype=torch.int32, device=sel.device).expand_as(sel)
    idx.scatter_(-1, torch.where(sel, pos - 1, n).to(torch.int64), cols)
    return num, idx[..., :n].contiguous()


def _table(nonempty: torch.Tensor, full: torch.Tensor) -> BlockTable:
    """The :class:`BlockTable` of per-tile classes ``(TB, TH, n_m, n_n)`` (full tiles are non-empty)."""
    partial = nonempty & ~full
    kv_num, kv_idx = _lists(partial)
    full_num, full_idx = _lists(full)
    q_num, q_idx = _lists(partial.transpose(2, 3))
    qfull_num, qfull_idx = _lists(full.transpose(2, 3))
    return BlockTable(kv_num, kv_idx, full_num, full_idx, q_num, q_idx, qfull_num, qfull_idx)


def block_classes(plan, sizes: dict, tensors: dict, block_m: int, block_n: int, device) -> tuple:
    """Tile classes of a plan whose mask is ``rest and blk[..., q // bq, kv // bk] != 0``
    (:class:`attncc.passes.BlockRead`), from the block tensor and the closed form of ``rest``:
    a tile is non-empty when ``rest`` may allow a pair in it and some block under it is set,
    full when ``rest`` is full on it and every block under it is set (any / all from a 2-D
    prefix sum of the block tensor: O(blocks + tiles) work on the device, no host sync).

    Returns:
        ``(nonempty, full)``: bool ``(TB, TH, n_m, n_n)`` (TB / TH as :func:`block_table`).
    """
    br = plan.blocks
    Lq, Lk, B, H = sizes["Lq"], sizes["Lk"], sizes["B"], sizes["H"]
    n_m, n_n = -(-Lq // block_m), -(-Lk // block_n)
    TB = B if plan.mask_uses_b else 1
    TH = H if plan.mask_uses_h else 1
    blk = tensors[br.tensor]
    # the leading indices, per (b, h): blk[i0(b, h), i1(b, h), ...] -> (B', H', nQ, nK)
    env = size_env(sizes, device)
    env[I.b], env[I.h] = env[I.b].view(-1, 1), env[I.h].view(1, -1)
    lead = [torch.as_tensor(eval_expr(ix, env, {}), device=device).to(torch.int64) for ix in br.read.indices[:-2]]
    lead = [x.clamp(0, d - 1) for x, d in zip(lead, blk.shape)]  # in bounds: checked before the launch
    sel = blk[tuple(lead)] if lead else blk[None, None]
    if sel.dim() == 2:  # leading indices that are constants
        sel = sel[None, None]
    nQ, nK = sel.shape[-2:]
    pre = torch.zeros(*sel.shape[:-2], nQ + 1, nK + 1, dtype=torch.int32, device=device)
    pre[..., 1:, 1:] = (sel != 0).to(torch.int32).cumsum(-2, dtype=torch.int32).cumsum(-1, dtype=torch.int32)

    def spans(n_tiles, tile, L, blk_size, n_blocks):  # the blocks [a, z) under each tile
        first = torch.arange(n_tiles, device=device) * tile
        last = torch.clamp(first + tile, max=L) - 1
        return (first // blk_size).clamp(max=n_blocks), (last // blk_size + 1).clamp(max=n_blocks)

    a0, a1 = spans(n_m, block_m, Lq, br.bq, nQ)
    c0, c1 = spans(n_n, block_n, Lk, br.bk, nK)
    A0, A1, C0, C1 = a0[:, None], a1[:, None], c0[None, :], c1[None, :]
    count = pre[..., A1, C1] - pre[..., A0, C1] - pre[..., A1, C0] + pre[..., A0, C0]
    any_set = count > 0
    all_set = count == (A1 - A0) * (C1 - C0)
    if br.intervals is not None:
        starts = torch.arange(n_m, device=device) * block_m
        visit, rfull = closed_tile_classes(br.intervals, sizes, starts, torch.clamp(starts + block_m, max=Lq) - 1,
                                           block_n, device)
    else:  # no closed form of the rest: its tile classes evaluated per tile
        visit, rfull = tile_classes(dataclasses.replace(plan.ir, mask=br.rest), sizes, tensors, block_m, block_n,
                                    device, TB, TH)
    ragged = (torch.arange(n_n, device=device) + 1) * block_n > Lk  # the kernels' unmasked tiles are whole
    nonempty = torch.broadcast_to(visit & any_set, (TB, TH, n_m, n_n))
    full = torch.broadcast_to(rfull & all_set & ~ragged, (TB, TH, n_m, n_n))
    return nonempty, full


def block_table(plan, sizes: dict, tensors: dict, block_m: int, block_n: int, device, key: str) -> BlockTable:
    """The :class:`BlockTable` of ``plan.ir.mask`` for these sizes and tensor values: for
    block-read plans (``plan.blocks``) built per call from the block tensor
    (:func:`block_classes`); else from a chunked dense evaluation of the mask, cached per
    (pattern, sizes, tiles, device, mask tensor contents)."""
    if plan.blocks is not None:
        return _table(*block_classes(plan, sizes, tensors, block_m, block_n, device))
    ir = plan.ir
    TB = sizes["B"] if plan.mask_uses_b else 1
    TH = sizes["H"] if plan.mask_uses_h else 1
    ck = (key, tuple(sorted(sizes.items())), block_m, block_n, str(device), TB, TH,
          tuple(tensor_digest(tensors[n]) for n in plan.mask_tensors))
    if ck in _CACHE:
        _CACHE.move_to_end(ck)
        return _CACHE[ck]
    nonempty, full = tile_classes(ir, sizes, tensors, block_m, block_n, device, TB, TH, ragged_full=False)
    tbl = _table(nonempty, full)
    _CACHE[ck] = tbl
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return tbl
