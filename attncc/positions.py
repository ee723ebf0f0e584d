"""Position offsets and ragged KV lengths: the call keywords ``q_offset``, ``kv_offset``,
``q_total``, ``kv_total`` and ``kv_lens`` of :class:`attncc.runtime.CompiledAttention` and
:func:`attncc.reference`, resolved into the run-time positions tensor of
:func:`attncc.ir.with_positions`.

Conventions (FlashAttention-2 / FlashInfer KV cache, context-parallel shards):

* ``q_offset`` / ``kv_offset``: the global position of query row 0 / key row 0 (an int, an
  integer tensor ``(B,)``, or for ``q_offset`` the string ``"bottom_right"``: the last query
  sits at the position of the last key of the call, ``kv_offset + Lk_b - Lq``).
* ``kv_lens``: int32/int64 ``(B,)``; batch row ``b`` attends only to its first ``kv_lens[b]``
  keys; the default ``q_offset`` is then ``"bottom_right"``.
* ``kv_total`` (the pattern's ``Lk``): default ``kv_offset + Lk_b`` (``Lk_b = kv_lens[b]``
  when ragged, else ``Lk``); ``q_total`` (the pattern's ``Lq``): default ``kv_total`` when a
  query offset is in force (``q_offset`` or ``kv_lens`` given), else ``Lq``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from .ir import POS_COLUMNS

#: the call keywords this module resolves, in the order of :func:`resolve_positions`
KEYWORDS = ("q_offset", "kv_offset", "kv_lens", "q_total", "kv_total")
#: positions and totals must stay below this (the kernels' index arithmetic is int32)
POS_LIMIT = 2 ** 30
_INT_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class Positions:
    """A resolved set of position keywords.

    Attributes:
        table: int32 ``(B, 5)`` on the queries' device, columns :data:`attncc.ir.POS_COLUMNS`
            (``q_offset, kv_offset, q_total, kv_total, kv_len``) per batch row.
        ragged: ``kv_lens`` was given (the twin masks keys ``>= kv_len``).
    """

    table: torch.Tensor
    ragged: bool


def given(*values) -> bool:
    """Whether any position keyword is set (not ``None``)."""
    return any(x is not None for x in values)


def _per_batch(name: str, x, B: int, device, allow_str: bool = False) -> torch.Tensor | str | None:
    """``x`` as int64 ``(B,)`` on ``device`` (``None`` stays ``None``; ``"bottom_right"`` is
    returned as is where ``allow_str``).

    Raises:
        TypeError / ValueError: a float / bool, another string, a tensor of the wrong dtype,
            shape or device (naming ``name``).
    """
    if x is None:
        return None
    if isinstance(x, str):
        if allow_str and x == "bottom_right":
            return x
        raise ValueError(f"{name} must be an int, an int32/int64 tensor (B,) = ({B},)"
                         + (" or 'bottom_right'" if allow_str else "") + f", got {x!r}")
    if isinstance(x, torch.Tensor):
        if x.dtype not in _INT_DTYPES:
            raise ValueError(f"{name} must be an int32/int64 tensor of shape (B,) = ({B},), got dtype "
                             f"{str(x.dtype).replace('torch.', '')}")
        if tuple(x.shape) not in ((B,), ()):
            raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(x.shape)}")
        if x.device != device and device.type != "meta":
            raise ValueError(f"{name} is on {x.device} but q is on {device}")
        return x.to(torch.int64).expand(B)
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int or an int32/int64 tensor (B,), got {type(x).__name__}")
    return torch.full((B,), int(x), dtype=torch.int64, device=device)


def _check_range(name: str, x: torch.Tensor, lo, hi, what: str) -> None:
    """Raise ``ValueError`` unless ``lo <= x <= hi`` elementwise (``lo`` / ``hi``: ints or
    tensors ``(B,)``; ``what``: the range in words)."""
    bad = (x < lo) | (x > hi)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        lo_i = int(lo[i]) if isinstance(lo, torch.Tensor) else lo
        hi_i = int(hi[i]) if isinstance(hi, torch.Tensor) else hi
        raise ValueError(f"{name}[{i}] = {int(x[i])} is outside [{lo_i}, {hi_i}]: {name} must be {what}")


def resolve_positions(B: int, Lq: int, Lk: int, device, q_offset=None, kv_offset=None, kv_lens=None,
                      q_total=None, kv_total=None) -> Optional[Positions]:
    """Resolve the position keywords of a call with ``B`` batch rows, ``Lq`` queries and
    ``Lk`` keys (1-D lengths; see the module docstring for the conventions).

    Returns:
        ``None`` when no keyword is given (the pattern runs as compiled, unchanged), else the
        :class:`Positions`.

    Raises:
        TypeError / ValueError (before any launch, naming the keyword): ``kv_lens`` not an
            int32/int64 tensor ``(B,)`` on the queries' device, or outside ``[0, Lk]``;
            offsets that are not ints / ``(B,)`` integer tensors, negative, or past
            :data:`POS_LIMIT`; a ``kv_total`` below ``kv_offset + Lk_b`` or a ``q_total``
            below ``q_offset + Lq``. Value checks read the tensors on the host (one sync);
            while ``torch.compile`` traces they are skipped.
    """
    if not given(q_offset, kv_offset, kv_lens, q_total, kv_total):
        return None
    device = torch.device(device)
    if kv_lens is not None:
        if not isinstance(kv_lens, torch.Tensor):
            raise TypeError(f"kv_lens must be an int32 tensor of shape (B,) = ({B},), got {type(kv_lens).__name__}")
        if kv_lens.dtype not in _INT_DTYPES or tuple(kv_lens.shape) != (B,):
            raise ValueError(f"kv_lens must be an int32 tensor of shape (B,) = ({B},) with values in [0, Lk] = "
                             f"[0, {Lk}], got dtype {str(kv_lens.dtype).replace('torch.', '')} shape "
                             f"{tuple(kv_lens.shape)}")
        if kv_lens.device != device and device.type != "meta":
            raise ValueError(f"kv_lens is on {kv_lens.device} but q is on {device}")
    qo = _per_batch("q_offset", q_offset, B, device, allow_str=True)
    ko = _per_batch("kv_offset", kv_offset, B, device)
    qt = _per_batch("q_total", q_total, B, device)
    kt = _per_batch("kv_total", kv_total, B, device)
    check = not torch.compiler.is_compiling() and device.type != "meta"
    lens = kv_lens.to(torch.int64) if kv_lens is not None else torch.full((B,), Lk, dtype=torch.int64, device=device)
    if check:
        if kv_lens is not None:
            _check_range("kv_lens", lens, 0, Lk, f"in [0, Lk] = [0, {Lk}] (the keys of each batch row)")
        for name, x in (("q_offset", qo), ("kv_offset", ko)):
            if isinstance(x, torch.Tensor):
                _check_range(name, x, 0, POS_LIMIT, "a position in [0, 2**30]")
    ko = torch.zeros(B, dtype=torch.int64, device=device) if ko is None else ko
    if kt is None:
        kt = ko + lens
    elif check:
        _check_range("kv_total", kt, ko + lens, POS_LIMIT, "at least kv_offset + (kv_lens[b] or Lk)")
    offset = qo is not None or kv_lens is not None
    if qo is None or isinstance(qo, str):  # "bottom_right" (the default with kv_lens)
        qo = qo if qo is not None else ("bottom_right" if kv_lens is not None else None)
        qo = ko + lens - Lq if qo == "bottom_right" else torch.zeros(B, dtype=torch.int64, device=device)
    if qt is None:
        qt = kt if offset else torch.full((B,), Lq, dtype=torch.int64, device=device)
    elif check:
        _check_range("q_total", qt, qo + Lq, POS_LIMIT, "at least q_offset + Lq")
    table = torch.stack([qo, ko, qt, kt, lens], dim=1).to(torch.int32)
    assert table.shape[1] == len(POS_COLUMNS)
    return Positions(table, kv_lens is not None)
