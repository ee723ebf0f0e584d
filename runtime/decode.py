"""Split-KV decode (issue 16, section 1): FlashDecoding / FlexAttention's ``flex_decoding`` for
every pattern the language expresses, generated from the same plan as the forward.

With few queries (token-by-token generation, speculative decoding: ``Lq <= 16``) the forward's
one program per (query tile, head) leaves most of a GPU idle while each program walks the whole
KV cache alone. The decode kernel ``attn_decode`` (``templates/decode.py.j2``):

* packs the ``G = Hq / Hkv`` query heads that share a KV head, times ``Lq`` queries, into the
  rows of one query tile (any ratio, padded rows masked), so the KV cache is read once per KV
  head;
* visits the key tiles the plan gives those rows (closed-form ranges, the union over the
  packed heads where a range depends on the head, e.g. per-head windows; or the block table)
  and splits that tile sequence into ``num_splits`` contiguous shares, one program each;
* runs the forward's own per-tile code (score, mask, online softmax, ``P V``, ``dot()`` terms)
  and writes each split's fp32 partial output and LSE; ``decode_merge`` merges them by LSE
  (sigmoid attention: partial sums add). The sink joins split 0, the gate multiplies every
  split's partial output (the merge is linear in them).

Semantics are the forward's for the same call (positions as the pattern states them,
``attncc.reference`` defines them): ``kern(q, k, v, decode=True)`` equals ``kern(q, k, v)``.
Block-table plans whose table depends on the head (per-head masks, run-time block masks) pack
one head per program (``GP = 1``) and read the forward's table at the decode's key tiles.
Forward only: a call that needs a gradient is refused by ``decode=True`` and never chosen
automatically. Grid patterns (box plans) have no decode kernel.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from attncc.layout import identity_layout

from . import cache
from .configs import Config, dtype_name, register_cap

#: calls with at most this many queries take the decode kernel automatically (when nothing
#: needs a gradient and the Triton kernels run: CUDA, or ``backend="interpret"`` on CPU)
MAX_AUTO_LQ = 16
#: set while a call with ``decode=False`` runs: the forward custom op launches the forward
#: kernel even for ``Lq <= MAX_AUTO_LQ`` (see :func:`op_decodes`)
FORWARD_KERNEL: contextvars.ContextVar = contextvars.ContextVar("attncc_forward_kernel", default=False)
#: largest number of splits of one program's key tiles
MAX_SPLITS = 64
#: key tiles a split should get at least (fewer: fewer splits)
MIN_TILES_PER_SPLIT = 2
#: rows of a decode_merge program
MERGE_ROWS = 16


def decode_config(head_dim: int, arch: int = 90, dtype=None, rows: int = 64) -> Config:
    """The decode kernel's launch config for a packed query tile of ``rows`` rows (a power of
    two, 16 .. :func:`max_rows`) at head dim ``head_dim`` (padded to a power of two by the
    kernel) on compute capability ``arch`` for inputs of ``dtype``. Decode is bound by the KV
    read: the split count, not the tile shape, sets the parallelism, so one config per row
    tile. Every decode launch takes :func:`register_cap` (ptxas otherwise trades registers
    for occupancy and spills).

    Measured with the AOT sweep (``attncc.aot`` family ``decode``, 15 library patterns):
    64-row tiles at 4 warps spilled 8-40 B at D = 128 on sm_80 (``gated_causal``,
    ``relative_position_bias``, ``query_temperature``, ``global_sliding_window``), as did
    ``global_sliding_window``'s 32-row tile on sm_90a (16 B); 8 warps for 64 rows at D > 64.
    The sweep with this rule (bf16, D = 64 / 128 / 256, sm_90a and sm_80, every row tile,
    ``attn_decode`` and ``decode_merge``): ``benchmarks/results/aot_decode.md``.
    fp32 (exact fp32 products, no tensor cores) takes the forward's fp32 tiles."""
    if dtype_name(dtype) == "fp32":
        rows = min(rows, 32)
        return Config(rows, 16, 8 if rows > 16 else 4, 2)
    if head_dim <= 64:
        return Config(rows, 64, 4, 3)
    if head_dim <= 128:
        return Config(rows, 64, 8 if rows >= 64 else 4, 3 if arch >= 90 else 2)
    return Config(rows, 32, 8 if rows >= 32 else 4, 2)


