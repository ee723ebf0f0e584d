"""Argument checks shared by the kernels and the reference.

Every user mistake is reported here, before any kernel launch, as a
``TypeError`` (wrong type/dtype, missing or unexpected argument) or a
``ValueError`` (wrong rank, shape or device), naming the argument and the
expected shape (NATTEN keeps its checks in one module the same way).
"""

from __future__ import annotations

import sympy as sp
import torch

from . import ir as I

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
_KIND_DTYPES = {
    "float": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "int": (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8),
    "bool": (torch.bool,),
}
MAX_HEAD_DIM = 256


def split_kwargs(spec, pattern, kwargs: dict) -> tuple[dict, dict]:
    """Split ``**kwargs`` of :func:`attncc.reference` into (params, tensors) by the spec's declarations."""
    from .dsl import load

    pat = load(spec, pattern)
    pnames = {p.name for p in pat.params}
    params = {k: v for k, v in kwargs.items() if k in pnames}
    tensors = {k: v for k, v in kwargs.items() if k not in pnames}
    return params, tensors


def _shape_str(shape) -> str:
    return str(tuple(int(x) for x in shape))


def check_qkv(q, k, v, dtypes=KERNEL_DTYPES) -> dict:
    """Check q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)``.

    Returns:
        The sizes ``{"B", "H", "Hkv", "Lq", "Lk", "D", "Dv"}`` (``H`` = query heads).

    Raises:
        TypeError: a non-tensor, a dtype outside ``dtypes``, or q/k/v dtypes differ.
        ValueError: wrong ranks, mismatched sizes, ``Hq % Hkv != 0``, head dims
            outside 1..256, empty tensors, or tensors on different devices.
    """
    for name, t, shape in (("q", q, "(B, Hq, Lq, D)"), ("k", k, "(B, Hkv, Lk, D)"), ("v", v, "(B, Hkv, Lk, Dv)")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims {shape}, got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got q on {q.device}, k on {k.device}, v on {v.device}")
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch size mismatch: q has B={B}, k has {k.shape[0]}, v has {v.shape[0]}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if k.shape[3] != D:
        raise ValueError(f"k must have shape (B, Hkv, Lk, D) with D={D} (q's head_dim), got {tuple(k.shape)}")
    if v.shape[1] != Hkv or v.shape[2] != Lk:
        raise ValueError(f"v must have shape (B, Hkv, Lk, Dv) = ({B}, {Hkv}, {Lk}, Dv) like k, got {tuple(v.shape)}")
    Dv = v.shape[3]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of key/value heads ({Hkv}) "
                         f"for GQA/MQA")
    for name, n in (("D (q/k head_dim)", D), ("Dv (v head_dim)", Dv)):
        if not 1 <= n <= MAX_HEAD_DIM:
            raise ValueError(f"{name} = {n} is outside the supported range 1..{MAX_HEAD_DIM}")
    if B == 0 or Hq == 0 or Lq == 0 or Lk == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)} (every size must be >= 1)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        # the kernels add 64-bit batch / head offsets to 32-bit (row, feature) offsets
        span = (x.shape[2] - 1) * abs(x.stride(2)) + (x.shape[3] - 1) * abs(x.stride(3))
        if span >= 2 ** 31:
            raise ValueError(f"{name}: one (batch, head) slice spans {span} elements with strides {tuple(x.stride())}, "
                             f"beyond the kernels' 32-bit row offsets (< 2**31): pass {name}.contiguous() (a "
                             f"(B, H, L, D) layout) or a shorter sequence")
    return {"B": B, "H": Hq, "Hkv": Hkv, "Lq": Lq, "Lk": Lk, "D": D, "Dv": Dv}


def shape_functions(ir: I.AttentionIR) -> dict:
    """name -> plain Python function of the sizes, then the free dimensions (``ir.free_dims``
    order), giving the tensor's expected shape (no sympy at call time, so torch.compile
    can trace the checks)."""
    syms = [I.SIZES[n] for n in I.SIZES] + [I.free_dim(n) for n in ir.free_dims]
    return {t.name: sp.lambdify(syms, sp.Tuple(*t.shape), modules="math") for t in ir.tensors}


def bind_free_dims(ir: I.AttentionIR, tensors: dict) -> tuple[int, ...]:
    """The values of the free tensor dimensions (``ir.free_dims``, e.g. the rank ``R`` of
    ``float32[B, H, Lq, R]``), read from the tensors passed.

    Args:
        tensors: spec tensor name -> tensor (those absent are skipped; a dim no tensor
            binds defaults to 1, so that the shape check names the tensor instead).

    Raises:
        ValueError: a tensor with the wrong number of dims, or two tensors binding one
            free dimension to different sizes (naming both).
    """
    if not ir.free_dims:
        return ()
    bound: dict = {}
    for t in ir.tensors:
        x = tensors.get(t.name)
        if not isinstance(x, torch.Tensor):
            continue
        if x.dim() != t.ndim:
            raise ValueError(f"tensor {t.name!r} must have {t.ndim} dims ({_Decl(t)}), got shape {_shape_str(x.shape)}")
        for axis, d in enumerate(t.shape):
            if isinstance(d, sp.Symbol) and d.name in ir.free_dims:
                n = int(x.shape[axis])
                if d.name in bound and bound[d.name][0] != n:
                    other, oaxis = bound[d.name][1:]
                    raise ValueError(f"free dimension {d.name} is {bound[d.name][0]} in tensor {other!r} (dim {oaxis}) "
                                     f"but {n} in tensor {t.name!r} (dim {axis}): tensors sharing {d.name} must agree")
                bound.setdefault(d.name, (n, t.name, axis))
    return tuple(bound.get(n, (1,))[0] for n in ir.free_dims)


