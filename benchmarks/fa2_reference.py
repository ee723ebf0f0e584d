"""A plain FlashAttention-2 forward in Triton: the yardstick for attncc's generated kernels.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(2023): one program per (query tile, batch*head), online softmax in base 2 with
log2(e) folded into the scale, key tiles below the diagonal without mask code and the
diagonal tiles (causal, top-left ``kv <= q``) with it. No GQA, no score_mod, no block
table: the least code a fused attention forward needs, so the register count and SASS
size of attncc's kernels can be compared with it at the same launch config
(``benchmarks/aot_report.py``; ``tests/test_aot.py`` checks it against SDPA).

    out, lse = forward(q, k, v, causal=True)          # q, k, v (B, H, L, D), D a power of two
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _fa2_tile(acc, l_i, m_i, q, k_base, v_base, start, offs_m, stride_kn, stride_vn, Lk, qk_scale,
              BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    if MASKED:
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=offs_n[None, :] < Lk, other=0.0)
    else:
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None])
    t = tl.dot(q, k) * qk_scale
    if MASKED:
        keep = offs_n[None, :] < Lk
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        t = tl.where(keep, t, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(t, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(t - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=offs_n[:, None] < Lk, other=0.0)
    else:
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def fa2_fwd(Q, K, V, Out, LSE,
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
            H, Lq, Lk, sm_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr):
    """Out = softmax(scale Q K^T [+ causal mask]) V for one (query tile, batch*head); LSE natural log."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :], mask=offs_m[:, None] < Lq, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    if CAUSAL:  # tiles entirely below the diagonal, then the diagonal ones
        hi = tl.minimum((pid_m + 1) * BLOCK_M, Lk)
        full_hi = tl.minimum((pid_m * BLOCK_M) // BLOCK_N * BLOCK_N, Lk // BLOCK_N * BLOCK_N)
    else:
        hi = Lk
        full_hi = Lk // BLOCK_N * BLOCK_N
    for start in range(0, full_hi, BLOCK_N):
        acc, l_i, m_i = _fa2_tile(acc, l_i, m_i, q, k_base, v_base, start, offs_m, stride_kn, stride_vn, Lk,
                                  qk_scale, BLOCK_N, D, False, CAUSAL)
    for start in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fa2_tile(acc, l_i, m_i, q, k_base, v_base, start, offs_m, stride_kn, stride_vn, Lk,
                                  qk_scale, BLOCK_N, D, True, CAUSAL)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om
             + offs_d[None, :], out.to(Out.dtype.element_ty), mask=offs_m[:, None] < Lq)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) / LOG2E)
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


def launch_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, block_m: int = 128,
                block_n: int = 64, num_warps: int = 8, num_stages: int = 3):
    """``(grid, args, kwargs, out, lse)`` of one :func:`fa2_fwd` launch on q, k, v ``(B, H, L, D)``
    (last dim contiguous, D a power of two >= 16).

    Raises:
        ValueError: a head dim that is not a power of two >= 16, or a last dim that is not contiguous.
    """
    B, H, Lq, D = q.shape
    if D < 16 or D & (D - 1):
        raise ValueError(f"fa2_reference: head dim must be a power of two >= 16, got {D}")
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        raise ValueError("fa2_reference: q, k, v need a contiguous last dim")
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    args = [q, k, v, out, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            H, Lq, k.shape[2], 1.0 / math.sqrt(D)]
    kwargs = dict(BLOCK_M=block_m, BLOCK_N=block_n, D=D, CAUSAL=causal, num_warps=num_warps, num_stages=num_stages)
    return (triton.cdiv(Lq, block_m), B * H), args, kwargs, out, lse


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, **config):
    """Run the plain FA2 forward: ``(out (B, H, L, D) q.dtype, lse (B, H, L) float32)``."""
    grid, args, kwargs, out, lse = launch_args(q, k, v, causal, **config)
    fa2_fwd[grid](*args, **kwargs)
    return out, lse
