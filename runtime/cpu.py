"""The CPU executor: a tiled PyTorch implementation of a :class:`~attncc.passes.KernelPlan`.

On CPU tensors :class:`~attncc.runtime.CompiledAttention` runs this executor by default
instead of the generated Triton kernels under the Triton interpreter (about 50-100x
slower). It computes what the kernel computes, from the same plan:

* **Which keys.** Query rows are taken a chunk of ``block_m`` rows at a time (FlashAttention's
  query tile). The keys a chunk visits come from the plan, not from the mask: the closed-form
  key intervals ``[lo, hi)`` / full ranges ``[flo, fhi)`` of :attr:`KernelPlan.intervals`
  evaluated at the chunk's ``q_lo, q_hi`` and rounded to key tiles of ``block_n`` exactly as
  the kernels' ``interval_bounds`` macro rounds them; the cached block table
  (:func:`attncc.runtime.tiles.block_table`) of table plans; and the per-axis key intervals
  of the box plans of grid patterns (NATTEN-style neighborhoods, Swin, ...), evaluated for
  the bounding box of the chunk's rows in grid coordinates, per dilation group. The mask is
  evaluated only on the keys of partial tiles (full tiles skip it, as in the kernel).
* **Math.** ``S = scale * (Q K^T + U W^T)`` (dot() terms folded as in the kernel), the
  score and mask expressions of the IR evaluated with :func:`attncc.dense.eval_expr` (the
  dense reference's evaluator) in float32, then a tile-wise exact softmax over the chunk's
  keys in float32 (sink logits join the denominator, sigmoid attention weights each pair),
  ``O = P V``, the gate. Chunks whose score is plain ``s`` (no score expression, dot() terms,
  sink or sigmoid; ``D == Dv``) run torch's fused CPU attention kernel instead, once on
  their full tiles (no mask) and once on their partial tiles (the mask as a ``0 / -inf``
  bias), the two merged by their LSEs. GQA maps query head ``h`` to key/value head ``h // (Hq / Hkv)``
  without copying K/V. A row with no allowed key gives 0 output and LSE ``-inf``.
* **Backward.** Per chunk, the chunk's forward is recomputed with autograd and
  differentiated (FlashAttention-2's recomputation: memory is one chunk's score matrix,
  never ``Lq x Lk``); gradients of q, k, v, the dot() factors and every float spec tensor.

Selection (see :func:`cpu_backend`): ``attncc.compile(..., backend="torch" | "interpret")``
or the environment variable ``ATTNCC_CPU=torch | interpret``; the default is ``torch``.
CUDA tensors always run the Triton kernels.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import List, Optional

import sympy as sp
import torch

from attncc import ir as I
from attncc.dense import eval_expr, index_env
from attncc.ir import grid_sizes
from attncc.passes import BQ_HI, BQ_LO, GQ, LG, q_hi, q_lo

from .tiles import block_table, closed_tile_classes, size_env, tensor_digest

#: the CPU implementations: the tiled PyTorch executor of this module, and the generated
#: Triton kernels under the Triton interpreter
BACKENDS = ("torch", "interpret")

#: query rows per chunk at most / key tile size (the granularity of the plan's key ranges)
BLOCK_M = 256
BLOCK_N = 64
#: score elements (batch x heads x rows x keys) of one chunk at most (64 MiB in float32)
CHUNK_ELEMS = 1 << 24


def cpu_backend(requested: Optional[str] = None) -> str:
    """The CPU implementation to run: ``requested`` (``attncc.compile(..., backend=)``) if
    given, else the environment variable ``ATTNCC_CPU``, else ``"torch"``.

    Returns:
        ``"torch"`` (this module's executor) or ``"interpret"`` (the Triton kernels under
        the Triton interpreter).

    Raises:
        ValueError: any other value (naming where it came from).
    """
    if requested is not None:
        where, value = "backend", requested
    else:
        where, value = "ATTNCC_CPU", os.environ.get("ATTNCC_CPU") or "torch"
    if value not in BACKENDS:
        raise ValueError(f"{where}={value!r}: the CPU backend must be one of {', '.join(map(repr, BACKENDS))}")
    return value


@dataclass(frozen=True)
class Chunk:
    """One query chunk of the schedule: rows ``[r0, r1)`` and the keys it visits.

    Attributes:
        keys: int64 ``(n,)`` key indices, ascending, or ``None`` for the contiguous range
            ``[k0, k1)`` (sliced, not gathered).
        k0 / k1: the range when ``keys`` is None.
        runs: ``((a, b), ...)`` column ranges (positions in the chunk's keys) of partial
            tiles, where the mask is evaluated; ``None``: every column.
    """

    r0: int
    r1: int
    keys: Optional[torch.Tensor]
    k0: int
    k1: int
    runs: Optional[tuple]

    @property
    def n_keys(self) -> int:
        return int(self.keys.numel()) if self.keys is not None else self.k1 - self.k0


def _runs(flags: list) -> list:
    """``[(a, b), ...]``: the maximal runs of True in a list of booleans."""
    out, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def _complement(runs, n: int) -> list:
    """``[(a, b), ...]``: the maximal sub-ranges of ``[0, n)`` outside the sorted, disjoint
    ``runs``."""
    out, at = [], 0
    for a, z in runs:
        if a > at:
            out.append((at, a))
        at = max(at, z)
    if at < n:
        out.append((at, n))
    return out


def _chunk_from_tiles(r0: int, r1: int, visit: list, full: list, block_n: int, Lk: int) -> Chunk:
    """The :class:`Chunk` of rows ``[r0, r1)`` visiting key tiles ``visit`` (bools per tile),
    of which ``full`` need no mask."""
    tiles = [n for n, x in enumerate(visit) if x]
    if not tiles:
        return Chunk(r0, r1, None, 0, 0, ())
    spans = [(n * block_n, min(Lk, (n + 1) * block_n)) for n in tiles]
    part_cols = []
    for n, (a, b) in zip(tiles, spans):
        part_cols += [not full[n]] * (b - a)
    runs = tuple(_runs(part_cols))
    if len(_runs([bool(x) for x in visit])) == 1:  # one contiguous key range: a slice
        return Chunk(r0, r1, None, spans[0][0], spans[-1][1], runs)
    keys = torch.cat([torch.arange(a, b) for a, b in spans])
    return Chunk(r0, r1, keys, 0, 0, runs)


def _rows_per_chunk(sizes: dict) -> int:
    """Query rows per chunk: :data:`BLOCK_M`, fewer (a power of two >= 16) when a chunk's
    score matrix would exceed :data:`CHUNK_ELEMS`."""
    bm = BLOCK_M
    while bm > 16 and sizes["B"] * sizes["H"] * bm * sizes["Lk"] > CHUNK_ELEMS:
        bm //= 2
    return bm


def _closed_tiles(plan, sizes: dict, starts: torch.Tensor, lasts: torch.Tensor, block_n: int, device,
                  named: dict | None = None):
    """Visited / full key tiles of closed-form plans: bool ``(n_chunks, n_n)`` each (a tile is
    visited when some (batch, head) visits it, full when it is full for all), from the
    intervals exactly as the kernels' ``interval_bounds`` macro rounds them."""
    visit, full = closed_tile_classes(plan.intervals, sizes, starts, lasts, block_n, device, named)
    shape = (sizes["B"], sizes["H"]) + visit.shape[2:]
    return visit.any(1).any(0), torch.broadcast_to(full, shape).all(1).all(0)


def _table_tiles(kern, sizes: dict, named: dict, block_m: int, block_n: int, device):
    """Visited / full key tiles of table plans from the (cached) block table."""
    tbl = block_table(kern.plan, sizes, named, block_m, block_n, device, kern.key)
    TB, TH, n_m, n_n = tbl.kv_idx.shape
    pos = torch.arange(n_n, device=device)

    def tiles(num, idx):
        sel = torch.zeros(TB, TH, n_m, n_n + 1, dtype=torch.bool, device=device)
        live = pos < num[..., None].long()
        sel.scatter_(3, torch.where(live, idx.long(), n_n), torch.ones_like(live))
        return sel[..., :n_n]

    part, full = tiles(tbl.kv_num, tbl.kv_idx), tiles(tbl.full_num, tbl.full_idx)
    visit = part | full
    return visit.any(1).any(0), (full & ~part).all(1).all(0)


def _box_keys(plan, sizes: dict, starts: torch.Tensor, lasts: torch.Tensor, device) -> torch.Tensor:
    """Keys of box plans per query chunk: bool ``(n_chunks, Lk)``. Per grid axis, the key
    intervals of each box (group coordinates) are evaluated for the bounding box of the
    chunk's rows in grid coordinates, once per dilation group; a key is visited when its
    coordinates lie in one box's intervals on every axis."""
    n = len(plan.ir.grid)
    G = I.grid_of(sizes)[:n]
    env = size_env(sizes, device)
    span = int((lasts - starts).max()) + 1
    every = (starts[:, None] + torch.arange(span, device=device)).clamp(max=lasts[:, None])
    cmin, cmax = [], []
    for i in range(n):
        inner = math.prod(G[i + 1:])
        c = torch.div(every, inner, rounding_mode="floor") % G[i]
        cmin.append(c.amin(1))
        cmax.append(c.amax(1))
    keys = torch.zeros(starts.numel(), *G, dtype=torch.bool, device=device)
    for bx in plan.boxes:
        sets = []
        for i, iv in enumerate(bx.axes):
            d = int(eval_expr(plan.groups[i], env, {}))
            xs = torch.arange(G[i], device=device)
            on = torch.zeros(starts.numel(), G[i], dtype=torch.bool, device=device)
            for g in range(d):
                j_lo = -torch.div(-(cmin[i] - g), d, rounding_mode="floor")
                j_hi = torch.div(cmax[i] - g, d, rounding_mode="floor")
                genv = dict(env)
                genv.update({BQ_LO[i]: j_lo.view(1, 1, -1), BQ_HI[i]: j_hi.view(1, 1, -1), GQ[i]: g,
                             LG[i]: -(-(G[i] - g) // d)})
                lo = eval_expr(iv.lo, genv, {}).to(torch.int64)
                hi = eval_expr(iv.hi, genv, {}).to(torch.int64)
                lo = torch.broadcast_to(lo, (sizes["B"], sizes["H"], starts.numel())).amin((0, 1))
                hi = torch.broadcast_to(hi, (sizes["B"], sizes["H"], starts.numel())).amax((0, 1))
                j = torch.div(xs - g, d, rounding_mode="floor")
                on |= ((xs % d == g) & (j >= lo[:, None]) & (j < hi[:, None]) & (j_lo <= j_hi)[:, None])
            sets.append(on)
        prod = sets[0]
        for i in range(1, n):
            prod = prod.unsqueeze(-1) & sets[i].view(sets[i].shape[0], *([1] * i), G[i])
        keys |= prod
    return keys.view(starts.numel(), -1)


def schedule(kern, sizes: dict, named: dict, device) -> list:
    """The :class:`Chunk` list of a call: query chunks and the keys each visits (from the
    plan: closed-form intervals, block table or box intervals). Closed-form and box
    schedules depend on the sizes (and the values of a closed plan's run-time scalars) only
    and are cached on ``kern``."""
    plan = kern.plan
    key = tuple(sorted(sizes.items()))
    if plan.path == "closed" and plan.scalars:  # run-time scalars (per-head windows): keyed by their values
        key += tuple(tensor_digest(named[n]) for n in sorted({str(r.base.label) for r in plan.scalars}))
    cache = kern.__dict__.setdefault("_cpu_schedules", {})
    if plan.path != "table" and key in cache:
        return cache[key]
    Lq, Lk = sizes["Lq"], sizes["Lk"]
    bm = _rows_per_chunk(sizes)
    starts = torch.arange(0, Lq, bm, device=device)
    lasts = (starts + bm).clamp(max=Lq) - 1
    out = []
    if plan.path == "box":
        keys = _box_keys(plan, sizes, starts, lasts, device) if plan.boxes else \
            torch.zeros(starts.numel(), Lk, dtype=torch.bool)
        for c, (a, z) in enumerate(zip(starts.tolist(), lasts.tolist())):
            idx = keys[c].nonzero()[:, 0]
            if idx.numel() and int(idx[-1] - idx[0]) + 1 == idx.numel():
                out.append(Chunk(a, z + 1, None, int(idx[0]), int(idx[-1]) + 1, None))
            else:
                out.append(Chunk(a, z + 1, idx, 0, 0, None))
    else:
        if plan.path == "closed":
            visit, full = _closed_tiles(plan, sizes, starts, lasts, BLOCK_N, device, named)
        else:
            visit, full = _table_tiles(kern, sizes, named, bm, BLOCK_N, device)
        for c, (a, z) in enumerate(zip(starts.tolist(), lasts.tolist())):
            out.append(_chunk_from_tiles(a, z + 1, visit[c].tolist(), full[c].tolist(), BLOCK_N, Lk))
    if plan.path != "table":
        if len(cache) >= 16:
            cache.pop(next(iter(cache)))
        cache[key] = out
    return out


# ----------------------------------------------------------------------------- one chunk
def _gather(x: torch.Tensor, ch: Chunk) -> torch.Tensor:
    """Rows of the chunk's keys of ``x`` ``(B, H, Lk, E)`` (a view for a contiguous range)."""
    return x[:, :, ch.k0:ch.k1] if ch.keys is None else x.index_select(2, ch.keys.to(x.device))


def _row_env(kern, sizes: dict, ch: Chunk, device) -> dict:
    """Index grids of the chunk: ``b, h, q`` (its rows), ``kv`` (its keys), sizes, ``dv``."""
    rows = torch.arange(ch.r0, ch.r1, device=device)
    env = index_env(sizes["B"], sizes["H"], sizes["Lq"], sizes["Lk"], sizes["Hkv"], sizes["D"], sizes["Dv"],
                    device, q_rows=rows, grid=I.grid_of(sizes))
    kidx = ch.keys.to(device) if ch.keys is not None else torch.arange(ch.k0, ch.k1, device=device)
    env[I.kv] = kidx.view(1, 1, 1, -1)
    env[I.dv] = torch.arange(sizes["Dv"], device=device).view(1, 1, 1, -1)
    return env


def _chunk_forward(kern, sizes: dict, ch: Chunk, qc, kc, vc, uc, wc, named: dict, scale: float, grad: bool):
    """Attention of one query chunk over its keys, in float32.

    Args:
        qc: ``(B, Hq, R, D)``; kc / vc: ``(B, Hkv, n, D / Dv)`` the chunk's keys; uc / wc:
            the dot() factors of the rows / keys or None; named: spec tensors by name.
        grad: build an autograd graph (the backward's recomputation): no in-place ops.

    Returns:
        ``(out, lse, out_u)``: ``out`` ``(B, Hq, R, Dv)`` float32 (gated), ``lse`` ``(B, Hq, R)``
        float32 (zeros for sigmoid attention), ``out_u`` the ungated output (gated patterns).
    """
    ir = kern.ir
    B, Hq, R, _ = qc.shape
    Hkv, n = kc.shape[1], kc.shape[2]
    G = Hq // Hkv
    device = qc.device
    env = _row_env(kern, sizes, ch, device)
    sink = None
    if ir.sink is not None and ir.normalize != "sigmoid":
        sink = torch.broadcast_to(eval_expr(ir.sink, env, named, float_dtype=torch.float32).to(torch.float32),
                                  (B, Hq, R, 1))[..., 0]
    if n == 0:  # no key: 0 output; LSE -inf (or the sink logit)
        out = qc.new_zeros((B, Hq, R, vc.shape[-1]), dtype=torch.float32)
        lse = sink + 0.0 if sink is not None else torch.full((B, Hq, R), -math.inf, device=device)
        if ir.normalize == "sigmoid":
            lse = torch.zeros((B, Hq, R), device=device)
    elif (not grad and _FUSED is not None and kern.plan.score_is_identity and uc is None and sink is None
          and ir.normalize != "sigmoid" and qc.shape[-1] == vc.shape[-1]):  # the fused kernel wants D == Dv
        out, lse = _fused_chunk(ir, ch, env, qc, kc, vc, named, scale)
    else:
        identity = kern.plan.score_is_identity
        qs = qc * scale if identity and uc is None else qc
        # GQA: the query heads of a group share their key/value head: (B, Hkv, G * R, .)
        qg = qs.reshape(B, Hkv, G * R, -1)
        s = torch.matmul(qg, kc.transpose(-1, -2))
        if uc is not None:
            s = s + torch.matmul(uc.reshape(B, wc.shape[1], -1, uc.shape[-1]), wc.transpose(-1, -2)).reshape(s.shape)
        s = s.view(B, Hq, R, n)
        if not (identity and uc is None):
            s = s * scale
        if not identity:
            env[I.s] = s
            s = torch.broadcast_to(eval_expr(ir.score, env, named, float_dtype=torch.float32).to(torch.float32),
                                   (B, Hq, R, n))
            if not grad and 0 in s.stride():  # a broadcast view: the in-place softmax needs its own memory
                s = s.contiguous()
        runs = ch.runs if ch.runs is not None else ((0, n),)
        if ir.mask != sp.true and runs:
            if grad or not identity or len(runs) > 4:  # one out-of-place mask over every column
                keep = eval_expr(ir.mask, env, named)
                if ch.runs is not None and runs != ((0, n),):
                    part = torch.zeros(n, dtype=torch.bool, device=device)
                    for a, z in runs:
                        part[a:z] = True
                    keep = keep | ~part
                s = torch.where(keep, s, -math.inf)
            else:  # in place, on the partial tiles' columns only
                for a, z in runs:
                    sub = dict(env)
                    sub[I.kv] = env[I.kv][..., a:z]
                    keep = eval_expr(ir.mask, sub, named)
                    s[..., a:z].masked_fill_(~keep, -math.inf)
        if ir.normalize == "sigmoid":  # independent per pair, no row statistics
            p = torch.sigmoid(s)
            out = torch.matmul(p.view(B, Hkv, G * R, n), vc).view(B, Hq, R, -1)
            lse = torch.zeros((B, Hq, R), device=device)
        else:
            m = s.amax(-1).detach()
            if sink is not None:
                m = torch.maximum(m, sink.detach())
            m = torch.where(m == -math.inf, 0.0, m)
            if grad:
                p = torch.exp(s - m[..., None])
            else:
                p = s.sub_(m[..., None]).exp_()
            l = p.sum(-1)
            if sink is not None:
                l = l + torch.exp(sink - m)
            empty = l == 0
            l_safe = torch.where(empty, 1.0, l)
            out = torch.matmul(p.view(B, Hkv, G * R, n), vc).view(B, Hq, R, -1) / l_safe[..., None]
            lse = torch.where(empty, -math.inf, m + torch.log(l_safe))
    out_u = out
    if ir.gate is not None:
        out = out * eval_expr(ir.gate, env, named, float_dtype=torch.float32).to(torch.float32)
    return out, lse, out_u


#: torch's fused CPU attention kernel (FlashAttention-style, returns the LSE too); chunks whose
#: score is plain ``s`` (no score expression, dot() terms, sink or sigmoid) run through it
_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _fused_chunk(ir, ch: Chunk, env: dict, qc, kc, vc, named: dict, scale: float):
    """One chunk with an identity score through :data:`_FUSED`: the mask of the partial tiles'
    columns as an additive ``0 / -inf`` bias (full tiles get none), K/V expanded to the query
    heads under GQA. Rows with no allowed key: 0 and LSE ``-inf``."""
    B, Hq, R, _ = qc.shape
    n = kc.shape[2]
    G = Hq // kc.shape[1]
    if G > 1:
        kc, vc = kc.repeat_interleave(G, dim=1), vc.repeat_interleave(G, dim=1)
    runs = ch.runs if ch.runs is not None else ((0, n),)
    if ir.mask == sp.true:
        runs = ()
    full = _complement(runs, n) if runs else [(0, n)]
    if runs and full:  # full tiles without a mask, the partial ones masked; merged by their LSEs
        def cols(x, spans):  # one span: a view (the fused op takes strided rows)
            return x[:, :, spans[0][0]:spans[0][1]] if len(spans) == 1 else torch.cat(
                [x[:, :, a:z] for a, z in spans], 2)

        o1, l1 = _FUSED(qc, cols(kc, full), cols(vc, full), 0.0, False, scale=scale)
        sub = dict(env)
        sub[I.kv] = cols(env[I.kv].transpose(-1, 2), runs).transpose(-1, 2)
        o2, l2 = _fused_chunk(ir, Chunk(ch.r0, ch.r1, None, 0, 0, None), sub, qc, cols(kc, runs), cols(vc, runs),
                              named, scale)
        lse = torch.logaddexp(l1, l2)
        return o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None], lse
    bias, empty = None, None
    if runs:
        keeps = []
        for a, z in runs:
            sub = dict(env)
            sub[I.kv] = env[I.kv][..., a:z]
            keeps.append((a, z, eval_expr(ir.mask, sub, named)))
        shape = torch.broadcast_shapes((1, 1, R, n), *[x.shape[:-1] + (n,) for _, _, x in keeps])
        bias = torch.zeros(shape, dtype=qc.dtype, device=qc.device)
        for a, z, keep in keeps:
            bias[..., a:z].masked_fill_(~torch.broadcast_to(keep, shape[:-1] + (z - a,)), -math.inf)
        empty = (bias == -math.inf).all(-1)
    out, lse = _FUSED(qc, kc, vc, 0.0, False, attn_mask=bias, scale=scale)
    if empty is not None and bool(empty.any()):
        out = torch.where(empty[..., None], 0.0, out)
        lse = torch.where(empty, -math.inf, lse)
    return out, lse


def _setup(kern, q, k, v, tensors: List[torch.Tensor], layout: list, lowrank):
    """Sizes, named spec tensors, the dot() factors and the schedule of an op call."""
    B, Hq, Lq, D = q.shape
    sizes = {"B": B, "H": Hq, "Hkv": k.shape[1], "Lq": Lq, "Lk": k.shape[2], "D": D, "Dv": v.shape[3],
             **grid_sizes([x for x in list(layout or ())[:3]])}
    named = {t.name: x for t, x in zip(kern.ir.tensors, tensors)}
    u, w = (lowrank[0], lowrank[1]) if lowrank else (None, None)
    return sizes, named, u, w, schedule(kern, sizes, named, q.device)


def forward(kern, q, k, v, tensors: List[torch.Tensor], scale: float, layout=None, lowrank=()):
    """The forward of :meth:`CompiledAttention.launch` on CPU tensors, run by this executor.

    Args:
        q: ``(B, Hq, Lq, D)``, k: ``(B, Hkv, Lk, D)``, v: ``(B, Hkv, Lk, Dv)`` (grid patterns:
            the grid flattened in row-major order, ``layout`` the identity layout list whose
            first three entries are the grid sizes); float32 / float16 / bfloat16, checked by
            the caller (:func:`attncc.checks.check_inputs`).
        tensors: the spec tensors in declaration order; lowrank: ``[u, w]`` of the dot()
            terms (see :meth:`CompiledAttention._lowrank_factors`) or empty.

    Returns:
        ``(out, lse, out_u)`` as the kernel writes them: ``out`` ``(B, Hq, Lq, Dv)`` in
        ``q.dtype``, ``lse`` ``(B, Hq, Lq)`` float32 (natural log; ``-inf`` and ``out = 0``
        for rows with no allowed key), ``out_u`` the ungated output (gated patterns) or an
        empty tensor.
    """
    sizes, named, u, w, chunks = _setup(kern, q, k, v, tensors, layout, lowrank)
    B, Hq, Lq, _ = q.shape
    Dv = v.shape[3]
    out = torch.empty((B, Hq, Lq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    gated = kern.ir.gate is not None
    out_u = torch.empty_like(out) if gated else out.new_empty(0)
    kf, vf = k.float(), v.float()
    uf, wf = (u.float(), w.float()) if u is not None else (None, None)
    with torch.no_grad():
        for ch in chunks:
            o, l, ou = _chunk_forward(kern, sizes, ch, q[:, :, ch.r0:ch.r1].float(), _gather(kf, ch), _gather(vf, ch),
                                      uf[:, :, ch.r0:ch.r1] if uf is not None else None,
                                      _gather(wf, ch) if wf is not None else None, named, scale, grad=False)
            out[:, :, ch.r0:ch.r1] = o
            lse[:, :, ch.r0:ch.r1] = l
            if gated:
                out_u[:, :, ch.r0:ch.r1] = ou
    return out, lse, out_u


@contextlib.contextmanager
def _autograd_recording():
    """Grad mode on, and the autograd dispatch keys un-excluded for the block: the custom op's
    backward implementation (``attncc::<pattern>_bwd``) runs below the autograd dispatch key,
    where tensors would record no graph for the recomputation to differentiate."""
    keys = [torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther, torch._C.DispatchKey.ADInplaceOrView]
    saved = [torch._C._dispatch_tls_is_dispatch_key_excluded(key) for key in keys]
    try:
        for key in keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        with torch.enable_grad():
            yield
    finally:
        for key, was in zip(keys, saved):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)


def backward(kern, q, k, v, dout, dlse, tensors: List[torch.Tensor], scale: float, want=None, layout=None,
             lowrank=()) -> list:
    """The backward of :meth:`CompiledAttention.launch_backward` on CPU tensors: per query
    chunk, its forward recomputed with autograd and differentiated (FlashAttention-2 style
    recomputation; one chunk's scores in memory at a time).

    Args:
        dout: ``(B, Hq, Lq, Dv)`` gradient of the (gated) output; dlse: ``(B, Hq, Lq)``
            gradient of the LSE; want: per spec tensor, whether to return its gradient.

    Returns:
        ``[dq, dk, dv, *grads, *dlowrank]`` shaped and typed like ``q, k, v``, the wanted
        tensors and ``u, w`` (as :meth:`CompiledAttention.launch_backward`).
    """
    sizes, named, u, w, chunks = _setup(kern, q, k, v, tensors, layout, lowrank)
    want = [False] * len(tensors) if want is None else list(want)
    leaves = {t.name: x.detach().requires_grad_(True) for t, x, wt in zip(kern.ir.tensors, tensors, want)
              if wt and x.is_floating_point()}
    named = {n: leaves.get(n, x.detach()) for n, x in named.items()}
    kf, vf = k.detach().float(), v.detach().float()
    uf, wf = (u.detach().float(), w.detach().float()) if u is not None else (None, None)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    du = torch.zeros_like(uf) if uf is not None else None
    dw = torch.zeros_like(wf) if wf is not None else None
    tgrads = {n: torch.zeros(x.shape, dtype=torch.float64, device=x.device) for n, x in leaves.items()}
    dlse = dlse.float() if kern.ir.normalize != "sigmoid" else torch.zeros_like(dlse, dtype=torch.float32)
    for ch in chunks:
        with _autograd_recording():
            qc = q[:, :, ch.r0:ch.r1].detach().float().requires_grad_(True)
            kc = _gather(kf, ch).detach().requires_grad_(True)
            vc = _gather(vf, ch).detach().requires_grad_(True)
            ins = [qc, kc, vc]
            uc = wc = None
            if uf is not None:
                uc = uf[:, :, ch.r0:ch.r1].detach().requires_grad_(True)
                wc = _gather(wf, ch).detach().requires_grad_(True)
                ins += [uc, wc]
            o, l, _ = _chunk_forward(kern, sizes, ch, qc, kc, vc, uc, wc, named, scale, grad=True)
            outs, gouts = [o], [dout[:, :, ch.r0:ch.r1].float()]
            if kern.ir.normalize != "sigmoid":
                outs.append(l)
                gouts.append(torch.where(torch.isinf(l), 0.0, dlse[:, :, ch.r0:ch.r1]))
            live = [(x, g) for x, g in zip(outs, gouts) if x.requires_grad]
            if not live:  # a chunk without keys: nothing flows back
                continue
            grads = torch.autograd.grad([x for x, _ in live], ins + list(leaves.values()), [g for _, g in live],
                                        allow_unused=True)
        gq, gk, gv, *rest = grads
        if gq is not None:
            dq[:, :, ch.r0:ch.r1] += gq
        for acc, g in ((dk, gk), (dv, gv)) + (((dw, rest[1]),) if uf is not None else ()):
            if g is None:
                continue
            if ch.keys is None:
                acc[:, :, ch.k0:ch.k1] += g
            else:
                acc.index_add_(2, ch.keys.to(acc.device), g)
        if uf is not None:
            if rest[0] is not None:
                du[:, :, ch.r0:ch.r1] += rest[0]
            rest = rest[2:]
        for n, g in zip(leaves, rest):
            if g is not None:
                tgrads[n] += g
    out = [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)]
    out += [tgrads[t.name].to(x.dtype) if t.name in tgrads else torch.zeros_like(x)
            for t, x, wt in zip(kern.ir.tensors, tensors, want) if wt]
    if uf is not None:
        out += [du.to(u.dtype), dw.to(w.dtype)]
    return out
