"""Compiled attention kernels: loading, launching, autotuning and the torch custom op.

(No ``from __future__ import annotations`` here: ``torch.library.custom_op`` reads
the real annotations of the op functions.)
"""

import math
import threading
import contextvars
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

try:  # torch.compile's C++ tensor guard (a private API: without it, only the call key is used)
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every supported torch has it
    _TensorGuards = None

from attncc.checks import (KERNEL_DTYPES, check_inputs, check_reads, check_sizes, check_tensors, clauses_to_check,
                           compile_read_checks, compile_size_checks, compile_value_checks, flatten_grid,
                           shape_functions)
from attncc.codegen import backward_support
from attncc.dense import check_clause_reads, eval_expr, index_env as dense_index_env, lowrank_factors
from attncc.gradients import partial_shape, reduce_partials
from attncc.ir import INDEX as I_INDEX, SIZES as I_SIZES, s as _S
from attncc.ir import BLOCK_TENSOR, POS_TENSOR, grid_sizes, size_values, with_block_mask, with_positions
from attncc.layout import (BoxLayout, choose_layout, identity_layout, layout_constexprs,
                           layout_sizes)
from attncc.passes import KernelPlan, index_tensors
from attncc import grid_positions as _gp
from attncc.positions import given as _positions_given, resolve_positions

from . import cache, cpu
from . import decode as _decode
from .configs import CPU_CONFIG, Config, backward_candidates, dkdv_rows, forward_candidates, register_cap
from .tiles import block_table, closed_tile_classes, tensor_digest, tensor_snapshot


_OPS: dict = {}
_LOCK = threading.Lock()


@dataclass
class Launch:
    """One kernel launch as the runtime issues it: the generated module's kernel name,
    the launch grid, the positional arguments (tensors, strides, sizes, scale) and the
    keyword arguments (constexprs, ``num_warps``, ``num_stages``).

    Built by :meth:`CompiledAttention.launch`, :meth:`~CompiledAttention.launch_backward`
    and :meth:`~CompiledAttention.tile_stats`, then run on the device or, inside
    :func:`capture`, recorded: ahead-of-time compilation (:mod:`attncc.aot`) compiles
    exactly these arguments, so the AOT kernel is the kernel the JIT builds.

    The kernels read a tensor argument through its data pointer and the strides that
    follow in ``args``, never through its shape: a repeated call of a grid pattern (see
    :meth:`CompiledAttention._direct_call`) passes q, k, v and allocates out and lse in the
    grid's shape ``(B, H, *grid, ...)``, with the strides of their ``(B, H, L, ...)`` views."""

    kernel: str
    grid: tuple
    args: list
    kwargs: dict = field(default_factory=dict)


_CAPTURE: contextvars.ContextVar = contextvars.ContextVar("attncc_capture", default=None)


_COMPILED: contextvars.ContextVar = contextvars.ContextVar("attncc_compiled", default=None)


class _Collect:
    """Context manager: a fresh list in the context variable ``VAR`` for the duration of
    the block (what the runtime appends there), returned by ``__enter__``."""

    VAR: contextvars.ContextVar

    def __enter__(self) -> list:
        self._items = []
        self._token = self.VAR.set(self._items)
        return self._items

    def __exit__(self, *exc) -> None:
        self.VAR.reset(self._token)


class _compiled(_Collect):
    """Context manager collecting the compiled kernels (Triton ``CompiledKernel``) of the
    launches inside it (the autotuner reads their ``n_spills``)."""

    VAR = _COMPILED


def _arch(device) -> int:
    """Compute capability of a CUDA device as an int (90 for sm_90)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def untimed(device: torch.device) -> bool:
    """Whether a launch on ``device`` must not be timed: inside :class:`capture` (launches are
    recorded, not run) or while a CUDA graph is captured (timing synchronises the device and
    would break the capture). Autotuners then take an already saved choice, else the rule's."""
    return _CAPTURE.get() is not None or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


class capture(_Collect):
    """Context manager: record the launches of every kernel call inside it instead of
    running them (outputs are left unwritten). ``with capture() as launches: kern(q, k, v)``
    gives ``launches``: a list of ``(CompiledAttention, Launch)``. Works without a GPU and
    without the interpreter (nothing is launched, the generated module is not loaded)."""

    VAR = _CAPTURE


def tma_strides_ok(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors (TMA) can read every ``(B, H, L, D)`` tensor given, as far
    as its layout says: last stride 1 and 16-byte multiples for the other strides (of
    dimensions longer than 1, whose offsets are used). The 16-byte alignment of the base
    pointer is checked per call (:func:`tma_pointers_ok`)."""
    for x in tensors:
        size = x.element_size()
        if any(n > 1 and (st * size) % 16 for n, st in zip(x.shape[:-1], x.stride()[:-1])):
            return False
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            return False
    return True


def tma_pointers_ok(*tensors: torch.Tensor) -> bool:
    """Whether every tensor's data pointer is 16-byte aligned (a TMA descriptor's base)."""
    return all(x.data_ptr() % 16 == 0 for x in tensors)


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton allocator: the global scratch device-side tensor descriptors are written to."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton an allocator for the TMA kernels' descriptor scratch unless one is set
    (Triton keeps it in a context variable: per thread)."""
    import triton

    try:
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # another Triton layout: set ours
        pass
    triton.set_allocator(_tma_scratch)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


#: entries kept per kernel in each per-signature cache (calls, launches); the oldest goes first
CALL_CACHE_SIZE = 64

#: tensor types whose metadata the per-signature caches key on; anything else (FakeTensor,
#: FunctionalTensor, other subclasses) takes the checked path on every call
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_SCALARS = (float, int, type(None))


def _tensor_guards(tensors: list):
    """A check that tensors have the type, dtype, device, ``requires_grad``, sizes and
    strides (and dispatch keys) of ``tensors``: ``guards.check(*others) -> bool``, in C++
    (torch.compile's own tensor guard, ``torch._C._dynamo.guards.TensorGuards``; about
    0.1 us a tensor, a quarter of reading that metadata into a key in Python). ``None``
    where this torch lacks it or it does not accept these tensors: callers then use the
    call key alone.

    Raises nothing; ``check`` returns False for anything that is not such a tensor.
    """
    if _TensorGuards is None:
        return None
    try:
        guards = _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                               dynamic_dims_strides=[list(t.stride()) for t in tensors])
        return guards if guards.check(*tensors) else None
    except Exception:  # noqa: BLE001 - a private API: any failure means "not available"
        return None


def _remember(cache_: dict, key, value) -> None:
    """Store ``value`` under ``key`` in a per-kernel cache, dropping the oldest entry past
    :data:`CALL_CACHE_SIZE` (plain dict, immutable values: safe under the GIL)."""
    if len(cache_) >= CALL_CACHE_SIZE:
        cache_.pop(next(iter(cache_), None), None)
    cache_[key] = value


@dataclass(frozen=True)
class _CallPlan:
    """What one call signature of :meth:`CompiledAttention.__call__` resolved to once its
    checks passed: the sizes, the grid, the scale, which spec tensors need a contiguous
    copy, and (box plans) the token layout. Never mutated (shared by every later call
    with the same signature)."""

    sizes: dict
    grid: tuple
    scale: float
    names: tuple
    copy: tuple
    layout: Optional[BoxLayout]
    layout_list: list
    graph: bool  # the call builds an autograd graph (it goes through the custom op)


@dataclass(frozen=True)
class _LaunchPlan:
    """The shape-only part of one forward :class:`Launch` (see :meth:`CompiledAttention.launch`):
    everything but the tensors, the block table and the scale. Never mutated."""

    sizes: dict
    cfg: Config
    grid: tuple
    out_shape: tuple
    lse_shape: tuple
    strides: list  # q, k, v and out strides
    tables: Optional[tuple]  # closed forms: the placeholder tables and strides; None: block table per call
    ksizes: list
    consts: dict
    value_sizes: dict  # the sizes the value checks see (box plans: the grid's own token count)


@dataclass(eq=False)
class _Direct:
    """A call signature whose forward launch needs nothing but the call's tensors (eager,
    nothing to differentiate, no dot() terms, tokens in row-major order): the launch's
    argument list with the tensors left out (``None``) and where each goes (see
    :meth:`CompiledAttention._direct_call`). Only ``memo`` changes after construction."""

    args: tuple  # the forward's arguments; None where q, k, v, out, lse, out_u and the spec tensors go
    slots: tuple  # (index in args, tensor name, whether it needs a contiguous copy) per spec tensor
    flatten: tuple  # grid patterns: per q, k, v whether flattening the grid copies (() when none does)
    ngrid: int  # grid axes (0: not a grid pattern)
    # out and lse as returned, (B, Hq, *grid, Dv) and (B, Hq, *grid) on a grid: one element
    # expanded to their shape; ``torch.empty_like(proto, memory_format=contiguous_format)``
    # allocates them contiguous (so their flattened strides are the launch's) for about half
    # the host time of ``torch.empty(shape, dtype=, device=)``
    out_proto: torch.Tensor
    lse_proto: torch.Tensor
    device: torch.device
    gated: bool
    grid: tuple  # the launch grid
    kwargs: dict  # constexprs, num_warps, num_stages (copied into every Launch)
    launch: _LaunchPlan
    tables_at: Optional[tuple]  # block-table plans: indices in args of the 4 tables and of their 4 strides
    masks: tuple  # block-table plans: the mask tensors' names (else empty)
    # what the call key holds besides the tensors' metadata, and a check of that metadata
    scale: Optional[float]  # as passed
    return_lse: bool
    grad_mode: bool
    names: tuple  # the spec tensors' names, in the order passed
    guards: object  # see _tensor_guards (None: only the call key finds this entry)
    memo: Optional[tuple] = None  # block-table plans: (mask tensor snapshots, args with their tables)
    order_at: Optional[int] = None  # plans with run-time scalars: the index in args of HEAD_ORDER


def _sizes(q, k, v, grid=None) -> dict:
    """The size names of q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(..., Dv)`` (grid
    flattened) and the grid sizes ``G0, G1, G2`` (1 where not a grid axis)."""
    B, Hq, Lq, D = q.shape
    return {"B": B, "H": Hq, "Hkv": k.shape[1], "Lq": Lq, "Lk": k.shape[2], "D": D, "Dv": v.shape[3],
            **grid_sizes(grid)}


def _kernel_sizes(sizes: dict, layout: list) -> list:
    """The size arguments of every kernel (``B .. Dv, G0..2, DIL0..2, J0..2``)."""
    return size_values(sizes) + list(layout_sizes(layout).values())[3:]


#: the dtype of a stand-in for a spec tensor a kernel does not read, per tensor kind
_STAND_IN = {"float": torch.float32, "int": torch.int32, "bool": torch.bool}


def _tensor_args(tensors) -> list:
    """Kernel arguments of the spec tensors: pointer, strides, sizes of each."""
    out = []
    for t in tensors:
        out += [t, *t.stride(), *t.shape]
    return out


def _forward_args(lp: "_LaunchPlan", head: list, tensors, lowrank, tables, tstrides, scale: float,
                  order=None) -> tuple:
    """The positional arguments of ``attn_fwd`` (``head``: q, k, v, out, lse and the
    ungated output's buffer; ``order``: plans with run-time scalars, the ``HEAD_ORDER``
    tensor of :meth:`CompiledAttention._head_order`, right after the 4 tables; else None),
    and where the varying parts sit in them.

    Returns:
        ``(args, slots, tables_at)``: the list, the index of each spec tensor in it, and
        ``(index of the 4 tables, index of their 4 strides)`` (``HEAD_ORDER``: at index
        ``tables_at[0] + 4``).
    """
    args = list(head)
    slots = []
    for t in tensors:
        slots.append(len(args))
        args += [t, *t.stride(), *t.shape]
    args += _lowrank_args(lowrank)
    at = len(args)
    args += [*tables, *([order] if order is not None else []), *lp.strides]
    tat = len(args)
    args += [*tstrides, *lp.ksizes, scale]
    return args, slots, (at, tat)


def _lowrank_args(lowrank, grads=()) -> list:
    """Kernel arguments of the dot() terms (none without): ``u``, ``w``, their gradient
    buffers (``u``/``w`` themselves in the forward, never written), strides, the rank."""
    if not lowrank:
        return []
    u, w = lowrank
    du, dw = grads or (u, w)
    return [u, w, du, dw, *u.stride(), *w.stride(), u.shape[-1]]


