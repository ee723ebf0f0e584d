"""Paged KV caches (issue 16, section 2): ``kern(q, k_cache, v_cache, block_table=bt, kv_lens=lens)``,
the vLLM / FlashAttention (``flash_attn_with_kvcache``) layout.

* ``k_cache`` ``(num_pages, page_size, Hkv, D)``, ``v_cache`` ``(num_pages, page_size, Hkv, Dv)``
  (any strides, the last dimension contiguous or not);
* ``block_table`` int32 ``(B, max_pages)``: logical key ``j`` of batch row ``b`` is slot
  ``j % page_size`` of page ``block_table[b, j // page_size]``;
* ``kv_lens`` int32 ``(B,)`` (required), at most ``max_pages * page_size``: batch row ``b`` has
  ``kv_lens[b]`` keys; query positions bottom-right by default (``kv_lens[b] - Lq + i``), as a
  contiguous call with ``kv_lens``.

The pattern runs as its ragged positions twin (:func:`attncc.ir.with_positions`, so every
static mask keeps its closed-form key ranges and tiles past ``kv_lens`` are skipped), rendered
with the paged flag (``templates/paged.j2``): in the forward (prefill) and the split-KV decode
kernels the key tile's rows are translated through the page table before each K / V load (one
lookup per tile when the page size is a multiple of the key tile ``BLOCK_N``, else one per key);
every program's key count is its row's ``kv_lens[b]``, so no page past a row's pages is read.
Any page size >= 1 works; 16 .. 256 (powers of two) are the ones measured. Forward only.

On CPU with the torch executor (no Triton kernel runs) the cache is gathered and the contiguous
call with ``kv_lens`` computes the same result.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from attncc.layout import identity_layout

from . import cache
from .configs import CPU_CONFIG, forward_candidates

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class PagedCache:
    """A checked paged call: ``num_pages``, ``page_size``, ``Hkv``, ``D``, ``Dv``, ``max_pages``
    and the logical capacity ``max_pages * page_size`` of every batch row."""

    num_pages: int
    page_size: int
    Hkv: int
    D: int
    Dv: int
    max_pages: int

    @property
    def capacity(self) -> int:
        return self.max_pages * self.page_size


def check_paged(q: torch.Tensor, k_cache, v_cache, block_table, kv_lens) -> PagedCache:
    """Check a paged call's arguments (before any launch).

    Args:
        q: ``(B, Hq, Lq, D)``; k_cache ``(num_pages, page_size, Hkv, D)``; v_cache
            ``(num_pages, page_size, Hkv, Dv)`` of q's dtype and device; block_table int32
            ``(B, max_pages)``; kv_lens int32 ``(B,)`` in ``[0, max_pages * page_size]``.

    Raises:
        TypeError / ValueError naming the argument: wrong rank, layout, dtype or device;
            ``kv_lens`` missing, outside ``[0, max_pages * page_size]``; a page index of a page
            in use (``j < ceil(kv_lens[b] / page_size)``) outside ``[0, num_pages)``. The
            value checks read the tensors on the host (one synchronisation).
    """
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, Hq, Lq, D) with a paged KV cache, got shape {tuple(q.shape)}")
    B, Hq, Lq, D = q.shape
    for name, x, last in (("k_cache", k_cache, "D"), ("v_cache", v_cache, "Dv")):
        if x.dim() != 4:
            raise ValueError(f"{name} must be (num_pages, page_size, Hkv, {last}) (the vLLM / FlashAttention paged "
                             f"layout), got shape {tuple(x.shape)}")
        if x.dtype != q.dtype or x.dtype not in _FLOATS:
            raise ValueError(f"{name} must have q's dtype ({str(q.dtype).replace('torch.', '')}; float16 / bfloat16 "
                             f"/ float32), got {str(x.dtype).replace('torch.', '')}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    P, S, Hkv, Dk = k_cache.shape
    if tuple(v_cache.shape[:3]) != (P, S, Hkv):
        raise ValueError(f"v_cache must be (num_pages, page_size, Hkv, Dv) = ({P}, {S}, {Hkv}, Dv) like k_cache, got "
                         f"shape {tuple(v_cache.shape)}")
    if Dk != D:
        raise ValueError(f"k_cache's head dim {Dk} differs from q's {D}: k_cache must be (num_pages, page_size, Hkv, D)")
    if P < 1 or S < 1 or Hkv < 1:
        raise ValueError(f"k_cache must have num_pages, page_size, Hkv >= 1, got shape {tuple(k_cache.shape)}")
    if Hq % Hkv:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of the cache's KV heads ({Hkv})")
    bt = block_table
    if bt.dtype not in (torch.int32, torch.int64) or bt.dim() != 2 or bt.shape[0] != B or bt.shape[1] < 1:
        raise ValueError(f"block_table must be an int32 tensor (B, max_pages) with B = {B}, got dtype "
                         f"{str(bt.dtype).replace('torch.', '')} shape {tuple(bt.shape)}")
    if bt.device != q.device:
        raise ValueError(f"block_table is on {bt.device} but q is on {q.device}")
    cap = bt.shape[1] * S
    if kv_lens is None:
        raise ValueError("kv_lens is required with block_table: an int32 tensor (B,) of each batch row's keys")
    if not isinstance(kv_lens, torch.Tensor) or kv_lens.dtype not in (torch.int32, torch.int64) \
            or tuple(kv_lens.shape) != (B,):
        raise ValueError(f"kv_lens must be an int32 tensor of shape (B,) = ({B},), got "
                         f"{tuple(kv_lens.shape) if isinstance(kv_lens, torch.Tensor) else type(kv_lens).__name__}")
    if kv_lens.device != q.device:
        raise ValueError(f"kv_lens is on {kv_lens.device} but q is on {q.device}")
    if not torch.compiler.is_compiling() and q.device.type != "meta":
        lens = kv_lens.to(torch.int64)
        bad = (lens < 0) | (lens > cap)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"kv_lens[{i}] = {int(lens[i])} is outside [0, max_pages * page_size] = [0, {cap}] "
                             f"(block_table has {bt.shape[1]} pages of {S} slots per batch row)")
        used = torch.arange(bt.shape[1], device=bt.device)[None, :] < ((lens + S - 1) // S)[:, None]
        bad = used & ((bt < 0) | (bt >= P))
        if bool(bad.any()):
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {j}] = {int(bt[b, j])} is outside [0, num_pages) = [0, {P}]: "
                             f"page {j} of batch row {b} is in use (kv_lens[{b}] = {int(lens[b])}, page_size {S})")
    return PagedCache(P, S, Hkv, D, v_cache.shape[3], bt.shape[1])


def gather_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 kv_lens: Optional[torch.Tensor] = None) -> tuple:
    """The contiguous caches a page table describes: ``(k, v)`` of shapes ``(B, Hkv,
    max_pages * page_size, D)`` / ``(..., Dv)``, key ``j`` of row ``b`` from slot ``j %
    page_size`` of page ``block_table[b, j // page_size]`` (page indices outside ``[0,
    num_pages)`` read page 0: such slots are past ``kv_lens`` in a checked call). With
    ``kv_lens`` (int ``(B,)``), keys ``j >= kv_lens[b]`` are 0 (the kernels never read those
    slots, which may hold anything, NaN included)."""
    P, S = k_cache.shape[:2]
    bt = block_table.long()
    bt = torch.where((bt >= 0) & (bt < P), bt, torch.zeros_like(bt))
    keep = None
    if kv_lens is not None:
        keep = (torch.arange(bt.shape[1] * S, device=bt.device)[None, :] < kv_lens.to(bt.device)[:, None].long())

    def one(c):
        g = c[bt].flatten(1, 2)  # (B, max_pages * page_size, Hkv, D)
        if keep is not None:
            g = torch.where(keep[:, :, None, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
        return g.transpose(1, 2)

    return one(k_cache), one(v_cache)


def paged_twin(kern):
    """The paged kernel of ``kern`` (a ragged positions twin): the same plan rendered with the
    paged flag, compiled once and kept on ``kern``."""
    twin = kern.__dict__.get("_paged_twin")
    if twin is None:
        from attncc.compiler import build

        twin = kern.__dict__["_paged_twin"] = build(kern.plan, kern.config, kern.deterministic, kern.backend,
                                                    paged=True)
    return twin


def paged_attention(kern, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    kv_lens: torch.Tensor, scale: Optional[float] = None, return_lse: bool = False,
                    decode: Optional[bool] = None, num_splits: Optional[int] = None, q_offset=None, kv_offset=None,
                    q_total=None, kv_total=None, block_mask=None, **tensors):
    """Attention of ``kern``'s pattern over a paged KV cache (see the module docstring):
    the result of ``kern(q, k, v, kv_lens=kv_lens, ...)`` on the gathered cache
    (:func:`gather_cache`), forward only.

    Args:
        kern: a :class:`attncc.runtime.CompiledAttention` of a 1-D pattern.
        q: ``(B, Hq, Lq, D)``; k_cache / v_cache / block_table / kv_lens: see
            :func:`check_paged`. scale / return_lse / spec tensors: as the forward.
        decode: ``True``: the split-KV decode kernel; ``False``: the forward (prefill)
            kernel; ``None``: decode when ``Lq <= 16``.
        num_splits: the decode kernel's split count (default: from the work and the device).
        q_offset / kv_offset / q_total / kv_total: the positions keywords, as with a
            contiguous cache (default bottom-right query positions).
        block_mask: optional run-time block sparsity (:class:`attncc.BlockSparse` or a
            FlexAttention ``BlockMask``) over the logical cache: key block ``j`` covers the
            cache's keys ``[j * BK, (j + 1) * BK)`` of each row (routed pages, e.g. the lists
            of :func:`attncc.topk_blocks` on the gathered keys); as ``kern(q, k, v,
            block_mask=..., kv_lens=...)`` on the gathered cache.

    Returns:
        ``out`` ``(B, Hq, Lq, Dv)`` in q's dtype (and ``lse`` ``(B, Hq, Lq)`` float32). A row with
        ``kv_lens[b] == 0``: 0 and LSE ``-inf``.

    Raises:
        NotImplementedError: an input requires grad (paged caches are forward only), a grid
            pattern, ``dot()`` terms or a ``route:`` clause (as the positions keywords).
        TypeError / ValueError: see :func:`check_paged` and the forward's checks, before any launch.
    """
    pc = check_paged(q, k_cache, v_cache, block_table, kv_lens)
    from .decode import requiring_grad

    grads = requiring_grad(q=q, k_cache=k_cache, v_cache=v_cache, **tensors)
    if grads:
        raise NotImplementedError(f"block_table (paged KV cache) is forward only, but {', '.join(grads)} require grad: "
                                  "call under torch.no_grad() / with detached inputs, or gather the cache "
                                  "(attncc.runtime.paged.gather_cache) and call with kv_lens")
    B, Hq, Lq, _ = q.shape
    # stand-ins of the logical contiguous caches (B, Hkv, capacity, D): shapes for the checks only
    kf = torch.empty((), dtype=q.dtype, device=q.device).expand(B, pc.Hkv, pc.capacity, pc.D)
    vf = torch.empty((), dtype=q.dtype, device=q.device).expand(B, pc.Hkv, pc.capacity, pc.Dv)
    if kern._torch_cpu(q.device):  # the torch executor: the gathered cache, the contiguous call
        k, v = gather_cache(k_cache, v_cache, block_table, kv_lens)
        return kern(q, k, v, scale=scale, return_lse=return_lse, kv_lens=kv_lens, q_offset=q_offset,
                    kv_offset=kv_offset, q_total=q_total, kv_total=kv_total, decode=False, block_mask=block_mask,
                    **tensors)
    from attncc.ir import BLOCK_TENSOR, POS_TENSOR

    twin, pos = kern.with_positions(q, kf, q_offset=q_offset, kv_offset=kv_offset, kv_lens=kv_lens, q_total=q_total,
                                    kv_total=kv_total)
    tensors = {**tensors, POS_TENSOR: pos}
    if block_mask is not None:  # the block-mask twin of the positions twin (routed pages)
        twin, tensors[BLOCK_TENSOR] = twin.with_blocks(block_mask, q, kf)
    pk = paged_twin(twin)
    bt = block_table.to(torch.int32).contiguous()
    kvl = kv_lens.to(torch.int32).contiguous()
    paged = (bt, kvl, pc.page_size)
    if decode is None:
        from .decode import MAX_AUTO_LQ

        decode = Lq <= MAX_AUTO_LQ
    q2, _, _, cplan, targs, lowrank = pk._plan_call(q, kf, vf, scale, return_lse, tensors)
    if decode:
        from .decode import _decode_plan, launch_decode
        from .kernel import _sizes

        if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
            raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
        dplan = _decode_plan(pk, q2, kf, vf, _sizes(q2, kf, vf), targs, lowrank, num_splits)
        out, lse = launch_decode(pk, dplan, q2, k_cache, v_cache, targs, cplan.scale, lowrank, paged=paged)
    else:
        out, lse = _launch_forward(pk, q2, k_cache, v_cache, kf, vf, targs, cplan.scale, paged)
    return (out, lse) if return_lse else out


def page_strides(c: torch.Tensor) -> tuple:
    """The kernel's ``(stride_b, stride_h, stride_n, stride_d)`` arguments of a paged cache
    ``(num_pages, page_size, H, D)``: page stride, head stride, slot stride, element stride."""
    s = c.stride()
    return (s[0], s[2], s[1], s[3])


def paged_candidates(head_dim: int, arch: int, dtype=None) -> tuple:
    """The paged forward's candidate configs: :func:`~attncc.runtime.configs.forward_candidates`
    without TMA / warp specialisation (the tile's key rows are gathered through the page
    table, which a tensor descriptor over the cache cannot follow)."""
    return tuple(c for c in forward_candidates(head_dim, arch, dtype) if not c.tma and not c.ws)


def forward_config(pk, head_dim: int, device, dtype):
    """The paged forward's untimed launch config of the paged kernel ``pk``: the CPU config
    under the interpreter, else the first of its launch candidates
    (:meth:`~attncc.runtime.CompiledAttention.launch_candidates` of :func:`paged_candidates`:
    block-read plans, e.g. routed pages, keep the tiles that do not spill). On CUDA the
    launch takes the autotuned one instead (:func:`_launch_forward`)."""
    if cache.interpreting():
        return CPU_CONFIG
    from .kernel import _arch

    arch = _arch(device) if torch.device(device).type == "cuda" else 90
    return pk.launch_candidates(paged_candidates, head_dim, arch, dtype)[0]


def _launch_forward(pk, q, k_cache, v_cache, kf, vf, targs: list, scale: float, paged: tuple) -> tuple:
    """Launch the paged ``attn_fwd`` (one program per (query tile, batch * head), as the
    forward) at ``pk.config``, else on CUDA at the fastest of its spill-free
    :func:`paged_candidates` for the shape bucket (timed on the call's own inputs and page
    table, remembered as the forward's choices: ``autotune.json``, family ``fwd:paged<page
    size>``), else at :func:`forward_config`. Returns ``(out, lse)``."""
    from . import decode
    from .kernel import _sizes

    sizes = _sizes(q, kf, vf)
    cfg = pk.config
    if cfg is None and decode._tunes(q.device):
        cfg = pk._tune(f"fwd:paged{paged[2]}", q, sizes, identity_layout(None), [], paged_candidates,
                       lambda c: _run_forward(pk, q, k_cache, v_cache, sizes, targs, scale, paged, c))
    return _run_forward(pk, q, k_cache, v_cache, sizes, targs, scale, paged,
                        cfg or forward_config(pk, max(sizes["D"], sizes["Dv"]), q.device, q.dtype))


def _run_forward(pk, q, k_cache, v_cache, sizes: dict, targs: list, scale: float, paged: tuple, cfg) -> tuple:
    """One paged ``attn_fwd`` launch at ``cfg`` (``sizes``: the logical contiguous call's). Returns
    ``(out, lse)``."""
    from .kernel import Launch, _constexprs, _forward_args, _kernel_sizes, _LaunchPlan

    bt, kvl, page = paged
    B, Hq, Lq, Dv = sizes["B"], sizes["H"], sizes["Lq"], sizes["Dv"]
    cfg = dataclasses.replace(cfg, tma=False, ws=False)
    dev = q.device
    out = torch.empty((B, Hq, Lq, Dv), dtype=q.dtype, device=dev)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=dev)
    out_u = torch.empty_like(out) if pk.ir.gate is not None else out
    layout = identity_layout(None)
    consts = dict(_constexprs(q.dtype, sizes, cfg, layout, cap=pk.plan.blocks is not None), USE_TMA=False, WS=False,
                  PAGE=page)
    lp = _LaunchPlan(sizes, cfg, (-(-Lq // cfg.block_m), B * Hq), out.shape, lse.shape,
                     [*q.stride(), *page_strides(k_cache), *page_strides(v_cache), *out.stride()], None,
                     _kernel_sizes(sizes, layout), consts, dict(sizes))
    named = pk._named(targs)
    if pk._value_checks:
        pk._check_values(sizes, named, dev)
    tables, tstrides = pk._tables(sizes, named, cfg, dev)
    order = pk._head_order(lp, named, dev) if pk.plan.scalars else None
    args, _, _ = _forward_args(lp, [q, k_cache, v_cache, out, lse, out_u], targs, [], tables, tstrides, scale, order)
    args += [bt, kvl, bt.stride(0)]
    pk._run(dev, Launch("attn_fwd", lp.grid, args, consts))
    return out, lse


__all__ = ["paged_attention", "check_paged", "gather_cache", "page_strides", "paged_candidates", "PagedCache"]
