"""Block tables for masks the closed form cannot bound (data-dependent masks).

The mask is evaluated with torch on broadcast index grids, one chunk of query
tiles at a time (never the whole ``Lq x Lk`` matrix at once), and reduced per
(query tile, key tile) to non-empty / full. The result lists, per query tile,
its partial key tiles and its full key tiles (like FlexAttention's BlockMask),
and is cached per (pattern, shape, block sizes, device, mask tensor contents).
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from attncc.dense import tile_classes

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


def block_table(plan, sizes: dict, tensors: dict, block_m: int, block_n: int, device, key: str) -> BlockTable:
    """The (cached) :class:`BlockTable` of ``plan.ir.mask`` for these sizes and tensor values."""
    ir = plan.ir
    TB = sizes["B"] if plan.mask_uses_b else 1
    TH = sizes["H"] if plan.mask_uses_h else 1
    ck = (key, tuple(sorted(sizes.items())), block_m, block_n, str(device), TB, TH,
          tuple(tensor_digest(tensors[n]) for n in plan.mask_tensors))
    if ck in _CACHE:
        _CACHE.move_to_end(ck)
        return _CACHE[ck]
    nonempty, full = tile_classes(ir, sizes, tensors, block_m, block_n, device, TB, TH, ragged_full=False)
    partial = nonempty & ~full

    def lists(sel):
        num = sel.sum(-1, dtype=torch.int32)
        idx = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return num.contiguous(), idx.contiguous()

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    q_num, q_idx = lists(partial.transpose(2, 3))
    qfull_num, qfull_idx = lists(full.transpose(2, 3))
    tbl = BlockTable(kv_num, kv_idx, full_num, full_idx, q_num, q_idx, qfull_num, qfull_idx)
    _CACHE[ck] = tbl
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return tbl
