"""Position offsets for grid (N-D) patterns: a shard along the FIRST grid axis.

A grid pattern (``grid: y, x[, t]``) takes q / k / v of shape ``(B, H, G0, G1[, G2], D)``.
A query shard or a key shard (context parallelism, Ring Attention / Llama 3 all-gather over
the rows of an image or the frames of a video) holds some consecutive rows of the first grid
axis and the whole of the other axes. The call keywords then mean (unit: **rows of the
first grid axis**, never tokens):

* ``q_offset`` / ``kv_offset``: the global first-axis coordinate of the query / key shard's
  row 0 (int, int32/int64 ``(B,)`` tensor, or ``q_offset="bottom_right"``: ``kv_offset +
  kv_rows - q_rows``).
* ``q_total`` / ``kv_total``: the global first-axis size ``G0`` of the whole grid. A grid
  pattern's queries and keys live on one grid, so both must be equal; when only one is given
  it is used for both, when neither, ``G0 = max(q_offset + q_rows, kv_offset + kv_rows)``.
* ``kv_lens`` (ragged key lengths) is refused (``NotImplementedError``): a key shard of a
  grid is whole rows.

The twin (:func:`with_grid_positions`) is a 1-D pattern on the flattened (row-major) local
tokens whose mask / score are the pattern's coordinate form (:attr:`attncc.ir.AttentionIR.
coord_mask`, ``coord_score``) evaluated at global coordinates: ``qc0 -> q // (G1*G2) +
q_offset``, ``qc1 -> (q // G2) % G1``, ``qc2 -> q % G2`` (keys alike with ``kv_offset``),
``G0 -> total``, and the flattened index ``q -> q + q_offset * G1 * G2`` where the spec uses
it, with ``G1``, ``G2`` and the offsets read from the int32 positions tensor ``(B, 7)``
(columns :data:`GRID_POS_COLUMNS`). Spec tensors indexed by coordinates are read at global
coordinates: their dims written with ``G0``, ``G1``, ``G2``, ``Lq`` or ``Lk`` are free (they
hold the whole grid; reads outside them are refused at call time). The twin's mask reads
the positions tensor, so its kernels take the block-table path (the table is built per call
from the mask at the shard's global coordinates: exactly the non-empty tiles are visited).

Semantics follow NATTEN's neighborhood attention on the whole grid (windows shifted inward
at the GLOBAL borders), Swin's windows on the global grid, etc.: a shard's result equals the
corresponding rows of the whole grid's result.
"""

from __future__ import annotations

import dataclasses
import math

import sympy as sp
import torch

from . import ir as I
from .positions import POS_LIMIT, resolve_positions

#: columns of the positions tensor of a grid twin, int32 ``(B, 7)``: the 1-D columns
#: (:data:`attncc.ir.POS_COLUMNS`; offsets and totals in rows of the first grid axis,
#: ``kv_len`` unused) and the sizes of the second and third grid axes (1 where absent)
GRID_POS_COLUMNS = I.POS_COLUMNS + ("G1", "G2")
_GRID_AND_LENGTHS = frozenset({I.Lq, I.Lk, *I.GRID_SIZES})
#: most tokens of a shard (q or k) of a grid pattern whose score, sink or gate reads a tensor:
#: the kernels index those reads with the clamped token index, whose division by the row size
#: is evaluated in float32 with a snap tolerance (attncc.codegen ``_floor_snap``), exact while
#: the index stays below ``1 / FLOOR_TOL = 2**18``
EXACT_READ_TOKENS = 2 ** 18


def _reads_at_coordinates(ir: I.AttentionIR) -> bool:
    """Whether the score, sink or gate of grid pattern ``ir`` reads a tensor (at coordinates)."""
    return any(e is not None and sp.sympify(e).atoms(sp.Indexed) for e in (ir.coord_score, ir.sink, ir.gate))


