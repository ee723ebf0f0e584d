"""Block sparsity chosen at run time: :class:`BlockSparse`, the schedule a call takes as
``kern(q, k, v, block_mask=...)``.

The layout is FlexAttention's ``BlockMask`` (``torch.nn.attention.flex_attention``): per
(batch, head, query block) a count and a list of key blocks; ``B`` and ``H`` may be 1
(broadcast), ``H`` may also be the number of key/value heads (GQA: query head ``h`` reads
``h // (Hq / Hkv)``). A call turns the lists into a block tensor ``(B | 1, H | 1, nQ, nK)``
on the device (a scatter, O(query blocks x key blocks)) and runs the pattern compiled with
that tensor joined to its mask (:func:`attncc.ir.with_block_mask`): the pattern's own
closed-form analysis still decides which tiles are empty, partial or full, and its mask
still holds inside partial tiles. Per call the kernels' tile lists (and the transposed lists
of the dK/dV backward) are built on the device from the block tensor in O(tiles)
(:func:`attncc.runtime.tiles.block_classes`), never from an ``Lq x Lk`` evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["BlockSparse", "as_block_sparse"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class BlockSparse:
    """A run-time block-sparse schedule (FlexAttention's ``BlockMask`` layout).

    Attributes:
        kv_num_blocks: int32 ``(B | 1, H | 1, nQ)``: key blocks listed per query block.
        kv_indices: int32 ``(B | 1, H | 1, nQ, max_blocks)``: their indices; entries at
            positions ``>= kv_num_blocks`` are ignored. Any order; a block listed twice
            counts once.
        block_size: ``(BQ, BK)``: queries / keys per block (positive ints; need not match
            the kernel's tiles: a tile covering several blocks is visited when one of them
            is listed, and the block test runs inside it).
        full_kv_num_blocks / full_kv_indices: optional second lists, in the same layout,
            of blocks the producer knows to be fully allowed (FlexAttention's ``full_*``).
            attncc visits them like the others; whether a tile runs without its mask is
            decided by the pattern's own analysis (a listed block never allows a pair the
            pattern masks).

    The sizes ``H`` may be 1, the number of query heads or the number of key/value heads;
    ``nQ`` must cover ``ceil(Lq / BQ)`` query blocks (rows past it are ignored) and every
    listed index must lie in ``[0, ceil(Lk / BK))`` — checked by :meth:`block_tensor`
    before any launch.

    Raises:
        TypeError / ValueError (on construction): non-tensors, non-integer dtypes, wrong
            ranks, mismatched leading dims between the count and the indices, or a block
            size that is not a pair of positive ints; each message names the argument.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: Tuple[int, int] = (128, 128)
    full_kv_num_blocks: Optional[torch.Tensor] = None
    full_kv_indices: Optional[torch.Tensor] = None

    def __post_init__(self):
        bs = self.block_size
        if isinstance(bs, int):
            bs = (bs, bs)
        if (not isinstance(bs, (tuple, list)) or len(bs) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in bs)):
            raise ValueError(f"block_size must be a positive int or a pair (BQ, BK) of positive ints, got {bs!r}")
        object.__setattr__(self, "block_size", (int(bs[0]), int(bs[1])))
        pairs = [("kv_num_blocks", "kv_indices")]
        if (self.full_kv_num_blocks is None) != (self.full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must be given together")
        if self.full_kv_num_blocks is not None:
            pairs.append(("full_kv_num_blocks", "full_kv_indices"))
        for num_name, idx_name in pairs:
            num, idx = getattr(self, num_name), getattr(self, idx_name)
            for name, x, rank in ((num_name, num, 3), (idx_name, idx, 4)):
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
                if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
                    raise TypeError(f"{name} must be an integer tensor (int32), got {x.dtype}")
                if x.dim() != rank:
                    raise ValueError(f"{name} must have {rank} dims ({'(B, H, nQ)' if rank == 3 else '(B, H, nQ, max_blocks)'}), "
                                     f"got shape {tuple(x.shape)}")
            if tuple(idx.shape[:3]) != tuple(num.shape):
                raise ValueError(f"{idx_name} {tuple(idx.shape)} must start with the shape of {num_name} "
                                 f"{tuple(num.shape)} (B, H, nQ)")
            if idx.device != self.kv_num_blocks.device or num.device != self.kv_num_blocks.device:
                raise ValueError(f"{num_name} / {idx_name} must be on one device with kv_num_blocks")
        if self.full_kv_num_blocks is not None and tuple(self.full_kv_num_blocks.shape) != tuple(self.kv_num_blocks.shape):
            raise ValueError(f"full_kv_num_blocks {tuple(self.full_kv_num_blocks.shape)} must have the shape of "
                             f"kv_num_blocks {tuple(self.kv_num_blocks.shape)}")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dense(cls, blocks: torch.Tensor, block_size=(128, 128), full: Optional[torch.Tensor] = None) -> "BlockSparse":
        """The schedule of a dense block mask.

        Args:
            blocks: bool ``(B | 1, H | 1, nQ, nK)``: key block ``j`` is visited by query
                block ``i`` where ``blocks[..., i, j]``.
            block_size: ``(BQ, BK)`` or one int for both.
            full: optional bool of the same shape: blocks known to be fully allowed, listed
                in ``full_*`` (a block set in both is listed once, as full).

        Raises:
            TypeError / ValueError: not a 4-D tensor, or ``full`` of another shape.
        """
        from .tiles import _lists

        if not isinstance(blocks, torch.Tensor) or blocks.dim() != 4:
            raise ValueError(f"blocks must be a 4-D tensor (B, H, nQ, nK), got "
                             f"{tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__}")
        sel = blocks != 0
        if full is None:
            num, idx = _lists(sel)
            return cls(num, idx, block_size)
        if not isinstance(full, torch.Tensor) or full.shape != blocks.shape:
            raise ValueError(f"full must have the shape of blocks {tuple(blocks.shape)}")
        fsel = full != 0
        num, idx = _lists(sel & ~fsel)
        fnum, fidx = _lists(fsel)
        return cls(num, idx, block_size, fnum, fidx)

    @classmethod
    def from_flex(cls, block_mask) -> "BlockSparse":
        """The schedule of a FlexAttention ``BlockMask`` (its ``kv_num_blocks``,
        ``kv_indices``, ``full_kv_*`` and ``BLOCK_SIZE``; the same tensors, not copied).

        Raises:
            TypeError: not a ``BlockMask``.
        """
        from torch.nn.attention.flex_attention import BlockMask

        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"expected a torch.nn.attention.flex_attention.BlockMask, got {type(block_mask).__name__}")
        bs = tuple(int(x) for x in block_mask.BLOCK_SIZE)
        return cls(block_mask.kv_num_blocks, block_mask.kv_indices, bs,
                   block_mask.full_kv_num_blocks, block_mask.full_kv_indices)

    # ------------------------------------------------------------------ reading
    def to_dense(self, n_kv_blocks: Optional[int] = None) -> torch.Tensor:
        """bool ``(B | 1, H | 1, nQ, nK)``: the listed blocks (both lists). ``nK`` defaults to
        ``max_blocks`` of ``kv_indices`` (FlexAttention's convention: the lists have one
        slot per key block); entries past the counts are ignored.

        Raises:
            ValueError: a listed index outside ``[0, nK)`` (naming the list).
        """
        nk = self.kv_indices.shape[-1] if n_kv_blocks is None else int(n_kv_blocks)
        out = self._scatter(self.kv_num_blocks, self.kv_indices, nk, "kv_indices")
        if self.full_kv_num_blocks is not None:
            out |= self._scatter(self.full_kv_num_blocks, self.full_kv_indices, nk, "full_kv_indices")
        return out

    @staticmethod
    def _scatter(num: torch.Tensor, idx: torch.Tensor, nk: int, name: str) -> torch.Tensor:
        """bool ``(B, H, nQ, nk)`` from a count and index list (positions past the count ignored)."""
        pos = torch.arange(idx.shape[-1], device=idx.device)
        live = pos < num[..., None].to(torch.int64)
        ix = idx.to(torch.int64)
        bad = live & ((ix < 0) | (ix >= nk))
        if bool(bad.any()):
            at = tuple(int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_mask: {name}{list(at)} = {int(ix[at])} is outside [0, {nk}) (the key blocks "
                             f"of this call: ceil(Lk / BK) = {nk})")
        out = torch.zeros(*idx.shape[:3], nk + 1, dtype=torch.bool, device=idx.device)
        out.scatter_(-1, torch.where(live, ix, nk), True)
        return out[..., :nk]

    def block_tensor(self, B: int, Hq: int, Hkv: int, Lq: int, Lk: int) -> Tuple[torch.Tensor, bool, str]:
        """The block tensor of a call with these sizes, and how it is indexed.

        Returns:
            ``(blocks, per_batch, heads)``: bool ``(B | 1, H' , ceil(Lq / BQ), ceil(Lk / BK))``
            (contiguous, on the schedule's device); ``per_batch``: one entry per batch;
            ``heads``: ``"q"`` (H' = Hq), ``"kv"`` (H' = Hkv < Hq) or ``"one"`` (H' = 1), as
            :func:`attncc.ir.with_block_mask` takes them.

        Raises:
            ValueError: a batch or head dim that is neither 1 nor the call's, fewer query
                blocks than ``ceil(Lq / BQ)``, or a listed index outside ``[0, ceil(Lk / BK))``.
        """
        bq, bk = self.block_size
        nq, nk = _cdiv(Lq, bq), _cdiv(Lk, bk)
        tb, th, have_q = self.kv_num_blocks.shape
        if tb not in (1, B):
            raise ValueError(f"block_mask: kv_num_blocks has batch dim {tb}; expected 1 or B = {B}")
        if th not in (1, Hq, Hkv):
            raise ValueError(f"block_mask: kv_num_blocks has head dim {th}; expected 1, Hq = {Hq} or Hkv = {Hkv}")
        if have_q < nq:
            raise ValueError(f"block_mask: kv_num_blocks has {have_q} query blocks; Lq = {Lq} with BQ = {bq} needs "
                             f"{nq} (ceil(Lq / BQ))")
        if self.kv_num_blocks.is_floating_point():
            raise TypeError("block_mask: kv_num_blocks must be an integer tensor")
        sub = self if have_q == nq else BlockSparse(
            self.kv_num_blocks[:, :, :nq], self.kv_indices[:, :, :nq], self.block_size,
            None if self.full_kv_num_blocks is None else self.full_kv_num_blocks[:, :, :nq],
            None if self.full_kv_indices is None else self.full_kv_indices[:, :, :nq])
        blocks = sub.to_dense(nk).contiguous()
        heads = "one" if th == 1 and Hq > 1 else ("q" if th == Hq else "kv")
        return blocks, tb == B and B > 1, heads


def as_block_sparse(block_mask) -> BlockSparse:
    """``block_mask`` as a :class:`BlockSparse` (a FlexAttention ``BlockMask`` is read by
    :meth:`BlockSparse.from_flex`).

    Raises:
        TypeError: anything else.
    """
    if isinstance(block_mask, BlockSparse):
        return block_mask
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # pragma: no cover - torch without flex_attention
        BlockMask = ()
    if BlockMask and isinstance(block_mask, BlockMask):
        return BlockSparse.from_flex(block_mask)
    raise TypeError(f"block_mask must be an attncc.BlockSparse or a torch.nn.attention.flex_attention.BlockMask, "
                    f"got {type(block_mask).__name__}")