def flatten_grid(ir: I.AttentionIR, q, k, v) -> tuple:
    """For a grid pattern, check q ``(B, Hq, *grid, D)``, k ``(B, Hkv, *grid, D)``, v
    ``(B, Hkv, *grid, Dv)`` and flatten the grid (row-major) to one token axis.

    Returns:
        ``(q, k, v, grid)``: ``(B, H, L, D)`` views (copies if not viewable) and the
        grid shape (one size per axis; see :func:`attncc.ir.grid_sizes`). 1-D patterns:
        unchanged, ``[]``.

    Raises:
        TypeError: a non-tensor. ValueError: wrong rank, or k/v grids differing from q's.
    """
    n = len(ir.grid)
    if not n:
        return q, k, v, []
    axes = ", ".join(a.upper() for a in ir.grid)
    for name, t, last in (("q", q, "D"), ("k", k, "D"), ("v", v, "Dv")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3 + n:
            raise ValueError(f"pattern {ir.name!r} has a {n}-D grid ({', '.join(ir.grid)}): {name} must have shape "
                             f"(B, H, {axes}, {last}), got {tuple(t.shape)}")
    grid = list(q.shape[2:2 + n])
    for name, t in (("k", k), ("v", v)):
        if list(t.shape[2:2 + n]) != grid:
            raise ValueError(f"{name} must have the grid of q ({axes} = {tuple(grid)}), got {tuple(t.shape[2:2 + n])}")
    flat = [t.flatten(2, 1 + n) for t in (q, k, v)]
    return (*flat, grid)


def compile_size_checks(ir: I.AttentionIR) -> list:
    """``ir.checks`` as ``(callable of the sizes, message)`` pairs (see :func:`check_sizes`)."""
    syms = [I.SIZES[n] for n in I.SIZES]
    return [(sp.lambdify(syms, c, modules="math"), m) for c, m in ir.checks]


def check_sizes(ir: I.AttentionIR, compiled: list, sizes: dict) -> None:
    """Raise ``ValueError`` when a size condition of the pattern fails (e.g. a
    neighborhood kernel larger than its grid axis), naming the axis and the sizes."""
    vals = I.size_values(sizes)
    for f, msg in compiled:
        if not bool(f(*vals)):
            names = {f"G{i}": a.upper() for i, a in enumerate(ir.grid)}
            have = ", ".join(f"{names.get(k, k)}={v}" for k, v in sizes.items() if k in names or k[0] != "G")
            raise ValueError(f"pattern {ir.name!r}: {msg} (sizes: {have})")


def expected_shape(shapes: dict, name: str, sizes: dict, free: tuple = ()) -> tuple[int, ...]:
    """Concrete shape of spec tensor ``name`` for ``sizes`` and the free dimension values
    ``free`` (:func:`bind_free_dims`), from :func:`shape_functions`."""
    return tuple(int(x) for x in shapes[name](*I.size_values(sizes), *free))


def check_tensors(ir: I.AttentionIR, tensors: dict, sizes: dict, device, only=None, shapes=None) -> dict:
    """Check the spec tensors passed by keyword (``only``: names to require; default all;
    ``shapes``: :func:`shape_functions` of ``ir``, precomputed by callers on a hot path).

    Returns:
        name -> tensor for every declared tensor (contiguous).

    Raises:
        TypeError: a missing or unexpected tensor, a non-tensor, a dtype of the
            wrong kind (float / integer / bool) for its declaration.
        ValueError: a wrong shape (the message gives the declared dims and their
            values) or device.
    """
    declared = {t.name: t for t in ir.tensors}
    shapes = shape_functions(ir) if shapes is None else shapes
    for name in tensors:
        if name not in declared:
            if name in dict(ir.params):
                raise TypeError(f"{name!r} is a compile-time param of pattern {ir.name!r} (specialised into the "
                                f"kernel), not a call argument: set it with attncc.compile(spec, {name}=VALUE)")
            known = ", ".join(declared) or "none"
            raise TypeError(f"pattern {ir.name!r} has no tensor or param {name!r} (its tensors: {known})")
    out = {}
    free = bind_free_dims(ir, tensors)
    for t in ir.tensors:
        if only is not None and t.name not in only and t.name not in tensors:
            continue
        decl = _Decl(t)  # printed only in an error (no sympy printing while torch.compile traces)
        if t.name not in tensors:
            raise TypeError(f"missing tensor {t.name!r}: pattern {ir.name!r} needs {t.name}: {decl}, passed by keyword")
        x = tensors[t.name]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"tensor {t.name!r} must be a torch.Tensor ({decl}), got {type(x).__name__}")
        want = expected_shape(shapes, t.name, sizes, free)
        if tuple(x.shape) != want:
            raise ValueError(f"tensor {t.name!r} must have shape {decl} = {_shape_str(want)}, got {_shape_str(x.shape)}")
        if x.dtype not in _KIND_DTYPES[t.kind]:
            raise TypeError(f"tensor {t.name!r} is declared {t.dtype} ({t.kind}) but has dtype "
                            f"{str(x.dtype).replace('torch.', '')}")
        if x.device != device:
            raise ValueError(f"tensor {t.name!r} is on {x.device} but q is on {device}")
        out[t.name] = x.contiguous()
    return out