def is_grid_twin(ir: I.AttentionIR) -> bool:
    """Whether ``ir`` is a twin of :func:`with_grid_positions` (its positions tensor has 7 columns)."""
    return any(t.name == I.POS_TENSOR and t.shape[-1] == len(GRID_POS_COLUMNS) for t in ir.tensors)


def with_grid_positions(ir: I.AttentionIR, ragged: bool = False) -> I.AttentionIR:
    """The twin of a grid pattern at global grid coordinates (see the module doc): a 1-D IR on
    the flattened local tokens with the int32 tensor :data:`attncc.ir.POS_TENSOR` ``(B, 7)``.

    Args:
        ir: a grid pattern's IR (``ir.grid`` non-empty), without ``dot()`` terms or ``route:``.
        ragged: must be False (``kv_lens`` is not supported on grids).

    Returns:
        The IR named ``<pattern>_pos`` (``grid=()``, no coordinate form); size checks that
        involve the grid or the lengths are dropped (:func:`resolve_grid_positions` checks
        them at the global grid).

    Raises:
        NotImplementedError: ``ragged``, ``dot()`` terms or a ``route:`` clause.
        ValueError: not a grid pattern, or the pattern declares a tensor named ``positions``.
    """
    if not ir.grid:
        raise ValueError(f"pattern {ir.name!r} has no grid: use attncc.ir.with_positions")
    if ragged:
        raise NotImplementedError(f"kv_lens: pattern {ir.name!r} has a grid ({', '.join(ir.grid)}); ragged key "
                                  "lengths are supported for 1-D patterns only (a key shard of a grid holds whole "
                                  "rows of its first axis: pass kv_offset= / kv_total= instead)")
    if ir.lowrank or ir.route is not None:
        raise NotImplementedError(f"q_offset / kv_offset / q_total / kv_total: pattern {ir.name!r} has "
                                  f"{'dot() low-rank terms' if ir.lowrank else 'a route: clause'}; positions are "
                                  "supported for patterns without dot() terms or routing")
    if any(t.name == I.POS_TENSOR for t in ir.tensors):
        raise ValueError(f"pattern {ir.name!r} declares a tensor named {I.POS_TENSOR!r}, the name of the run-time "
                         "positions tensor: rename it to pass q_offset= / kv_offset=")
    n = len(ir.grid)
    base = sp.IndexedBase(I.POS_TENSOR, integer=True)
    # the same tensor, read as positive integers: the grid sizes G1, G2 divide token indices,
    # and a provably positive integer divisor prints exact integer division (no float path)
    sizes = sp.IndexedBase(I.POS_TENSOR, integer=True, positive=True)
    col = {c: (sizes if c in ("G1", "G2") else base)[I.b, i] for i, c in enumerate(GRID_POS_COLUMNS)}
    G = [col["kv_total"], col["G1"], col["G2"]][:n]  # G0: the global first-axis size
    W = sp.Mul(*G[1:])  # tokens per row of the first axis

    def coords(idx, off):
        out = []
        for i in range(n):
            inner = sp.Mul(*G[i + 1:])
            c = sp.floor(idx / inner) if i < n - 1 else idx
            out.append(c + off if i == 0 else sp.Mod(c, G[i]))
        return out

    rep = dict(zip(I.QC, coords(I.q, col["q_offset"])))
    rep.update(zip(I.KC, coords(I.kv, col["kv_offset"])))
    rep.update({I.q: I.q + col["q_offset"] * W, I.kv: I.kv + col["kv_offset"] * W,
                I.Lq: col["q_total"] * W, I.Lk: col["kv_total"] * W})
    rep.update({g: x for g, x in zip(I.GRID_SIZES, [col["kv_total"], col["G1"], col["G2"]])})

    def glob(e):
        return None if e is None else sp.sympify(e).xreplace(rep)

    free = list(ir.free_dims)
    tensors = []
    for t in ir.tensors:  # dims in the grid or the lengths: the whole grid's (reads are checked)
        shape = list(t.shape)
        for axis, d in enumerate(shape):
            if sp.sympify(d).free_symbols & _GRID_AND_LENGTHS:
                name = f"{t.name}_{axis}_total"
                free.append(name)
                shape[axis] = I.free_dim(name)
        tensors.append(dataclasses.replace(t, shape=tuple(shape)))
    tensors.append(I.TensorSpec(I.POS_TENSOR, "int32", (I.B, sp.Integer(len(GRID_POS_COLUMNS))), base))
    checks = tuple((c, m) for c, m in ir.checks if not sp.sympify(c).free_symbols & _GRID_AND_LENGTHS)
    return dataclasses.replace(ir, name=f"{ir.name}_pos", tensors=tuple(tensors), mask=glob(ir.coord_mask),
                               score=glob(ir.coord_score), sink=glob(ir.sink), gate=glob(ir.gate), grid=(),
                               coord_mask=None, coord_score=None, checks=checks, free_dims=tuple(free))