def max_rows(head_dim: int, dtype=None) -> int:
    """The largest packed row tile of the decode kernel: 64, or 32 for fp32 and for head dims
    above 128 (measured: ``gated_causal``'s 64-row tile at D = 256 spilled 16 B on sm_80 with 8
    warps and the register cap; its 32-row tile does not)."""
    return 32 if dtype_name(dtype) == "fp32" or head_dim > 128 else 64


def decode_candidates(head_dim: int, arch: int = 90, dtype=None) -> tuple:
    """Every decode launch config the runtime may use at this head dim, target and dtype: one
    per packed row tile (16 .. :func:`max_rows`), see :func:`decode_config`."""
    rows = (16, 32, 64)[: 2 if max_rows(head_dim, dtype) == 32 else 3]
    return tuple(decode_config(head_dim, arch, dtype, m) for m in rows)


def choose_splits(n_tiles: int, programs: int, units: int) -> int:
    """Split count of one program's ``n_tiles`` key tiles when ``programs`` programs (row tiles
    times head groups) share a device of ``units`` SMs (CPU: cores): enough splits for about
    two programs per SM, each with at least :data:`MIN_TILES_PER_SPLIT` tiles, at most
    :data:`MAX_SPLITS`."""
    if n_tiles <= 1:
        return 1
    want = -(-2 * units // max(1, programs))
    return max(1, min(want, -(-n_tiles // MIN_TILES_PER_SPLIT), MAX_SPLITS))


def _units(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter runs programs one after another: a few splits exercise the merge


@dataclass(frozen=True)
class DecodePlan:
    """The shape-only part of a decode call (kept per call signature): sizes, the launch
    config (``block_m``: the packed row tile), heads packed per program ``gp``, the split
    count, the two launch grids and the constexprs.

    Attributes:
        sizes: ``B, H, Hkv, Lq, Lk, D, Dv`` (and grid sizes 1).
        cfg: the :class:`Config` of ``attn_decode``.
        gp: query heads packed per program (``Hq / Hkv``, or 1 for head-dependent tables).
        splits: programs per (row tile, head group) along the key range.
        grid: ``attn_decode``'s grid ``(splits, row tiles, B * Hq / gp)``.
        table_m: block-table plans: the query tile of the table (``block_m`` when ``gp == 1``,
            else one tile holding every query), else 0.
        consts: ``attn_decode``'s constexprs and launch options.
        n_tiles: the key tiles one program visits (the estimate :func:`choose_splits` read).
        auto: the split count is the rule's (no ``num_splits`` given): on CUDA the first
            launch autotunes it (:func:`split_candidates`, :func:`tuned_plan`).
        tuned: holds the autotuned plan (key ``"plan"``) once the first launch has chosen it.
    """

    sizes: dict
    cfg: Config
    gp: int
    splits: int
    grid: tuple
    table_m: int
    consts: dict
    n_tiles: int = 1
    auto: bool = False
    tuned: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def decode_error(kern) -> str:
    """Why ``kern`` has no decode kernel (``""``: it has one)."""
    if kern.plan.path == "box" or kern.ir.grid:
        return f"pattern {kern.ir.name!r} is a grid pattern: grid patterns (box plans) have no split-KV decode kernel"
    return ""


def requiring_grad(**inputs) -> list:
    """The names of ``inputs`` that are tensors requiring a gradient while autograd records
    (empty under ``torch.no_grad()``): what the forward-only paths (decode, paged caches) refuse."""
    if not torch.is_grad_enabled():
        return []
    return [n for n, x in inputs.items() if isinstance(x, torch.Tensor) and x.requires_grad]


def _needs_grad(q, k, v, tensors: dict) -> list:
    return requiring_grad(q=q, k=k, v=v, **tensors)


def auto_decode(kern, q, k, v, tensors: dict) -> bool:
    """Whether a call ``kern(q, k, v, **tensors)`` without ``decode=`` takes the decode kernel:
    ``Lq <= MAX_AUTO_LQ`` queries of a 1-D pattern, nothing requires a gradient, the Triton
    kernels run (CUDA, or ``backend="interpret"`` / ``capture`` on CPU) and ``torch.compile``
    is not tracing (it traces the forward's custom op)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[2] > MAX_AUTO_LQ or kern.ir.grid:
        return False
    if kern.plan.path == "box" or torch.compiler.is_compiling() or kern._torch_cpu(q.device):
        return False
    return not _needs_grad(q, k, v, tensors)


def op_decodes(kern, q, lowrank) -> bool:
    """Whether the forward custom op (:meth:`CompiledAttention.launch`, what ``torch.compile``,
    the graph pass's rewritten sites and calls that build an autograd graph run) takes the
    decode kernel: ``Lq <= MAX_AUTO_LQ`` queries of a 1-D pattern without a gate (whose
    backward needs the ungated output the forward kernel keeps) or ``dot()`` terms. Its output
    and LSE are the forward kernel's, so the backward is unchanged."""
    return (q.dim() == 4 and q.shape[2] <= MAX_AUTO_LQ and not lowrank and not decode_error(kern)
            and kern.ir.gate is None and not kern.ir.lowrank and not FORWARD_KERNEL.get())


def op_plan(kern, q, k, v, targs: list) -> DecodePlan:
    """The :class:`DecodePlan` of an op call (checked by :meth:`CompiledAttention.__call__`),
    remembered per shapes, strides, dtype and device."""
    from .kernel import _sizes, launch_signature

    key = launch_signature(q, k, v, targs)
    plans = kern.__dict__.setdefault("_op_decode_plans", {})
    dp = plans.get(key)
    if dp is None:
        dp = _decode_plan(kern, q, k, v, _sizes(q, k, v), targs, [], None)
        _remember(plans, key, dp)
    return dp


def decode_attention(kern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                     return_lse: bool = False, num_splits: Optional[int] = None, block_mask=None, q_offset=None,
                     kv_offset=None, kv_lens=None, q_total=None, kv_total=None, **tensors):
    """Split-KV decode of ``kern``'s pattern (see the module docstring): the same result as
    ``kern(q, k, v, scale=scale, return_lse=return_lse, **tensors)``, forward only.

    Args:
        kern: a :class:`attncc.runtime.CompiledAttention` of a 1-D pattern.
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``; fp32 / fp16 /
            bf16, any strides (checked exactly as the forward checks them). Any ``Lq``
            (chosen automatically for ``Lq <= 16``).
        scale / return_lse / block_mask / **tensors: as the forward (a routed pattern computes
            its block mask with :func:`attncc.topk_blocks` unless one is given).
        q_offset / kv_offset / kv_lens / q_total / kv_total: the position keywords of the
            forward (a ragged KV cache ``kv_lens``, bottom-right query positions by default):
            the pattern's positions twin (:meth:`~attncc.runtime.CompiledAttention.with_positions`)
            runs, its run-time scalars read per batch row by the decode kernel as by the forward.
        num_splits: programs per (query tile, head group) along the key range (default:
            from the visited key tiles and the device's SM count; under the interpreter a
            few). Any value >= 1 gives the same result within fp32 rounding.

    Returns:
        ``out`` ``(B, Hq, Lq, Dv)`` in ``q.dtype`` (and ``lse`` ``(B, Hq, Lq)`` float32,
        natural log, with ``return_lse``). Rows with no allowed key: 0 and ``-inf`` (with a
        sink: 0 and the sink logit).

    Raises:
        ValueError: an input requires grad (decode is forward only), ``num_splits < 1``, or
            what the forward raises for bad inputs (before any launch).
        NotImplementedError: a grid pattern (no decode kernel).
    """
    err = decode_error(kern)
    if err:
        raise NotImplementedError(f"decode: {err}; call without decode=True")
    grads = _needs_grad(q, k, v, tensors)
    if grads:
        raise ValueError(f"decode=True: the split-KV decode kernel is forward only, but {', '.join(grads)} "
                         "require grad; call under torch.no_grad() / with detached inputs, or without decode=True "
                         "(the forward kernel has a backward)")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    from attncc.positions import given

    if given(q_offset, kv_offset, kv_lens, q_total, kv_total):  # the positions twin, as the forward
        from attncc.ir import POS_TENSOR

        twin, pos = kern.with_positions(q, k, q_offset=q_offset, kv_offset=kv_offset, kv_lens=kv_lens,
                                        q_total=q_total, kv_total=kv_total)
        return decode_attention(twin, q, k, v, scale, return_lse, num_splits, block_mask, **tensors,
                                **{POS_TENSOR: pos})
    if block_mask is None and kern.ir.route is not None:  # route: the producer, then the consumer
        from .routing import topk_blocks

        block_mask = topk_blocks(q, k, **kern.ir.route.kwargs())
    if block_mask is not None:
        from attncc.ir import BLOCK_TENSOR

        twin, blocks = kern.with_blocks(block_mask, q, k)
        return decode_attention(twin, q, k, v, scale, return_lse, num_splits, **tensors, **{BLOCK_TENSOR: blocks})
    if kern._torch_cpu(q.device):  # CPU tensors with the torch executor: it computes the same result
        return kern(q, k, v, scale=scale, return_lse=return_lse, decode=False, **tensors)
    key = kern._call_key(q, k, v, scale, return_lse, tensors) if kern.cache_calls else None
    calls = kern.__dict__.setdefault("_decode_calls", {})
    hit = calls.get((key, num_splits)) if key is not None else None
    if hit is None:
        q, k, v, cplan, targs, lowrank = kern._plan_call(q, k, v, scale, return_lse, tensors)
        from .kernel import _sizes

        # the sizes of the launched tensors (dot() terms may repeat k, v to the query heads)
        dplan = _decode_plan(kern, q, k, v, _sizes(q, k, v), targs, lowrank, num_splits)
        if key is not None and not lowrank:
            _remember(calls, (key, num_splits), (cplan, dplan))
    else:
        cplan, dplan = hit
        targs = [tensors[n].contiguous() if c else tensors[n] for n, c in zip(cplan.names, cplan.copy)]
        lowrank = []
    out, lse = launch_decode(kern, dplan, q, k, v, targs, cplan.scale, lowrank)
    return (out, lse) if return_lse else out


def _remember(store: dict, key, value) -> None:
    from .kernel import _remember as remember

    remember(store, key, value)


def _decode_plan(kern, q, k, v, sizes: dict, targs: list, lowrank: list, num_splits: Optional[int]) -> DecodePlan:
    """The :class:`DecodePlan` of a checked call (q, k, v as launched)."""
    from .kernel import _constexprs, _next_pow2

    B, Hq, Hkv, Lq, Lk = (sizes[n] for n in ("B", "H", "Hkv", "Lq", "Lk"))
    plan = kern.plan
    G = Hq // Hkv
    # block tables that depend on the head (per-head masks, run-time block masks): one head a
    # program, the forward's table per query tile; else the G heads of a KV head packed
    gp = 1 if plan.path == "table" and (plan.mask_uses_h or plan.blocks is not None) else G
    rows = gp * Lq
    if kern.config is not None:  # a fixed config (attncc.compile(block_m=...), the AOT jobs): its
        base = kern.config       # block_m caps the row tile
        cfg = dataclasses.replace(base, block_m=max(16, min(_next_pow2(base.block_m), _next_pow2(rows))), tma=False,
                                  ws=False)
    elif cache.interpreting():
        cfg = Config(max(16, min(64, _next_pow2(rows))), 16, 1, 1)
    else:
        from .kernel import _arch

        arch = _arch(q.device) if q.device.type == "cuda" else 90  # (CPU: recorded by capture())
        hd = max(sizes["D"], sizes["Dv"])
        cfg = decode_config(hd, arch, q.dtype, max(16, min(max_rows(hd, q.dtype), _next_pow2(rows))))
    bm = cfg.block_m
    n_m = -(-rows // bm)
    n_n = -(-Lk // cfg.block_n)
    programs = n_m * B * (Hq // gp)
    n_tiles = _visited_estimate(kern, sizes, cfg.block_n, q.device, n_n)
    auto = num_splits is None
    if auto:
        num_splits = choose_splits(n_tiles, programs, _units(q.device))
    consts = _constexprs(q.dtype, sizes, cfg, identity_layout(None), lowrank)
    for name in ("TM0", "TM1", "TM2", "TN0", "TN1", "TN2"):
        consts.pop(name)
    if not cache.interpreting():
        consts["maxnreg"] = register_cap(cfg.num_warps)
    table_m = (bm if gp == 1 else max(16, _next_pow2(Lq))) if plan.path == "table" else 0
    return DecodePlan(sizes, cfg, gp, num_splits, (num_splits, n_m, B * (Hq // gp)), table_m, consts, n_tiles, auto)


def with_splits(dp: DecodePlan, splits: int) -> DecodePlan:
    """``dp`` with ``splits`` programs per (row tile, head group) (grid updated; not auto)."""
    return dataclasses.replace(dp, splits=splits, grid=(splits, *dp.grid[1:]), auto=False, tuned={})


def split_candidates(splits: int, n_tiles: int) -> tuple:
    """The split counts the decode autotuner times around the rule's ``splits``
    (:func:`choose_splits`) for a program visiting ``n_tiles`` key tiles: half, the same and
    twice as many (at least 1, at most one tile a split and :data:`MAX_SPLITS`), ascending."""
    top = max(1, min(max(n_tiles, 1), MAX_SPLITS))
    return tuple(sorted({max(1, splits // 2), min(splits, top), min(2 * splits, top)}))


def _tunes(device: torch.device) -> bool:
    """Whether launches on ``device`` are autotuned at run time (the decode split count, the
    paged forward's config): compiled Triton on CUDA (tests substitute True to run the tuners
    under the interpreter)."""
    return device.type == "cuda" and not cache.interpreting()


def _bench(fn) -> float:
    """Median milliseconds of ``fn()`` (``triton.testing.do_bench``; tests substitute a clock)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def tuned_plan(kern, dp: DecodePlan, q: torch.Tensor, run, paged: int = 0) -> DecodePlan:
    """The autotuned twin of an ``auto`` decode plan: the split count is the fastest of
    :func:`split_candidates` for its shape bucket (device, pattern, dtype, ``B``, heads,
    ``Lq``, ``Lk`` rounded up to a power of two, head dims, row tile, page size), timed by
    launching ``run(plan)`` per candidate on the call's own inputs. The choice is kept as a
    factor of the rule's count (``0.5`` / ``1`` / ``2``), so a cache growing inside one
    bucket keeps the rule's dependence on its length; remembered in ``kern`` and on disk
    (``autotune.json`` in the cache dir, as the forward's configs), and in ``dp.tuned`` so
    later launches of the same call signature pay one dict lookup. Every candidate gives the
    same result within fp32 rounding (split invariance). A bucket not yet timed while a CUDA
    graph is being captured keeps the rule's count (timing synchronises the device), as does
    one inside :func:`attncc.runtime.capture` (nothing runs there)."""
    hit = dp.tuned.get("plan")
    if hit is not None:
        return hit
    from .kernel import _LOCK, _next_pow2, untimed

    z = dp.sizes
    bucket = (f"{_device_name(q.device)}|decode|{kern.key}|{dtype_name(q.dtype)}|B{z['B']}|H{z['H']}"
              f"|Hkv{z['Hkv']}|Lq{z['Lq']}|Lk{_next_pow2(z['Lk'])}|D{z['D']}|Dv{z['Dv']}|rows{dp.cfg.block_m}"
              f"|page{paged}")
    cands = split_candidates(dp.splits, dp.n_tiles)
    factor = kern._tuned.get(bucket)
    if factor is None:
        with _LOCK:
            saved = cache.read_json("autotune.json")
            if bucket in saved:
                factor = float(saved[bucket]["split_factor"])
            elif untimed(q.device):  # inside a CUDA graph capture or attncc's capture(): the rule's count
                return dp
            else:
                times = {s: _bench(lambda s=s: run(with_splits(dp, s))) for s in cands}
                best = min(cands, key=lambda s: (times[s], s))
                factor = best / dp.splits
                saved = cache.read_json("autotune.json")
                saved[bucket] = {"split_factor": factor}
                cache.write_json("autotune.json", saved)
        kern._tuned[bucket] = factor
    splits = max(1, min(int(round(dp.splits * factor)), max(cands)))
    plan = with_splits(dp, splits)
    dp.tuned["plan"] = plan
    return plan


def _visited_estimate(kern, sizes: dict, block_n: int, device, n_n: int) -> int:
    """Key tiles a decode program visits, for the split count: closed plans without run-time
    scalars from their closed forms (all queries of every head, the most over (batch, head));
    otherwise every key tile (``n_n``)."""
    plan = kern.plan
    if plan.path != "closed" or plan.scalars or not plan.intervals:
        return n_n if plan.intervals or plan.path != "closed" else 0
    from .tiles import closed_tile_classes

    zero = torch.zeros(1, dtype=torch.int64)
    visit, _ = closed_tile_classes(plan.intervals, sizes, zero, zero + sizes["Lq"] - 1, block_n, torch.device("cpu"))
    return int(visit.sum(-1).max())


def launch_decode(kern, dp: DecodePlan, q, k, v, targs: list, scale: float, lowrank: list,
                  paged: Optional[tuple] = None) -> tuple:
    """Launch ``attn_decode`` (and ``decode_merge`` when ``dp.splits > 1``) for a checked call.
    ``paged``: ``(block_table, kv_lens, page_size)`` of a paged KV cache (``k`` / ``v`` the
    caches ``(num_pages, page_size, Hkv, D)``, ``kern`` rendered paged; see
    :mod:`attncc.runtime.paged`). A plan whose split count is the rule's (``dp.auto``)
    takes the autotuned count on CUDA (:func:`tuned_plan`; the first launch per shape bucket
    times the candidates).

    Returns:
        ``(out, lse)``: ``(B, Hq, Lq, Dv)`` in ``q.dtype`` and ``(B, Hq, Lq)`` float32.
    """
    if dp.auto and _tunes(q.device):
        dp = dp.tuned.get("plan") or tuned_plan(
            kern, dp, q, lambda d: _launch_decode(kern, d, q, k, v, targs, scale, lowrank, paged),
            paged[2] if paged is not None else 0)
    return _launch_decode(kern, dp, q, k, v, targs, scale, lowrank, paged)


def _launch_decode(kern, dp: DecodePlan, q, k, v, targs: list, scale: float, lowrank: list,
                   paged: Optional[tuple] = None) -> tuple:
    from .kernel import Launch, _kernel_sizes, _lowrank_args, _tensor_args

    sizes, cfg, S = dp.sizes, dp.cfg, dp.splits
    B, Hq, Lq, Dv = sizes["B"], sizes["H"], sizes["Lq"], sizes["Dv"]
    dev = q.device
    named = kern._named(targs)
    if kern._value_checks:
        kern._check_values(sizes, named, dev)
    out = torch.empty((B, Hq, Lq, Dv), dtype=q.dtype, device=dev)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=dev)
    if S == 1:  # one split: the kernel writes the call's output and LSE
        op, lp = out, lse
        pstr, lstr = (0, *out.stride()), (0, *lse.stride())
    else:
        op = torch.empty((S, B, Hq, Lq, Dv), dtype=torch.float32, device=dev)
        lp = torch.empty((S, B, Hq, Lq), dtype=torch.float32, device=dev)
        pstr, lstr = op.stride(), lp.stride()
    if kern.plan.path == "table":
        from .tiles import block_table

        tbl = block_table(kern.plan, sizes, named, dp.table_m, cfg.block_n, dev, kern.key)
        tables = (tbl.kv_num, tbl.kv_idx, tbl.full_num, tbl.full_idx)
        stb, sth, stm, stn = tbl.strides()
        tstrides = (stb, sth, stm if dp.gp == 1 else 0, stn)
    else:
        tables, _ = kern._tables(sizes, {}, cfg, dev)
        tstrides = (0, 0, 0, 0)
    consts = dict(dp.consts)
    kstr, vstr = k.stride(), v.stride()
    if paged is not None:
        from .paged import page_strides

        kstr, vstr = page_strides(k), page_strides(v)
        consts["PAGE"] = paged[2]
    args = [q, k, v, op, lp, *_tensor_args(targs), *_lowrank_args(lowrank), *tables,
            *q.stride(), *kstr, *vstr, *pstr, *lstr, *tstrides,
            *_kernel_sizes(sizes, identity_layout(None)), scale, dp.gp, S]
    if paged is not None:
        args += [paged[0], paged[1], paged[0].stride(0)]
    launches = [Launch("attn_decode", dp.grid, args, consts)]
    if S > 1:
        rows = B * Hq * Lq
        launches.append(Launch("decode_merge", (-(-rows // MERGE_ROWS),), [
            op, lp, out, lse, rows, Dv, S, op.stride(0), Dv, 1, lp.stride(0), 1, Dv, 1],
            dict(SIGMOID=kern.ir.normalize == "sigmoid", BLOCK_R=MERGE_ROWS, BLOCK_DV=dp.consts["BLOCK_DV"],
                 num_warps=4, num_stages=1)))
    kern._run(dev, *launches)
    return out, lse


__all__ = ["decode_attention", "decode_config", "decode_candidates", "max_rows", "choose_splits", "split_candidates",
           "tuned_plan", "DecodePlan", "MAX_AUTO_LQ"]
