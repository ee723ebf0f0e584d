"""Context-parallel attention on ``torch.distributed`` (issue 17): one attention call whose
sequence is split over the ranks of a process group.

A sequence of ``L`` tokens (grid patterns: the first grid axis) is cut into chunks and each
rank of a group of ``W`` holds some of them, its *shard*:

* ``layout="contiguous"``: ``W`` chunks of ``L / W``; rank ``r`` holds chunk ``r``.
* ``layout="zigzag"``: ``2W`` chunks of ``L / (2W)``; rank ``r`` holds chunks ``r`` and
  ``2W - 1 - r`` (in that order), which balances causal masks (ring-flash-attention's
  zigzag, Megatron-LM's load-balanced context parallelism).

:func:`shard` / :func:`unshard` move a whole tensor in and out of a layout.
:func:`context_parallel` runs a compiled pattern on sharded q, k, v in one of three modes,
each built on ``torch.distributed`` collectives only:

* ``"ulysses"`` (DeepSpeed-Ulysses, Jacobs et al. 2023): ``all_to_all_single`` from
  sequence shards to head shards, the ordinary kernel on the whole sequence for ``H / W``
  heads, ``all_to_all_single`` back. Per-head spec tensors (ALiBi slopes, tables whose dim
  is ``H``) are sliced by rank.
* ``"allgather"`` (Llama 3's context parallelism, PyTorch's ``context_parallel`` all-gather
  rotation): ``all_gather_into_tensor`` of K and V (their gradients ``reduce_scatter_tensor``),
  the local queries attend with their global positions.
* ``"ring"`` (Ring Attention, Liu et al. 2023; ring-flash-attention): K / V shards passed
  around the ring with ``batch_isend_irecv`` (the next step's transfer overlaps the current
  step's kernels), every (query chunk, key chunk) pair one kernel call with the chunks'
  global position offsets, partial states merged by their LSE in float32
  (:func:`attncc.merge_state`); a pair the closed-form analysis proves empty is skipped
  without a launch. The backward passes K / V around again with their dK / dV
  accumulators and returns the accumulators to their owners (one more hop).

Every mode is differentiable: the backward of a collective is its transpose
(all-gather <-> reduce-scatter, all-to-all <-> the inverse all-to-all, ring send <-> ring
send of the gradient). Spec tensors are passed whole (their global values, the same on
every rank); the gradient a rank gets for a spec tensor is its own contribution, and their
sum over the group (``all_reduce``, as data parallelism does for any replicated parameter)
is the gradient of the sum of the ranks' losses.

:func:`ring_schedule`, :func:`pair_classes`, :func:`balance_report` and
:func:`simulate_ring` expose the ring's plan and run its per-rank arithmetic in one process
(no collectives), which the tests use for property tests over random masks.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import sympy as sp
import torch
import torch.distributed as dist

__all__ = ["context_parallel", "shard", "unshard", "chunk_ids", "ring_schedule", "pair_classes",
           "balance_report", "simulate_ring", "RingStats", "MODES", "LAYOUTS"]

MODES = ("allgather", "ulysses", "ring")
# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (same signatures)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
LAYOUTS = ("contiguous", "zigzag")
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- layouts
def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}")


def n_chunks(world: int, layout: str) -> int:
    """Number of sequence chunks of a layout over ``world`` ranks: ``W`` (contiguous) or ``2W`` (zigzag)."""
    _check_layout(layout)
    return world if layout == "contiguous" else 2 * world


def chunk_ids(rank: int, world: int, layout: str = "contiguous") -> tuple:
    """The sequence chunks rank ``rank`` of ``world`` holds, in the order its shard stores them:
    ``(rank,)`` for ``"contiguous"`` (chunks of ``L / W``), ``(rank, 2W - 1 - rank)`` for
    ``"zigzag"`` (chunks of ``L / (2W)``).

    Raises:
        ValueError: an unknown layout, or ``rank`` outside ``[0, world)``.
    """
    _check_layout(layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}) for a world of {world}; got {rank}")
    return (rank,) if layout == "contiguous" else (rank, 2 * world - 1 - rank)


def _layout_order(world: int, layout: str) -> list:
    """Chunk ids in the order a rank-ordered concatenation of all shards holds them."""
    return [c for r in range(world) for c in chunk_ids(r, world, layout)]


def _group_info(group) -> tuple:
    """``(rank, world)`` of ``group`` (None: the default group); a clear error when
    ``torch.distributed`` is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attncc.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def _seq_len(x: torch.Tensor, dim: int, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for {name} of shape {tuple(x.shape)}")
    return x.shape[dim]


def _reorder(x: torch.Tensor, dim: int, order: Sequence[int]) -> torch.Tensor:
    """Chunks of ``x`` along ``dim`` (``len(order)`` equal chunks) put in the order ``order``:
    chunk ``i`` of the result is chunk ``order[i]`` of ``x``."""
    if list(order) == sorted(order):
        return x
    parts = x.chunk(len(order), dim)
    return torch.cat([parts[i] for i in order], dim)


def _inverse(order: Sequence[int]) -> list:
    inv = [0] * len(order)
    for i, c in enumerate(order):
        inv[c] = i
    return inv


def shard(x: torch.Tensor, group=None, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """This rank's shard of a whole tensor (the same on every rank): the chunks
    :func:`chunk_ids` names, concatenated along ``dim``. No communication; differentiable (the
    gradient of ``x`` is the shard's gradient at the shard's positions, zeros elsewhere).

    Args:
        x: any tensor; ``x.shape[dim]`` (the sequence, or a grid pattern's first grid axis:
            ``dim=2`` of ``(B, H, Y, X, D)``) divisible by ``W`` (contiguous) or ``2W`` (zigzag).
        group: the process group (None: the default group).
        layout: ``"contiguous"`` or ``"zigzag"``.
        dim: the sequence dim (default 2, as in ``(B, H, L, D)``).

    Returns:
        ``x.shape`` with ``dim`` divided by ``W``.

    Raises:
        ValueError: unknown layout, ``dim`` out of range, length not divisible.
        RuntimeError: torch.distributed not initialised.
    """
    rank, world = _group_info(group)
    return _shard(x, rank, world, layout, dim)


def _shard(x, rank, world, layout, dim=2, name="x"):
    n = n_chunks(world, layout)
    L = _seq_len(x, dim, name)
    if L % n:
        raise ValueError(f"{name}.shape[{dim}] = {L} must be divisible by {n} ({layout} layout over {world} ranks)")
    parts = x.chunk(n, dim)
    return torch.cat([parts[c] for c in chunk_ids(rank, world, layout)], dim)


class _AllGather(torch.autograd.Function):
    """All-gather of sequence shards into the whole sequence in natural order
    (``all_gather_into_tensor``); backward: ``reduce_scatter_tensor`` of the gradient (sum over
    ranks), its transpose."""

    @staticmethod
    def forward(ctx, x, group, world, layout, dim):
        ctx.group, ctx.world, ctx.layout, ctx.dim = group, world, layout, dim
        xm = x.movedim(dim, 0).contiguous()
        out = xm.new_empty((world * xm.shape[0], *xm.shape[1:]))
        _all_gather(out, xm, group=group)
        out = _reorder(out, 0, _inverse(_layout_order(world, layout)))
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, g):
        gm = _reorder(g.movedim(ctx.dim, 0), 0, _layout_order(ctx.world, ctx.layout)).contiguous()
        out = gm.new_empty((gm.shape[0] // ctx.world, *gm.shape[1:]))
        _reduce_scatter(out, gm, group=ctx.group)
        return out.movedim(0, ctx.dim), None, None, None, None


def unshard(x: torch.Tensor, group=None, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """The whole tensor from every rank's shard (``all_gather_into_tensor``, chunks put back in
    sequence order): the inverse of :func:`shard`. Differentiable: the backward
    reduce-scatters (sums over ranks) the gradient, so each rank's loss may use the whole result.

    Args:
        x: this rank's shard (every rank's of one shape, dtype and device).
        group, layout, dim: as :func:`shard`.

    Returns:
        ``x.shape`` with ``dim`` multiplied by ``W``.

    Raises:
        ValueError: unknown layout or ``dim`` out of range; the shard length not divisible by
            2 (zigzag). RuntimeError: torch.distributed not initialised.
    """
    rank, world = _group_info(group)
    _check_layout(layout)
    L = _seq_len(x, dim, "x")
    if layout == "zigzag" and L % 2:
        raise ValueError(f"x.shape[{dim}] = {L}: a zigzag shard holds two equal chunks, its length must be even")
    return _AllGather.apply(x, group, world, layout, dim % x.dim())


# ----------------------------------------------------------------------------- ulysses
class _AllToAll(torch.autograd.Function):
    """``to_heads=True``: ``(B, H, Ls, R)`` sequence shards -> ``(B, H / W, L, R)`` head shards
    (natural sequence order) by one ``all_to_all_single``; ``False``: the inverse. The
    backward is the other direction applied to the gradient (its transpose)."""

    @staticmethod
    def forward(ctx, x, group, world, layout, to_heads):
        ctx.args = (group, world, layout)
        ctx.to_heads = to_heads
        return (_seq_to_head if to_heads else _head_to_seq)(x, group, world, layout)

    @staticmethod
    def backward(ctx, g):
        return (_head_to_seq if ctx.to_heads else _seq_to_head)(g, *ctx.args), None, None, None, None


def _seq_to_head(x, group, world, layout):
    B, H, Ls, R = x.shape
    inp = x.reshape(B, world, H // world, Ls, R).movedim(1, 0).contiguous()
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp, group=group)           # out[i]: rank i's shard of my heads
    out = out.permute(1, 2, 0, 3, 4).reshape(B, H // world, world * Ls, R)
    return _reorder(out, 2, _inverse(_layout_order(world, layout)))


def _head_to_seq(y, group, world, layout):
    B, Hw, L, R = y.shape
    y = _reorder(y, 2, _layout_order(world, layout))
    inp = y.reshape(B, Hw, world, L // world, R).permute(2, 0, 1, 3, 4).contiguous()
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp, group=group)           # out[i]: my shard of rank i's heads
    return out.movedim(0, 1).reshape(B, world * Hw, L // world, R)


def _ulysses_heads_ok(ir) -> Optional[str]:
    """Why a pattern cannot run on head shards (None: it can): ``h`` and ``H`` may only appear
    as the index of a tensor dim declared ``H`` (those dims are sliced by rank); anything else
    (e.g. ``2 ** (-8 * (h + 1) / H)`` written in the score) would see local head numbers."""
    from attncc import ir as I

    H, h = I.SIZES["H"], I.h
    exprs = [e for e in (ir.mask, ir.score, ir.sink, ir.gate, ir.coord_mask, ir.coord_score) if e is not None]
    decl = {t.name: t.shape for t in ir.tensors}
    for e in exprs:
        reps = {}
        for r in e.atoms(sp.Indexed):
            shape = decl.get(str(r.base))
            for i, ix in enumerate(r.indices):
                if shape is not None and i < len(shape) and shape[i] == H and ix != h:
                    return f"tensor {r.base}'s head dim is indexed by {ix}, not h"
            reps[r] = sp.Symbol(f"_read{len(reps)}")
        rest = e.xreplace(reps)
        if rest.has(h) or rest.has(H):
            return "its expressions use the head index h or H outside a tensor's head dim"
        for r in e.atoms(sp.Indexed):
            shape = decl.get(str(r.base))
            for i, ix in enumerate(r.indices):
                if (ix.has(h) or ix.has(H)) and not (shape is not None and i < len(shape) and shape[i] == H and ix == h):
                    return f"tensor {r.base} is indexed by {ix}, which uses the head index"
    for lr in ir.lowrank:
        for name, idx in ((lr.a, lr.a_idx), (lr.b, lr.b_idx)):
            shape = decl[name]
            for i, ix in enumerate(idx):
                if ix == h and shape[i] != H:
                    return f"dot() factor {name}'s dim {i} is indexed by h but declared {shape[i]}"
    return None


def _slice_heads(ir, tensors: dict, lo: int, n: int, lo_kv: int, n_kv: int) -> dict:
    """Spec tensors with every dim declared ``H`` narrowed to ``[lo, lo + n)`` and every dim
    declared ``Hkv`` to ``[lo_kv, lo_kv + n_kv)`` (differentiable views)."""
    from attncc import ir as I

    out = dict(tensors)
    for t in ir.tensors:
        x = tensors.get(t.name)
        if not isinstance(x, torch.Tensor):
            continue
        for d, s in enumerate(t.shape):
            if d >= x.dim():
                break
            if s == I.SIZES["H"]:
                x = x.narrow(d, lo, n)
            elif s == I.SIZES["Hkv"]:
                x = x.narrow(d, lo_kv, n_kv)
        out[t.name] = x
    return out


def _ulysses(kern, q, k, v, group, rank, world, layout, scale, return_lse, tensors):
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % world:
        raise ValueError(f"mode='ulysses' splits the query heads over the group: q has {Hq} heads, not divisible by "
                         f"the world size {world}; use mode='allgather' or 'ring'")
    why = _ulysses_heads_ok(kern.ir)
    if why:
        raise ValueError(f"mode='ulysses' runs each rank on a slice of the heads, but pattern {kern.ir.name!r} "
                         f"cannot be split by head: {why}; use mode='allgather' or 'ring'")
    hq = Hq // world
    if Hkv % world == 0:
        lo_kv, n_kv = rank * (Hkv // world), Hkv // world
    elif world % Hkv == 0:  # GQA with fewer KV heads than ranks: each rank needs one KV head
        rep = world // Hkv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        lo_kv, n_kv = rank // rep, 1
    else:
        raise ValueError(f"mode='ulysses' with GQA: k has {Hkv} heads, which neither the world size {world} divides "
                         f"nor divides it; use mode='allgather' or 'ring'")
    grid = q.shape[3:-1]
    flat = [x.reshape(*x.shape[:3], -1) for x in (q, k, v)]
    qh, kh, vh = (_AllToAll.apply(x, group, world, layout, True) for x in flat)
    qh, kh, vh = (y.reshape(*y.shape[:3], *grid, x.shape[-1]) for y, x in zip((qh, kh, vh), (q, k, v)))
    local = _slice_heads(kern.ir, tensors, rank * hq, hq, lo_kv, n_kv)
    out, lse = kern(qh, kh, vh, scale=scale, return_lse=True, **local)
    o = _AllToAll.apply(out.reshape(*out.shape[:3], -1), group, world, layout, False)
    o = o.reshape(*o.shape[:3], *grid, out.shape[-1])
    if not return_lse:
        return o
    l = _AllToAll.apply(lse.reshape(*lse.shape[:3], -1), group, world, layout, False).reshape(*o.shape[:-1])
    return o, l


# ----------------------------------------------------------------------------- positions
_POSITION_KEYWORDS = ("q_offset", "kv_offset", "q_total", "kv_total")


def supports_offsets(kern) -> bool:
    """Whether ``kern`` accepts global position offsets (``q_offset``, ``kv_offset``,
    ``q_total``, ``kv_total``), which ``"allgather"`` and ``"ring"`` need."""
    try:
        params = inspect.signature(kern.__call__).parameters
    except (TypeError, ValueError):
        return False
    return all(p in params for p in _POSITION_KEYWORDS)


def _require_offsets(kern, mode):
    if not supports_offsets(kern):
        raise NotImplementedError(
            f"mode={mode!r} runs the kernel on a part of the sequence at its global positions, which needs "
            f"the kernel keywords {', '.join(_POSITION_KEYWORDS)} (not in this attncc build); use mode='ulysses'")


def _kernel_pair(kern, scale, L, tensors):
    """The pair function of the real modes: ``fn(q_chunk, k_chunk, v_chunk, q_off, kv_off,
    **more_tensors)`` -> ``(out, lse)``, the kernel on a chunk pair at its global positions
    (``normalize: sigmoid`` patterns, which have no LSE: ``(out, None)``)."""
    if kern.ir.normalize == "sigmoid":
        def fn(qc, kc, vc, q_off, kv_off, **more):
            return kern(qc, kc, vc, scale=scale, q_offset=q_off, kv_offset=kv_off, q_total=L, kv_total=L,
                        **tensors, **more), None

        return fn

    def fn(qc, kc, vc, q_off, kv_off, **more):
        return kern(qc, kc, vc, scale=scale, return_lse=True, q_offset=q_off, kv_offset=kv_off, q_total=L,
                    kv_total=L, **tensors, **more)

    return fn


def _allgather(kern, q, k, v, group, rank, world, layout, scale, return_lse, tensors):
    _require_offsets(kern, "allgather")
    n = n_chunks(world, layout)
    c = q.shape[2] // len(chunk_ids(rank, world, layout))
    L = c * n
    kf, vf = _AllGather.apply(k, group, world, layout, 2), _AllGather.apply(v, group, world, layout, 2)
    pair = _kernel_pair(kern, scale, L, tensors)
    outs, lses = [], []
    for i, qi in enumerate(chunk_ids(rank, world, layout)):
        o, l = pair(q.narrow(2, i * c, c), kf, vf, qi * c, 0)
        outs.append(o)
        lses.append(l)
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- ring plan
def ring_schedule(world: int) -> list:
    """The ring's schedule: ``sched[r][s]`` is the rank whose K / V shard rank ``r`` holds at
    step ``s`` (``(r - s) mod W``: every step each rank sends its current shard to ``r + 1`` and
    receives from ``r - 1``). Over ``W`` steps every rank sees every shard once."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    return [[(r - s) % world for s in range(world)] for r in range(world)]


@dataclass
class PairClasses:
    """Classification of (query chunk, key chunk) pairs of a sequence cut into ``n`` chunks
    of ``chunk`` tokens: ``cls[i][j]`` is ``"empty"`` (no allowed pair: skipped, no launch),
    ``"full"`` (every pair allowed) or ``"partial"``; ``work[i][j]`` the pair's cost (key
    tiles visited by the kernel, or allowed (q, kv) pairs where ``unit == "pairs"``)."""

    chunk: int
    cls: list
    work: list
    unit: str
    source: str

    def count(self, kind: str) -> int:
        """Number of pairs of class ``kind`` (over the rows classified)."""
        return sum(row.count(kind) for row in self.cls if row is not None)


def pair_classes(kern, L: int, world: int, layout: str = "contiguous", *, B: int = 1, H: int = 1,
                 Hkv: Optional[int] = None, D: int = 16, Dv: Optional[int] = None, grid=None,
                 mask: Optional[torch.Tensor] = None, rows: Optional[Sequence[int]] = None,
                 **tensors) -> PairClasses:
    """Classify every (query chunk, key chunk) pair of a layout as empty / full / partial.

    With a kernel that takes position offsets, from ``kern.tile_stats(..., q_offset=,
    kv_offset=, q_total=, kv_total=)`` (the closed-form tile iteration, work in key tiles);
    otherwise, and always when ``mask`` is given, from the mask evaluated at chunk
    granularity (:func:`attncc.dense.tile_classes` with tiles of one chunk; work in allowed
    (q, kv) pairs). A pair is empty / full only when it is so for every (batch, head).

    Args:
        kern: a compiled pattern (may be None when ``mask`` is given).
        L: the whole sequence length (grid patterns: the number of tokens with ``mask``, else
            the rows of the first grid axis, which is sharded).
        world, layout: the group size and the layout (chunks of ``L / n_chunks``).
        B, H, Hkv, D, Dv, grid: the sizes the mask may depend on (``grid``: the whole grid;
            with a kernel that takes offsets, ``grid[0] == L``, chunks of whole rows).
        mask: optional bool ``(L, L)`` or ``(B, H, L, L)``: classify this mask instead.
        rows: classify only these query chunks with ``tile_stats`` (a ring rank needs its own
            rows only); the other rows are left ``None``.
        **tensors: the spec tensors the mask reads (their global values).

    Raises:
        ValueError: ``L`` not divisible by the number of chunks.
    """
    n = n_chunks(world, layout)
    if L % n:
        raise ValueError(f"L = {L} must be divisible by {n} ({layout} layout over {world} ranks)")
    c = L // n
    if mask is not None:
        m = mask if mask.dim() == 4 else mask[None, None]
        blk = m.reshape(*m.shape[:2], n, c, n, c)
        anyb = blk.any(5).any(3).any(1).any(0)
        allb = blk.all(5).all(3).all(1).all(0)
        cnt = blk.sum((5, 3)).amax((0, 1))
        return _classes(c, anyb, allb, cnt.tolist(), "pairs", "mask")
    Hkv = Hkv or H
    Dv = Dv or D
    if supports_offsets(kern) and not kern.ir.lowrank:
        rows = tuple(range(n)) if rows is None else tuple(rows)
        # grid patterns: chunks of rows of the first grid axis, w tokens each (attncc.grid_positions)
        w = math.prod(grid[1:]) if kern.ir.grid else 1
        if kern.ir.grid and (grid is None or grid[0] != L):
            raise ValueError(f"pair_classes of grid pattern {kern.ir.name!r}: grid= must be the whole grid with "
                             f"L = {L} rows on its first (sharded) axis, got {grid!r}")
        key = (L, world, layout, B, H, Hkv, D, Dv, rows, tuple(grid or ()))
        memo = kern.__dict__.setdefault("_cp_classes", {})
        static = not kern.plan.mask_tensors
        if static and key in memo:
            return memo[key]
        from .configs import Config

        # tiles that divide the chunk (a pair is full when all its tiles are; a tile crossing
        # the chunk's end is never full), else the kernel's CPU tiles (then nothing is "full")
        bs = next((b for b in (64, 32, 16) if c * w % b == 0), None)
        cfg = Config(bs, bs, 1, 1) if bs else None
        cls, work = [], []
        for i in range(n):
            if i not in rows:
                cls.append(None)
                work.append(None)
                continue
            crow, wrow = [], []
            for j in range(n):
                st = kern.tile_stats(c * w, c * w, B, H, Hkv, D, Dv, config=cfg, q_offset=i * c, kv_offset=j * c,
                                     q_total=L, kv_total=L, grid=(c, *grid[1:]) if kern.ir.grid else None,
                                     **{t: x for t, x in tensors.items() if t in kern.plan.mask_tensors})
                crow.append("empty" if st["visited"] == 0 else
                            "full" if bs and st["full"] == st["total"] else "partial")
                wrow.append(st["visited"])
            cls.append(crow)
            work.append(wrow)
        out = PairClasses(c, cls, work, "tiles", "tile_stats")
        if static:
            memo[key] = out
        return out
    from attncc import dense

    sizes = {"B": B, "H": H, "Hkv": Hkv, "Lq": L, "Lk": L, "D": D, "Dv": Dv}
    if grid is not None:
        from attncc.ir import grid_sizes

        sizes.update(grid_sizes(grid))
    named = {t.name: tensors[t.name] for t in kern.ir.tensors if t.name in tensors}
    nonempty, full = dense.tile_classes(kern.ir, sizes, named, c, c, "cpu", TB=B, TH=H, ragged_full=True)
    m = dense.dense_mask(kern.ir, sizes, named, "cpu")
    cnt = m.reshape(B, H, n, c, n, c).sum((5, 3)).amax((0, 1))
    return _classes(c, nonempty.any(1).any(0), full.all(1).all(0), cnt.tolist(), "pairs", "mask")


def _classes(c, anyb, allb, work, unit, source):
    n = anyb.shape[0]
    cls = [["empty" if not anyb[i, j] else "full" if allb[i, j] else "partial" for j in range(n)] for i in range(n)]
    return PairClasses(c, cls, work, unit, source)


def balance_report(classes: PairClasses, world: int, layout: str = "contiguous") -> dict:
    """Work per rank of a layout from a :func:`pair_classes` result: each rank's queries
    against every key chunk (what its ring steps or its all-gathered keys cost).

    Returns:
        ``{"per_rank": [work of rank 0, ...], "unit", "imbalance": max / mean (1.0 = perfect),
        "skipped": empty chunk pairs, "pairs": all chunk pairs}``.
    """
    per = []
    for r in range(world):
        per.append(sum(classes.work[i][j] for i in chunk_ids(r, world, layout) for j in range(len(classes.cls))))
    mean = sum(per) / world
    return {"per_rank": per, "unit": classes.unit, "imbalance": (max(per) / mean) if mean else 1.0,
            "skipped": classes.count("empty"), "pairs": len(classes.cls) ** 2}


# ----------------------------------------------------------------------------- ring
@dataclass
class RingStats:
    """What one rank's ring did: chunk pairs computed / skipped (empty), and which."""

    launched: int = 0
    skipped: int = 0
    pairs: list = field(default_factory=list)   # (q chunk, kv chunk, class) per pair seen


def _merge_into(acc, o, l):
    """Merge a partial state into a float32 accumulator ``[out, lse]`` (None at the start);
    ``l`` None (``normalize: sigmoid``, no row normalisation): the outputs add."""
    from .merge import merge_state

    if l is None:
        acc[0] = o.float() if acc[0] is None else acc[0] + o.float()
        return
    o, l = o.float(), l.float()
    if acc[0] is None:
        acc[0], acc[1] = o, l
    else:
        acc[0], acc[1] = merge_state(acc[0], acc[1], o, l)


def _ring_forward_step(pair, q_parts, q_ids, kv_parts, kv_ids, c, classes, accs, stats, tensors):
    """One ring step of one rank: every (query chunk, key chunk) pair of its queries and the
    key shard it holds, skipped when empty, else run and merged into ``accs``."""
    for a, (qi, qc) in enumerate(zip(q_ids, q_parts)):
        for kj, (kc, vc) in zip(kv_ids, kv_parts):
            kind = classes.cls[qi][kj]
            stats.pairs.append((qi, kj, kind))
            if kind == "empty":
                stats.skipped += 1
                continue
            stats.launched += 1
            o, l = pair(qc, kc, vc, qi * c, kj * c, **tensors)
            _merge_into(accs[a], o, l)


def _ring_backward_step(pair, q_parts, q_ids, kv_parts, kv_ids, c, classes, outs, lses, douts, dlses,
                        dq_parts, dkv_parts, tensors, want, tgrads):
    """The backward of :func:`_ring_forward_step`: each non-empty pair recomputed under
    autograd and differentiated with the gradient its partial state gets from the LSE merge
    (``d o_i = w_i dO``, ``d lse_i = w_i (dLSE + <dO, o_i - O>)``, ``w_i = exp(lse_i - LSE)``;
    exact, and 0 where a row's merged LSE is ``-inf``); dQ into ``dq_parts``, dK / dV into
    ``dkv_parts`` (the travelling accumulators), the gradients of the spec tensors named in
    ``want`` into ``tgrads``. A pair returning no LSE (sigmoid: the outputs add) is
    differentiated with ``dO`` itself."""
    for a, (qi, qc) in enumerate(zip(q_ids, q_parts)):
        O, LSE, dO, dL = outs[a], lses[a], douts[a], dlses[a]
        empty_row = torch.isneginf(LSE)
        for b_, (kj, (kc, vc)) in enumerate(zip(kv_ids, kv_parts)):
            if classes.cls[qi][kj] == "empty":
                continue
            with torch.enable_grad():
                qg, kg, vg = (x.detach().requires_grad_() for x in (qc, kc, vc))
                tens = {n: (t.detach().requires_grad_() if n in want else t) for n, t in tensors.items()}
                o, l = pair(qg, kg, vg, qi * c, kj * c, **tens)
            inputs = [qg, kg, vg] + [tens[n] for n in want]
            if l is None:  # sigmoid: the pairs' outputs add, each gets dO as it is
                grads = torch.autograd.grad([o], inputs, [dO.to(o.dtype)], allow_unused=True)
            else:
                w = torch.where(empty_row, 0.0, torch.exp(l.detach() - torch.where(empty_row, 0.0, LSE)))
                do = (w[..., None] * dO).to(o.dtype)
                diff = torch.where(w[..., None] > 0, o.detach().float() - O, 0.0)
                dl = w * (dL + (dO * diff).sum(-1))
                grads = torch.autograd.grad([o, l], inputs, [do, dl], allow_unused=True)
            dq_parts[a] += grads[0].float()
            dkv_parts[0][b_] += grads[1].float()
            dkv_parts[1][b_] += grads[2].float()
            for n, g in zip(want, grads[3:]):
                if g is not None:
                    tgrads[n] = g if tgrads.get(n) is None else tgrads[n] + g


def _split(x, parts):
    c = x.shape[2] // parts
    return [x.narrow(2, i * c, c) for i in range(parts)]


class _RingP2P:
    """One ring hop: send to ``rank + 1``, receive from ``rank - 1`` (``batch_isend_irecv``),
    started before a step's kernels and waited for after them."""

    def __init__(self, group, rank, world):
        self.group, self.rank, self.world = group, rank, world
        self.nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
        self.prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world

    def start(self, tensors):
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.nxt, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prv, self.group) for t in recv]
        reqs = dist.batch_isend_irecv(ops)
        return reqs, recv

    @staticmethod
    def wait(handle):
        reqs, recv = handle
        for r in reqs:
            r.wait()
        return recv


class _Ring(torch.autograd.Function):
    """Ring attention forward and backward over :class:`_RingP2P` hops (see the module doc).
    ``apply(run, q, k, v, *spec tensor values)`` -> ``(out, lse)``."""

    @staticmethod
    def forward(ctx, run, q, k, v, *tvals):
        ctx.run = run
        out, lse = run.forward(q, k, v, dict(zip(run.tnames, tvals)))
        ctx.save_for_backward(q, k, v, out, lse, *tvals)
        return out.to(run.out_dtype or q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        run = ctx.run
        q, k, v, out, lse, *tvals = ctx.saved_tensors
        tensors = dict(zip(run.tnames, tvals))
        want = [n for n, x in zip(run.tnames, ctx.needs_input_grad[4:]) if x]
        dq, dk, dv, tgrads = run.backward(q, k, v, out, lse, dout, dlse, tensors, want)
        return (None, dq, dk, dv, *[tgrads.get(n) for n in run.tnames])


@dataclass
class _RingRun:
    """One rank's ring: ``pair(q_chunk, k_chunk, v_chunk, q_offset, kv_offset, **tensors)`` runs
    one chunk pair (``(out, lse)``; ``(out, None)``: sigmoid, the pairs' outputs add); ``p2p`` moves shards (:class:`_RingP2P`, or :class:`_SimP2P` in
    :func:`simulate_ring`); ``stats`` is filled by the forward."""

    pair: Callable
    rank: int
    world: int
    layout: str
    classes: PairClasses
    p2p: object = None
    tnames: tuple = ()
    stats: RingStats = field(default_factory=RingStats)
    out_dtype: Optional[torch.dtype] = None   # of _Ring's output (None: q's; float32 before a sink merge)

    def forward(self, q, k, v, tensors):
        with torch.no_grad():
            q_ids = chunk_ids(self.rank, self.world, self.layout)
            c = self.classes.chunk
            q_parts = _split(q, len(q_ids))
            accs = [[None, None] for _ in q_ids]
            kv = [k, v]
            for s in range(self.world):
                src = (self.rank - s) % self.world
                handle = self.p2p.start(kv) if s < self.world - 1 else None   # overlaps this step's kernels
                kv_ids = chunk_ids(src, self.world, self.layout)
                kv_parts = list(zip(_split(kv[0], len(kv_ids)), _split(kv[1], len(kv_ids))))
                _ring_forward_step(self.pair, q_parts, q_ids, kv_parts, kv_ids, c, self.classes, accs, self.stats,
                                   tensors)
                if handle is not None:
                    kv = self.p2p.wait(handle)
            outs, lses = [], []
            for acc, qc in zip(accs, q_parts):
                # every key chunk empty for these queries: 0 and -inf (sigmoid, no LSE: -inf throughout)
                outs.append(acc[0] if acc[0] is not None else
                            qc.new_zeros((*qc.shape[:-1], v.shape[-1]), dtype=torch.float32))
                lses.append(acc[1] if acc[1] is not None else
                            torch.full(qc.shape[:-1], _NEG_INF, dtype=torch.float32, device=qc.device))
            return torch.cat(outs, 2), torch.cat(lses, 2)

    def backward(self, q, k, v, out, lse, dout, dlse, tensors, want=()):
        """dQ, dK, dV (this rank's shards) and the wanted spec tensors' gradients: K / V go
        around the ring again, each followed by its dK / dV accumulator; after ``W`` steps the
        accumulators take one more hop, to their owners."""
        q_ids = chunk_ids(self.rank, self.world, self.layout)
        c = self.classes.chunk
        nq = len(q_ids)
        dout = torch.zeros_like(out) if dout is None else dout.float()
        dlse = torch.zeros_like(lse) if dlse is None else dlse.float()
        dq_parts = [torch.zeros(p.shape, dtype=torch.float32, device=q.device) for p in _split(q, nq)]
        state = (_split(q, nq), q_ids, _split(out, nq), list(lse.chunk(nq, 2)), _split(dout, nq),
                 list(dlse.chunk(nq, 2)), dq_parts)
        tgrads: dict = {}
        kv = [k, v, torch.zeros(k.shape, dtype=torch.float32, device=k.device),
              torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
        for s in range(self.world):
            src = (self.rank - s) % self.world
            handle = self.p2p.start(kv[:2]) if s < self.world - 1 else None
            self.backward_step(state, kv, src, tensors, want, tgrads)
            if self.p2p is not None:  # the accumulators go to the next rank (after the last step: home)
                dkv = self.p2p.wait(self.p2p.start(kv[2:]))
                kv = (self.p2p.wait(handle) if handle is not None else kv[:2]) + dkv
        return torch.cat(dq_parts, 2).to(q.dtype), kv[2].to(k.dtype), kv[3].to(v.dtype), tgrads

    def backward_step(self, state, kv, src, tensors, want, tgrads):
        """One step of :meth:`backward`: the pairs of this rank's queries and the shard of
        ``src`` (``kv``: its K, V and their dK / dV accumulators, updated in place)."""
        kv_ids = chunk_ids(src, self.world, self.layout)
        nk = len(kv_ids)
        kv_parts = list(zip(_split(kv[0], nk), _split(kv[1], nk)))
        dkv_parts = [_split(kv[2], nk), _split(kv[3], nk)]
        _ring_backward_step(self.pair, *state[:2], kv_parts, kv_ids, self.classes.chunk, self.classes, *state[2:],
                            dkv_parts, tensors, want, tgrads)


def _check_ring_pattern(kern, mode, return_lse):
    ir = kern.ir
    if ir.normalize == "sigmoid" and return_lse:
        raise ValueError(f"mode={mode!r}: pattern {ir.name!r} uses normalize: sigmoid, which has no log-sum-exp: "
                         f"call with return_lse=False")


def _sink_free(kern):
    """The sink-free twin of ``kern`` (``sink: None``, the same mask, score, gate, tensors and
    config; built once, cached on ``kern``): the ring runs its pairs with it and adds the sink
    once per row after the LSE merge (:func:`_add_sink`)."""
    import dataclasses

    return kern.twin(("sink_free",), lambda ir: dataclasses.replace(ir, sink=None))


def _sink_rows(ir, tensors, B, H, Hkv, D, Dv, L, grid):
    """float32 sink logits ``(B, H, L)`` (grid patterns: ``(B, H, prod(grid))``, flattened
    row-major) of every query at its global position: :func:`attncc.dense.sink_values` over the
    whole sequence, differentiable in the spec tensors; the tensors' shapes and the sink's
    reads checked first (TypeError / ValueError naming the tensor)."""
    from attncc import dense
    from attncc.checks import check_tensors

    sizes = {"B": B, "H": H, "Hkv": Hkv, "Lq": L, "Lk": L, "D": D, "Dv": Dv}
    if grid:
        from attncc.ir import grid_sizes

        sizes.update(grid_sizes(grid))
        sizes["Lq"] = sizes["Lk"] = math.prod(grid)
    device = next((t.device for t in tensors.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    named = check_tensors(ir, tensors, sizes, device)
    dense.check_clause_reads(ir, sizes, named, device, clauses=("sink",))
    return dense.sink_values(ir, named, sizes, device, float_dtype=torch.float32)


def _add_sink(out, lse, sink):
    """The sink merged once into a row's state: the partial state (output 0, LSE ``sink``)
    merged by :func:`attncc.merge_state` (differentiable: ``d sink = (dLSE - <dO, out>) p_sink``
    with ``p_sink = exp(sink - LSE)``, the single-process kernel's sink gradient)."""
    from .merge import merge_state

    return merge_state(out, lse, torch.zeros_like(out), sink.reshape(lse.shape).float())


def _ring(kern, q, k, v, group, rank, world, layout, scale, return_lse, tensors):
    _require_offsets(kern, "ring")
    _check_ring_pattern(kern, "ring", return_lse)
    n = n_chunks(world, layout)
    L = q.shape[2] // len(chunk_ids(rank, world, layout)) * n
    grid = (L, *q.shape[3:-1]) if kern.ir.grid else None
    classes = pair_classes(kern, L, world, layout, B=q.shape[0], H=q.shape[1], Hkv=k.shape[1], D=q.shape[-1],
                           Dv=v.shape[-1], grid=grid, rows=chunk_ids(rank, world, layout), **tensors)
    sink = None
    if kern.ir.sink is not None:  # evaluated (and its reads checked) before any launch or collective
        rows = _sink_rows(kern.ir, tensors, q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], L, grid)
        sink = _shard(rows.reshape(*rows.shape[:2], *grid) if grid else rows, rank, world, layout)
        kern = _sink_free(kern)
    tnames = tuple(n_ for n_, t in tensors.items() if isinstance(t, torch.Tensor))
    rest = {n_: t for n_, t in tensors.items() if n_ not in tnames}
    run = _RingRun(_kernel_pair(kern, scale, L, rest), rank, world, layout, classes,
                   _RingP2P(group, rank, world) if world > 1 else None, tnames,
                   out_dtype=torch.float32 if sink is not None else None)
    out, lse = _Ring.apply(run, q, k, v, *[tensors[n_] for n_ in tnames])
    if sink is not None:
        out, lse = _add_sink(out, lse, sink)
        out = out.to(q.dtype)
    context_parallel.last_stats = run.stats
    return (out, lse) if return_lse else out


def simulate_ring(pair: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world: int,
                  layout: str = "contiguous", classes: Optional[PairClasses] = None, grads=None, *,
                  normalize: str = "softmax", sink: Optional[torch.Tensor] = None):
    """The ring of :func:`context_parallel` for every rank in one process (no collectives):
    each rank's shard of the whole ``q``, ``k``, ``v``, its steps in :func:`ring_schedule`
    order, pair skipping and the float32 LSE merge (or the sum, for sigmoid pairs), then the
    sink merged once per row, exactly the per-rank code the real ring runs; K / V "arrive" by
    indexing instead of P2P.

    Args:
        pair: ``pair(q_chunk, k_chunk, v_chunk, q_offset, kv_offset) -> (out, lse)``: attention of
            a chunk pair at its global positions (the kernel, or a reference); ``(out, None)``
            with ``normalize="sigmoid"``.
        q, k, v: the whole tensors ``(B, H, L, D)`` / ``(B, Hkv, L, D)`` / ``(B, Hkv, L, Dv)``.
        world, layout: the simulated group and layout.
        classes: pair classes (default: every pair ``"partial"``, nothing skipped).
        grads: optional ``(dout, dlse)`` of the whole output (``dlse`` may be None): also run the
            ring's backward (its dK / dV accumulators passed around as the real ring passes them).
        normalize: ``"softmax"`` (pairs merged by their LSE) or ``"sigmoid"`` (no LSE: the
            pairs' outputs add; the returned LSE is None and ``dlse`` is ignored).
        sink: optional float32 ``(B, H, L)`` sink logits of every row (a ``sink:`` pattern's;
            the pairs then run without it): merged once per row after the pairs, as a state of
            output 0 and LSE ``sink`` (:func:`attncc.merge_state`).

    Returns:
        ``(out, lse, stats)`` with ``out`` / ``lse`` unsharded (sequence order) and ``stats`` a
        list of :class:`RingStats` per rank; with ``grads`` also ``(dq, dk, dv)``, and with
        ``sink`` ``(dq, dk, dv, dsink)`` (``dsink`` float32 ``(B, H, L)``).

    Raises:
        ValueError: ``L`` not divisible by the number of chunks, an unknown ``normalize``, a
            sink with sigmoid, a sink not ``(B, H, L)``.
    """
    n = n_chunks(world, layout)
    L = q.shape[2]
    if L % n:
        raise ValueError(f"q.shape[2] = {L} must be divisible by {n} ({layout} layout over {world} ranks)")
    if normalize not in ("softmax", "sigmoid"):
        raise ValueError(f"normalize must be 'softmax' or 'sigmoid'; got {normalize!r}")
    if sink is not None and normalize == "sigmoid":
        raise ValueError("sink= needs normalize='softmax' (a sink joins the softmax denominator)")
    if sink is not None and tuple(sink.shape) != (q.shape[0], q.shape[1], L):
        raise ValueError(f"sink must be the sink logits (B, H, L) = {(q.shape[0], q.shape[1], L)}, got "
                         f"{tuple(sink.shape)}")
    if classes is None:
        classes = PairClasses(L // n, [["partial"] * n for _ in range(n)], [[1] * n for _ in range(n)], "pairs",
                              "none")
    runs = [_RingRun(pair, r, world, layout, classes, None) for r in range(world)]
    qs, ks, vs = ([_shard(x, r, world, layout) for r in range(world)] for x in (q, k, v))
    outs, lses, finals = [], [], []
    for r, run in enumerate(runs):
        run.p2p = _SimP2P(r, world, [ks, vs])
        o, l = run.forward(qs[r], ks[r], vs[r], {})
        outs.append(o)
        lses.append(l)
        if sink is not None:  # the final merge under autograd, as the real ring's (its backward below)
            with torch.enable_grad():
                st = [x.detach().requires_grad_() for x in (o, l, _shard(sink, r, world, layout).float())]
                finals.append((st, _add_sink(*st)))
    order = _inverse(_layout_order(world, layout))

    def whole(parts):
        return _reorder(torch.cat(parts, 2), 2, order)

    additive = normalize == "sigmoid"
    res = [f[1] for f in finals] if sink is not None else list(zip(outs, lses))
    out = whole([o.detach() for o, _ in res]).to(q.dtype)
    lse = None if additive else whole([l.detach() for _, l in res])
    stats = [r.stats for r in runs]
    if grads is None:
        return out, lse, stats
    dout, dlse = grads
    douts = [_shard(dout, r, world, layout).float() for r in range(world)]
    dlses = [torch.zeros_like(l) if dlse is None or additive else _shard(dlse, r, world, layout).float()
             for r, l in enumerate(lses)]
    dsinks = []
    if sink is not None:  # d out / d lse of the ring's own state, and d sink, from the final merge
        for r, (st, fo) in enumerate(finals):
            g = torch.autograd.grad(fo, st, [douts[r], dlses[r]], allow_unused=True)
            douts[r], dlses[r] = g[0], g[1]
            dsinks.append(g[2])
    per_rank = _simulate_backward(runs, qs, ks, vs, outs, lses, douts, dlses)
    dq, dk, dv = (whole([g[i] for g in per_rank]).to(x.dtype) for i, x in enumerate((q, k, v)))
    return out, lse, stats, ((dq, dk, dv, whole(dsinks)) if sink is not None else (dq, dk, dv))


class _SimP2P:
    """Stand-in for :class:`_RingP2P` in :func:`simulate_ring`'s forward: the shard that would
    arrive is read from the list of all shards (every rank runs its steps in order)."""

    def __init__(self, rank, world, shards):
        self.rank, self.world, self.shards, self.step = rank, world, shards, 0

    def start(self, tensors):
        self.step += 1
        src = (self.rank - self.step) % self.world
        return [s[src] for s in self.shards]

    @staticmethod
    def wait(handle):
        return handle


def _simulate_backward(runs, qs, ks, vs, outs, lses, douts, dlses):
    """All ranks' ring backward in lockstep (:meth:`_RingRun.backward_step`): at step ``s``
    rank ``r`` holds the shard of ``(r - s) mod W`` with the dK / dV accumulator rank ``r - 1``
    passed on; after the last step each accumulator takes one more hop, to its owner.
    Returns per rank ``(dq, dk, dv)`` (float32)."""
    world = len(runs)
    layout = runs[0].layout
    states, held = [], []
    for r in range(world):
        nq = len(chunk_ids(r, world, layout))
        dq_parts = [torch.zeros(p.shape, dtype=torch.float32) for p in _split(qs[r], nq)]
        states.append((_split(qs[r], nq), chunk_ids(r, world, layout), _split(outs[r], nq),
                       list(lses[r].chunk(nq, 2)), _split(douts[r].float(), nq), list(dlses[r].float().chunk(nq, 2)),
                       dq_parts))
        held.append([ks[r], vs[r], torch.zeros(ks[r].shape), torch.zeros(vs[r].shape)])
    for s in range(world):
        for r, run in enumerate(runs):
            run.backward_step(states[r], held[r], (r - s) % world, {}, (), {})
        held = [held[(r - 1) % world] for r in range(world)]  # one hop: r receives from r - 1
    return [(torch.cat(states[r][6], 2), held[r][2], held[r][3]) for r in range(world)]


# ----------------------------------------------------------------------------- entry
def context_parallel(kern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
                     mode: str = "allgather", layout: str = "contiguous", return_lse: bool = False,
                     scale: Optional[float] = None, **tensors):
    """Attention of a compiled pattern over a sequence sharded across a process group.

    Args:
        kern: an :func:`attncc.compile` result (a :class:`~attncc.runtime.CompiledAttention`).
        q: this rank's query shard ``(B, Hq, L / W, D)``; k: ``(B, Hkv, L / W, D)``;
            v: ``(B, Hkv, L / W, Dv)`` (grid patterns ``(B, H, Y / W, X, D)``: the first grid
            axis sharded), in ``layout`` (:func:`shard` makes them); the same shapes on every
            rank. Float32 / float16 / bfloat16, one device.
        group: the ``torch.distributed`` process group (None: the default group).
        mode: ``"ulysses"`` (all-to-all to head shards; ``Hq`` divisible by ``W``, GQA with
            ``Hkv`` divisible by ``W`` or dividing ``W``), ``"allgather"`` (K / V gathered,
            local queries at their global positions) or ``"ring"`` (K / V passed around, LSE
            merge, empty pairs skipped). See the module doc.
        layout: ``"contiguous"`` or ``"zigzag"`` (rank r holds chunks r and 2W - 1 - r).
        return_lse: also return this rank's LSE shard ``(B, Hq, L / W)`` float32.
        scale: score scale (default ``1 / sqrt(D)``).
        **tensors: the pattern's spec tensors, whole (global values, the same on every rank),
            e.g. ALiBi's ``slope`` ``(H,)`` or a document id vector ``(L,)``.

    Returns:
        This rank's output shard ``(B, Hq, L / W, Dv)`` in ``q.dtype`` (and the LSE shard).
        Rows with no allowed key: 0 and LSE ``-inf``. After a ``"ring"`` call
        ``context_parallel.last_stats`` is this rank's :class:`RingStats` (pairs launched
        and skipped).

    Raises:
        ValueError / TypeError: unknown mode or layout, shapes not those of a shard, heads not
            divisible (ulysses), patterns a mode cannot split (see the messages), all before
            any collective or launch.
        NotImplementedError: ``allgather`` / ``ring`` on a kernel without position offsets.
        RuntimeError: torch.distributed not initialised.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    _check_layout(layout)
    rank, world = _group_info(group)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"context_parallel: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 4:
            raise ValueError(f"context_parallel: {name} must be (B, H, L / W, D) (grid: (B, H, Y / W, ..., D)), "
                             f"got shape {tuple(x.shape)}")
    if q.shape[2:-1] != k.shape[2:-1] or k.shape[2:-1] != v.shape[2:-1]:
        raise ValueError(f"context_parallel: q, k, v must hold the same sequence shard (self-attention): got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"context_parallel: a zigzag shard holds two equal chunks: q.shape[2] = {q.shape[2]} "
                         f"must be even")
    for bad in ("block_mask", "kv_index"):
        if bad in tensors:
            raise ValueError(f"context_parallel: {bad}= is not supported (the run-time block lists index the "
                             f"whole sequence)")
    if kern.ir.route is not None and mode != "ulysses":
        raise ValueError(f"context_parallel: pattern {kern.ir.name!r} routes per call (route: clause) from the "
                         f"whole q and k; use mode='ulysses'")
    if mode != "ulysses" and kern.ir.lowrank:
        raise NotImplementedError(f"context_parallel: mode={mode!r} runs the kernel at global position offsets, "
                                  f"which a pattern with dot() terms ({kern.ir.name!r}) does not take yet; use "
                                  f"mode='ulysses'")
    if mode != "ulysses" and kern.ir.grid and q.dim() != 3 + len(kern.ir.grid):
        raise ValueError(f"context_parallel: pattern {kern.ir.name!r} has a {len(kern.ir.grid)}-D grid: q, k, v must "
                         f"be (B, H, {', '.join(a.upper() for a in kern.ir.grid)}, D) with the first grid axis "
                         f"sharded, got q {tuple(q.shape)}")
    if world == 1 and mode == "ulysses":
        return kern(q, k, v, scale=scale, return_lse=return_lse, **tensors)
    fn = {"ulysses": _ulysses, "allgather": _allgather, "ring": _ring}[mode]
    return fn(kern, q, k, v, group, rank, world, layout, scale, return_lse, tensors)


context_parallel.last_stats = None