class _Decl:
    """A tensor's declaration ``dtype[dims]``, formatted when an error message needs it."""

    def __init__(self, t):
        self.t = t

    def __format__(self, spec) -> str:
        return f"{self.t.dtype}[{', '.join(str(d) for d in self.t.shape)}]"


def check_inputs(ir: I.AttentionIR, q, k, v, tensors: dict, dtypes=REFERENCE_DTYPES, grid=None,
                 size_checks=None, shapes=None) -> tuple[dict, dict]:
    """:func:`check_qkv` (q, k, v already flattened by :func:`flatten_grid`, whose grid
    sizes are ``grid``), the pattern's size conditions, then :func:`check_tensors`;
    returns ``(sizes, tensors)``. ``size_checks`` / ``shapes``: precompiled
    :func:`compile_size_checks` / :func:`shape_functions` of ``ir`` (hot paths)."""
    sizes = check_qkv(q, k, v, dtypes)
    sizes.update(I.grid_sizes(grid))
    check_sizes(ir, compile_size_checks(ir) if size_checks is None else size_checks, sizes)
    return sizes, check_tensors(ir, tensors, sizes, q.device, shapes=shapes)


def compile_read_checks(checks: tuple) -> list:
    """Turn :func:`attncc.passes.read_checks` tuples into plain Python callables of the sizes
    (cheap at call time, and traceable by torch.compile)."""
    syms = [I.SIZES[n] for n in I.SIZES]
    out = []
    for name, axis, text, lo, hi in checks:
        f_lo = sp.lambdify(syms, lo, modules="math")
        f_hi = sp.lambdify(syms, hi, modules="math")
        out.append((name, axis, text, f_lo, f_hi))
    return out


def check_reads(compiled: list, sizes: dict, tensors: dict) -> None:
    """Raise ``ValueError`` if a mask tensor read can go out of bounds for these sizes.

    A mask is evaluated for every (query, key) pair, so a read such as ``doc[q]``
    with ``doc`` of length ``Lk`` is out of bounds whenever ``Lq > Lk``.
    """
    args = I.size_values(sizes)
    for name, axis, text, f_lo, f_hi in compiled:
        lo, hi = int(f_lo(*args)), int(f_hi(*args))
        n = tensors[name].shape[axis]
        if lo < 0 or hi >= n:
            raise ValueError(f"the mask reads {text} with index {axis} ranging over [{lo}, {hi}] for these sizes, "
                             f"but tensor {name!r} has {n} entries on that axis "
                             f"(sizes: {', '.join(f'{k}={v}' for k, v in sizes.items())})")


def compile_value_checks(value_read_checks: tuple) -> list:
    """:attr:`attncc.passes.KernelPlan.value_read_checks` as ``(clause, [(tensor, axis,
    f_lo, f_hi), ...])`` with plain Python callables of the sizes (``None`` for reads
    without a static range)."""
    syms = [I.SIZES[n] for n in I.SIZES]
    out = []
    for clause, checks in value_read_checks:
        fs = []
        for name, axis, _text, lo, hi in checks:
            if lo is None:
                fs.append((name, axis, None, None))
            else:
                fs.append((name, axis, sp.lambdify(syms, lo, modules="math"), sp.lambdify(syms, hi, modules="math")))
        out.append((clause, fs))
    return out


def clauses_to_check(compiled: list, sizes: dict, tensors: dict) -> tuple:
    """The clauses of :func:`compile_value_checks` whose reads are not shown in bounds by
    their static index ranges at these sizes: they need the value check
    (:func:`attncc.dense.check_clause_reads`)."""
    args = I.size_values(sizes)
    out = []
    for clause, fs in compiled:
        for name, axis, f_lo, f_hi in fs:
            if f_lo is None or int(f_lo(*args)) < 0 or int(f_hi(*args)) >= tensors[name].shape[axis]:
                out.append(clause)
                break
    return tuple(out)
