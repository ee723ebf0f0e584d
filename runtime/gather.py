"""Token-level top-k attention (issue 15, DeepSeek Sparse Attention style): every query token
attends to its own list of key tokens.

:func:`gather_attention` takes ``kv_index`` ``(B, Lq, Hkv, topk)``: query token ``i`` of every
query head of KV group ``g`` attends exactly to the keys ``kv_index[b, i, g, :]``.
:func:`gather_attention_reference` is the definition in torch (a dense ``(B, Hq, Lq, Lk)``
mask built from the lists, float64 softmax).

The Triton path (CUDA tensors, or CPU ones under the interpreter with ``backend="interpret"``):

* the lists are first put in a canonical form in torch on the device (:func:`_canonical`):
  per (b, i, g) the valid distinct keys ascending, then the sentinel ``Lk``, and their count;
* forward (:func:`_gather_fwd_kernel`): one program per (b, query token, KV group); the
  group's ``G = Hq / Hkv`` query heads are the M rows of ``tl.dot`` (padded to 16), the keys
  are gathered 64 at a time from the list into a ``[64, D]`` tile, online softmax
  (FlashAttention). Memory is O(topk) per query; no ``Lq x Lk`` array exists anywhere;
* dQ (:func:`_gather_dq_kernel`): the forward's structure again (P from the saved LSE);
* dK / dV (:func:`_gather_dkdv_kernel`): the lists transposed on the device by one stable
  sort (:func:`_transpose_index`: per key, the query tokens that listed it, ascending, and
  the offsets of each key's segment) and one program per (b, KV group, key) that loops over
  its (query token, head) rows. Every gradient element is written by exactly one program in
  a fixed order: no atomics, bitwise deterministic.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import cache

__all__ = ["gather_attention", "gather_attention_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_BLOCK_N = 64   # keys gathered per step (forward and dQ)
_BLOCK_R = 64   # (query token, head) rows per step of the dK / dV kernel, at most (see _dkdv_launch)
_LOG2E = 1.4426950408889634


def _check(q, k, v, kv_index, scale, backend=None):
    """Validate the arguments of :func:`gather_attention` (before any launch); return
    ``(B, Hq, Hkv, Lq, Lk, D, Dv, topk)``."""
    for name, x in (("q", q), ("k", k), ("v", v), ("kv_index", kv_index)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"gather_attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            dims = "(B, Lq, Hkv, topk)" if name == "kv_index" else "(B, H, L, D)"
            raise ValueError(f"gather_attention: {name} must have 4 dims {dims}, got shape {tuple(x.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _DTYPES:
            raise TypeError(f"gather_attention: {name} must be float16, bfloat16 or float32, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"gather_attention: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if kv_index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"gather_attention: kv_index must be int32 or int64, got {kv_index.dtype}")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if tuple(k.shape) != (B, Hkv, Lk, D):
        raise ValueError(f"gather_attention: k must have shape (B, Hkv, Lk, D) = ({B}, Hkv, Lk, {D}) (B and D of q), "
                         f"got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, Hkv, Lk):
        raise ValueError(f"gather_attention: v must have shape (B, Hkv, Lk, Dv) = ({B}, {Hkv}, {Lk}, Dv) (those of k), "
                         f"got {tuple(v.shape)}")
    Dv = v.shape[3]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"gather_attention: the query heads Hq = {Hq} must be a multiple of the key heads Hkv = {Hkv}")
    topk = kv_index.shape[3]
    if tuple(kv_index.shape[:3]) != (B, Lq, Hkv):
        raise ValueError(f"gather_attention: kv_index must have shape (B, Lq, Hkv, topk) = ({B}, {Lq}, {Hkv}, topk), "
                         f"got {tuple(kv_index.shape)}")
    if min(B, Hq, Lq, Lk, D, Dv, topk) == 0:
        raise ValueError(f"gather_attention: empty inputs (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"kv_index {tuple(kv_index.shape)})")
    devs = {x.device for x in (q, k, v, kv_index)}
    if len(devs) != 1:
        raise ValueError(f"gather_attention: q, k, v and kv_index must be on one device; got q on {q.device}, "
                         f"k on {k.device}, v on {v.device}, kv_index on {kv_index.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"gather_attention: scale must be a finite number or None, got {scale!r}")
    if backend not in cache.KERNEL_BACKENDS:
        raise ValueError(f"gather_attention: backend must be one of "
                         f"{', '.join(map(repr, cache.KERNEL_BACKENDS))}; got {backend!r}")
    return B, Hq, Hkv, Lq, Lk, D, Dv, topk


def _valid(kv_index: torch.Tensor, Lk: int, causal: bool) -> torch.Tensor:
    """bool ``(B, Lq, Hkv, topk)``: the entries that name a key (``0 <= j < Lk``, and
    ``j <= i`` with ``causal``)."""
    ok = (kv_index >= 0) & (kv_index < Lk)
    if causal:
        ok &= kv_index <= torch.arange(kv_index.shape[1], device=kv_index.device)[None, :, None, None]
    return ok


def gather_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor, *,
                               scale: Optional[float] = None, causal: bool = False, return_lse: bool = False):
    """The definition of :func:`gather_attention` in torch (same arguments and results).

    Dense: builds the ``(B, Hq, Lq, Lk)`` allowed mask from the lists (an entry naming key
    ``j`` allows ``(i, j)``; repeats of ``j`` allow it once) and the float64 scores, softmax
    over the allowed keys; rows with none give 0 and LSE ``-inf``. Memory ``O(Lq * Lk)``: for
    small shapes (tests, CPU). Differentiable in q, k and v by torch autograd."""
    B, Hq, Hkv, Lq, Lk, D, Dv, topk = _check(q, k, v, kv_index, scale)
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    idx = kv_index.long()
    allowed = torch.zeros(B, Lq, Hkv, Lk + 1, dtype=torch.bool, device=q.device)
    allowed.scatter_(-1, torch.where(_valid(idx, Lk, causal), idx, Lk), True)
    allowed = allowed[..., :Lk].permute(0, 2, 1, 3).repeat_interleave(G, 1)       # (B, Hq, Lq, Lk)
    kf = k.double().repeat_interleave(G, 1)
    vf = v.double().repeat_interleave(G, 1)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), kf) * scale
    m = torch.where(allowed, s, float("-inf")).amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.where(allowed, torch.exp(torch.where(allowed, s, 0.0) - m), 0.0)
    l = e.sum(-1, keepdim=True)
    has = l > 0
    lsafe = torch.where(has, l, 1.0)
    out = torch.einsum("bhij,bhjd->bhid", e / lsafe, vf).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(has, torch.log(lsafe) + m, float("-inf")).squeeze(-1).float()
    return out, lse


def _canonical(kv_index: torch.Tensor, Lk: int, causal: bool):
    """The lists in canonical form (torch, on the device, deterministic): ``(idx, cnt)``, idx
    int32 ``(B, Lq, Hkv, topk)`` with per row the valid distinct keys ascending, then ``Lk``;
    cnt int32 ``(B, Lq, Hkv)`` their number. Duplicates are dropped (a key counts once)."""
    idx = kv_index.long()
    key = torch.where(_valid(idx, Lk, causal), idx, Lk).sort(-1).values
    dup = torch.zeros_like(key, dtype=torch.bool)
    dup[..., 1:] = key[..., 1:] == key[..., :-1]
    key = torch.where(dup, Lk, key).sort(-1).values
    return key.to(torch.int32).contiguous(), (key < Lk).sum(-1).to(torch.int32).contiguous()


def _transpose_index(idx: torch.Tensor, cnt: torch.Tensor, Lk: int):
    """The canonical lists transposed (torch, on the device, one stable sort: deterministic):
    ``(off, qidx)``, off int64 ``(B * Hkv * Lk + 1,)``: the pairs of key ``(b, g, j)`` are
    ``qidx[off[(b * Hkv + g) * Lk + j] : off[... + 1]]``, qidx int32: the query tokens that
    listed the key, ascending."""
    B, Lq, Hkv, T = idx.shape
    dev = idx.device
    live = torch.arange(T, device=dev) < cnt[..., None]
    bg = torch.arange(B, device=dev)[:, None, None, None] * Hkv + torch.arange(Hkv, device=dev)[None, None, :, None]
    key = torch.where(live, bg * Lk + idx.long(), B * Hkv * Lk).flatten()
    sk, perm = torch.sort(key, stable=True)
    qidx = torch.div(perm, Hkv * T, rounding_mode="floor") % Lq
    off = torch.searchsorted(sk, torch.arange(B * Hkv * Lk + 1, device=dev))
    return off.contiguous(), qidx.to(torch.int32).contiguous()


@triton.jit
def _group_rows(pid, Lq, Hkv, G, BLOCK_M: tl.constexpr):
    """The program's (b, query token i, KV group g) from its id (the row of the canonical
    ``(B, Lq, Hkv, T)`` lists) and its rows: the group's query heads and their mask."""
    g = pid % Hkv
    i = ((pid // Hkv) % Lq).to(tl.int64)
    b = (pid // (Hkv * Lq)).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    return g, i, b, (g * G + r).to(tl.int64), r < G


@triton.jit
def _load_heads(X, b, heads, i, rmask, stride_b, stride_h, stride_l, stride_d, N, BLOCK: tl.constexpr,
                UPCAST: tl.constexpr):
    """``[BLOCK_M, BLOCK]`` tile: per row, token ``i`` (one, or one per row) of head ``heads``
    of X (zero where not ``rmask`` / past N); float32 with ``UPCAST``."""
    d = tl.arange(0, BLOCK)
    x = tl.load(X + b * stride_b + (heads * stride_h + i * stride_l)[:, None] + d[None, :] * stride_d,
                mask=rmask[:, None] & (d[None, :] < N), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_heads(X, x, b, heads, i, rmask, stride_b, stride_h, stride_l, stride_d, N, BLOCK: tl.constexpr):
    """Store the ``[BLOCK_M, BLOCK]`` tile x where :func:`_load_heads` loads it."""
    d = tl.arange(0, BLOCK)
    tl.store(X + b * stride_b + (heads * stride_h + i * stride_l)[:, None] + d[None, :] * stride_d,
             x.to(X.dtype.element_ty), mask=rmask[:, None] & (d[None, :] < N))


@triton.jit
def _list_chunk(IDX, row, T, s0, n, BLOCK_N: tl.constexpr):
    """Entries ``s0 .. s0 + BLOCK_N`` of canonical list ``row`` (``n`` valid): the key tokens
    (int64, 0 past ``n``) and their mask."""
    c = s0 + tl.arange(0, BLOCK_N)
    cmask = c < n
    return tl.load(IDX + row * T + c, mask=cmask, other=0).to(tl.int64), cmask


@triton.jit
def _load_keys(X, b, g, j, cmask, stride_b, stride_h, stride_l, stride_d, N, BLOCK: tl.constexpr,
               UPCAST: tl.constexpr):
    """``[BLOCK_N, BLOCK]`` tile gathered from KV head g of X: the tokens ``j`` (zero where not
    ``cmask`` / past N); float32 with ``UPCAST``."""
    d = tl.arange(0, BLOCK)
    x = tl.load(X + b * stride_b + g.to(tl.int64) * stride_h + j[:, None] * stride_l + d[None, :] * stride_d,
                mask=cmask[:, None] & (d[None, :] < N), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _gather_fwd_kernel(Q, K, V, IDX, CNT, OUT, LSE,
                       stride_qb, stride_qh, stride_ql, stride_qd,
                       stride_kb, stride_kh, stride_kl, stride_kd,
                       stride_vb, stride_vh, stride_vl, stride_vd,
                       stride_ob, stride_oh, stride_ol, stride_od,
                       Lq, Hq, Hkv, T, D, DV, G, qk_scale,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (b, query token i, KV group g) (``pid`` is the row of the canonical
    ``(B, Lq, Hkv, T)`` lists): the G query heads as M rows, the listed keys gathered
    ``BLOCK_N`` at a time, online softmax in the log2 domain (``qk_scale = scale * log2 e``).
    Writes the output rows and the natural-log LSE (``-inf`` and 0 without keys)."""
    pid = tl.program_id(0)
    g, i, b, heads, rmask = _group_rows(pid, Lq, Hkv, G, BLOCK_M)
    row = pid.to(tl.int64)
    n = tl.load(CNT + row)
    q = _load_heads(Q, b, heads, i, rmask, stride_qb, stride_qh, stride_ql, stride_qd, D, BLOCK_D, UPCAST)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, n, BLOCK_N):
        j, cmask = _list_chunk(IDX, row, T, s0, n, BLOCK_N)
        kt = _load_keys(K, b, g, j, cmask, stride_kb, stride_kh, stride_kl, stride_kd, D, BLOCK_D, UPCAST)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every chunk holds at least one key
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        vt = _load_keys(V, b, g, j, cmask, stride_vb, stride_vh, stride_vl, stride_vd, DV, BLOCK_DV, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m = m_new
    has = l > 0
    lsafe = tl.where(has, l, 1.0)
    out = acc / lsafe[:, None]
    _store_heads(OUT, out, b, heads, i, rmask, stride_ob, stride_oh, stride_ol, stride_od, DV, BLOCK_DV)
    lse = tl.where(has, (m + tl.log2(lsafe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + (b * Hq + heads) * Lq + i, lse, mask=rmask)


@triton.jit
def _gather_dq_kernel(Q, K, V, DO, LSE, DELTA, IDX, CNT, DQ,
                      stride_qb, stride_qh, stride_ql, stride_qd,
                      stride_kb, stride_kh, stride_kl, stride_kd,
                      stride_vb, stride_vh, stride_vl, stride_vd,
                      stride_ob, stride_oh, stride_ol, stride_od,
                      stride_gb, stride_gh, stride_gl, stride_gd,
                      Lq, Hq, Hkv, T, D, DV, G, sm_scale, qk_scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ, one program per (b, i, g) as the forward: ``P = exp(S - LSE)`` over the gathered
    keys, ``dS = P * (dO V^T - delta)``, ``dQ = scale * dS K`` (``delta``: rowsum(dO * O)
    minus the LSE's incoming gradient, float32 ``(B, Hq, Lq)``)."""
    pid = tl.program_id(0)
    g, i, b, heads, rmask = _group_rows(pid, Lq, Hkv, G, BLOCK_M)
    row = pid.to(tl.int64)
    n = tl.load(CNT + row)
    q = _load_heads(Q, b, heads, i, rmask, stride_qb, stride_qh, stride_ql, stride_qd, D, BLOCK_D, UPCAST)
    do = _load_heads(DO, b, heads, i, rmask, stride_ob, stride_oh, stride_ol, stride_od, DV, BLOCK_DV, UPCAST)
    lse2 = tl.load(LSE + (b * Hq + heads) * Lq + i, mask=rmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + (b * Hq + heads) * Lq + i, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n, BLOCK_N):
        j, cmask = _list_chunk(IDX, row, T, s0, n, BLOCK_N)
        kt = _load_keys(K, b, g, j, cmask, stride_kb, stride_kh, stride_kl, stride_kd, D, BLOCK_D, UPCAST)
        vt = _load_keys(V, b, g, j, cmask, stride_vb, stride_vh, stride_vl, stride_vd, DV, BLOCK_DV, UPCAST)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        p = tl.where(rmask[:, None] & cmask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    dq *= sm_scale
    _store_heads(DQ, dq, b, heads, i, rmask, stride_gb, stride_gh, stride_gl, stride_gd, D, BLOCK_D)


@triton.jit
def _gather_dkdv_kernel(Q, K, V, DO, LSE, DELTA, OFF, QIDX, DK, DV_,
                        stride_qb, stride_qh, stride_ql, stride_qd,
                        stride_kb, stride_kh, stride_kl, stride_kd,
                        stride_vb, stride_vh, stride_vl, stride_vd,
                        stride_ob, stride_oh, stride_ol, stride_od,
                        Lq, Lk, Hq, Hkv, D, DV, G, sm_scale, qk_scale,
                        BLOCK_R: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dK / dV, one program per key ``(b, g, j)`` (``pid`` in ``(B, Hkv, Lk)`` order): loops over
    the query tokens that listed it (``QIDX[OFF[pid]:OFF[pid + 1]]``, from
    :func:`_transpose_index`), ``BLOCK_R // GP`` tokens times the ``GP >= G`` heads of the
    group per step, and accumulates ``dV += P dO`` and ``dK += dS Q`` in float32 registers.
    DK / DV are contiguous ``(B, Hkv, Lk, D / Dv)``."""
    pid = tl.program_id(0)
    j = (pid % Lk).to(tl.int64)
    g = (pid // Lk) % Hkv
    b = (pid // (Lk * Hkv)).to(tl.int64)
    start = tl.load(OFF + pid)
    end = tl.load(OFF + pid + 1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    e = tl.arange(0, BLOCK_DV)
    emask = e < DV
    kv = tl.load(K + b * stride_kb + g.to(tl.int64) * stride_kh + j * stride_kl + d * stride_kd, mask=dmask,
                 other=0.0).to(tl.float32)
    vv = tl.load(V + b * stride_vb + g.to(tl.int64) * stride_vh + j * stride_vl + e * stride_vd, mask=emask,
                 other=0.0).to(tl.float32)
    r = tl.arange(0, BLOCK_R)
    hh = r % GP
    heads = (g * G + hh).to(tl.int64)
    dk = tl.zeros([BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_R // GP):
        pair = p0 + r // GP
        ok = (pair < end) & (hh < G)
        i = tl.load(QIDX + pair, mask=ok, other=0).to(tl.int64)
        q = _load_heads(Q, b, heads, i, ok, stride_qb, stride_qh, stride_ql, stride_qd, D, BLOCK_D, True)
        do = _load_heads(DO, b, heads, i, ok, stride_ob, stride_oh, stride_ol, stride_od, DV, BLOCK_DV, True)
        lse2 = tl.load(LSE + (b * Hq + heads) * Lq + i, mask=ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + (b * Hq + heads) * Lq + i, mask=ok, other=0.0)
        s = tl.sum(q * kv[None, :], 1) * qk_scale
        p = tl.where(ok, tl.exp2(s - lse2), 0.0)
        ds = p * (tl.sum(do * vv[None, :], 1) - delta)
        dv += tl.sum(p[:, None] * do, 0)
        dk += tl.sum(ds[:, None] * q, 0)
    base = (b * Hkv + g) * Lk + j
    tl.store(DK + base * D + d, (dk * sm_scale).to(DK.dtype.element_ty), mask=dmask)
    tl.store(DV_ + base * DV + e, dv.to(DV_.dtype.element_ty), mask=emask)


def _blocks(q, v):
    """The constexprs of the forward-style kernels: ``BLOCK_M`` (the G heads of a group padded
    to 16 rows, ``tl.dot``'s minimum), ``BLOCK_D`` / ``BLOCK_DV`` (powers of two >= 16), ``PREC``
    (IEEE float32 products for float32 inputs, no TF32) and ``UPCAST`` (bfloat16 tiles made
    float32 under the Triton interpreter, which has no bfloat16 dot)."""
    G = q.shape[1] // v.shape[1]
    return dict(BLOCK_M=max(16, triton.next_power_of_2(G)), BLOCK_N=_BLOCK_N,
                BLOCK_D=max(16, triton.next_power_of_2(q.shape[3])), BLOCK_DV=max(16, triton.next_power_of_2(v.shape[3])),
                PREC="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST=q.dtype == torch.bfloat16 and cache.interpreting(), num_warps=4, num_stages=1)


def _forward_launch(q, k, v, idx, cnt, scale):
    """The forward launch as an :class:`attncc.runtime.Launch` (what AOT compiles) and its
    outputs: ``(launch, out, lse)``, out ``(B, Hq, Lq, Dv)`` in q's dtype, lse float32
    ``(B, Hq, Lq)``."""
    from .kernel import Launch

    B, Hq, Lq, D = q.shape
    Hkv, Dv, T = k.shape[1], v.shape[3], idx.shape[3]
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    launch = Launch("_gather_fwd_kernel", (B * Lq * Hkv,),
                    [q, k, v, idx, cnt, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                     Lq, Hq, Hkv, T, D, Dv, Hq // Hkv, scale * _LOG2E],
                    _blocks(q, v))
    return launch, out, lse


def _dq_launch(q, k, v, do, lse, delta, idx, cnt, scale):
    """The dQ launch: ``(launch, dq)``, dq ``(B, Hq, Lq, D)`` in q's dtype."""
    from .kernel import Launch

    B, Hq, Lq, D = q.shape
    Hkv, Dv, T = k.shape[1], v.shape[3], idx.shape[3]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    launch = Launch("_gather_dq_kernel", (B * Lq * Hkv,),
                    [q, k, v, do, lse, delta, idx, cnt, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                     *dq.stride(), Lq, Hq, Hkv, T, D, Dv, Hq // Hkv, scale, scale * _LOG2E],
                    _blocks(q, v))
    return launch, dq


def _dkdv_launch(q, k, v, do, lse, delta, off, qidx, scale):
    """The dK / dV launch: ``(launch, dk, dv)``, contiguous, in k's / v's dtype."""
    from .kernel import Launch

    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dk = torch.empty(B, Hkv, Lk, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, Hkv, Lk, Dv, dtype=v.dtype, device=v.device)
    gp = triton.next_power_of_2(Hq // Hkv)
    bd, bdv = triton.next_power_of_2(D), triton.next_power_of_2(Dv)
    # the q and dO rows of one step in float32: at most 8192 elements (32 rows at D = Dv = 128)
    block_r = max(gp, min(_BLOCK_R, triton.next_power_of_2(max(1, 8192 // (bd + bdv)) + 1) // 2))
    launch = Launch("_gather_dkdv_kernel", (B * Hkv * Lk,),
                    [q, k, v, do, lse, delta, off, qidx, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                     Lq, Lk, Hq, Hkv, D, Dv, Hq // Hkv, scale, scale * _LOG2E],
                    dict(BLOCK_R=block_r, GP=gp, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=4, num_stages=1))
    return launch, dk, dv


def _run(kernel, launch):
    kernel[launch.grid](*launch.args, **launch.kwargs)


class _GatherAttention(torch.autograd.Function):
    """out, lse = f(q, k, v) for fixed canonical lists; gradients to q, k and v (and through
    the LSE's gradient too), none to the lists."""

    @staticmethod
    def forward(ctx, q, k, v, idx, cnt, scale):
        launch, out, lse = _forward_launch(q, k, v, idx, cnt, scale)
        _run(_gather_fwd_kernel, launch)
        ctx.save_for_backward(q, k, v, idx, cnt, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, idx, cnt, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        delta = (dout.float() * out.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        delta = delta.contiguous()
        dq = dk = dv = None
        if ctx.needs_input_grad[0]:
            launch, dq = _dq_launch(q, k, v, dout, lse, delta, idx, cnt, ctx.scale)
            _run(_gather_dq_kernel, launch)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            off, qidx = _transpose_index(idx, cnt, k.shape[2])
            launch, dk, dv = _dkdv_launch(q, k, v, dout, lse, delta, off, qidx, ctx.scale)
            _run(_gather_dkdv_kernel, launch)
        return dq, dk, dv, None, None, None


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor, *,
                     scale: Optional[float] = None, causal: bool = False, return_lse: bool = False,
                     backend: Optional[str] = None):
    """Token-level top-k attention (DeepSeek Sparse Attention style): each query token attends to
    its own listed keys.

    Query token ``i`` of every query head of KV group ``g`` (heads ``g * G .. g * G + G - 1``,
    ``G = Hq / Hkv``) attends exactly to the keys ``kv_index[b, i, g, :]``. Entries ``< 0`` or
    ``>= Lk`` are ignored (use ``-1`` as padding); with ``causal=True`` (top-left aligned: query
    ``i`` sees keys ``j <= i`` whatever ``Lq`` and ``Lk``) so are entries ``> i``. Duplicates
    count once: a key listed twice is attended to as if listed once (the lists are a set).
    A row with no valid key gives an output of 0 and an LSE of ``-inf`` (never NaN).

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``: float16,
            bfloat16 or float32 (one dtype), any strides, ``Hq % Hkv == 0``.
        kv_index: int32 / int64 ``(B, Lq, Hkv, topk)``; gets no gradient.
        scale: the score scale, default ``D ** -0.5``.
        causal: also ignore the entries ``> i``.
        return_lse: also return the log-sum-exp of the scaled scores per row.
        backend: ``None``: the Triton kernels for CUDA tensors and the dense torch reference
            (:func:`gather_attention_reference`, memory ``O(Lq * Lk)``: small shapes only) for
            CPU ones; ``"triton"``: the kernels (CUDA, or CPU under the interpreter);
            ``"interpret"``: the kernels under the Triton interpreter on CPU tensors;
            ``"torch"``: the reference.

    Returns:
        out ``(B, Hq, Lq, Dv)`` in q's dtype, and with ``return_lse`` the LSE float32
        ``(B, Hq, Lq)`` (natural log; ``-inf`` for rows without keys). Both differentiable in
        q, k and v. The kernels use O(topk) memory per query (no ``Lq x Lk`` array), float32
        accumulation, and are deterministic (dQ per query row; dK / dV per key from a transposed
        index built by a stable sort; no atomics).

    Raises:
        TypeError / ValueError (before any launch): non-tensors, ranks other than 4, q / k / v
            not float16 / bfloat16 / float32 or of different dtypes, kv_index not int32 / int64,
            shapes that do not match (the message names the argument and its expected shape),
            ``Hq % Hkv != 0``, empty inputs, tensors on different devices, a non-finite scale,
            an unknown backend.
        RuntimeError: a Triton backend on CPU tensors without the interpreter, or
            ``backend="interpret"`` on CUDA tensors.
    """
    B, Hq, Hkv, Lq, Lk, D, Dv, topk = _check(q, k, v, kv_index, scale, backend)
    if not cache.runs_kernel("gather_attention", backend, q.device):
        return gather_attention_reference(q, k, v, kv_index, scale=scale, causal=causal, return_lse=return_lse)
    scale = D ** -0.5 if scale is None else float(scale)
    with torch.no_grad():
        idx, cnt = _canonical(kv_index, Lk, causal)
    out, lse = _GatherAttention.apply(q, k, v, idx, cnt, scale)
    return (out, lse) if return_lse else out