def check_shards(ir: I.AttentionIR, q, k, v=None) -> tuple:
    """Check the shapes of a grid call with position keywords: q ``(B, Hq, Rq, G1[, G2], D)``,
    k ``(B, Hkv, Rk, G1[, G2], D)``, v ``(B, Hkv, Rk, G1[, G2], Dv)`` (``Rq`` / ``Rk``: rows of
    the first grid axis, any; the other axes equal).

    Returns:
        ``(q_grid, k_grid)``: the query and key shards' grid shapes.

    Raises:
        TypeError: a non-tensor. ValueError: a wrong rank, or other axes differing.
    """
    n = len(ir.grid)
    axes = ", ".join(a.upper() for a in ir.grid)
    for name, t, last in (("q", q, "D"), ("k", k, "D"), ("v", v, "Dv")):
        if t is None and name == "v":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3 + n:
            raise ValueError(f"pattern {ir.name!r} has a {n}-D grid ({', '.join(ir.grid)}): {name} must have shape "
                             f"(B, H, {axes}, {last}) (with q_offset / kv_offset the first axis is a shard of rows), "
                             f"got {tuple(t.shape)}")
    qg, kg = tuple(q.shape[2:2 + n]), tuple(k.shape[2:2 + n])
    if kg[1:] != qg[1:]:
        raise ValueError(f"k must have the grid of q on every axis but the first ({axes}: q {qg}, k {kg}); "
                         "position offsets shard the first grid axis only")
    if v is not None and tuple(v.shape[2:2 + n]) != kg:
        raise ValueError(f"v must have the grid of k ({axes} = {kg}), got {tuple(v.shape[2:2 + n])}")
    return qg, kg


