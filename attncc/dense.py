"""The dense reference: the definition of what a pattern means.

:func:`reference` materialises the full score matrix in float64, applies the
mask and the softmax, and is what every kernel is tested against.
:func:`eval_expr` evaluates IR expressions on broadcast index grids with torch
(also used to build block tables for data-dependent masks).
"""

from __future__ import annotations

import math

import sympy as sp
import torch

from . import ir as I
from .checks import check_inputs, split_kwargs
from .positions import given, resolve_positions


def eval_expr(expr, env: dict, tensors: dict, reads: list | None = None, float_dtype=torch.float64,
              device=None) -> torch.Tensor:
    """Evaluate an IR expression with torch, broadcasting index grids.

    Args:
        expr: a sympy expression/boolean of the IR.
        env: symbol -> tensor (or number) for every free symbol (``b, h, q, kv, s``
            and the sizes), broadcastable against each other.
        tensors: spec tensor name -> tensor.
        reads: if given, for every tensor read a pair ``(name, in_range)`` is
            appended, ``in_range`` a boolean tensor broadcast like the read's indices.
            Out-of-range reads evaluate to 0 (as the kernels' masked loads do).
        float_dtype: dtype of float arithmetic (float64 for the reference; float32 when
            used inside FlexAttention mods, matching the kernels).
        device: where constants are created (default: CPU scalars, which broadcast).

    Returns:
        A tensor (bool for booleans, ``float_dtype`` or int64 otherwise).
    """
    memo: dict = {}
    # symbols also by name: equal Symbol objects from different sources (a plan loaded from the
    # disk cache, sympy's expression cache) are one key by name, also where torch.compile
    # (FlexAttention's mods) looks dict keys up by identity
    named = {k.name: v for k, v in env.items() if isinstance(k, sp.Symbol)}

    def ev(e):
        if e in memo:
            return memo[e]
        out = _ev(e)
        memo[e] = out
        return out

    def num(x):
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, device=device)

    def _ev(e):  # noqa: C901
        if isinstance(e, sp.Symbol) and e.name in named:
            return num(named[e.name])
        if e in env:
            return num(env[e])
        if e is sp.true or e == sp.true:
            return torch.tensor(True, device=device)
        if e is sp.false or e == sp.false:
            return torch.tensor(False, device=device)
        if e is sp.oo:
            return torch.tensor(math.inf, dtype=float_dtype, device=device)
        if e is sp.S.NegativeInfinity:
            return torch.tensor(-math.inf, dtype=float_dtype, device=device)
        if e.is_Integer:
            return torch.tensor(int(e), dtype=torch.int64, device=device)
        if e.is_number:
            return torch.tensor(float(e), dtype=float_dtype, device=device)
        if isinstance(e, sp.Indexed):
            t = tensors[str(e.base.label)]
            idx = [ev(i) for i in e.indices]
            idx = torch.broadcast_tensors(*[i.to(torch.int64) if not i.dtype.is_floating_point else i.floor().to(torch.int64)
                                            for i in idx])
            ok = torch.ones_like(idx[0], dtype=torch.bool)
            clamped = []
            for d, i in enumerate(idx):
                ok = ok & (i >= 0) & (i < t.shape[d])
                clamped.append(i.clamp(0, t.shape[d] - 1).to(t.device))
            val = t[tuple(clamped)]
            if reads is not None:
                reads.append((str(e.base.label), ok))
            zero = torch.zeros((), dtype=val.dtype, device=val.device)
            val = torch.where(ok.to(val.device), val, zero)
            return val.to(float_dtype) if val.dtype.is_floating_point else val.to(torch.int64)
        if isinstance(e, sp.Add):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out + ev(a)
            return out
        if isinstance(e, sp.Mul):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out * ev(a)
            return out
        if isinstance(e, sp.Pow):
            base, ex = e.args
            if ex.is_Integer and int(ex) < 0:  # plain ints: sympy comparisons do not trace
                return 1.0 / ev(base).to(float_dtype) ** (-int(ex))
            if ex.is_Integer:
                return ev(base) ** int(ex)
            return torch.pow(ev(base).to(float_dtype), ev(ex).to(float_dtype))
        if isinstance(e, sp.floor):
            x = ev(e.args[0])
            return x if not x.dtype.is_floating_point else _exact_floor(e.args[0], ev, torch.floor, float_dtype)
        if isinstance(e, sp.ceiling):
            x = ev(e.args[0])
            return x if not x.dtype.is_floating_point else _exact_floor(e.args[0], ev, torch.ceil, float_dtype)
        if isinstance(e, sp.Mod):
            return torch.remainder(ev(e.args[0]), ev(e.args[1]))
        if isinstance(e, sp.Abs):
            return torch.abs(ev(e.args[0]))
        if isinstance(e, (sp.Min, sp.Max)):
            f = torch.minimum if isinstance(e, sp.Min) else torch.maximum
            vals = [ev(a) for a in e.args]
            if any(v.dtype.is_floating_point for v in vals):
                vals = [v.to(float_dtype) for v in vals]
            out = vals[0]
            for v in vals[1:]:
                out = f(out, v)
            return out
        fns = {sp.exp: torch.exp, sp.log: torch.log, sp.tanh: torch.tanh, I.sigmoid: torch.sigmoid}
        for cls, f in fns.items():
            if isinstance(e, cls):
                return f(ev(e.args[0]).to(float_dtype))
        if isinstance(e, sp.Piecewise):
            *cases, (last, cond) = e.args
            out = ev(last) if cond == sp.true else torch.where(ev(cond), ev(last), torch.tensor(0, device=device))
            for val, c in reversed(cases):
                a = ev(val)
                out = torch.where(ev(c), a, out)
            return out
        if isinstance(e, sp.core.relational.Relational):
            a, c = ev(e.lhs), ev(e.rhs)
            return {"==": torch.eq, "!=": torch.ne, "<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge}[e.rel_op](a, c)
        if isinstance(e, sp.And):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out & ev(a)
            return out
        if isinstance(e, sp.Or):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out | ev(a)
            return out
        if isinstance(e, sp.Not):
            return ~ev(e.args[0])
        if isinstance(e, sp.Equivalent):
            return ev(e.args[0]) == ev(e.args[1])
        raise NotImplementedError(f"cannot evaluate {type(e).__name__} ({e})")

    return ev(sp.sympify(expr))


def output_env(sizes: dict, device) -> dict:
    """Index grids of the output elements: ``b, h, q`` as in :func:`index_env` and the output
    feature ``dv`` on the last axis (the names a sink or a gate may use)."""
    env = index_env(sizes["B"], sizes["H"], sizes["Lq"], 1, sizes["Hkv"], sizes["D"], sizes["Dv"], device,
                    grid=[sizes.get(f"G{i}", 1) for i in range(3)])
    env[I.dv] = torch.arange(sizes["Dv"], device=device, dtype=torch.int64).view(1, 1, 1, -1)
    return env


def gate_values(ir: I.AttentionIR, tensors: dict, sizes: dict, device, float_dtype=torch.float64) -> torch.Tensor:
    """The gate of ``ir`` evaluated for every output element: ``(B, H, Lq, Dv)`` (``Lq`` the
    flattened grid for grid patterns)."""
    g = eval_expr(ir.gate, output_env(sizes, device), tensors, float_dtype=float_dtype).to(float_dtype)
    return torch.broadcast_to(g, (sizes["B"], sizes["H"], sizes["Lq"], sizes["Dv"]))


def sink_values(ir: I.AttentionIR, tensors: dict, sizes: dict, device, float_dtype=torch.float64) -> torch.Tensor:
    """The sink logit of ``ir`` for every row: ``(B, H, Lq)``."""
    g = eval_expr(ir.sink, output_env(sizes, device), tensors, float_dtype=float_dtype).to(float_dtype)
    return torch.broadcast_to(g, (sizes["B"], sizes["H"], sizes["Lq"], 1))[..., 0]


def expand_factor(x: torch.Tensor, idx: tuple, order: tuple, shape: tuple) -> torch.Tensor:
    """A low-rank factor ``x`` (axes ``idx`` then the rank axis) as ``(*shape, R)`` with axes
    ``order`` (missing axes broadcast)."""
    perm = [idx.index(o) for o in order if o in idx]
    x = x.permute(*perm, len(idx))
    for pos, o in enumerate(order):
        if o not in idx:
            x = x.unsqueeze(pos)
    return x.expand(*shape, x.shape[-1])


def lowrank_factors(ir: I.AttentionIR, tensors: dict, sizes: dict) -> list:
    """``[(U, W), ...]`` of the ``dot()`` terms: ``U`` ``(B, H, Lq, R)``, ``W`` ``(B, H, Lk, R)``
    (query heads; broadcast views of the spec tensors).

    Raises:
        ValueError: the two factors of a term have different ranks (last dims).
    """
    B, H, Lq, Lk = sizes["B"], sizes["H"], sizes["Lq"], sizes["Lk"]
    out = []
    for lr in ir.lowrank:
        ra, rb = tensors[lr.a].shape[-1], tensors[lr.b].shape[-1]
        if ra != rb:
            raise ValueError(f"pattern {ir.name!r}: {lr} contracts {lr.a!r} (last dim {ra}) with {lr.b!r} "
                             f"(last dim {rb}): the ranks must be equal")
        U = expand_factor(tensors[lr.a], lr.a_idx, (I.b, I.h, I.q), (B, H, Lq))
        W = expand_factor(tensors[lr.b], lr.b_idx, (I.b, I.h, I.kv), (B, H, Lk))
        out.append((U, W))
    return out


#: floor/ceil argument -> its integer fraction ``(numerator, denominator)`` or ``None``
#: (see :func:`_integer_fraction`)
_FRACTIONS: dict = {}


def _integer_fraction(x):
    """``(P, c)`` with ``x = P / c``, both integer and ``c > 0`` (``P`` expanded, ``c`` an int
    when constant), else ``None``. Memoised: the sympy work (``together``, assumptions) runs
    once per expression, so that FlexAttention mods (:mod:`attncc.flex`), which evaluate
    the expression once eagerly before flex traces them, trace only a dict lookup here
    (dynamo cannot trace sympy's internals)."""
    if x not in _FRACTIONS:
        num_, den = sp.fraction(sp.together(x))
        ok = bool(num_.is_integer and den.is_integer and den.is_positive)
        _FRACTIONS[x] = (sp.expand(num_), int(den) if den.is_Integer else den) if ok else None
    return _FRACTIONS[x]


#: floor / ceil of a float expression treat a value within ``FLOOR_TOL * max(1, |x|)`` of an
#: integer as that integer (2**-18: 64 float32 ulps), in the reference and in the kernels
#: (``templates/attention.py.j2``: ``_floor_snap``). Integer-valued expressions built from
#: floats (T5's log-spaced buckets ``floor(8 * log(d / 8) / log(16))``) are then the same
#: integer in float32 and float64 at exact powers (float32 gives 5.9999995 at d = 64).
FLOOR_TOL = 2.0 ** -18


def _exact_floor(x, ev, fn, float_dtype=torch.float64):
    """floor/ceil of ``P / c`` with P integer: integer arithmetic (no float rounding); of
    any other float expression: within :data:`FLOOR_TOL` of an integer snaps to it."""
    frac = _integer_fraction(x)
    if frac is not None:
        n = ev(frac[0])
        d = frac[1] if isinstance(frac[1], int) else ev(frac[1])
        if not n.dtype.is_floating_point and (isinstance(d, int) or not d.dtype.is_floating_point):
            return torch.div(n, d, rounding_mode="floor") if fn is torch.floor else -torch.div(-n, d, rounding_mode="floor")
    xv = ev(x).to(float_dtype)
    tol = FLOOR_TOL * torch.clamp(torch.abs(xv), min=1.0)
    return fn(xv + tol) if fn is torch.floor else fn(xv - tol)


def index_env(B: int, H: int, Lq: int, Lk: int, Hkv: int, D: int, Dv: int, device, q_rows=None,
              grid=None) -> dict:
    """Broadcast index grids ``b [B,1,1,1], h [1,H,1,1], q [1,1,Lq,1], kv [1,1,1,Lk]`` and sizes
    (``grid``: the grid sizes ``G0, G1, G2`` of a grid pattern, else 1)."""
    def ar(n):
        return torch.arange(n, device=device, dtype=torch.int64)
    qv = ar(Lq) if q_rows is None else q_rows.to(device)
    return {I.b: ar(B).view(-1, 1, 1, 1), I.h: ar(H).view(1, -1, 1, 1), I.q: qv.view(1, 1, -1, 1),
            I.kv: ar(Lk).view(1, 1, 1, -1), I.B: B, I.H: H, I.Hkv: Hkv, I.Lq: Lq, I.Lk: Lk, I.D: D, I.Dv: Dv,
            **dict(zip(I.GRID_SIZES, I.grid_sizes(grid).values()))}


#: where a clause's reads are evaluated, as errors name it
_READ_UNITS = {"mask": "some query/key pair", "score": "some allowed query/key pair", "sink": "some row",
               "gate": "some output element"}


def _check_reads(reads, allowed, what):
    """Raise ``ValueError`` for the first out-of-bounds read of ``reads`` (pairs ``(name,
    in_range)`` from :func:`eval_expr`) where ``allowed`` (None: everywhere). The message
    does not depend on how the evaluation was chunked, so the kernels' checks and the
    reference raise the same error."""
    for name, ok in reads:
        bad = ~ok
        if allowed is not None:
            bad = bad & allowed.to(bad.device)
        if bool(bad.any()):
            raise ValueError(f"the {what} reads tensor {name!r} out of its bounds at {_READ_UNITS[what]}: "
                             f"check the index expression and the tensor's shape")


def check_clause_reads(ir: I.AttentionIR, sizes: dict, tensors: dict, device, clauses=("score", "sink", "gate"),
                       chunk_elems: int | None = None) -> None:
    """Raise ``ValueError`` when a tensor read of a clause lands outside its tensor: the one
    rule of :func:`reference` and of the kernels (which check it before the launch).

    * ``score``: every read (also nested ones, ``table[h, bucket[kv - q + Lq - 1]]``, and both
      branches of a ``where``) at every allowed (query, key) pair; masked pairs may read
      anywhere (they never contribute).
    * ``sink``: every read at every row ``(b, h, q)``; ``gate``: at every output element
      ``(b, h, q, dv)``.

    The kernels' loads are masked to the tensor's bounds, so without this check such a read
    would silently count as 0 (mask reads are checked by :func:`dense_mask` /
    :func:`tile_classes`, with the same message).

    Args:
        sizes: the call's sizes (``Lq`` / ``Lk``: flattened grids).
        tensors: spec tensor name -> tensor (checked shapes).
        clauses: which of ``score``, ``sink``, ``gate`` to check.
        chunk_elems: query rows are evaluated in chunks of at most this many pairs
            (default :data:`CHUNK_ELEMS`).
    """
    B, H, Lq, Lk = sizes["B"], sizes["H"], sizes["Lq"], sizes["Lk"]
    grid = I.grid_of(sizes)
    if "score" in clauses and ir.score.atoms(sp.Indexed):
        top = [r for r in ir.score.atoms(sp.Indexed)]
        rows_per = max(1, (chunk_elems or CHUNK_ELEMS) // max(1, B * H * Lk))
        for r0 in range(0, Lq, rows_per):
            rows = torch.arange(r0, min(Lq, r0 + rows_per), device=device)
            env = index_env(B, H, Lq, Lk, sizes["Hkv"], sizes["D"], sizes["Dv"], device, q_rows=rows, grid=grid)
            env[I.s] = 0.0
            mask = eval_expr(ir.mask, env, tensors, device=device).to(device)
            reads: list = []
            for r in top:
                eval_expr(r, env, tensors, reads, device=device)
            _check_reads(reads, mask, "score")
    for clause, expr in (("sink", ir.sink), ("gate", ir.gate)):
        if clause in clauses and expr is not None and expr.atoms(sp.Indexed):
            reads = []
            eval_expr(expr, output_env(sizes, device), tensors, reads, device=device)
            _check_reads(reads, None, clause)


def dense_mask(ir: I.AttentionIR, sizes: dict, tensors: dict, device) -> torch.Tensor:
    """The mask of ``ir`` materialised: bool ``(B, H, Lq, Lk)`` (True = pair allowed).

    Raises:
        ValueError: the mask reads a tensor out of its bounds.
    """
    env = index_env(sizes["B"], sizes["H"], sizes["Lq"], sizes["Lk"], sizes["Hkv"], sizes["D"], sizes["Dv"], device,
                    grid=I.grid_of(sizes))
    reads: list = []
    mask = eval_expr(ir.mask, env, tensors, reads).to(device)
    _check_reads(reads, None, "mask")
    return torch.broadcast_to(mask, (sizes["B"], sizes["H"], sizes["Lq"], sizes["Lk"]))


#: mask elements evaluated at once by :func:`tile_classes` (bounded memory)
CHUNK_ELEMS = 1 << 24


def tile_classes(ir: I.AttentionIR, sizes: dict, tensors: dict, block_m: int, block_n: int, device,
                 TB: int = 1, TH: int = 1, ragged_full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify (query tile, key tile) pairs of the mask: non-empty and full.

    The mask is evaluated a chunk of query tiles at a time (never the whole
    ``Lq x Lk`` matrix). A tile is non-empty when some valid pair in it is allowed
    and full when every valid pair is allowed; with ``ragged_full=False`` a tile
    that crosses ``Lk`` is never full (the kernels' unmasked path needs whole tiles).

    Args:
        TB / TH: batch / head extent to classify (1 = index 0 only, for masks that
            do not depend on it).

    Returns:
        ``(nonempty, full)``: bool ``(TB, TH, n_m, n_n)`` on ``device``.

    Raises:
        ValueError: the mask reads a tensor out of its bounds.
    """
    Lq, Lk = sizes["Lq"], sizes["Lk"]
    n_m, n_n = -(-Lq // block_m), -(-Lk // block_n)
    nonempty = torch.zeros(TB, TH, n_m, n_n, dtype=torch.bool, device=device)
    full = torch.zeros_like(nonempty)
    tiles_per_chunk = max(1, CHUNK_ELEMS // max(1, TB * TH * block_m * n_n * block_n))
    pad_k = n_n * block_n - Lk
    for m0 in range(0, n_m, tiles_per_chunk):
        m1 = min(n_m, m0 + tiles_per_chunk)
        rows = torch.arange(m0 * block_m, m1 * block_m, device=device)
        env = index_env(TB, TH, Lq, Lk, sizes["Hkv"], sizes["D"], sizes["Dv"], device, q_rows=rows.clamp(max=Lq - 1),
                        grid=I.grid_of(sizes))
        env[I.B], env[I.H] = sizes["B"], sizes["H"]
        reads: list = []
        m = eval_expr(ir.mask, env, tensors, reads).to(device)
        _check_reads(reads, (rows < Lq).view(1, 1, -1, 1), "mask")  # the padding rows repeat row Lq - 1
        m = torch.broadcast_to(m, (TB, TH, rows.numel(), Lk))
        valid_q = (rows < Lq).view(1, 1, -1, 1)
        any_m = torch.nn.functional.pad(m & valid_q, (0, pad_k), value=False)
        all_m = torch.nn.functional.pad(m | ~valid_q, (0, pad_k), value=ragged_full)
        shp = (TB, TH, m1 - m0, block_m, n_n, block_n)
        nonempty[:, :, m0:m1] = any_m.view(shp).any(dim=5).any(dim=3)
        full[:, :, m0:m1] = all_m.view(shp).all(dim=5).all(dim=3)
    return nonempty, full


def nonempty_tiles(mask: torch.Tensor, block_m: int, block_n: int) -> int:
    """Number of (query tile, key tile) pairs of a ``(B, H, Lq, Lk)`` bool mask with an allowed pair."""
    B, H, Lq, Lk = mask.shape
    n_m, n_n = -(-Lq // block_m), -(-Lk // block_n)
    m = torch.nn.functional.pad(mask, (0, n_n * block_n - Lk, 0, n_m * block_m - Lq), value=False)
    return int(m.view(B, H, n_m, block_m, n_n, block_n).any(dim=5).any(dim=3).sum())


#: finite scores are clamped to ``[-SCORE_LIMIT, SCORE_LIMIT]`` (2**127) by the reference and
#: by every kernel with a score clause (``templates/attention.py.j2``: ``_clamp_score``)
SCORE_LIMIT = 2.0 ** 127


def clamp_score(score: torch.Tensor) -> torch.Tensor:
    """The rule for huge finite scores: clamped to ``[-SCORE_LIMIT, SCORE_LIMIT]``; ``-inf``
    (a pair excluded by the score, e.g. ``where(c, s, -inf)``) stays ``-inf``.

    So a row whose every allowed key carries a finite bias, however negative (``-3e38``),
    is normalized as usual -- the mean of V when all its scores are at the limit, as
    ``scaled_dot_product_attention`` and FlexAttention give -- and only a row with no
    allowed key, or only ``-inf`` scores, gives 0 output and LSE ``-inf``. The kernels
    compute in base 2 (``score * log2(e)``), which overflows float32 beyond about
    ``2.36e38``; the limit keeps it finite. Gradients are 0 at clamped scores."""
    return torch.where(score == -math.inf, score, score.clamp(-SCORE_LIMIT, SCORE_LIMIT))


def _listed(kv_index, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, device) -> torch.Tensor:
    """bool ``(B, Hq, Lq, Lk)``: key ``kv`` is in ``kv_index[b, q, h // (Hq / Hkv), :]``.

    Raises:
        TypeError / ValueError: not an integer tensor of shape ``(B, Lq, Hkv, topk)``.
    """
    if not isinstance(kv_index, torch.Tensor) or kv_index.dtype.is_floating_point or kv_index.dtype == torch.bool:
        raise TypeError("kv_index must be an integer tensor (B, Lq, Hkv, topk)")
    if kv_index.dim() != 4 or tuple(kv_index.shape[:3]) != (B, Lq, Hkv):
        raise ValueError(f"kv_index must have shape (B, Lq, Hkv, topk) = ({B}, {Lq}, {Hkv}, topk), "
                         f"got {tuple(kv_index.shape)}")
    ix = kv_index.to(device=device, dtype=torch.int64)
    ok = (ix >= 0) & (ix < Lk)
    listed = torch.zeros(B, Lq, Hkv, Lk + 1, dtype=torch.bool, device=device)
    listed.scatter_(-1, torch.where(ok, ix, Lk), True)
    listed = listed[..., :Lk].permute(0, 2, 1, 3)  # (B, Hkv, Lq, Lk)
    return listed.repeat_interleave(Hq // Hkv, dim=1)


def reference(spec, q, k, v, pattern: str | None = None, scale: float | None = None,
              return_lse: bool = False, block_mask=None, kv_index=None, q_offset=None, kv_offset=None,
              kv_lens=None, q_total=None, kv_total=None, block_table=None, **params_and_tensors):
    """Dense materialised attention: the definition of a pattern's meaning.

    Args:
        spec: ``.attn`` text, a path, or a parsed pattern (see :func:`attncc.compile`).
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``; float
            tensors on one device, ``Hq % Hkv == 0`` (GQA/MQA: query head ``h`` reads
            key/value head ``h // (Hq // Hkv)``).
        pattern: block name when the spec holds several.
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the natural-log logsumexp per row.
        block_mask: optional :class:`attncc.BlockSparse` or FlexAttention ``BlockMask``:
            the pattern's mask AND "the pair's block is listed" (see
            :meth:`attncc.runtime.CompiledAttention.with_blocks`). Patterns with a ``route:``
            clause take it from :func:`attncc.runtime.routing.topk_blocks_reference` unless given.
        kv_index: optional int ``(B, Lq, Hkv, topk)`` token-level lists (DeepSeek sparse
            attention): the pattern's mask AND "the key is listed for this query and KV
            head" (entries outside ``[0, Lk)`` ignored, duplicates count once).
        q_offset / kv_offset / q_total / kv_total / kv_lens: global positions, as the kernel
            call takes them (:meth:`attncc.runtime.CompiledAttention.__call__`, resolved by
            :func:`attncc.positions.resolve_positions`): the mask, score, sink and gate are
            evaluated at ``q = q_offset + i``, ``kv = kv_offset + j`` with ``Lq = q_total``,
            ``Lk = kv_total``; ``kv_lens[b]`` (int32 ``(B,)``) keeps only the first
            ``kv_lens[b]`` keys of batch row ``b`` (default ``q_offset``: ``"bottom_right"``,
            ``kv_offset + kv_lens[b] - Lq``). Spec tensors indexed by ``q`` / ``kv`` hold the
            whole sequence. Grid patterns: shards of the first grid axis, offsets and totals
            in its rows (:mod:`attncc.grid_positions`; not ``kv_lens`` or ``block_mask``).
            Not with ``dot()`` terms or ``route:`` clauses (``NotImplementedError``).
        block_table: int32 ``(B, max_pages)``: ``k`` / ``v`` are a paged KV cache
            ``(num_pages, page_size, Hkv, D)`` / ``(..., Dv)`` and ``kv_lens`` is required
            (checked as the kernel checks them, :func:`attncc.runtime.paged.check_paged`); the
            cache is gathered (:func:`attncc.runtime.paged.gather_cache`, slots past
            ``kv_lens`` zero: never read) and attended as a contiguous cache with ``kv_lens``.
        **params_and_tensors: param values (compile-time in the kernels) and the
            spec's tensors, by name.

    Returns:
        ``out`` ``(B, Hq, Lq, Dv)`` in ``q.dtype`` (computed in float64), and with
        ``return_lse`` also ``lse`` ``(B, Hq, Lq)`` float32. A row with no allowed
        key (or only ``-inf`` scores) gives 0 output and LSE ``-inf``; finite scores are
        clamped to ``+-2**127`` first (:func:`clamp_score`: a row masked by huge finite
        biases gives the mean of V, as SDPA does).

    Raises:
        SpecError, TypeError, ValueError: as :func:`attncc.compile` and the kernel
            call; ValueError also when an allowed pair reads a tensor out of bounds.
    """
    from .checks import flatten_grid
    from .ir import lower

    if block_table is not None:  # a paged KV cache: gathered, then the contiguous cache with kv_lens
        from attncc.runtime.paged import check_paged, gather_cache

        check_paged(q, k, v, block_table, kv_lens)
        k, v = gather_cache(k, v, block_table, kv_lens)
    params, tensors = split_kwargs(spec, pattern, params_and_tensors)
    ir = lower(spec, pattern, **params)
    grid_shape = q.shape[2:-1] if isinstance(q, torch.Tensor) else None  # the output's (query) grid
    if given(q_offset, kv_offset, kv_lens, q_total, kv_total):  # the twin at global positions
        if kv_index is not None:
            raise NotImplementedError("kv_index with q_offset / kv_offset / q_total / kv_total / kv_lens is not "
                                      "supported: pass global key indices to kv_index instead")
        if ir.grid:  # shards of the first grid axis, flattened: the twin is 1-D (attncc.grid_positions)
            from .grid_positions import flat, resolve_grid_positions

            if block_mask is not None:
                raise NotImplementedError("block_mask with q_offset / kv_offset on a grid pattern is not supported")
            table = resolve_grid_positions(ir, q, k, q_offset, kv_offset, kv_lens, q_total, kv_total,
                                           Dv=v.shape[-1] if isinstance(v, torch.Tensor) else None)
            n = len(ir.grid)
            ir = I.with_positions(ir, False)
            q, k, v = flat(q, n), flat(k, n), flat(v, n)
            tensors = dict(tensors, **{I.POS_TENSOR: table})
        else:
            ir = I.with_positions(ir, kv_lens is not None)
            if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
                raise ValueError("q and k must be tensors (B, H, L, D) with q_offset / kv_offset / kv_lens")
            pos = resolve_positions(q.shape[0], q.shape[2], k.shape[2], q.device, q_offset, kv_offset, kv_lens,
                                    q_total, kv_total)
            tensors = dict(tensors, **{I.POS_TENSOR: pos.table})
    if block_mask is None and ir.route is not None:  # route: the producer's specification
        from attncc.runtime.routing import topk_blocks_reference

        block_mask = topk_blocks_reference(q, k, **ir.route.kwargs())
    if block_mask is not None:
        from attncc.runtime.sparse import as_block_sparse

        bs = as_block_sparse(block_mask)
        blocks, per_batch, heads = bs.block_tensor(q.shape[0], q.shape[1], k.shape[1], math.prod(q.shape[2:-1]),
                                                   math.prod(k.shape[2:-1]))
        ir = I.with_block_mask(ir, *bs.block_size, per_batch, heads)
        tensors = dict(tensors, **{I.BLOCK_TENSOR: blocks})
    q, k, v, grid = flatten_grid(ir, q, k, v)
    sizes, tensors = check_inputs(ir, q, k, v, tensors, grid=grid)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qd, kd, vd = q.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    group = Hq // Hkv
    if group > 1:
        kd = kd.repeat_interleave(group, dim=1)
        vd = vd.repeat_interleave(group, dim=1)
    sc = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    for U, W in lowrank_factors(ir, tensors, sizes):  # dot() terms, materialised here
        sc = sc + torch.matmul(U.double(), W.double().transpose(-1, -2))
    if return_lse and ir.normalize == "sigmoid":
        raise ValueError(f"pattern {ir.name!r} uses normalize: sigmoid, which has no log-sum-exp: "
                         "call without return_lse")
    mask = dense_mask(ir, sizes, tensors, q.device)
    if kv_index is not None:
        mask = mask & _listed(kv_index, B, Hq, Hkv, Lq, Lk, q.device)
    env = index_env(B, Hq, Lq, Lk, Hkv, D, Dv, q.device, grid=grid)
    env[I.s] = sc
    check_clause_reads(ir, sizes, tensors, q.device)  # score, sink and gate reads in bounds
    score = torch.broadcast_to(eval_expr(ir.score, env, tensors).to(torch.float64), (B, Hq, Lq, Lk))
    neg = torch.tensor(-math.inf, dtype=torch.float64, device=q.device)
    score = torch.where(mask, clamp_score(score), neg)
    if ir.normalize == "sigmoid":  # independent per pair, no row normalization
        lse = None
        p = torch.where(mask, torch.sigmoid(score), torch.zeros_like(score))
    else:
        full = score
        if ir.sink is not None:  # exp(sink) joins the denominator; the sink has no value
            full = torch.cat([score, sink_values(ir, tensors, sizes, q.device)[..., None]], dim=-1)
        # normalized by the row max first: at scores near the clamp limit (|score| ~ 1e38) the
        # LSE cannot hold the log of the row sum (it is below float64's resolution there)
        m = full.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        e_full = torch.exp(full - m)
        denom = e_full.sum(dim=-1, keepdim=True)
        lse = (m + torch.log(denom))[..., 0]
        p = torch.exp(score - m) / torch.where(denom == 0, torch.ones_like(denom), denom)
        p = torch.where(mask, p, torch.zeros_like(p))
    out = torch.matmul(p, vd)
    if ir.gate is not None:
        out = out * gate_values(ir, tensors, sizes, q.device)
    out = out.to(q.dtype).unflatten(2, grid_shape)
    if return_lse:
        return out, lse.to(torch.float32).unflatten(2, grid_shape)
    return out
