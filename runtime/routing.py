"""Top-k block routing (issue 15, section 3): the producer of run-time block sparsity.

:func:`topk_blocks` scores every key block against every query block (or query token) from
pooled keys and pooled queries, as MoBA / NSA's selection branch does, keeps the ``topk``
best blocks (with the local and sink blocks forced) and returns the lists as an
:class:`attncc.BlockSparse` that any compiled pattern takes as ``kern(q, k, v, block_mask=...)``.

:func:`topk_blocks_reference` is the specification in torch; :func:`topk_blocks` runs a fused
Triton kernel (one program per (batch, head or head group, query block): pooling of the
query block, the block scores as a ``[key blocks]`` vector in registers, top-k by an
iterative max-and-mask loop and the write of the sorted lists), so no ``Lq x Lk`` score matrix
and no ``(query blocks, key blocks)`` one is ever stored. The keys are pooled per block
beforehand in torch ((B, Hkv, ceil(Lk / block_size), D), float32).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import cache
from .sparse import BlockSparse, _cdiv

__all__ = ["topk_blocks", "topk_blocks_reference"]

_POOLS = ("mean", "max")
_SHARES = ("kv_head", "head")
_GRANULARITIES = ("block", "token")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(q, k, block_size, topk, pool, local_blocks, sink_blocks, share, query_granularity, backend=None):
    """Validate the arguments of :func:`topk_blocks` (before any launch); return
    ``(B, Hq, Hkv, Lq, Lk, D)``."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"topk_blocks: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"topk_blocks: {name} must have 4 dims (B, H, L, D), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"topk_blocks: {name} must be a floating-point tensor, got {x.dtype}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if B != Bk:
        raise ValueError(f"topk_blocks: q has batch {B} and k has batch {Bk}; they must match")
    if D != Dk:
        raise ValueError(f"topk_blocks: q has head dim {D} and k has head dim {Dk}; they must match")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"topk_blocks: the query heads Hq = {Hq} must be a multiple of the key heads Hkv = {Hkv}")
    if min(B, Lq, Lk, D) == 0:
        raise ValueError(f"topk_blocks: empty inputs (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if q.device != k.device:
        raise ValueError(f"topk_blocks: q is on {q.device} and k on {k.device}; they must be on one device")
    if not _is_int(block_size) or block_size <= 0:
        raise ValueError(f"topk_blocks: block_size must be a positive int, got {block_size!r}")
    if not _is_int(topk) or topk <= 0:
        raise ValueError(f"topk_blocks: topk must be a positive int, got {topk!r}")
    for name, x in (("local_blocks", local_blocks), ("sink_blocks", sink_blocks)):
        if not _is_int(x) or x < 0:
            raise ValueError(f"topk_blocks: {name} must be an int >= 0, got {x!r}")
    if local_blocks + sink_blocks > topk:
        raise ValueError(f"topk_blocks: local_blocks + sink_blocks = {local_blocks + sink_blocks} exceeds topk = {topk} "
                         f"(topk counts the forced blocks too)")
    for name, x, allowed in (("pool", pool, _POOLS), ("share", share, _SHARES),
                             ("query_granularity", query_granularity, _GRANULARITIES),
                             ("backend", backend, cache.KERNEL_BACKENDS)):
        if x not in allowed:
            raise ValueError(f"topk_blocks: {name} must be one of {', '.join(map(repr, allowed))}; got {x!r}")
    return B, Hq, Hkv, Lq, Lk, D


def _pool_keys(k: torch.Tensor, block_size: int, pool: str) -> torch.Tensor:
    """float32 ``(B, Hkv, ceil(Lk / block_size), D)``: each key block pooled over its valid tokens
    (``"mean"``: their mean; ``"max"``: the elementwise max)."""
    B, H, L, D = k.shape
    nk = _cdiv(L, block_size)
    pad = nk * block_size - L
    kf = k.detach().to(torch.float32)
    if pool == "max":
        kf = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf"))
        return kf.view(B, H, nk, block_size, D).amax(3).contiguous()
    kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
    counts = torch.clamp(L - torch.arange(nk, device=k.device) * block_size, max=block_size).to(torch.float32)
    return (kf.view(B, H, nk, block_size, D).sum(3) / counts[:, None]).contiguous()


def _sizes(Lq: int, Hq: int, Hkv: int, block_size: int, share: str, query_granularity: str):
    """``(bq, nq, Hout, G)``: queries per query block, query blocks, heads of the lists and
    query heads summed per list."""
    bq = block_size if query_granularity == "block" else 1
    Hout, G = (Hkv, Hq // Hkv) if share == "kv_head" else (Hq, 1)
    return bq, _cdiv(Lq, bq), Hout, G


def topk_blocks_reference(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, topk: int = 8, pool: str = "mean",
                          causal: bool = True, local_blocks: int = 1, sink_blocks: int = 0, share: str = "kv_head",
                          query_granularity: str = "block") -> BlockSparse:
    """The top-k block selection in plain torch (the specification of :func:`topk_blocks`;
    same arguments and result). Scores are float32 ``(B, Hout, nQ, nK)`` here (block level,
    never ``Lq x Lk``)."""
    B, Hq, Hkv, Lq, Lk, D = _check(q, k, block_size, topk, pool, local_blocks, sink_blocks, share, query_granularity)
    bq, nq, Hout, G = _sizes(Lq, Hq, Hkv, block_size, share, query_granularity)
    nk = _cdiv(Lk, block_size)
    dev = q.device
    with torch.no_grad():
        kp = _pool_keys(k, block_size, pool)
        qf = torch.nn.functional.pad(q.detach().to(torch.float32), (0, 0, 0, nq * bq - Lq))
        starts = torch.arange(nq, device=dev) * bq
        cnt = torch.clamp(Lq - starts, max=bq)
        qp = qf.view(B, Hq, nq, bq, D).sum(3) / cnt.to(torch.float32)[:, None]      # (B, Hq, nq, D)
        kp_q = kp.repeat_interleave(Hq // Hkv, dim=1)                                # per query head
        scores = torch.einsum("bhid,bhjd->bhij", qp, kp_q)                           # (B, Hq, nq, nk)
        scores = scores.view(B, Hout, G, nq, nk).sum(2)
        j = torch.arange(nk, device=dev)
        last = starts + cnt - 1
        jmax = torch.clamp(torch.div(last, block_size, rounding_mode="floor"), max=nk - 1)[:, None]  # (nq, 1)
        allowed = (j <= jmax) if causal else torch.ones(nq, nk, dtype=torch.bool, device=dev)
        forced = allowed & (((j > jmax - local_blocks) & (j <= jmax)) | (j < sink_blocks))
        key = torch.where(forced, float("inf"), torch.where(allowed, scores, float("-inf")))
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :topk]  # ties: lower index first
        take = torch.gather(key, -1, order) > float("-inf")
        sel = torch.zeros(B, Hout, nq, nk + 1, dtype=torch.bool, device=dev)
        sel.scatter_(-1, torch.where(take, order, nk), True)
        from .tiles import _lists

        num, idx = _lists(sel[..., :nk])
        return BlockSparse(num, idx[..., :min(topk, nk)].contiguous(), (bq, block_size))


@triton.jit
def _topk_blocks_kernel(Q, KP, NUM, IDX,
                        stride_qb, stride_qh, stride_ql, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        Hout, nQ, Lq, nK, D, G, R, BQ, BS, TOPK, LOCAL, SINK, MAXB,
                        CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_NK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (batch, list head, query block): pool the query block over its valid
    rows (summed over the ``G`` query heads of the list), score the ``nK`` pooled key blocks
    (a ``[BLOCK_NK]`` vector), keep the forced blocks and the best others (``TOPK`` rounds of
    max-and-mask, ties to the lower index) and write the count and the ascending indices."""
    pid = tl.program_id(0)
    i = pid % nQ
    bh = pid // nQ
    h = bh % Hout
    b = (bh // Hout).to(tl.int64)
    q_start = i * BQ
    cnt = tl.minimum(Lq - q_start, BQ)
    last = q_start + cnt - 1
    r = tl.arange(0, BLOCK_Q)
    rows = q_start + r
    rmask = (r < BQ) & (rows < Lq)
    jj = tl.arange(0, BLOCK_NK)
    kmask = jj < nK
    kvh = (h * G) // R
    scores = tl.zeros([BLOCK_NK], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        qv = tl.zeros([BLOCK_D], dtype=tl.float32)
        for g in range(0, G):
            qh = (h * G + g).to(tl.int64)
            qt = tl.load(Q + b * stride_qb + qh * stride_qh + rows[:, None].to(tl.int64) * stride_ql
                         + d[None, :] * stride_qd, mask=rmask[:, None] & dmask[None, :], other=0.0)
            qv += tl.sum(qt.to(tl.float32), 0) / cnt
        kt = tl.load(KP + b * stride_kb + kvh.to(tl.int64) * stride_kh + jj[:, None] * stride_kn + d[None, :] * stride_kd,
                     mask=kmask[:, None] & dmask[None, :], other=0.0)
        scores += tl.sum(kt * qv[None, :], 1)
    jmax = tl.minimum(last // BS, nK - 1)
    allowed = kmask
    if CAUSAL:
        allowed = allowed & (jj <= jmax)
    forced = allowed & (((jj > jmax - LOCAL) & (jj <= jmax)) | (jj < SINK))
    key = tl.where(forced, float("inf"), tl.where(allowed, scores, float("-inf")))
    sel = tl.zeros([BLOCK_NK], dtype=tl.int32)
    for _t in range(0, TOPK):
        m = tl.max(key, 0)
        j = tl.min(tl.where(key == m, jj, BLOCK_NK), 0)
        hit = jj == j
        sel = tl.where(hit & (key > float("-inf")), 1, sel)  # key[j] == m: a block left to take
        key = tl.where(hit, float("-inf"), key)
    pos = tl.cumsum(sel, 0) - 1
    out = pid.to(tl.int64)
    tl.store(IDX + out * MAXB + pos, jj, mask=sel != 0)
    tl.store(NUM + out, tl.sum(sel, 0))


def _kernel_launch(q, kp, block_size, topk, causal, local_blocks, sink_blocks, share, query_granularity):
    """The launch of :func:`_topk_blocks_kernel` (``kp``: the pooled keys of :func:`_pool_keys`)
    as an :class:`attncc.runtime.Launch` (what AOT compiles), with its outputs: ``(launch,
    schedule)``, the :class:`BlockSparse` written by the launch."""
    from .configs import register_cap
    from .kernel import Launch

    B, Hq, Lq, D = q.shape
    Hkv, nk = kp.shape[1], kp.shape[2]
    bq, nq, Hout, G = _sizes(Lq, Hq, Hkv, block_size, share, query_granularity)
    maxb = min(topk, nk)
    num = torch.zeros(B, Hout, nq, dtype=torch.int32, device=q.device)
    idx = torch.zeros(B, Hout, nq, maxb, dtype=torch.int32, device=q.device)
    block_nk = triton.next_power_of_2(nk)
    block_q = triton.next_power_of_2(bq)
    # [BLOCK_NK, BLOCK_D] and [BLOCK_Q, BLOCK_D] tiles of at most 4096 elements per step
    block_d = max(1, min(triton.next_power_of_2(D), 4096 // block_nk, 4096 // block_q))
    qd = q.detach()
    warps = 4 if block_nk * block_d <= 2048 else 8
    launch = Launch("_topk_blocks_kernel", (B * Hout * nq,),
                    [qd, kp, num, idx, *qd.stride(), *kp.stride(), Hout, nq, Lq, nk, D, G, Hq // Hkv, bq, block_size,
                     topk, local_blocks, sink_blocks, maxb],
                    dict(CAUSAL=bool(causal), BLOCK_Q=block_q, BLOCK_NK=block_nk, BLOCK_D=block_d, num_warps=warps,
                         # the whole register file per CTA (measured, sm_80, 2048 key blocks: 64
                         # registers and 8 B of spills uncapped; 92 registers, none, capped)
                         maxnreg=register_cap(warps)))
    return launch, BlockSparse(num, idx, (bq, block_size))


def topk_blocks(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, topk: int = 8, pool: str = "mean",
                causal: bool = True, local_blocks: int = 1, sink_blocks: int = 0, share: str = "kv_head",
                query_granularity: str = "block", backend: Optional[str] = None) -> BlockSparse:
    """Top-k key blocks per query block (MoBA / NSA block selection) as an :class:`attncc.BlockSparse`.

    Key blocks are ``block_size`` consecutive keys. The score of key block ``j`` for query
    block ``i`` is ``q_pooled_i . k_pooled_j`` per query head: the query pooled by its mean
    over the block's valid rows (``query_granularity="block"``) or each query token alone
    (``"token"``), the keys pooled over the block's valid tokens by ``pool`` (``"mean"``,
    or ``"max"``: elementwise max). With ``share="kv_head"`` the scores of the query heads of
    one GQA group are summed and the group shares one list (the result has ``H = Hkv``);
    ``share="head"`` keeps one list per query head (``H = Hq``).

    Allowed blocks: every key block, or with ``causal=True`` (top-left aligned) the blocks
    ``j`` with ``j * block_size <= `` the last query position of the query block. Let
    ``jmax`` be the key block holding that last position (clamped to the last key block):
    the ``local_blocks`` blocks ``jmax, jmax - 1, ...`` and the ``sink_blocks`` leading blocks
    are forced (when allowed); ``topk`` counts every selected block, forced ones included
    (MoBA's convention), and the others are the best-scoring allowed blocks, ties broken by
    the lower block index. With fewer allowed blocks than ``topk`` all of them are kept.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``, ``Hq % Hkv == 0``. Any float dtype and
            strides; scores are accumulated in float32 (inputs are assumed finite).
        block_size: keys per key block, and queries per query block with
            ``query_granularity="block"``.
        topk: blocks kept per query block (``>= local_blocks + sink_blocks``).
        pool / causal / local_blocks / sink_blocks / share / query_granularity: as above.
        backend: ``None``: the fused Triton kernel for CUDA tensors and the torch reference
            (:func:`topk_blocks_reference`) for CPU ones; ``"triton"``: the kernel (CUDA, or CPU
            under the interpreter); ``"interpret"``: the kernel under the Triton interpreter
            (CPU tensors, ``TRITON_INTERPRET=1``, as attncc sets on machines without a GPU);
            ``"torch"``: the reference.

    Returns:
        :class:`attncc.BlockSparse` with ``block_size = (block_size, block_size)`` (or
        ``(1, block_size)`` per token), ``kv_num_blocks`` int32 ``(B, H, nQ)`` and
        ``kv_indices`` int32 ``(B, H, nQ, min(topk, nK))``: ascending, zero past the count.
        The lists have ``min(topk, nK)`` slots, not ``nK``: pass ``n_kv_blocks`` to
        :meth:`BlockSparse.to_dense`.

    The router gets no gradient: it runs under ``torch.no_grad()`` on detached inputs and
    returns integer schedules (attention through ``kern(q, k, v, block_mask=...)`` still
    differentiates q, k and v).

    Raises:
        TypeError / ValueError: non-tensors, non-float dtypes, ranks other than 4, mismatched
            batch / head dims, ``Hq % Hkv != 0``, ``block_size <= 0``, ``topk <= 0``,
            negative ``local_blocks`` / ``sink_blocks`` or their sum above ``topk``, an unknown
            ``pool`` / ``share`` / ``query_granularity`` / ``backend``; all before any launch.
        RuntimeError: ``backend="interpret"`` while Triton is not in interpreter mode, or a
            Triton backend on CPU tensors without the interpreter.
    """
    args = (block_size, topk, pool, local_blocks, sink_blocks, share, query_granularity)
    _check(q, k, *args, backend=backend)
    if not cache.runs_kernel("topk_blocks", backend, q.device):
        return topk_blocks_reference(q, k, block_size=block_size, topk=topk, pool=pool, causal=causal,
                                     local_blocks=local_blocks, sink_blocks=sink_blocks, share=share,
                                     query_granularity=query_granularity)
    with torch.no_grad():
        kp = _pool_keys(k, block_size, pool)
        launch, schedule = _kernel_launch(q, kp, block_size, topk, causal, local_blocks, sink_blocks, share,
                                          query_granularity)
        _topk_blocks_kernel[launch.grid](*launch.args, **launch.kwargs)
        return schedule