def launch_signature(q, k, v, tensors, layout=None, cfg=None, lowrank=()) -> tuple:
    """What fixes a launch's plan (config, grid, strides, constexprs): the shapes and strides of
    ``q``, ``k``, ``v``, the spec tensors and the ``dot()`` factors, the dtype, the device, the
    grid layout and a fixed config. The key of the remembered launch plans."""
    return (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device,
            tuple(layout) if layout else None, cfg, tuple((t.shape, t.stride()) for t in tensors),
            tuple((x.shape, x.stride()) for x in lowrank))


def _constexprs(dtype, sizes: dict, cfg: "Config", layout: list, lowrank=(), cap: bool = False) -> dict:
    """The compile-time launch parameters of the attention kernels (``BLOCK_R``: the dot()
    terms' rank padded to a power of two >= 16, only for patterns with such terms; fp32, or
    ``cap``: ``maxnreg``, see :func:`~attncc.runtime.configs.register_cap`)."""
    block_d, block_dv = max(16, _next_pow2(sizes["D"])), max(16, _next_pow2(sizes["Dv"]))
    extra = {"BLOCK_R": max(16, _next_pow2(lowrank[0].shape[-1]))} if lowrank else {}
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, **extra,
                **layout_constexprs(layout),
                EVEN_D=(sizes["D"] == block_d), EVEN_DV=(sizes["Dv"] == block_dv), IEEE=(dtype == torch.float32),
                UPCAST=(dtype == torch.bfloat16 and cache.interpreting()),  # the interpreter has no bf16 dot
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **({"maxnreg": register_cap(cfg.num_warps)} if dtype == torch.float32 or cap else {}))


