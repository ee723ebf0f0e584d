"""Merging partial attention states (issue 16, section 3): FlashInfer's ``merge_state`` /
FlashDecoding's reduction, and cascade attention over a shared prefix.

Attention over a key set split into disjoint parts ``K = K_1 + ... + K_n`` is recovered from
each part's output and LSE: ``lse = logsumexp_i(lse_i)`` and ``out = sum_i w_i * out_i`` with
``w_i = exp(lse_i - lse)``. :func:`merge_state` merges two states, :func:`merge_states` a
list; :func:`cascade` attends a shared prefix (a system prompt, batch 1) once for every batch
row and each row's own suffix separately, then merges the two.

:func:`merge_states_reference` is the formula in plain torch (the specification; autograd
differentiates it). The Triton kernel (:func:`_merge_kernel`, one program per block of rows,
the leading dims flattened into rows) runs on CUDA tensors and with ``backend="interpret"``;
a torch implementation of the same float32 arithmetic runs on CPU by default. Both are the
forward of one ``torch.autograd.Function`` whose backward is the analytic gradient in torch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import cache

__all__ = ["merge_state", "merge_states", "merge_states_reference", "cascade"]

_BLOCK_R = 16   # rows per program
_NEG_INF = float("-inf")


def _check(fn, outs, lses, names, backend=None):
    """Validate the states of :func:`merge_states` / :func:`merge_state` (before any launch):
    ``outs[i]`` float ``(..., L, Dv)`` of one shape, ``lses[i]`` float32 ``outs[i].shape[:-1]``,
    one device. ``names``: ``(out names, lse names)`` for the messages. Returns the result dtype
    (the promotion of the outputs' dtypes)."""
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise TypeError(f"{fn}: outs and lses must be lists of tensors, got {type(outs).__name__} and "
                        f"{type(lses).__name__}")
    if len(outs) != len(lses):
        raise ValueError(f"{fn}: {len(outs)} outputs and {len(lses)} LSEs; pass one LSE per output")
    if not outs:
        raise ValueError(f"{fn}: no states to merge")
    onames, lnames = names
    for i, (o, l) in enumerate(zip(outs, lses)):
        for name, x in ((onames[i], o), (lnames[i], l)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if o.dim() < 2:
            raise ValueError(f"{fn}: {onames[i]} must have at least 2 dims (..., L, Dv), got shape {tuple(o.shape)}")
        if not o.dtype.is_floating_point:
            raise TypeError(f"{fn}: {onames[i]} must be a floating-point tensor, got {o.dtype}")
        if l.dtype != torch.float32:
            raise TypeError(f"{fn}: {lnames[i]} must be float32 (the natural-log LSE attncc kernels return), "
                            f"got {l.dtype}")
        if tuple(o.shape) != tuple(outs[0].shape):
            raise ValueError(f"{fn}: {onames[i]} has shape {tuple(o.shape)} but {onames[0]} has "
                             f"{tuple(outs[0].shape)}; the states must have one shape")
        if tuple(l.shape) != tuple(o.shape[:-1]):
            raise ValueError(f"{fn}: {lnames[i]} must have shape {tuple(o.shape[:-1])} (that of {onames[i]} "
                             f"without its last dim), got {tuple(l.shape)}")
        for name, x in ((onames[i], o), (lnames[i], l)):
            if x.device != outs[0].device:
                raise ValueError(f"{fn}: {name} is on {x.device} but {onames[0]} on {outs[0].device}; "
                                 f"the states must be on one device")
    if backend not in cache.KERNEL_BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {', '.join(map(repr, cache.KERNEL_BACKENDS))}; got {backend!r}")
    dtype = outs[0].dtype
    for o in outs[1:]:
        dtype = torch.promote_types(dtype, o.dtype)
    return dtype


def merge_states_reference(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]):
    """The merge in plain torch (the specification of :func:`merge_states`; same arguments and
    results): ``lse = logsumexp(lses)``, ``out = sum_i exp(lse_i - lse) * out_i`` in float32.
    Rows whose states are all ``-inf`` give 0 and ``-inf``. Differentiable by torch autograd
    (whose gradient is NaN at rows that are all ``-inf``; :func:`merge_states` gives 0 there)."""
    dtype = _check("merge_states_reference", outs, lses, _names(len(outs)))
    L = torch.stack(list(lses))
    lse = torch.logsumexp(L, 0)
    empty = torch.isneginf(lse)
    w = torch.exp(L - torch.where(empty, 0.0, lse))            # exp(-inf - 0) = 0 on empty rows
    out = sum(w[i][..., None] * o.float() for i, o in enumerate(outs))
    return out.to(dtype), lse


def _weights(lses):
    """float32 ``(n, ...)`` weights ``exp(lse_i - lse)`` and the merged LSE, in a numerically
    stable form (the max subtracted first; 0 and ``-inf`` where every state is ``-inf``)."""
    L = torch.stack([l.detach() for l in lses])
    m = L.amax(0)
    msafe = torch.where(torch.isneginf(m), 0.0, m)
    e = torch.exp(L - msafe)
    s = e.sum(0)
    has = s > 0
    w = torch.where(has, e / torch.where(has, s, 1.0), 0.0)
    lse = torch.where(has, msafe + torch.log(torch.where(has, s, 1.0)), _NEG_INF)
    return w, lse


def _merge_torch(outs, lses, dtype):
    """The forward in torch: the kernel's float32 arithmetic (a part of weight 0 adds nothing,
    even where its output is not finite)."""
    w, lse = _weights(lses)
    acc = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    for i, o in enumerate(outs):
        wi = w[i][..., None]
        acc = acc + torch.where(wi > 0, wi * o.detach().float(), 0.0)
    return acc.to(dtype), lse


@triton.jit
def _merge_kernel(OA, LA, OB, LB, O, LSE, R, DV,
                  stride_ar, stride_ad, stride_br, stride_bd, stride_or, stride_od, stride_la, stride_lb,
                  BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program per ``BLOCK_R`` rows of the flattened states: the rows' LSEs, the weights
    ``exp(lse_x - lse)`` (max subtracted, float32), then the output rows ``BLOCK_DV`` columns
    at a time. A part of weight 0 (LSE ``-inf``) is not read; rows where both are ``-inf`` get
    output 0 and LSE ``-inf``. ``O`` / ``LSE``: the merged states (O in its own dtype)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    r = rows.to(tl.int64)
    la = tl.load(LA + r * stride_la, mask=rmask, other=float("-inf"))
    lb = tl.load(LB + r * stride_lb, mask=rmask, other=float("-inf"))
    m = tl.maximum(la, lb)
    msafe = tl.where(m == float("-inf"), 0.0, m)
    ea = tl.exp(la - msafe)
    eb = tl.exp(lb - msafe)
    s = ea + eb
    has = s > 0
    ssafe = tl.where(has, s, 1.0)
    wa = tl.where(has, ea / ssafe, 0.0)
    wb = tl.where(has, eb / ssafe, 0.0)
    tl.store(LSE + r, tl.where(has, msafe + tl.log(ssafe), float("-inf")), mask=rmask)
    use_a = rmask & (wa > 0)
    use_b = rmask & (wb > 0)
    for d0 in range(0, DV, BLOCK_DV):
        d = d0 + tl.arange(0, BLOCK_DV)
        dmask = d < DV
        oa = tl.load(OA + r[:, None] * stride_ar + d[None, :] * stride_ad, mask=use_a[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        ob = tl.load(OB + r[:, None] * stride_br + d[None, :] * stride_bd, mask=use_b[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        o = wa[:, None] * oa + wb[:, None] * ob
        tl.store(O + r[:, None] * stride_or + d[None, :] * stride_od, o.to(O.dtype.element_ty),
                 mask=rmask[:, None] & dmask[None, :])


def _merge_launch(out_a, lse_a, out_b, lse_b, dtype):
    """The launch of :func:`_merge_kernel` for two states ``(..., Dv)`` / ``(...)`` as an
    :class:`attncc.runtime.Launch` (what AOT compiles) and its outputs: ``(launch, out, lse)``,
    out contiguous in ``dtype``, lse float32, both in the states' shapes."""
    from .kernel import Launch

    shape, Dv = tuple(out_a.shape), out_a.shape[-1]
    oa, ob = out_a.reshape(-1, Dv), out_b.reshape(-1, Dv)   # views where the strides allow
    la, lb = lse_a.reshape(-1), lse_b.reshape(-1)
    R = oa.shape[0]
    out = torch.empty(R, Dv, dtype=dtype, device=out_a.device)
    lse = torch.empty(R, dtype=torch.float32, device=out_a.device)
    block_dv = min(triton.next_power_of_2(Dv), 128)          # a [16, 128] float32 tile per operand at most
    launch = Launch("_merge_kernel", (triton.cdiv(R, _BLOCK_R),),
                    [oa, la, ob, lb, out, lse, R, Dv, *oa.stride(), *ob.stride(), *out.stride(), la.stride(0),
                     lb.stride(0)],
                    dict(BLOCK_R=_BLOCK_R, BLOCK_DV=block_dv, num_warps=4, num_stages=1))
    return launch, out.view(shape), lse.view(shape[:-1])


def _merge_triton(outs, lses, dtype):
    """The forward by the kernel, folding the states pairwise (intermediate outputs in
    float32, the last one in ``dtype``)."""
    out, lse = outs[0].detach(), lses[0].detach()
    if len(outs) == 1:
        return out.to(dtype, copy=True), lse.clone()
    for i in range(1, len(outs)):
        launch, out, lse = _merge_launch(out, lse, outs[i].detach(), lses[i].detach(),
                                         dtype if i == len(outs) - 1 else torch.float32)
        if launch.grid[0] > 0:
            _merge_kernel[launch.grid](*launch.args, **launch.kwargs)
    return out, lse


class _MergeStates(torch.autograd.Function):
    """``out, lse = merge(outs, lses)``: forward by the kernel or in torch, backward analytic in
    torch. With ``w_i = exp(lse_i - lse)`` and incoming gradients ``g`` (out) and ``g_lse``:
    ``d out_i = w_i g`` and ``d lse_i = w_i (<g, out_i> - <g, out> + g_lse)`` (0 where
    ``w_i = 0``, so never NaN for ``-inf`` parts)."""

    @staticmethod
    def forward(ctx, use_kernel, dtype, n, *states):
        outs, lses = states[:n], states[n:]
        out, lse = (_merge_triton if use_kernel else _merge_torch)(outs, lses, dtype)
        ctx.n = n
        ctx.save_for_backward(*states)
        return out, lse

    @staticmethod
    def backward(ctx, g, g_lse):
        states = ctx.saved_tensors
        n = ctx.n
        outs, lses = states[:n], states[n:]
        w, _ = _weights(lses)
        grads = [None] * (2 * n)
        if g is None:
            g = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
        gf = g.float()
        # <g, out_i> where part i has weight (its output is not read elsewhere: it may be NaN)
        dots = [(gf * torch.where(w[i][..., None] > 0, o.float(), 0.0)).sum(-1) for i, o in enumerate(outs)]
        mean = sum(w[i] * dots[i] for i in range(n))                      # <g, out> in float32
        for i, o in enumerate(outs):
            if ctx.needs_input_grad[3 + i]:
                grads[i] = (w[i][..., None] * gf).to(o.dtype)
            if ctx.needs_input_grad[3 + n + i]:
                dl = dots[i] - mean
                if g_lse is not None:
                    dl = dl + g_lse.float()
                grads[n + i] = w[i] * dl
        return (None, None, None, *grads)


def _names(n):
    return [f"outs[{i}]" for i in range(n)], [f"lses[{i}]" for i in range(n)]


def _merge(fn, outs, lses, names, backend):
    dtype = _check(fn, outs, lses, names, backend)
    return _MergeStates.apply(cache.runs_kernel(fn, backend, outs[0].device), dtype, len(outs), *outs, *lses)


def merge_states(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], *, backend: Optional[str] = None):
    """Merge the attention states of disjoint key sets into the state over their union.

    ``lse = logsumexp_i(lse_i)`` and ``out = sum_i w_i * out_i`` with ``w_i = exp(lse_i - lse)``
    computed in float32 (the max subtracted first): FlashInfer's ``merge_states``,
    FlashDecoding's split-KV reduction. ``out_i, lse_i = kern(q, k_i, v_i, return_lse=True)``
    over a partition ``k_1, ..., k_n`` of the keys (one pattern, one scale) merge to
    ``kern(q, k, v, return_lse=True)``. A part with LSE ``-inf`` (no key: fully masked) gets
    weight 0 and its output is not read (it may hold anything, NaN included); a row whose parts
    are all ``-inf`` gives output 0 and LSE ``-inf``, never NaN.

    Args:
        outs: ``n >= 1`` tensors ``(..., L, Dv)`` of one shape, any float dtypes and strides
            (any number of leading dims, flattened into rows by the kernel).
        lses: ``n`` float32 tensors ``(..., L)`` (each ``outs[i].shape[:-1]``), natural log,
            finite or ``-inf``.
        backend: ``None``: the Triton kernel for CUDA tensors, torch for CPU ones; ``"triton"``:
            the kernel (CUDA, or CPU under the interpreter); ``"interpret"``: the kernel under
            the Triton interpreter on CPU tensors; ``"torch"``: torch (the same float32 formula).
            The kernel merges two states per launch; ``n > 2`` states are folded left to right
            with float32 intermediates.

    Returns:
        ``(out, lse)``: out in the promotion of the outputs' dtypes, lse float32, contiguous,
        in the inputs' shapes. Differentiable in every ``outs[i]`` and ``lses[i]`` (the analytic
        gradient, computed in torch; 0 for parts of weight 0).

    Raises:
        TypeError / ValueError (before any launch): non-tensors or non-lists, a different number
            of outputs and LSEs, no states, outputs with fewer than 2 dims or not floating point,
            LSEs not float32, shapes that differ (the message names the argument and the shape
            it needs), tensors on different devices, an unknown backend.
        RuntimeError: a Triton backend on CPU tensors without the interpreter, or
            ``backend="interpret"`` on CUDA tensors.
    """
    return _merge("merge_states", outs, lses, _names(len(outs) if isinstance(outs, (list, tuple)) else 0), backend)


def merge_state(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
                backend: Optional[str] = None):
    """Merge two attention states (FlashInfer's ``merge_state``): ``merge_states([out_a, out_b],
    [lse_a, lse_b])``; errors name ``out_a``, ``lse_a``, ``out_b``, ``lse_b``.

    ``out_a`` / ``out_b``: ``(..., L, Dv)`` float; ``lse_a`` / ``lse_b``: float32 ``(..., L)``.
    Returns ``(out, lse)``: ``lse = logaddexp(lse_a, lse_b)``, ``out = w_a out_a + w_b out_b``.
    See :func:`merge_states` for the backends, ``-inf`` parts, gradients and errors."""
    return _merge("merge_state", [out_a, out_b], [lse_a, lse_b], (["out_a", "out_b"], ["lse_a", "lse_b"]), backend)


def cascade(prefix_kern, suffix_kern, q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
            suffix_k: torch.Tensor, suffix_v: torch.Tensor, *, scale: Optional[float] = None,
            return_lse: bool = False, prefix_tensors: Optional[dict] = None, suffix_tensors: Optional[dict] = None,
            backend: Optional[str] = None):
    """Cascade attention: a prefix shared by every batch row (a system prompt) and each row's
    own suffix, attended separately and merged (FlashInfer's cascade inference).

    ``prefix_kern(q, prefix_k, prefix_v, return_lse=True)`` runs with the prefix keys of batch
    1 expanded over the batch (``expand``: no copy), ``suffix_kern(q, suffix_k, suffix_v,
    return_lse=True)`` with each row's keys, and :func:`merge_state` merges the two. The result
    equals one attention over the concatenated keys ``[prefix; suffix]`` when the two patterns
    are that attention restricted to each part, with the key positions of each part counted
    from its own start. For causal decoding or chunked prefill (the ``Lq`` queries are the last
    ``Lq`` positions of prefix + suffix, ``Lq <= Ls``):

    * the prefix is entirely visible: compile a mask-free pattern,
      ``attncc.compile("pattern full:\\n    score: s\\n")``;
    * the suffix is bottom-right causal: ``attncc.compile(attncc.pattern_path("causal_bottom_right"))``
      (``kv <= q + Ls - Lq``, which is ``kv <= q + (Lp + Ls) - Lq`` over the concatenation).

    Then ``cascade(full, cbr, q, pk, pv, sk, sv)`` equals ``cbr(q, cat(pk, sk), cat(pv, sv))``.
    Top-left ``causal`` would not: its positions start at the first key of the part it sees.

    Args:
        prefix_kern / suffix_kern: compiled patterns (``attncc.compile``), or any callables
            ``f(q, k, v, scale=..., return_lse=True, **tensors) -> (out, lse)``.
        q: ``(B, Hq, Lq, D)``.
        prefix_k / prefix_v: ``(1, Hkv, Lp, D / Dv)`` (expanded to batch B) or ``(B, ...)``.
        suffix_k / suffix_v: ``(B, Hkv, Ls, D / Dv)``.
        scale: the score scale of both parts (default ``D ** -0.5``).
        return_lse: also return the merged LSE ``(B, Hq, Lq)``.
        prefix_tensors / suffix_tensors: spec tensors of each pattern (keyword arguments).
        backend: of the merge (see :func:`merge_states`).

    Returns:
        out ``(B, Hq, Lq, Dv)`` (and the LSE), differentiable in q, the prefix and suffix
        keys and values (the prefix's gradient summed over the batch by the expand).

    Raises:
        TypeError / ValueError (before any launch): non-tensors, ranks other than 4, a prefix
            batch other than 1 or B, suffix batch other than B; the kernels' and the merge's
            own checks otherwise.
    """
    for name, x in (("q", q), ("prefix_k", prefix_k), ("prefix_v", prefix_v), ("suffix_k", suffix_k),
                    ("suffix_v", suffix_v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"cascade: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"cascade: {name} must have 4 dims (B, H, L, D), got shape {tuple(x.shape)}")
    B = q.shape[0]
    for name, x in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if x.shape[0] not in (1, B):
            raise ValueError(f"cascade: {name} must have batch 1 (shared) or {B} (that of q), got shape "
                             f"{tuple(x.shape)}")
    for name, x in (("suffix_k", suffix_k), ("suffix_v", suffix_v)):
        if x.shape[0] != B:
            raise ValueError(f"cascade: {name} must have batch {B} (that of q), got shape {tuple(x.shape)}")
    if backend not in cache.KERNEL_BACKENDS:
        raise ValueError(f"cascade: backend must be one of {', '.join(map(repr, cache.KERNEL_BACKENDS))}; got {backend!r}")
    pk = prefix_k.expand(B, -1, -1, -1)
    pv = prefix_v.expand(B, -1, -1, -1)
    out_p, lse_p = prefix_kern(q, pk, pv, scale=scale, return_lse=True, **(prefix_tensors or {}))
    out_s, lse_s = suffix_kern(q, suffix_k, suffix_v, scale=scale, return_lse=True, **(suffix_tensors or {}))
    out, lse = merge_state(out_p, lse_p, out_s, lse_s, backend=backend)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