def resolve_grid_positions(ir: I.AttentionIR, q, k, q_offset=None, kv_offset=None, kv_lens=None, q_total=None,
                           kv_total=None, Dv: int | None = None) -> torch.Tensor:
    """The positions tensor of a grid call with position keywords (see the module doc for the
    conventions; every offset and total counts rows of the first grid axis).

    Args:
        ir: the grid pattern's own IR (not the twin).
        q / k: the call's query ``(B, Hq, Rq, G1[, G2], D)`` and key ``(B, Hkv, Rk, G1[, G2], D)``.
        Dv: the value head dim, for the pattern's size checks (default ``D``).

    Returns:
        int32 ``(B, 7)`` on q's device, columns :data:`GRID_POS_COLUMNS`.

    Raises:
        NotImplementedError: ``kv_lens`` given.
        TypeError / ValueError (before any launch): see :func:`check_shards` and
            :func:`attncc.positions.resolve_positions`; ``q_total != kv_total``; a global grid
            of more than :data:`attncc.positions.POS_LIMIT` tokens; a size check of the
            pattern that fails at the global grid (e.g. a neighborhood larger than the axis).
    """
    if kv_lens is not None:
        with_grid_positions(ir, ragged=True)  # raises, naming the keyword
    qg, kg = check_shards(ir, q, k)
    B, W = q.shape[0], math.prod(qg[1:])
    qt = q_total if q_total is not None else kv_total
    kt = kv_total if kv_total is not None else q_total
    pos = resolve_positions(B, qg[0], kg[0], q.device, q_offset, kv_offset, None, qt, kt)
    table = pos.table.to(torch.int64)
    check = not torch.compiler.is_compiling() and q.device.type != "meta"
    if qt is None:  # the global grid spans both shards
        table[:, 2] = table[:, 3] = torch.maximum(table[:, 0] + qg[0], table[:, 1] + kg[0])
    elif check and bool((table[:, 2] != table[:, 3]).any()):
        i = int((table[:, 2] != table[:, 3]).nonzero()[0, 0])
        raise ValueError(f"q_total[{i}] = {int(table[i, 2])} and kv_total[{i}] = {int(table[i, 3])} differ: pattern "
                         f"{ir.name!r} has a grid, whose queries and keys share one first axis (pass one total, in "
                         "rows of the first grid axis)")
    if check and _reads_at_coordinates(ir) and max(math.prod(qg), math.prod(kg)) > EXACT_READ_TOKENS:
        raise ValueError(f"pattern {ir.name!r} reads a tensor at grid coordinates of the shard's tokens: a shard of "
                         f"q {qg} / k {kg} has more than {EXACT_READ_TOKENS} tokens, where the kernels' index "
                         "arithmetic of those reads is no longer exact; split the grid into smaller shards")
    if check:
        from .checks import check_sizes, compile_size_checks

        grid_checks = [(c, m) for c, m in ir.checks if sp.sympify(c).free_symbols & _GRID_AND_LENGTHS]
        compiled = compile_size_checks(dataclasses.replace(ir, checks=tuple(grid_checks)))
        D = q.shape[-1]
        for T in sorted(set(table[:, 3].tolist())):
            if T * W > POS_LIMIT:
                raise ValueError(f"q_total / kv_total = {T} rows x {W} tokens per row exceeds {POS_LIMIT} tokens "
                                 "(the kernels' index arithmetic is int32)")
            g = (T, *qg[1:])
            sizes = {"B": B, "H": q.shape[1], "Hkv": k.shape[1], "Lq": T * W, "Lk": T * W, "D": D, "Dv": Dv or D,
                     **I.grid_sizes(g)}
            try:
                check_sizes(ir, compiled, sizes)
            except ValueError as e:
                raise ValueError(f"at the global grid {g} (q_total = kv_total = {T} rows): {e}") from None
    extra = torch.tensor([qg[1] if len(qg) > 1 else 1, qg[2] if len(qg) > 2 else 1], dtype=torch.int64,
                         device=table.device)
    return torch.cat([table, extra.expand(B, 2)], 1).to(torch.int32)


def flat(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, H, *grid, D)`` -> ``(B, H, prod(grid), D)`` (row-major; a view where possible)."""
    return x.flatten(2, 1 + n)


def stat_shapes(ir: I.AttentionIR, B: int, H: int, Hkv: int, Lq: int, Lk: int, grid) -> tuple:
    """Shapes of stand-in q / k for :meth:`~attncc.runtime.CompiledAttention.tile_stats` of a
    grid pattern with position keywords: ``grid`` the query shard's ``(rows, G1[, G2])`` with
    ``Lq`` its token count, ``Lk`` the key shard's tokens (whole rows).

    Raises:
        ValueError: ``grid`` missing, of the wrong rank, or not matching ``Lq`` / ``Lk``.
    """
    n = len(ir.grid)
    if grid is None or len(grid) != n:
        raise ValueError(f"tile_stats of grid pattern {ir.name!r} with position keywords needs grid= the query "
                         f"shard's grid ({n} sizes: rows of the first axis, then the other axes), got {grid!r}")
    w = math.prod(grid[1:])
    if math.prod(grid) != Lq or Lk % w:
        raise ValueError(f"tile_stats: Lq = {Lq} must be the query shard's token count prod(grid) = {math.prod(grid)}"
                         f" and Lk = {Lk} a multiple of the row size {w} (whole rows of the first grid axis)")
    return (B, H, *grid, 1), (B, Hkv, Lk // w, *grid[1:], 1)