class CompiledAttention:
    """An attention pattern compiled to a fused Triton kernel (see :func:`attncc.compile`).

    Call it like ``scaled_dot_product_attention``::

        out = kern(q, k, v, scale=None, **tensors)          # (B, Hq, Lq, Dv), q.dtype
        out, lse = kern(q, k, v, return_lse=True)           # lse (B, Hq, Lq) float32, natural log

    Attributes:
        ir: the :class:`~attncc.ir.AttentionIR` (params specialised).
        plan: the :class:`~attncc.passes.KernelPlan` (closed form or block table).
        source: the generated Triton source (a Python module).
        key: the cache key (hash of IR, templates and library versions).
        config: a fixed :class:`Config` if one was given (else CPU default / autotuned).
        deterministic: spec tensor gradients reduced from per-program partials in a fixed
            order (default), or, when False, added with atomics in the kernel (see
            :mod:`attncc.gradients`).
        backend: what runs on CPU tensors: ``"torch"`` (the tiled PyTorch executor of
            :mod:`attncc.runtime.cpu`, built from the same plan), ``"interpret"`` (the
            Triton kernels under the Triton interpreter), or ``None``: the environment
            variable ``ATTNCC_CPU``, default ``"torch"``. CUDA tensors always run the kernels.
    """

    def __init__(self, plan: KernelPlan, source: str, path, key: str, config: Optional[Config] = None,
                 deterministic: bool = True, backend: Optional[str] = None):
        if backend is not None:
            cpu.cpu_backend(backend)  # raises for an unknown name
        self.backend = backend
        self.plan = plan
        self.deterministic = deterministic
        self.ir = plan.ir
        self.source = source
        self.path = path
        self.key = key
        self.config = config
        self._module = None
        self._read_checks = compile_read_checks(plan.mask_read_checks)
        self._value_checks = compile_value_checks(plan.value_read_checks)
        #: the tensors whose values decide whether the value checks pass (mask tensors and
        #: tensors read inside indices), and the keys of the checks passed (see _check_values)
        self._value_keyed = tuple(sorted(set(plan.mask_tensors) | {n for e in (plan.ir.score, plan.ir.sink,
                                                                               plan.ir.gate)
                                                                   for n in index_tensors(e)}))
        self._values_ok: dict = {}
        self._shapes = shape_functions(plan.ir)
        self._size_checks = compile_size_checks(plan.ir)
        self._tuned = {}
        #: per-signature caches of __call__ and launch (see _CallPlan, _LaunchPlan)
        self._calls: dict = {}
        self._launches: dict = {}
        self._direct: dict = {}
        self._last: Optional[_Direct] = None  # the last _Direct called through the key (see __call__)
        self._dummy: dict = {}
        self._orders: dict = {}  # plans with run-time scalars: see _head_order
        #: "" or why there is no backward; tensor name -> why it has no gradient; the reads
        #: whose gradient partials the backward writes (see attncc.gradients)
        self.backward_error, self.tensor_grad_errors, self._grad_reads, self._epi_reads = backward_support(plan)
        self.op = _make_op(self)

    #: reuse what a call signature seen before resolved to (same shapes, strides, dtypes,
    #: devices, requires_grad, scale, return_lse, grad mode): checked sizes, layout, launch
    #: config and arguments; eager calls with nothing to differentiate launch from a
    #: remembered argument list (see _Direct), and the last such signature is recognised by
    #: one C++ check of the tensors' metadata. False (per instance, or on the class for every
    #: kernel): every call takes the checked path (benchmarks/bench_host.py times both).
    cache_calls: bool = True

    def __repr__(self) -> str:
        return f"CompiledAttention({self.ir.name!r}, path={self.plan.path!r}, key={self.key[:12]})"

    # ------------------------------------------------------------------ calling
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                 return_lse: bool = False, block_mask=None, kv_index=None, q_offset=None, kv_offset=None,
                 kv_lens=None, q_total=None, kv_total=None, decode: Optional[bool] = None, block_table=None,
                 **tensors):
        """Run the kernel.

        Args:
            q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``
                (grid patterns: ``(B, H, *grid, D)``, the same grid for all three);
                float32/float16/bfloat16 on one device (CPU runs the Triton
                interpreter), ``Hq % Hkv == 0``, head dims 1..256. Any strides.
            scale: score scale (default ``1/sqrt(D)``).
            return_lse: also return the logsumexp of each row (natural log).
            block_mask: optional run-time block sparsity, an :class:`attncc.BlockSparse`
                or a FlexAttention ``BlockMask``: a pair is computed only inside a listed
                block (and where the pattern's mask allows it). See :meth:`with_blocks`.
                Patterns with a ``route:`` clause compute it per call with
                :func:`attncc.topk_blocks` on ``q`` and ``k`` (no gradient flows to the
                routing) unless one is given.
            kv_index: optional token-level top-k lists (DeepSeek sparse attention), int
                ``(B, Lq, Hkv, topk)``: each query attends exactly to its listed keys (and
                where the pattern allows), run by :func:`attncc.gather_attention`; patterns
                with no mask or ``kv <= q`` and the plain score ``s`` only.
            q_offset / kv_offset: the global position of query row 0 / key row 0 (a query
                shard, a KV cache, a context-parallel shard): an int, an int32/int64 tensor
                ``(B,)``, or for ``q_offset`` the string ``"bottom_right"`` (the last query
                at the last key's position: ``kv_offset + Lk_b - Lq``, the FlashAttention-2
                KV-cache convention). The mask, score, sink and gate see ``q = q_offset + i``
                and ``kv = kv_offset + j``; spec tensors indexed by ``q`` / ``kv`` are read at
                these global positions (their ``Lq`` / ``Lk`` dims hold the whole sequence,
                any length; a read outside them is a ``ValueError`` naming the tensor).
            q_total / kv_total: the ``Lq`` / ``Lk`` the pattern sees (int or ``(B,)``):
                default ``kv_total = kv_offset + Lk_b`` and ``q_total = kv_total`` when a
                query offset is in force (``q_offset`` or ``kv_lens`` given), else ``Lq``.
            kv_lens: int32 ``(B,)`` in ``[0, Lk]``: ragged KV cache, batch row ``b`` attends
                only to its first ``kv_lens[b]`` keys (the tiles past it are skipped);
                the default ``q_offset`` is then ``"bottom_right"`` (``kv_lens[b] - Lq``,
                FlashAttention / FlashInfer). ``kv_lens[b] == 0``: output 0, LSE ``-inf``.
                With any of these five keywords the pattern runs as its twin
                :func:`attncc.ir.with_positions` (see :meth:`with_positions`); without them
                the kernel and its code are unchanged. Grid patterns: q / k / v are shards
                of the FIRST grid axis ``(B, H, rows, G1[, G2], D)`` (k / v may hold other
                rows than q), offsets and totals count rows of that axis (not tokens), one
                total for queries and keys (:mod:`attncc.grid_positions`); ``kv_lens`` and
                ``block_mask`` are refused there. ``dot()`` terms and ``route:`` clauses
                refuse them (``NotImplementedError``), as does ``kv_index``.
            decode: ``True``: run the split-KV decode kernel (:mod:`attncc.runtime.decode`:
                the GQA group's heads packed into one query tile, the key range split across
                programs, partial states merged by LSE; forward only, any ``Lq``); ``False``:
                never; ``None`` (default): when ``Lq <= 16``, nothing requires grad and the
                Triton kernels run (CUDA, or ``backend="interpret"``). The result is the
                forward's either way.
            block_table: int32 ``(B, max_pages)``: ``k`` / ``v`` are a paged KV cache
                ``(num_pages, page_size, Hkv, D)`` / ``(..., Dv)`` (vLLM / FlashAttention
                layout) and ``kv_lens`` is required: logical key ``j`` of batch row ``b`` is
                slot ``j % page_size`` of page ``block_table[b, j // page_size]``; forward only
                (prefill and decode kernels; :mod:`attncc.runtime.paged`).
            **tensors: the spec's ``tensor`` inputs by name, shaped as declared.

        Returns:
            ``out`` ``(B, Hq, Lq, Dv)`` in ``q.dtype``; with ``return_lse`` also
            ``lse`` ``(B, Hq, Lq)`` float32. Rows with no allowed key: 0 and ``-inf``.

        Raises:
            TypeError / ValueError: bad ranks, shapes, dtypes, devices, missing or
                misshapen tensors (raised before any launch, naming the argument).
            NotImplementedError: an input requires grad but the pattern's backward (or
                that tensor's gradient) cannot be generated; raised here, before the
                forward runs, never in the backward. ``decode=True`` for a grid pattern.
            ValueError: ``decode=True`` while an input requires grad (decode is forward only).

        Gradients flow to ``q``, ``k``, ``v`` and every float spec tensor the score
        reads; tensors only the mask reads (and int/bool tensors) get none.
        """
        if block_table is not None:  # a paged KV cache
            if kv_index is not None:
                raise NotImplementedError("block_table (paged KV cache) with kv_index is not supported")
            from .paged import paged_attention

            return paged_attention(self, q, k, v, block_table, kv_lens, scale, return_lse, decode, None, q_offset,
                                   kv_offset, q_total, kv_total, block_mask=block_mask, **tensors)
        if _positions_given(q_offset, kv_offset, kv_lens, q_total, kv_total):
            if kv_index is not None:
                raise NotImplementedError("kv_index with q_offset / kv_offset / q_total / kv_total / kv_lens is not "
                                          "supported: pass global key indices to kv_index instead")
            kern, pos = self.with_positions(q, k, q_offset=q_offset, kv_offset=kv_offset, kv_lens=kv_lens,
                                            q_total=q_total, kv_total=kv_total, v=v)
            if self.ir.grid:  # the twin is 1-D on the flattened local tokens (attncc.grid_positions)
                if block_mask is not None:
                    raise NotImplementedError("block_mask with q_offset / kv_offset on a grid pattern is not supported")
                n = len(self.ir.grid)
                res = kern(*(_gp.flat(x, n) for x in (q, k, v)), scale, return_lse, decode=decode, **tensors,
                           **{POS_TENSOR: pos})
                out, lse = res if return_lse else (res, None)
                out = out.unflatten(2, q.shape[2:2 + n])
                return (out, lse.unflatten(2, q.shape[2:2 + n])) if return_lse else out
            return kern(q, k, v, scale, return_lse, block_mask, decode=decode, **tensors, **{POS_TENSOR: pos})
        if kv_index is not None:
            return self._gathered(q, k, v, kv_index, scale, return_lse, block_mask, tensors)
        if block_mask is None and self.ir.route is not None:  # route: the producer, then the consumer
            from .routing import topk_blocks

            block_mask = topk_blocks(q, k, **self.ir.route.kwargs())
        if block_mask is not None:
            kern, blocks = self.with_blocks(block_mask, q, k)
            return kern(q, k, v, scale, return_lse, decode=decode, **tensors, **{BLOCK_TENSOR: blocks})
        if decode or (decode is None and getattr(q, "ndim", 0) == 4 and q.shape[2] <= _decode.MAX_AUTO_LQ
                      and _decode.auto_decode(self, q, k, v, tensors)):
            return _decode.decode_attention(self, q, k, v, scale, return_lse, **tensors)
        if decode is False and not _decode.FORWARD_KERNEL.get():  # the op's launch too (see launch)
            token = _decode.FORWARD_KERNEL.set(True)
            try:
                return self(q, k, v, scale, return_lse, decode=False, **tensors)
            finally:
                _decode.FORWARD_KERNEL.reset(token)
        if self.cache_calls:
            # the signature of the last direct call again: one C++ check of every tensor's
            # metadata (see _Direct.guards) instead of building and hashing the key
            d = self._last
            if (d is not None and type(scale) in _SCALARS and scale == d.scale and bool(return_lse) is d.return_lse
                    and torch.is_grad_enabled() is d.grad_mode and tuple(tensors) == d.names
                    and not torch.compiler.is_compiling() and d.guards.check(q, k, v, *tensors.values())
                    and not (q.is_cpu and self._executor_runs())):
                return self._direct_call(d, q, k, v, tensors, return_lse)
            key = self._call_key(q, k, v, scale, return_lse, tensors)
        else:
            key = None
        if key is not None:
            d = self._direct.get(key)
            if d:  # a signature seen before whose launch needs nothing but the new tensors
                if d.guards is not None:
                    self._last = d
                return self._direct_call(d, q, k, v, tensors, return_lse)
        plan = self._calls.get(key) if key is not None else None
        q0, k0, v0 = q, k, v
        if plan is None:  # checked path: every check, then the plan is remembered for the signature
            q, k, v, plan, targs, lowrank = self._plan_call(q, k, v, scale, return_lse, tensors)
            if key is not None:
                _remember(self._calls, key, plan)
        else:  # the same shapes, strides, dtypes, devices and flags passed every check before
            targs = [tensors[n].contiguous() if c else tensors[n] for n, c in zip(plan.names, plan.copy)]
            lowrank = []
            if plan.layout is not None and not self.ir.lowrank:  # q, k, v permuted from their grid shape
                lay = plan.layout
                op = (functools.partial(_eager_autograd, self, key) if plan.graph else
                      functools.partial(self._launch_op, key))
                out, lse, _ = op(lay.permute(q, "q"), lay.permute(k, "kv"), lay.permute(v, "kv"), targs,
                                 plan.scale, plan.layout_list, [])
                out = lay.unpermute(out)
                return (out, lay.unpermute(lse)) if return_lse else out
            if plan.grid:
                n = len(plan.grid)
                q, k, v = q.flatten(2, 1 + n), k.flatten(2, 1 + n), v.flatten(2, 1 + n)
            if self.ir.lowrank:  # value-dependent: folded on every call
                q, k, v, lowrank = self._lowrank_factors(q, k, v, dict(zip(plan.names, targs)), plan.sizes,
                                                         plan.scale)
        op = self.op
        if key is not None:  # eager: no op dispatch (torch.compile traces without a key, through the op)
            op = (functools.partial(_eager_autograd, self, key) if plan.graph else
                  functools.partial(self._launch_op, key))
        lay = plan.layout
        if lay is not None:  # box plans: tokens permuted so that every grid box is one contiguous tile
            qp, kp, vp, *lr = (lay.permute(x.unflatten(2, plan.grid), side) for x, side in
                               zip([q, k, v] + lowrank, ("q", "kv", "kv", "q", "kv")))
            out, lse, _ = op(qp, kp, vp, targs, plan.scale, plan.layout_list, lr)
            out, lse = lay.unpermute(out), lay.unpermute(lse)
        else:
            # the op takes a fixed-length layout list (grid sizes, 1 past the pattern's axes)
            out, lse, _ = op(q, k, v, targs, plan.scale, plan.layout_list, lowrank)
            if plan.grid:
                out, lse = out.unflatten(2, plan.grid), lse.unflatten(2, plan.grid)
        if key is not None and not plan.graph and key not in self._direct:
            _remember(self._direct, key, self._direct_plan(key, plan, (q0, k0, v0), (q, k, v), targs, tensors))
        return (out, lse) if return_lse else out

    def _launch_op(self, call_key, q, k, v, tensors, scale: float, layout, lowrank):
        """What the custom op's implementation runs (:meth:`launch`): eager calls with nothing
        to differentiate call it directly, saving the op's dispatch (about 20 us) and the
        launch's own cache key; traced calls and calls that build an autograd graph go
        through :attr:`op`."""
        return self.launch(q, k, v, tensors, scale, layout=layout, lowrank=lowrank, call_key=call_key)

    def _call_key(self, q, k, v, scale, return_lse, tensors: dict):
        """The per-signature cache key of a call: shape, strides, dtype, device and
        ``requires_grad`` of q, k, v and of every spec tensor passed (by name, in the order
        passed), the scale, ``return_lse``, the grad mode and, for CPU tensors, whether the
        CPU executor runs (see :meth:`_torch_cpu`); ``None`` (no caching: every check runs)
        for anything but plain tensors and Python scalars, and while ``torch.compile``
        traces the call (it sees the checked path). Everything the argument checks read is
        in the key, so a call with a key seen before passes them."""
        if type(scale) not in _SCALARS or torch.compiler.is_compiling():
            return None
        if type(q) not in _PLAIN_TENSORS or type(k) not in _PLAIN_TENSORS or type(v) not in _PLAIN_TENSORS:
            return None
        try:
            key = (scale, bool(return_lse), torch.is_grad_enabled(),
                   q.shape, q.stride(), q.dtype, q.device, q.requires_grad,
                   k.shape, k.stride(), k.dtype, k.device, k.requires_grad,
                   v.shape, v.stride(), v.dtype, v.device, v.requires_grad)
            if tensors:
                more = []
                for name, x in tensors.items():
                    if type(x) not in _PLAIN_TENSORS:
                        return None
                    more += (name, x.shape, x.stride(), x.dtype, x.device, x.requires_grad)
                key += tuple(more)
        except Exception:  # noqa: BLE001 - no strides (sparse, nested): the checked path says what is wrong
            return None
        if q.is_cpu:  # the executor runs on the row-major grid, the kernels on the box layout
            key += (self._executor_runs(),)
        return key

    def _executor_runs(self) -> bool:
        """Whether a call on CPU tensors runs the CPU executor (see :meth:`_torch_cpu`)."""
        return _CAPTURE.get() is None and cpu.cpu_backend(self.backend) == "torch"

    def _direct_plan(self, key, plan: _CallPlan, given: tuple, launched: tuple, targs: list,
                     tensors: dict) -> Optional[_Direct]:
        """The :class:`_Direct` of a call signature, built after its first eager call without
        autograd (``given``: q, k, v as passed; ``launched``: as the launch got them,
        grid-flattened; ``targs``: the spec tensors launched; ``tensors``: as passed; ``key``:
        the call key), or ``None`` (remembered too: the key path then takes the plan) when the
        call needs more than new tensors per call: dot() terms (folded from the tensors'
        values), a box layout that moves tokens, or no kernel launch (the CPU executor)."""
        lp = self._launches.get(("call", key))
        if lp is None or self.ir.lowrank or (plan.layout is not None and not plan.layout.is_identity()):
            return None
        gated = self.ir.gate is not None
        # a grid flattened to a view is passed as is (the kernel reads its pointer and the flat
        # strides of the argument list); a grid whose flattening copies is flattened per call
        flatten = tuple(a.data_ptr() != b.data_ptr() for a, b in zip(given, launched)) if plan.grid else ()
        q = launched[0]
        out = q.new_empty(0)  # stand-ins: their positions in the argument list are all that is kept
        tables = None if lp.tables is not None else ((out,) * 4, (0,) * 4)
        order = out if self.plan.scalars else None  # HEAD_ORDER: per call (the scalars' values)
        args, slots, tables_at = _forward_args(lp, [q, q, q, out, out, out], targs, [],
                                               *(lp.tables if tables is None else tables), plan.scale, order)
        order_at = tables_at[0] + 4 if order is not None else None
        for i in (0, 1, 2, 3, 4, 5, *slots, *([order_at] if order is not None else [])):
            args[i] = None
        if tables is not None:
            args[tables_at[0]:tables_at[0] + 4] = [None] * 4
        B, Hq = lp.out_shape[:2]
        out_shape = (B, Hq, *plan.grid, lp.out_shape[3]) if plan.grid else lp.out_shape
        lse_shape = (B, Hq, *plan.grid) if plan.grid else lp.lse_shape
        one = functools.partial(torch.empty, (), device=q.device)
        return _Direct(tuple(args), tuple(zip(slots, plan.names, plan.copy)), flatten if any(flatten) else (),
                       len(plan.grid), one(dtype=q.dtype).expand(out_shape), one(dtype=torch.float32).expand(lse_shape),
                       q.device, gated, lp.grid, lp.consts, lp, tables_at if tables is not None else None,
                       tuple(self.plan.mask_tensors) if tables is not None else (),
                       key[0], key[1], key[2], tuple(tensors), _tensor_guards([*given, *tensors.values()]),
                       order_at=order_at)

    def _direct_call(self, d: _Direct, q, k, v, tensors: dict, return_lse: bool):
        """A call whose signature has a :class:`_Direct`: the block table (block-table plans:
        reused while the mask tensors hold the values it was built from, see
        :meth:`_memo_tables`), the outputs allocated, the call's tensors put into the
        remembered argument list, the value checks, one launch."""
        base = d.args
        if d.tables_at is not None and self.plan.blocks is not None:
            base = self._memo_tables(d, tensors, remember=False)[1]  # O(tiles) on the device, per call
        elif d.tables_at is not None:  # block-table plans (also those whose mask reads no tensor)
            m = d.memo
            if m is not None:
                for snap, name in zip(m[0], d.masks):
                    if not torch.equal(snap, tensors[name]):
                        m = None
                        break
            base = (m or self._memo_tables(d, tensors))[1]
        if d.flatten:
            n = d.ngrid
            q, k, v = (x.flatten(2, 1 + n) if f else x for x, f in zip((q, k, v), d.flatten))
        out = torch.empty_like(d.out_proto, memory_format=torch.contiguous_format)
        lse = torch.empty_like(d.lse_proto, memory_format=torch.contiguous_format)
        args = list(base)
        args[0:6] = q, k, v, out, lse, (torch.empty_like(out) if d.gated else out)
        for i, name, copy in d.slots:
            args[i] = tensors[name].contiguous() if copy else tensors[name]
        if self._value_checks:
            self._check_values(d.launch.value_sizes, {name: args[i] for i, name, _ in d.slots}, d.device)
        if d.order_at is not None:
            args[d.order_at] = self._head_order(d.launch, {name: args[i] for i, name, _ in d.slots}, d.device)
        kwargs = dict(d.kwargs)
        if kwargs.get("USE_TMA") and not tma_pointers_ok(q, k, v):  # a misaligned base: the plain loads
            kwargs["USE_TMA"] = False
        self._run(d.device, Launch("attn_fwd", d.grid, args, kwargs))
        return (out, lse) if return_lse else out

    def _memo_tables(self, d: _Direct, tensors: dict, remember: bool = True) -> tuple:
        """A block-table plan's :class:`_Direct`: the block table of the call's mask tensors
        (:meth:`_tables`, the block-table cache), remembered as ``d.memo``: ``(snapshots of
        the mask tensors, the argument list with the tables in place)``. Later calls of the
        signature reuse the list while every mask tensor equals (``torch.equal``, on its
        device; on CUDA a synchronisation, as in :func:`~attncc.runtime.tiles.tensor_digest`)
        its snapshot: a mask tensor changed in any way, in place or not, version counter
        bumped or not, takes this path again. The snapshots are the ones ``tensor_digest``
        keeps; the memo keeps them (one copy of each mask tensor) alive while the signature
        is cached, also after the tensors they copy are freed. ``remember=False`` (block-read
        plans, whose block tensor may change every call): the argument list of this call only."""
        named = {name: tensors[name].contiguous() if copy else tensors[name] for _, name, copy in d.slots}
        tables, tstrides = self._tables(d.launch.sizes, named, d.launch.cfg, d.device)
        args = list(d.args)
        at, tat = d.tables_at
        args[at:at + 4], args[tat:tat + 4] = tables, tstrides
        if not remember:  # block-read plans: the lists of this call only (no snapshot, no host copy)
            return (), tuple(args)
        d.memo = (tuple(tensor_snapshot(named[n]) for n in d.masks), tuple(args))
        return d.memo

    def _plan_call(self, q, k, v, scale, return_lse: bool, tensors: dict) -> tuple:
        """The checked path of :meth:`__call__`: every argument check (raising before any
        launch), the scale, the dot() factors and the box layout.

        Returns:
            ``(q, k, v, plan, targs, lowrank)``: q, k, v grid-flattened (dot() terms: after
            :meth:`_lowrank_factors`), the :class:`_CallPlan`, the spec tensors in
            declaration order (contiguous) and ``[u, w]`` (``[]`` without dot() terms).
        """
        q, k, v, grid = flatten_grid(self.ir, q, k, v)
        sizes, tens = self._check(q, k, v, tensors, grid)
        if torch.is_grad_enabled():
            self._check_grads(q, k, v, tens)
        if return_lse and self.ir.normalize == "sigmoid":
            raise ValueError(f"pattern {self.ir.name!r} uses normalize: sigmoid, which has no log-sum-exp: "
                             "call without return_lse")
        if scale is None:
            scale = 1.0 / math.sqrt(sizes["D"])
        names = tuple(t.name for t in self.ir.tensors)
        targs = [tens[n] for n in names]
        lowrank = []
        if self.ir.lowrank:
            q, k, v, lowrank = self._lowrank_factors(q, k, v, tens, sizes, scale)
        lay = None
        if self.plan.path == "box" and not self._torch_cpu(q.device):  # differentiated calls take the
            # backward's tiles (see _box_config); the CPU executor runs on the row-major grid
            training = torch.is_grad_enabled() and any(x.requires_grad for x in [q, k, v, *targs, *lowrank])
            lay = self.layout_for(sizes, device=q.device, training=training, dtype=q.dtype)
        graph = torch.is_grad_enabled() and any(x.requires_grad for x in [q, k, v, *targs])
        plan = _CallPlan(sizes, tuple(grid), float(scale), names, tuple(tens[n] is not tensors[n] for n in names),
                         lay, lay.as_list() if lay is not None else identity_layout(grid), graph)
        return q, k, v, plan, targs, lowrank

    def _lowrank_factors(self, q, k, v, tens: dict, sizes: dict, scale: float):
        """FlashBias folding of the dot() terms: ``u = [A_1, A_2, ...] / scale`` ``(B, Hq, Lq, R)``
        and ``w = [B_1, B_2, ...]`` ``(B, Hkv, Lk, R)`` (R: the ranks summed), in q's / k's dtype.
        The kernels add ``u w^T`` to ``q k^T`` with one extra small GEMM per tile (as if the head
        dim were ``[q, u]``/``[k, w]``, without padding D + R to a power of two), so
        ``score = s + A B^T`` and no ``Lq x Lk`` bias exists; their gradients come from the dQ
        and dK/dV kernels. A key-side factor per query head under GQA expands k and v to the
        query heads first.

        Returns:
            ``(q, k, v, [u, w])``.

        Raises:
            ValueError: summed ranks above 256 (or factors of unequal rank).
        """
        Hq, Hkv = sizes["H"], sizes["Hkv"]
        if Hq != Hkv and any(str(i) == "h" for lr in self.ir.lowrank for i in lr.b_idx):
            k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
            Hkv = Hq
        facs = lowrank_factors(self.ir, tens, sizes)
        rank = sum(U.shape[-1] for U, _ in facs)
        if rank > 256:
            raise ValueError(f"pattern {self.ir.name!r}: the dot() ranks sum to {rank}, above 256")
        u = torch.cat([U / scale for U, _ in facs], dim=-1).to(q.dtype).contiguous()
        w = torch.cat([W[:, :Hkv] for _, W in facs], dim=-1).to(k.dtype).contiguous()
        return q, k, v, [u, w]

    def layout_for(self, sizes: dict, config: Optional[Config] = None, device=None,
                   training: bool = False, dtype=torch.bfloat16) -> BoxLayout:
        """Box plans: the token layout (tile shape per axis, chosen by
        :func:`attncc.layout.choose_layout`) used for these sizes (``B, H, ..., G0..G2``).

        Raises:
            ValueError: the pattern has no box plan, or a grid axis has no dilation group.
        """
        if self.plan.path != "box":
            raise ValueError(f"pattern {self.ir.name!r} has no box plan (path {self.plan.path!r})")
        cfg = config or self._box_config(max(sizes["D"], sizes["Dv"]), device, training, dtype)
        return choose_layout(self.plan, sizes, cfg.block_m, cfg.block_n)

    def _box_config(self, head_dim: int, device=None, training: bool = False, dtype=torch.bfloat16) -> Config:
        """Tile sizes of box plans (the tile shape per axis, not the block size, is what the
        cost model chooses): fixed, CPU, or the first forward candidate of the device; when
        the call will be differentiated, the tiles of the first backward candidate (the
        token layout fixes the tiles of the forward and of the backward), with the warps of
        the forward candidate of those tiles."""
        if self.config or cache.interpreting():
            return self.config or CPU_CONFIG
        arch = _arch(device) if device is not None and torch.device(device).type == "cuda" else 90
        fwd = forward_candidates(head_dim, arch, dtype)
        if not training:
            return fwd[0]
        bwd = backward_candidates(head_dim, arch, dtype)[0]
        return next((c for c in fwd if (c.block_m, c.block_n) == (bwd.block_m, bwd.block_n)), bwd)

    def _launch_config(self, layout: list, cfg: Optional[Config], head_dim: int,
                       backward: bool = False, device=None, dtype=torch.bfloat16) -> Optional[Config]:
        """Box plans launch with the block sizes of their layout's tile shapes (warps and
        stages: ``cfg``, fixed, or the first forward / backward candidate)."""
        if self.plan.path != "box":
            return cfg
        if cfg is None and backward and not self.config and not cache.interpreting():
            cfg = backward_candidates(head_dim, _arch(device) if device is not None and device.type == "cuda" else 90,
                                      dtype)[0]
        base = cfg or self._box_config(head_dim, device, dtype=dtype)
        return dataclasses.replace(base, block_m=math.prod(layout[9:12]), block_n=math.prod(layout[12:15]))

    def with_blocks(self, block_mask, q: torch.Tensor, k: torch.Tensor) -> tuple:
        """The kernel a call with ``block_mask`` runs, and its block tensor.

        The pattern is compiled once per (block size, batch / head broadcast) with the block
        tensor joined to its mask (:func:`attncc.ir.with_block_mask`; kept on this object),
        so forward, backward (q, k, v and spec tensor gradients), GQA and ``Lq != Lk`` work
        as for the pattern itself; the block tensor reaches the kernels as the spec tensor
        :data:`attncc.ir.BLOCK_TENSOR`, and the tile lists come from it per call
        (:func:`attncc.runtime.tiles.block_classes`).

        Args:
            block_mask: :class:`attncc.BlockSparse` or FlexAttention ``BlockMask``.
            q / k: the call's query and key (their batch, heads and lengths; grid patterns:
                tokens flattened row-major).

        Returns:
            ``(kernel, blocks)``: a :class:`CompiledAttention` and the bool block tensor
            ``(B | 1, H | Hkv | 1, ceil(Lq / BQ), ceil(Lk / BK))``.

        Raises:
            TypeError / ValueError: see :meth:`attncc.BlockSparse.block_tensor`, and a
                pattern that declares a tensor named :data:`attncc.ir.BLOCK_TENSOR`.
        """
        from .sparse import as_block_sparse

        bs = as_block_sparse(block_mask)
        for name, x in (("q", q), ("k", k)):
            if not isinstance(x, torch.Tensor) or x.dim() < 4:
                raise ValueError(f"{name} must be a tensor (B, H, L, D) (grid patterns: (B, H, *grid, D))")
        if bs.kv_num_blocks.device != q.device and q.device.type != "meta":
            raise ValueError(f"block_mask is on {bs.kv_num_blocks.device} but q is on {q.device}")
        B, Hq, Hkv = q.shape[0], q.shape[1], k.shape[1]
        Lq, Lk = math.prod(q.shape[2:-1]), math.prod(k.shape[2:-1])
        blocks, per_batch, heads = bs.block_tensor(B, Hq, Hkv, Lq, Lk)
        kern = self.twin(("blocks", bs.block_size, per_batch, heads),
                         lambda ir: with_block_mask(ir, *bs.block_size, per_batch, heads))
        return kern, blocks

    def twin(self, key, derive) -> "CompiledAttention":
        """The kernel of a pattern derived from this one (``derive(self.ir)``: the block-mask,
        positions or sink-free twin), compiled once per ``key`` with this kernel's config,
        determinism and backend, and kept on this object."""
        twins = self.__dict__.setdefault("_twins", {})
        kern = twins.get(key)
        if kern is None:
            from attncc.compiler import build, plan_ir

            kern = twins[key] = build(plan_ir(derive(self.ir)), self.config, self.deterministic, self.backend)
        return kern

    def with_positions(self, q: torch.Tensor, k: torch.Tensor, q_offset=None, kv_offset=None, kv_lens=None,
                       q_total=None, kv_total=None, v: Optional[torch.Tensor] = None) -> tuple:
        """The kernel a call with position keywords runs, and its positions tensor.

        The twin :func:`attncc.ir.with_positions` (``q -> q + q_offset``, ``kv -> kv +
        kv_offset``, ``Lq -> q_total``, ``Lk -> kv_total``, and ``kv < kv_lens[b]`` when
        ragged, all run-time scalars per batch row) is compiled once per ragged flag and kept
        on this object, so forward, backward (q, k, v and spec tensor gradients), GQA, block
        masks and the CPU executor work as for the pattern itself, and causal / windowed
        masks keep their closed-form key ranges (a window visits only its window's tiles).

        Grid patterns (:mod:`attncc.grid_positions`): q / k / v are ``(B, H, rows, G1[, G2],
        D)`` shards of the first grid axis, offsets and totals count rows of that axis, and
        the twin is a 1-D kernel on the flattened local tokens (the caller flattens q, k, v;
        :meth:`__call__` does) with a positions tensor ``(B, 7)``; ``kv_lens`` is refused.

        Args:
            q / k: the call's query ``(B, Hq, Lq, D)`` and key ``(B, Hkv, Lk, D)`` (their
                batch, lengths and device; ``meta`` tensors skip the value checks; grid
                patterns: ``(B, H, rows, G1[, G2], D)``).
            q_offset, kv_offset, kv_lens, q_total, kv_total: see :meth:`__call__`.
            v: optional, the call's value (grid patterns: its shape is checked).

        Returns:
            ``(kernel, positions)``: a :class:`CompiledAttention` and the int32 ``(B, 5)``
            tensor :data:`attncc.ir.POS_TENSOR` (columns :data:`attncc.ir.POS_COLUMNS`;
            grid patterns ``(B, 7)``, :data:`attncc.grid_positions.GRID_POS_COLUMNS`).

        Raises:
            TypeError / ValueError: see :func:`attncc.positions.resolve_positions` and
                :func:`attncc.grid_positions.resolve_grid_positions`; q / k not 4-D tensors
                (grid patterns: not ``3 + axes``-D, or other axes than the first differing).
            NotImplementedError: ``dot()`` terms, ``route:`` clauses, ``kv_lens`` on a grid.
        """
        for name, x in (("q", q), ("k", k)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                if self.ir.grid:
                    break  # checked by attncc.grid_positions.check_shards below
                raise ValueError(f"{name} must be a tensor (B, H, L, D) with q_offset / kv_offset / kv_lens, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        ragged = kv_lens is not None
        kern = self.twin(("positions", ragged), lambda ir: with_positions(ir, ragged))
        if self.ir.grid:
            return kern, _gp.resolve_grid_positions(self.ir, q, k, q_offset, kv_offset, kv_lens, q_total, kv_total,
                                                    Dv=v.shape[-1] if isinstance(v, torch.Tensor) else None)
        pos = resolve_positions(q.shape[0], q.shape[2], k.shape[2], q.device, q_offset, kv_offset, kv_lens,
                                q_total, kv_total)
        return kern, pos.table

    def _gathered(self, q, k, v, kv_index, scale, return_lse: bool, block_mask, tensors: dict):
        """A call with ``kv_index`` (see :meth:`__call__`): :func:`attncc.gather_attention` with
        ``causal`` from the pattern's mask (none: every listed key; ``kv <= q``: top-left causal).

        Raises:
            NotImplementedError: another mask or score, a sink, gate, sigmoid, ``dot()``
                terms, spec tensors or a grid, or ``block_mask`` given too.
        """
        import sympy as sp

        from .gather import gather_attention

        ir = self.ir
        causal = {sp.true: False, sp.Le(I_INDEX["kv"], I_INDEX["q"]): True}.get(ir.mask)
        plain = (ir.score == _S and ir.sink is None and ir.gate is None and ir.normalize == "softmax"
                 and not ir.lowrank and not ir.tensors and not ir.grid)
        if causal is None or not plain or block_mask is not None or tensors:
            raise NotImplementedError(f"kv_index: token-level top-k runs attncc.gather_attention, which covers "
                                      f"patterns with no mask or 'kv <= q', the plain score s and no tensors, sink, "
                                      f"gate or grid, without block_mask; pattern {ir.name!r} is not one (use "
                                      f"attncc.reference(..., kv_index=...) for its semantics)")
        backend = "interpret" if q.device.type == "cpu" and cpu.cpu_backend(self.backend) == "interpret" else None
        return gather_attention(q, k, v, kv_index, scale=scale, causal=causal, return_lse=return_lse, backend=backend)

    def block_mass(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_mask, scale: Optional[float] = None,
                   **tensors) -> torch.Tensor:
        """The softmax mass each listed block received in a ``block_mask`` call: the target
        for training a router / indexer by distillation (NSA, DeepSeek sparse attention).

        ``mass[b, h, i, s]`` is the attention probability summed over the keys of block
        ``kv_indices[b, h', i, s]`` and averaged over the valid queries of query block ``i``
        (``exp(score - lse)`` over the pairs the pattern allows, ``lse`` from the same call's
        ``return_lse=True``, so the masses of a row sum to 1 minus its sink's share); 0 past
        ``kv_num_blocks`` and for rows with no allowed key. Computed in torch (float32) from
        gathered key blocks, a chunk of query blocks at a time (never ``Lq x Lk``); no gradient.

        Args:
            q / k: as the call (1-D patterns); lse: float32 ``(B, Hq, Lq)`` from the call.
            block_mask: the call's :class:`attncc.BlockSparse` or FlexAttention ``BlockMask``.
            scale / **tensors: as the call.

        Returns:
            float32 ``(B, Hq, ceil(Lq / BQ), max_blocks)`` (both lists of a schedule with
            ``full_*`` lists are concatenated: the full ones after the others).

        Raises:
            NotImplementedError: grid patterns, ``dot()`` terms or sigmoid normalization.
            ValueError / TypeError: as the call, and an ``lse`` of another shape.
        """
        from .sparse import as_block_sparse

        if self.ir.grid or self.ir.lowrank or self.ir.normalize != "softmax":
            raise NotImplementedError(f"block_mass: pattern {self.ir.name!r} has a grid, dot() terms or sigmoid "
                                      "normalization; only 1-D softmax patterns are supported")
        bs = as_block_sparse(block_mask)
        twin, blocks = self.with_blocks(bs, q, k)
        sizes, tens = twin._check(q, k, k, dict(tensors, **{BLOCK_TENSOR: blocks}))
        B, Hq, Hkv, Lq, Lk, D = (sizes[n] for n in ("B", "H", "Hkv", "Lq", "Lk", "D"))
        if tuple(lse.shape) != (B, Hq, Lq):
            raise ValueError(f"block_mass: lse must have shape (B, Hq, Lq) = {(B, Hq, Lq)}, got {tuple(lse.shape)}")
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        bq, bk = bs.block_size
        nq = -(-Lq // bq)
        lists = [(bs.kv_num_blocks, bs.kv_indices)]
        if bs.full_kv_num_blocks is not None:
            lists.append((bs.full_kv_num_blocks, bs.full_kv_indices))
        num, idx = [], []
        for n_, i_ in lists:  # per query head: (B, Hq, nq[, slots])
            th = n_.shape[1]
            hmap = torch.arange(Hq, device=q.device) // (Hq // th) if th not in (1, Hq) else None
            n_, i_ = n_[:, :, :nq].long(), i_[:, :, :nq].long()
            if hmap is not None:
                n_, i_ = n_[:, hmap], i_[:, hmap]
            num.append(n_.expand(B, Hq, nq))
            idx.append(i_.expand(B, Hq, nq, i_.shape[-1]))
        slots = torch.cat([torch.arange(x.shape[-1], device=q.device) < n_[..., None] for n_, x in zip(num, idx)], -1)
        idx = torch.cat(idx, -1)
        S = idx.shape[-1]
        kq = k.detach().float().repeat_interleave(Hq // Hkv, dim=1)
        out = torch.zeros(B, Hq, nq, S, dtype=torch.float32, device=q.device)
        per = max(1, (1 << 24) // max(1, B * Hq * bq * S * bk))  # query blocks per chunk
        env = dense_index_env(B, Hq, 1, 1, Hkv, D, sizes["Dv"], q.device)
        env[I_SIZES["Lq"]], env[I_SIZES["Lk"]] = Lq, Lk
        qpad = torch.nn.functional.pad(q.detach().float(), (0, 0, 0, nq * bq - Lq))
        lpad = torch.nn.functional.pad(lse.detach().float(), (0, nq * bq - Lq), value=float("inf"))
        with torch.no_grad():
            for i0 in range(0, nq, per):
                i1 = min(nq, i0 + per)
                c = i1 - i0
                rows = torch.arange(i0 * bq, i1 * bq, device=q.device).view(c, bq)
                cols = (idx[:, :, i0:i1, :, None] * bk + torch.arange(bk, device=q.device)).view(B, Hq, c, S * bk)
                kg = torch.gather(kq, 2, cols.clamp(max=Lk - 1).view(B, Hq, -1, 1).expand(-1, -1, -1, D))
                sc = torch.einsum("bhcqd,bhcnd->bhcqn", qpad[:, :, i0 * bq:i1 * bq].view(B, Hq, c, bq, D),
                                  kg.view(B, Hq, c, S * bk, D)) * scale
                env.update({I_INDEX["b"]: torch.arange(B, device=q.device).view(B, 1, 1, 1, 1),
                            I_INDEX["h"]: torch.arange(Hq, device=q.device).view(1, Hq, 1, 1, 1),
                            I_INDEX["q"]: rows.view(1, 1, c, bq, 1), I_INDEX["kv"]: cols.view(B, Hq, c, 1, S * bk),
                            _S: sc})
                ok = eval_expr(twin.ir.mask, env, tens).to(q.device) & (rows.view(1, 1, c, bq, 1) < Lq)
                ok = ok & (cols.view(B, Hq, c, 1, S * bk) < Lk) & slots[:, :, i0:i1, None, :, None].expand(
                    B, Hq, c, 1, S, bk).reshape(B, Hq, c, 1, S * bk)
                score = eval_expr(self.ir.score, env, tens, float_dtype=torch.float32).to(q.device)
                p = torch.where(ok, torch.exp(torch.broadcast_to(score, ok.shape) - lpad[:, :, i0 * bq:i1 * bq]
                                              .view(B, Hq, c, bq, 1)), 0.0)
                cnt = torch.clamp(Lq - rows[:, 0], max=bq).to(torch.float32).view(1, 1, c, 1)
                out[:, :, i0:i1] = p.view(B, Hq, c, bq, S, bk).sum((3, 5)) / cnt
        return out

    # ------------------------------------------------------------------ internals
    def _check_grads(self, q, k, v, tens: dict) -> None:
        """Raise before the forward when a requested gradient cannot be generated."""
        needs = [n for n, x in (("q", q), ("k", k), ("v", v)) if x.requires_grad]
        needs += [t.name for t in self.ir.tensors if tens[t.name].requires_grad]
        if needs and self.backward_error:
            raise NotImplementedError(f"pattern {self.ir.name!r} has no backward ({', '.join(needs)} require grad): "
                                      f"{self.backward_error}")
        for name in needs:
            if name in self.tensor_grad_errors:
                raise NotImplementedError(f"pattern {self.ir.name!r}: no gradient for tensor {name!r}: "
                                          f"{self.tensor_grad_errors[name]}; pass {name}.detach()")

    def grad_tensor_names(self) -> tuple:
        """Names of the spec tensors this kernel computes gradients for (declaration order)."""
        names = {g.tensor for g in self._grad_reads + self._epi_reads}
        return tuple(t.name for t in self.ir.tensors if t.name in names)

    def _check(self, q, k, v, tensors: dict, grid=None) -> tuple:
        """All argument checks before a launch (q, k, v grid-flattened); returns ``(sizes, tensors by name)``."""
        sizes, tens = check_inputs(self.ir, q, k, v, tensors, KERNEL_DTYPES, grid, self._size_checks, self._shapes)
        check_reads(self._read_checks, sizes, tens)
        return sizes, tens

    def _check_values(self, sizes: dict, named: dict, device) -> None:
        """Before a launch: the score / sink / gate reads in bounds, by the reference's rule
        (:func:`attncc.dense.check_clause_reads`), where their static index ranges do not
        show it for these sizes. A check passed is remembered per (clauses, sizes, content
        of the mask tensors and of the tensors read inside indices), so repeated calls cost a
        content comparison (see :func:`attncc.runtime.tiles.tensor_digest`).

        Raises:
            ValueError: a read outside its tensor (the reference's message).
        """
        if not self._value_checks:
            return
        clauses = clauses_to_check(self._value_checks, sizes, named)
        if not clauses:
            return
        key = (clauses, tuple(sorted(sizes.items())), tuple(tensor_digest(named[n]) for n in self._value_keyed))
        if key in self._values_ok:
            return
        check_clause_reads(self.ir, sizes, named, device, clauses)
        _remember(self._values_ok, key, True)

    def module(self, device: torch.device):
        """The loaded generated module, checked to be able to run on ``device``.

        Raises:
            RuntimeError: CPU tensors while Triton is not in interpreter mode.
        """
        if device.type == "cpu" and not cache.interpreting():
            raise RuntimeError("attncc kernels run on CPU tensors only under the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before triton is imported (attncc does so itself when it is "
                               "imported first on a machine without a GPU), or use the CPU executor "
                               "(backend=\"torch\" or ATTNCC_CPU=torch)")
        if self._module is None:
            mod = cache.load_module(self.path, self.key[:24])
            assert [[g.tensor, g.kind] for g in self._grad_reads] == mod.GRAD_READS, "generated module out of date"
            assert [[g.tensor, g.kind] for g in self._epi_reads] == mod.EPI_READS, "generated module out of date"
            self._module = mod
        return self._module

    def _torch_cpu(self, device) -> bool:
        """Whether a call on ``device`` runs the CPU executor (:mod:`attncc.runtime.cpu`): CPU
        tensors, backend ``"torch"`` (see :func:`~attncc.runtime.cpu.cpu_backend`), and not
        inside :class:`capture` (which records the kernels' launches)."""
        return device.type == "cpu" and _CAPTURE.get() is None and cpu.cpu_backend(self.backend) == "torch"

    def _run(self, device, *launches: Launch) -> None:
        """Launch on ``device`` (or record them inside :func:`capture`)."""
        rec = _CAPTURE.get()
        if rec is not None:
            rec.extend([(self, ln) for ln in launches])
            return
        mod = self.module(device)
        seen = _COMPILED.get()
        for ln in launches:
            if ln.kwargs.get("USE_TMA") and device.type == "cuda":
                _ensure_allocator()
            kernel = getattr(mod, ln.kernel)[ln.grid](*ln.args, **ln.kwargs)
            if seen is not None:
                seen.append(kernel)

    def _tables(self, sizes: dict, named: dict, cfg: Config, device, transposed: bool = False):
        """``(tables, strides)`` kernel arguments: the block table's lists (per query tile, or
        per key tile when ``transposed``) for table patterns, placeholders for closed forms."""
        if self.plan.path != "table":  # one zero placeholder per device, never written
            d = self._dummy.get(device)
            if d is None:
                d = self._dummy.setdefault(device, torch.zeros(1, dtype=torch.int32, device=device))
            return (d, d, d, d), (0, 0, 0, 0)
        tbl = block_table(self.plan, sizes, named, cfg.block_m, cfg.block_n, device, self.key)
        if transposed:
            return (tbl.q_num, tbl.q_idx, tbl.qfull_num, tbl.qfull_idx), tbl.strides_t()
        return (tbl.kv_num, tbl.kv_idx, tbl.full_num, tbl.full_idx), tbl.strides()

    def _named(self, tensors: List[torch.Tensor]) -> dict:
        return {t.name: x for t, x in zip(self.ir.tensors, tensors)}

    def launch(self, q, k, v, tensors: List[torch.Tensor], scale: float, cfg: Optional[Config] = None,
               layout=None, lowrank=(), call_key=None):
        """Launch the forward kernel (no argument checks: :meth:`__call__` does them; q, k, v
        grid-flattened, or permuted for box plans, ``layout`` their layout list, see
        :meth:`attncc.layout.BoxLayout.as_list`; ``lowrank``: ``[u, w]`` of the dot() terms,
        see :meth:`_lowrank_factors`).

        Returns:
            ``(out, lse, out_u)`` (``out_u``: the ungated output of gated patterns, else empty).
            CPU tensors run the executor of :mod:`attncc.runtime.cpu` unless the backend is
            ``"interpret"`` (see :meth:`_torch_cpu`).
        """
        if self._torch_cpu(q.device) and (self.plan.path != "box" or _is_identity(layout)):
            return cpu.forward(self, q, k, v, tensors, scale, layout, lowrank)
        if cfg is None and _decode.op_decodes(self, q, lowrank):
            # few queries through the custom op (torch.compile, the graph pass's sites, calls
            # that build an autograd graph): the split-KV decode kernel writes the same output
            # and LSE, which the backward reads as the forward's
            out, lse = _decode.launch_decode(self, _decode.op_plan(self, q, k, v, tensors), q, k, v, tensors, scale, [])
            return out, lse, out.new_empty(0)
        if call_key is not None:  # from __call__'s cache: the call's signature fixes this launch's
            key = ("call", call_key)
        else:
            key = launch_signature(q, k, v, tensors, layout, cfg, lowrank) if self.cache_calls else None
        lp = self._launches.get(key) if key is not None else None
        if lp is None:
            lp = self._launch_plan(q, k, v, tensors, scale, cfg, layout, lowrank)
            if key is not None:
                _remember(self._launches, key, lp)
        out = torch.empty(lp.out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(lp.lse_shape, dtype=torch.float32, device=q.device)
        # gated patterns also keep the ungated output (the backward needs it)
        gated = self.ir.gate is not None
        out_u = torch.empty_like(out) if gated else out.new_empty(0)
        if self._value_checks:
            self._check_values(lp.value_sizes, self._named(tensors), q.device)
        if lp.tables is not None:
            tables, tstrides = lp.tables
        else:
            tables, tstrides = self._tables(lp.sizes, self._named(tensors), lp.cfg, q.device)
        order = self._head_order(lp, self._named(tensors), q.device) if self.plan.scalars else None
        args, _, _ = _forward_args(lp, [q, k, v, out, lse, out_u if gated else out], tensors, lowrank, tables,
                                   tstrides, scale, order)
        consts = dict(lp.consts)
        if consts["USE_TMA"] and not tma_pointers_ok(q, k, v):  # a misaligned base: the plain loads
            consts["USE_TMA"] = False
        self._run(q.device, Launch("attn_fwd", lp.grid, args, consts))
        return out, lse, out_u

    def _head_order(self, lp: _LaunchPlan, named: dict, device) -> torch.Tensor:
        """``HEAD_ORDER`` of a plan with run-time scalars (:attr:`KernelPlan.scalars`, e.g.
        per-head windows): int32 ``(B*Hq,)``, the (batch*head) indices sorted by the number of
        key tiles their programs visit, summed over the query tiles (the tiles ``count_tiles``
        counts, from :func:`~attncc.runtime.tiles.closed_tile_classes`), descending; ties in
        index order (a stable sort: deterministic). ``attn_fwd`` runs (batch*head)
        ``HEAD_ORDER[program_id(1)]``.

        Why the grid stays ``(n_m, B*Hq)``: the hardware hands out blocks in linear block
        order, x fastest, so the n_m query tiles of grid row 0 go out first, then those of
        row 1: with the rows permuted the programs of the longest heads start first and the
        short ones fill the tail (LPT scheduling, as FlashAttention's). A grid
        ``(B*Hq, n_m)`` would instead start query tile 0 of every head, long and short,
        before any second tile, which the order cannot help; and ``B*Hq`` stays on the y
        axis whose 65535 limit it already had.

        The order depends on the scalars' values, which may change between calls of one
        signature: it is kept per (launch plan, device) with a snapshot of the scalar
        tensors and reused while each of them equals its snapshot (``torch.equal``: on CUDA
        one synchronisation, as the block-table memo of :meth:`_direct_call`); any change,
        in place or not, recomputes it (on the tensors' device)."""
        names = sorted({str(r.base.label) for r in self.plan.scalars})
        vals = [named[n] for n in names]
        key = (id(lp), device)
        hit = self._orders.get(key)
        if hit is not None and hit[0] is lp and all(
                a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
                for a, b in zip(hit[1], vals)):
            return hit[2]
        counts = self._visit_counts(lp.sizes, lp.cfg, named, device)
        order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
        _remember(self._orders, key, (lp, tuple(x.detach().clone() for x in vals), order))
        return order

    def _visit_counts(self, sizes: dict, cfg: Config, named: dict, device) -> torch.Tensor:
        """Per (batch*head): the key tiles the forward's programs visit, summed over the query
        tiles (int64 ``(B*Hq,)``, on ``device``; closed plans), evaluated in chunks of query
        tiles (never more than about 2**24 tile pairs at once)."""
        B, H, Lq, Lk = sizes["B"], sizes["H"], sizes["Lq"], sizes["Lk"]
        bm, bn = cfg.block_m, cfg.block_n
        n_m, n_n = -(-Lq // bm), -(-Lk // bn)
        total = torch.zeros(B, H, dtype=torch.int64, device=device)
        step = max(1, (1 << 24) // max(1, B * H * n_n))
        for m0 in range(0, n_m, step):
            starts = torch.arange(m0, min(n_m, m0 + step), device=device) * bm
            visit, _ = closed_tile_classes(self.plan.intervals, sizes, starts, torch.clamp(starts + bm, max=Lq) - 1,
                                           bn, device, named)
            total += visit.sum((-2, -1))
        return total.flatten()

    def _launch_plan(self, q, k, v, tensors, scale, cfg, layout, lowrank) -> _LaunchPlan:
        """The shape-only part of a forward launch (see :class:`_LaunchPlan`): sizes, the
        launch config (autotuned on CUDA), grid, output shapes, strides, constexprs."""
        layout = list(layout or identity_layout(None))
        sizes = _sizes(q, k, v, layout[:3])
        B, Hq, Lq, Dv = sizes["B"], sizes["H"], sizes["Lq"], sizes["Dv"]
        cfg = self._launch_config(layout, cfg, max(sizes["D"], Dv), device=q.device, dtype=q.dtype)
        if cfg is None:
            cfg = self.config or (CPU_CONFIG if cache.interpreting() else
                                  self._autotune(q, k, v, tensors, scale, sizes, layout, lowrank))
        if cfg.tma and not tma_strides_ok(q, k, v):  # TMA cannot read these strides: the plain loads
            cfg = dataclasses.replace(cfg, tma=False)
        out_shape = (B, Hq, Lq, Dv)
        out_stride = torch.empty(out_shape, device="meta").stride()  # torch.empty's (contiguous) strides
        tables = None if self.plan.path == "table" else self._tables(sizes, {}, cfg, q.device)
        n = math.prod(layout[:3]) if self.plan.path == "box" else None  # the grid's own tokens, not the padded
        return _LaunchPlan(sizes, cfg, (-(-Lq // cfg.block_m), B * Hq), out_shape, (B, Hq, Lq),
                           [*q.stride(), *k.stride(), *v.stride(), *out_stride], tables,
                           _kernel_sizes(sizes, layout),
                           # block-read forwards take the register cap (measured: moba's block
                           # kernel, sm_80 bf16 D = 64 at 64x64:4:3, 168 registers + 8 B spilled)
                           dict(_constexprs(q.dtype, sizes, cfg, layout, lowrank, cap=self.plan.blocks is not None),
                                USE_TMA=cfg.tma, WS=cfg.ws),
                           dict(sizes, **({"Lq": n, "Lk": n} if n else {})))

    def config_for(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                   **tensors) -> Config:
        """The launch :class:`Config` this kernel uses for these inputs (fixed, the CPU
        config under the interpreter, or the autotuned choice on CUDA, tuning if needed)."""
        if self.config is not None:
            return self.config
        if cache.interpreting():
            return CPU_CONFIG
        q, k, v, grid = flatten_grid(self.ir, q, k, v)
        sizes, tens = self._check(q, k, v, tensors, grid)
        if self.plan.path == "box":
            lay = self.layout_for(sizes, device=q.device, dtype=q.dtype)
            return self._launch_config(lay.as_list(), None, max(sizes["D"], sizes["Dv"]), device=q.device,
                                       dtype=q.dtype)
        scale = 1.0 / math.sqrt(sizes["D"]) if scale is None else float(scale)
        lowrank = []
        if self.ir.lowrank:
            q, k, v, lowrank = self._lowrank_factors(q, k, v, tens, sizes, scale)
        return self._autotune(q, k, v, [tens[t.name] for t in self.ir.tensors], scale, sizes,
                              identity_layout(grid), lowrank)

    def launch_backward(self, q, k, v, out, lse, dout, dlse, tensors: List[torch.Tensor], scale: float,
                        want: Optional[List[bool]] = None, cfg: Optional[Config] = None, layout=None, aux=None,
                        lowrank=()):
        """Launch the fused backward kernels (FlashAttention-2 style).

        Args:
            out / lse: the forward's outputs; dout ``(B, Hq, Lq, Dv)`` and dlse
                ``(B, Hq, Lq)``: the gradients flowing into them.
            aux: gated patterns: the ungated output the forward kept. The preprocessing
                kernel (``attn_bwd_pre``) computes delta, ``dout * gate`` and the partials of
                the gate's and the sink's tensors in one pass (fused), reduced here in a
                fixed order like the score tensors' partials.
            want: per spec tensor (declaration order), whether to return its gradient
                (only tensors in :meth:`grad_tensor_names` can have one).

            lowrank: ``[u, w]`` of the dot() terms (see :meth:`_lowrank_factors`).

        Returns:
            ``[dq, dk, dv, *grads, *dlowrank]``: shaped and typed like ``q, k, v`` (dK/dV
            summed over the query heads of each GQA group, without atomics: deterministic),
            then one gradient per wanted tensor, shaped and typed like it, then ``du, dw``
            (dot() terms only; written by the dQ and dK/dV kernels).
        """
        if self.backward_error:
            raise NotImplementedError(f"pattern {self.ir.name!r}: {self.backward_error}")
        if self._torch_cpu(q.device) and (self.plan.path != "box" or _is_identity(layout)):
            return cpu.backward(self, q, k, v, dout, dlse, tensors, scale, want, layout, lowrank)
        layout = list(layout or identity_layout(None))
        sizes = _sizes(q, k, v, layout[:3])
        B, Hq, Hkv, Lq, Lk = (sizes[n] for n in ("B", "H", "Hkv", "Lq", "Lk"))
        cfg = self._launch_config(layout, cfg, max(sizes["D"], sizes["Dv"]), backward=True, device=q.device,
                                  dtype=q.dtype)
        if cfg is None:  # fixed, the CPU config, or the fastest spill-free backward candidate
            cfg = self.config or (CPU_CONFIG if cache.interpreting() else self._tune(
                "bwd", q, sizes, layout, lowrank, backward_candidates,
                lambda c: self.launch_backward(q, k, v, out, lse, dout, dlse, tensors, scale, want, c, layout, aux,
                                               lowrank)))
        n_m, n_n = -(-Lq // cfg.block_m), -(-Lk // cfg.block_n)
        # partial buffers and their reduction use the original token indices (box plans: the
        # kernel sees permuted tokens but writes partials at the grid's row-major indices)
        osizes = dict(sizes)
        if self.plan.path == "box":
            osizes["Lq"] = osizes["Lk"] = math.prod(layout[:3])
        named = self._named(tensors)
        lse = lse.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        fwd_tables, fwd_strides = self._tables(sizes, named, cfg, q.device)
        t_tables, t_strides = self._tables(sizes, named, cfg, q.device, transposed=True)
        want = [False] * len(tensors) if want is None else list(want)
        names = [t.name for t in self.ir.tensors]
        reads = self._grad_reads
        wanted = {names[i] for i, w in enumerate(want) if w}
        atomic = not self.deterministic
        if atomic and wanted:  # the kernel adds at the tensor's own offsets into contiguous buffers
            tensors = [x.contiguous() for x in tensors]
            named = self._named(tensors)
        # float64 sums of the reduced partials; with atomics, the kernel's float32 gradients
        # of column / full reads (row partials are always reduced: they are small)
        sums = {n: torch.zeros(named[n].shape, dtype=torch.float64, device=q.device) for n in wanted}
        added = {g.tensor: torch.zeros(named[g.tensor].shape, dtype=torch.float32, device=q.device)
                 for g in reads if atomic and g.kind != "row" and g.tensor in wanted}
        dummy = torch.zeros(1, dtype=torch.float32, device=q.device)

        def buffers(grad_reads, into_added):  # per read: its buffer (a dummy when not wanted); the mask
            bufs, mask = [], 0
            for j, g in enumerate(grad_reads):
                if g.tensor not in wanted:
                    bufs.append(dummy)
                    continue
                mask |= 1 << j
                bufs.append(added[g.tensor] if into_added and atomic and g.kind != "row" else
                            torch.zeros(partial_shape(g.kind, osizes, n_m), dtype=torch.float32, device=q.device))
            return bufs, mask

        partials, gmask = buffers(reads, True)
        targs = _tensor_args(tensors)
        consts = _constexprs(q.dtype, sizes, cfg, layout, lowrank)
        ksizes = _kernel_sizes(sizes, layout)
        dlowrank = [torch.empty_like(x) for x in lowrank]
        lr_args = _lowrank_args(lowrank, dlowrank)
        # preprocessing: delta, and the fused epilogue backward (gate: dO * gate and the gate
        # tensors' partials; sink: the sink logits' partials)
        epi = self._epi_reads
        epartials, emask = buffers(epi, False)  # always reduced partials ("row" / "out")
        delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
        if self.ir.gate is not None:  # out = gate * o: the other kernels get dL/do = dout * gate and o
            out, dout_g = aux, torch.empty_like(dout)
        else:
            dout_g = dout
        # the preprocessing kernel is row-wise: 1-D plans give it at most 64 rows a program,
        # with 8 warps (it holds O, dO and the gate of its rows in fp32: 128 rows, or 4 warps
        # on sm_80, spill); box plans need the layout's tiles
        pre_m = cfg.block_m if self.plan.path == "box" else min(cfg.block_m, 64)
        pre = Launch("attn_bwd_pre", (-(-Lq // pre_m), B * Hq), [
            out, dout, lse, dlse.float().contiguous(), delta, dout_g, *epartials, *targs,
            *out.stride(), *dout.stride(), *dout_g.stride(), *ksizes],
            dict(BLOCK_M=pre_m, BLOCK_DV=consts["BLOCK_DV"], EMASK=emask, **layout_constexprs(layout),
                 num_warps=cfg.num_warps if cache.interpreting() else max(cfg.num_warps, 8), num_stages=1))
        dout = dout_g
        dq_launch = Launch("attn_bwd_dq", (n_m, B * Hq), [
            q, k, v, dout, lse, delta, dq, *partials, *targs, *lr_args, *fwd_tables,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *fwd_strides,
            *ksizes, scale], dict(consts, ATOMIC=atomic, GMASK=gmask, maxnreg=register_cap(cfg.num_warps)))
        dkdv = Launch("attn_bwd_dkdv", (n_n, B * Hkv), [
            q, k, v, dout, lse, delta, dk, dv, *targs, *lr_args, *t_tables,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), *t_strides,
            *ksizes, scale, n_m], dict(consts, DKDV_M=dkdv_rows(cfg, self.plan.path == "box" or bool(self.ir.lowrank)),
                                       maxnreg=register_cap(cfg.num_warps)))
        self._run(q.device, pre, dq_launch, dkdv)
        for j, g in enumerate(reads):
            if g.tensor in wanted and partials[j] is not added.get(g.tensor):
                reduce_partials(g, partials[j], sums[g.tensor], osizes, named)
        for n, x in added.items():
            sums[n] += x
        for g, part in zip(epi, epartials):
            if g.tensor in wanted:
                reduce_partials(g, part, sums[g.tensor], osizes, named)
        return [dq, dk, dv] + [sums[n].to(named[n].dtype) for n in names if n in wanted] + dlowrank

    def _autotune(self, q, k, v, tensors, scale, sizes, layout, lowrank=()) -> Config:
        """The forward's launch config on CUDA: the fastest spill-free
        :func:`~attncc.runtime.configs.forward_candidates` entry for this device and shape
        bucket (remembered on disk, ``autotune.json`` in the cache dir)."""
        if tma_strides_ok(q, k, v) and tma_pointers_ok(q, k, v):
            family, rule = "fwd", forward_candidates
        else:  # inputs tensor descriptors cannot read: the tma candidates are not tried (own bucket)
            family, rule = "fwd:no-tma", lambda hd, arch, dt=None: tuple(c for c in forward_candidates(hd, arch, dt)
                                                                    if not c.tma)
        return self._tune(family, q, sizes, layout, lowrank, rule,
                          lambda cfg: self.launch(q, k, v, tensors, scale, cfg, layout, lowrank))

    def launch_candidates(self, rule, head_dim: int, arch: int, dtype) -> tuple:
        """The launch configs the autotuner tries for this kernel: ``rule(head_dim, arch, dtype)``
        (:func:`~attncc.runtime.configs.forward_candidates` or
        :func:`~attncc.runtime.configs.backward_candidates`; also what ``attncc aot`` compiles).
        Plans with several key intervals bounded by run-time scalars (per-head mixes such as
        DuoAttention) drop the 128 x 64 backward tiles (their dQ spilled); on sm_80 at head dims
        up to 64, block-table plans whose score tensors get gradients drop the 64 x 32 ones.
        Grid twins (:mod:`attncc.grid_positions`) whose score reads a tensor keep the
        configs with key tiles of at most 32, as do positions twins gathering a score tensor
        per (q, kv) pair on sm_80 at head dims above 64.
        Block-read plans (and routed patterns, whose calls run one) keep the configs whose
        tiles lie inside one block (``block_m``
        divides BQ, ``block_n`` divides BK: the kernel then skips the per-pair block test),
        else those with key tiles of at most 32 (measured: the per-pair block read spills
        at 64-key tiles, D = 128, sm_90a and sm_80; block-mask twins of positions twins on
        sm_80 at D > 64 keep the 8-warp ones)."""
        cands = tuple(rule(head_dim, arch, dtype))
        if self.plan.score_tensors and _gp.is_grid_twin(self.ir):
            # a grid twin reading a tensor at global coordinates (neighborhood_2d_rpb): the per-pair
            # index arithmetic spills at 64-key tiles (measured, bf16 D = 128: forward 112-240 B on
            # sm_90a and sm_80, dQ at 128 x 64 56 B on sm_90a); 32-key tiles do not
            return tuple(c for c in cands if c.block_n <= 32) or cands
        if arch < 90 and head_dim > 64 and self._pair_read_positions_twin():
            # a positions twin (kv_lens / offsets / paged) gathering a score tensor per (q, kv) pair
            # (relative_position_bias' table[h, kv - q + Lq - 1]): measured bf16 D = 128 on sm_80,
            # forward: ragged 128x64:8:2 spilled 56 B, paged (page 16) 64x64:4:2 120 B and 128x64:8:2
            # 40 B, page 64: 40 / 80 B; every 32-key tile 0 (sm_90a and D = 64: none spilled)
            return tuple(c for c in cands if c.block_n <= 32) or cands
        if rule is backward_candidates and self.plan.scalars and len(self.plan.intervals) > 1:
            # several key intervals bounded by run-time scalars (duo_attention): the dQ kernel at
            # 128 x 64 tiles needs more than 255 registers (measured, sm_90a bf16 D = 128: 8 B spilled)
            return tuple(c for c in cands if c.block_m * c.block_n < 128 * 64) or cands
        if (rule is backward_candidates and arch < 90 and head_dim <= 64 and self.plan.path == "table"
                and self._grad_reads):
            # block-table plans whose score tensors get gradient partials: the dQ kernel at
            # 64 x 32 tiles needs more than 255 registers on sm_80 (measured, bf16 D = 64: BLOOM's
            # padded ALiBi from the graph pass, slope[h] * pos[b, kv] with a key-padding mask, 16 B
            # spilled; 32 x 32: 154 registers)
            return tuple(c for c in cands if c.block_m * c.block_n < 64 * 32) or cands
        br, route = self.plan.blocks, self.ir.route
        if br is not None:
            bq, bk = br.bq, br.bk
        elif route is not None:  # a routed call runs the block-mask kernel of the route's blocks
            bq, bk = (route.block if route.granularity == "block" else 1), route.block
        elif any(t.name == BLOCK_TENSOR for t in self.ir.tensors):
            # a block mask read per pair outside a block-read plan (the block-mask twin of a
            # positions twin: its table is evaluated per tile): 32-key tiles (measured, paged
            # causal + 64 x 64 block mask, bf16 D = 128: 128 x 64 spilled 504 B on sm_90a); on sm_80
            # at D > 64 with 8 warps (64 x 32 at 4 warps spilled 8 B there, 128 x 32 at 8: 0)
            return tuple(c for c in cands if c.block_n <= 32
                         and (arch >= 90 or head_dim <= 64 or c.num_warps >= 8)) or cands
        else:
            return cands
        aligned = tuple(c for c in cands if bq % c.block_m == 0 and bk % c.block_n == 0)
        return aligned or tuple(c for c in cands if c.block_n <= 32) or cands

    def _pair_read_positions_twin(self) -> bool:
        """A positions twin (:func:`attncc.ir.with_positions`) whose score reads a tensor at an
        index depending on both ``q`` and ``kv`` (a per-pair gather, e.g. a relative-position
        table)."""
        if not any(t.name == POS_TENSOR for t in self.ir.tensors):
            return False
        import sympy as sp

        pair = {I_INDEX["q"], I_INDEX["kv"]}
        return any(pair <= set().union(*(i.free_symbols for i in e.indices))
                   for e in self.ir.score.atoms(sp.Indexed))

    def _tune(self, family: str, q, sizes: dict, layout, lowrank, candidates, run) -> Config:
        """Time ``run(cfg)`` for every candidate of ``candidates(head_dim, arch)`` that fits
        and does not spill (``n_spills`` of the kernels it compiled), keep the fastest. A bucket
        not yet timed where nothing may be timed (:func:`untimed`) takes the first candidate."""
        dev = torch.cuda.get_device_name(q.device)
        arch = _arch(q.device)
        head_dim = max(sizes["D"], sizes["Dv"])
        bucket = (f"{dev}|{family}|{self.key}|{q.dtype}|D{sizes['D']}|Dv{sizes['Dv']}|Lq{_next_pow2(sizes['Lq'])}"
                  f"|Lk{_next_pow2(sizes['Lk'])}|G{sizes['H'] // sizes['Hkv']}|grid{list(layout)[:3]}"
                  f"|R{lowrank[0].shape[-1] if lowrank else 0}")
        if bucket in self._tuned:
            return self._tuned[bucket]
        cands = self.launch_candidates(candidates, head_dim, arch, q.dtype)
        with _LOCK:
            saved = cache.read_json("autotune.json")
            if bucket in saved:
                cfg = Config(**saved[bucket])
            elif untimed(q.device):  # nothing may be timed here: the first candidate, not remembered
                return cands[0]
            else:
                import triton.testing

                best, best_t = None, float("inf")
                for cfg in cands:
                    try:
                        with _compiled() as kernels:
                            run(cfg)
                        if any(getattr(kn, "n_spills", 0) for kn in kernels):
                            continue  # a config that spills registers is never used
                        t = triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
                    except Exception:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                        continue
                    if t < best_t:
                        best, best_t = cfg, t
                cfg = best or cands[0]
                saved = cache.read_json("autotune.json")
                saved[bucket] = cfg.__dict__
                cache.write_json("autotune.json", saved)
            self._tuned[bucket] = cfg
            return cfg

    # ------------------------------------------------------------------ analysis
    def tile_stats(self, Lq: int, Lk: int, B: int = 1, H: int = 1, Hkv: Optional[int] = None,
                   D: int = 64, Dv: Optional[int] = None, config: Optional[Config] = None,
                   device=None, per_query_tile: bool = False, grid=None, block_mask=None, q_offset=None,
                   kv_offset=None, kv_lens=None, q_total=None, kv_total=None, **tensors) -> dict:
        """Count the (query tile, key tile) pairs the kernel visits for a shape.

        Runs the generated ``count_tiles`` kernel, which is the forward kernel's own
        tile iteration without the math, so the counts are what the kernel does.

        Args:
            Lq, Lk: query / key lengths; B, H, Hkv, D, Dv: other sizes (only needed
                when the mask or the tensors depend on them).
            config: tile sizes (default: the CPU config, or this kernel's fixed config).
            device: where to run the counting kernel (default: the tensors' device, else
                CUDA when Triton compiles for a GPU, else CPU under the interpreter).
            per_query_tile: also return ``"per_query_tile"``: int64 ``(B*H, n_m, 2)`` on the
                CPU, the key tiles visited and of those full, per (batch*head, query tile).
            grid: grid patterns: the grid shape (e.g. ``(Y, X)``; ``Lq = Lk`` = its product).
            block_mask: a run-time block mask (as :meth:`__call__` takes it): the counts of
                the kernel a call with it runs (:meth:`with_blocks`).
            q_offset, kv_offset, kv_lens, q_total, kv_total: position keywords (as
                :meth:`__call__` takes them; tensors on ``device``): the counts of the
                kernel a call with them runs (:meth:`with_positions`), e.g. which tiles of a
                (query shard, key shard) pair of a context-parallel split are non-empty.
                Grid patterns: ``grid`` is the query shard's grid ``(rows, G1[, G2])``,
                ``Lq`` its token count and ``Lk`` the key shard's (whole rows: a multiple
                of ``G1 * G2``); offsets and totals in rows of the first grid axis.
            **tensors: the tensors the mask reads (block-table patterns), on any device.

        Returns:
            ``{"total", "visited", "full", "partial", "block_m", "block_n", "layout"}``: counts
            summed over all (batch, head) pairs; ``partial = visited - full``; ``layout``: the
            :class:`~attncc.layout.BoxLayout` whose tiles were counted (box plans), else None.
        """
        Hkv = Hkv or H
        if _positions_given(q_offset, kv_offset, kv_lens, q_total, kv_total):
            dev = torch.device(device) if device is not None else next(
                (x.device for x in (q_offset, kv_offset, kv_lens, q_total, kv_total) if isinstance(x, torch.Tensor)),
                torch.device("cpu" if cache.interpreting() or not torch.cuda.is_available() else "cuda"))
            qs, ks = (B, H, Lq, 1), (B, Hkv, Lk, 1)
            if self.ir.grid:  # grid: the query shard's grid (rows, G1[, G2]); Lk: the key shard's tokens
                qs, ks = _gp.stat_shapes(self.ir, B, H, Hkv, Lq, Lk, grid)
                grid = None
            kern, pos = self.with_positions(torch.empty(qs, device=dev), torch.empty(ks, device=dev), q_offset,
                                            kv_offset, kv_lens, q_total, kv_total)
            return kern.tile_stats(Lq, Lk, B, H, Hkv, D, Dv, config, dev, per_query_tile, grid, block_mask,
                                   **tensors, **{POS_TENSOR: pos})
        if block_mask is not None:
            dev = block_mask.kv_num_blocks.device
            shape = (B, H, *(grid or (Lq,)), 1)
            kern, blocks = self.with_blocks(block_mask, torch.empty(shape, device="meta"),
                                            torch.empty((B, Hkv, *(grid or (Lk,)), 1), device="meta"))
            return kern.tile_stats(Lq, Lk, B, H, Hkv, D, Dv, config, device or dev, per_query_tile, grid,
                                   **tensors, **{BLOCK_TENSOR: blocks})
        cfg = config or self.config or CPU_CONFIG
        Dv = Dv or D
        sizes = {"B": B, "H": H, "Hkv": Hkv, "Lq": Lq, "Lk": Lk, "D": D, "Dv": Dv, **grid_sizes(grid)}
        check_sizes(self.ir, self._size_checks, sizes)
        if device is None:
            device = next((t.device for t in tensors.values() if isinstance(t, torch.Tensor)), None)
        if device is None:
            device = torch.device("cpu" if cache.interpreting() or not torch.cuda.is_available() else "cuda")
        device = torch.device(device)
        tensors = {n: x.to(device) if isinstance(x, torch.Tensor) else x for n, x in tensors.items()}
        named = check_tensors(self.ir, tensors, sizes, device, only=self.plan.mask_tensors, shapes=self._shapes)
        check_reads(self._read_checks, sizes, named)
        lay = None
        layout = identity_layout(grid)
        if self.plan.path == "box":  # counted on the permuted layout the kernel runs on
            lay = self.layout_for(sizes, config, device)
            layout = lay.as_list()
            cfg = self._launch_config(layout, cfg, max(D, Dv), device=device)
            Lq = Lk = lay.length
        n_m, n_n = -(-Lq // cfg.block_m), -(-Lk // cfg.block_n)
        tables, tstrides = self._tables(sizes, named, cfg, device)
        counts = torch.zeros(B * H, n_m, 2, dtype=torch.int32, device=device)
        # the spec tensors (closed plans read their run-time scalars, e.g. per-head windows);
        # tensors the iteration does not read may be left out: an empty stand-in of their kind
        targs = _tensor_args([named[t.name] if t.name in named else
                              torch.zeros((1,) * t.ndim, dtype=_STAND_IN[t.kind], device=device)
                              for t in self.ir.tensors])
        self._run(device, Launch("count_tiles", (n_m, B * H), [counts, *targs, *tables, *tstrides,
                                                               *_kernel_sizes(sizes, layout), n_m],
                                 dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **layout_constexprs(layout))))
        visited = int(counts[..., 0].sum())
        full = int(counts[..., 1].sum())
        out = {"total": B * H * n_m * n_n, "visited": visited, "full": full, "partial": visited - full,
               "block_m": cfg.block_m, "block_n": cfg.block_n, "layout": lay}
        if per_query_tile:
            out["per_query_tile"] = counts.to(torch.int64).cpu()
        return out


def _is_identity(layout) -> bool:
    """Whether a layout list is the identity (tokens in the grid's row-major order)."""
    return not layout or list(layout) == identity_layout(list(layout)[:3])


def _save_for_backward(ctx, kern, q, k, v, out, lse, aux, tensors, lowrank, scale: float, layout) -> None:
    """What the backward of the custom op and of :class:`_EagerAutograd` keeps: the inputs,
    outputs, dot() factors and spec tensors, the scale, the layout and which spec tensors
    get a gradient (float tensors that require grad and that the kernels differentiate)."""
    ctx.save_for_backward(q, k, v, out, lse, aux, *lowrank, *tensors)
    ctx.scale, ctx.layout, ctx.n_lowrank = scale, layout, len(lowrank)
    has_grad = set(kern.grad_tensor_names())
    ctx.want = [t.requires_grad and spec.name in has_grad for t, spec in zip(tensors, kern.ir.tensors)]


def _backward_grads(ctx, dout, dlse, run) -> tuple:
    """The backward of the custom op and of :class:`_EagerAutograd`: ``run(q, k, v, out, lse,
    aux, dout, dlse, tensors, scale, want, layout, lowrank)`` (the backward op, or
    :meth:`CompiledAttention.launch_backward`) on what :func:`_save_for_backward` kept, with
    missing output gradients as zeros. Returns ``(dq, dk, dv, per-tensor grads or None,
    dot() factor grads)``."""
    q, k, v, out, lse, aux, *rest = ctx.saved_tensors
    lowrank, tensors = list(rest[:ctx.n_lowrank]), list(rest[ctx.n_lowrank:])
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv, *grads = run(q, k, v, out, lse, aux, dout, dlse, tensors, ctx.scale, ctx.want, ctx.layout, lowrank)
    it = iter(grads)
    tgrads = [next(it) if w else None for w in ctx.want]
    return dq, dk, dv, tgrads, list(it)


class _EagerAutograd(torch.autograd.Function):
    """Eager calls that build an autograd graph: the custom op's forward and backward
    (:meth:`CompiledAttention.launch` / :meth:`~CompiledAttention.launch_backward`, the same
    saved tensors and gradients as the op's ``register_autograd``) through one
    ``torch.autograd.Function``, without ``torch.library``'s Python autograd wrapper around
    the op (its argument normalisation and pytree flattening cost most of a small call's host
    time). ``torch.compile`` never sees it: a traced call has no call key and takes the op.

    ``apply(kern, call_key, scale, layout, n_tensors, q, k, v, *tensors, *lowrank)`` ->
    ``(out, lse, aux)`` as :meth:`CompiledAttention.launch`. Double backward raises (as the
    op's backward op, which has no autograd kernel)."""

    @staticmethod
    def forward(ctx, kern, call_key, scale, layout, n_tensors, q, k, v, *rest):
        tensors, lowrank = list(rest[:n_tensors]), list(rest[n_tensors:])
        out, lse, aux = kern.launch(q, k, v, tensors, scale, layout=layout, lowrank=lowrank, call_key=call_key)
        _save_for_backward(ctx, kern, q, k, v, out, lse, aux, tensors, lowrank, scale, layout)
        ctx.kern = kern
        ctx.mark_non_differentiable(aux)
        return out, lse, aux

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse, daux):
        kern = ctx.kern

        def run(q, k, v, out, lse, aux, dout, dlse, tensors, scale, want, layout, lowrank):
            return kern.launch_backward(q, k, v, out, lse, dout, dlse, tensors, scale, want, layout=layout, aux=aux,
                                        lowrank=lowrank)

        dq, dk, dv, tgrads, dlowrank = _backward_grads(ctx, dout, dlse, run)
        return (None, None, None, None, None, dq, dk, dv, *tgrads, *dlowrank)


def _eager_autograd(kern: CompiledAttention, call_key, q, k, v, tensors, scale: float, layout, lowrank):
    """The op's signature over :class:`_EagerAutograd` (``(out, lse, aux)``)."""
    return _EagerAutograd.apply(kern, call_key, scale, layout, len(tensors), q, k, v, *tensors, *lowrank)


def _make_op(kern: CompiledAttention):
    """Register ``attncc::<pattern>_<hash>`` as a torch custom op with a fake (meta)
    implementation, so ``torch.compile(fullgraph=True)`` traces through it."""
    # torch's schema parser takes ASCII identifiers: other characters of a pattern name
    # (``pattern é:`` is a valid Python identifier) are spelled by their code point
    safe = "".join(c if c.isascii() and (c.isalnum() or c == "_") else f"u{ord(c):x}" for c in kern.ir.name)
    name = f"attncc::{safe}_{kern.key[:16]}"
    if kern.config is not None:  # a fixed launch config is part of the op's behaviour
        c = kern.config
        name += f"_m{c.block_m}n{c.block_n}w{c.num_warps}s{c.num_stages}" + "_tma" * c.tma + "_ws" * c.ws
    if not kern.deterministic:
        name += "_atomic"
    if kern.backend is not None:  # a fixed CPU backend too
        name += f"_{kern.backend}"
    with _LOCK:
        if name in _OPS:  # same IR, templates, compiler and config: the kernel it runs is identical
            return _OPS[name]

        def impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: List[torch.Tensor],
                 scale: float, layout: List[int],
                 lowrank: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return kern.launch(q, k, v, tensors, scale, layout=layout, lowrank=lowrank)

        op = torch.library.custom_op(name, mutates_args=())(impl)

        def fake(q, k, v, tensors, scale, layout, lowrank):
            B, Hq, Lq, _ = q.shape
            out = q.new_empty((B, Hq, Lq, v.shape[-1]))
            return (out, q.new_empty((B, Hq, Lq), dtype=torch.float32),
                    torch.empty_like(out) if kern.ir.gate is not None else q.new_empty(0))

        op.register_fake(fake)

        def bwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     aux: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor, tensors: List[torch.Tensor],
                     scale: float, want: List[bool], layout: List[int],
                     lowrank: List[torch.Tensor]) -> List[torch.Tensor]:
            return kern.launch_backward(q, k, v, out, lse, dout, dlse, tensors, scale, want, layout=layout, aux=aux,
                                        lowrank=lowrank)

        bwd = torch.library.custom_op(name + "_bwd", mutates_args=())(bwd_impl)

        def bwd_fake(q, k, v, out, lse, aux, dout, dlse, tensors, scale, want, layout, lowrank):
            return ([torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
                    + [torch.empty_like(t) for t, w in zip(tensors, want) if w] + [torch.empty_like(x) for x in lowrank])

        bwd.register_fake(bwd_fake)

        def setup_context(ctx, inputs, output):
            q, k, v, tensors, scale, layout, lowrank = inputs
            _save_for_backward(ctx, kern, q, k, v, *output, tensors, lowrank, scale, layout)

        def backward(ctx, dout, dlse, daux):
            dq, dk, dv, tgrads, dlowrank = _backward_grads(ctx, dout, dlse, bwd)
            return dq, dk, dv, tgrads, None, None, dlowrank

        op.register_autograd(backward, setup_context=setup_context)
        _OPS[name] = op
        return op
