"""FlexAttention mods built from the IR, for side-by-side checks and benchmarks.

FlexAttention (``torch.nn.attention.flex_attention``) is the system attncc is
measured against. Both ``attncc demo`` and ``benchmarks/bench_forward.py`` build its
``score_mod``/``mask_mod`` from a pattern's IR with :func:`attncc.dense.eval_expr`
(the tests use hand-written mods instead, to stay independent of the IR).
"""

from __future__ import annotations

import warnings

import sympy
import torch

from . import ir as I
from .dense import eval_expr


def flex_mods(ir: I.AttentionIR, sizes: dict, tensors: dict, device=None, float_dtype=torch.float32):
    """FlexAttention ``(score_mod, mask_mod)`` for ``ir``; ``None`` where not needed.

    Args:
        ir: the lowered pattern.
        sizes: ``{"B", "H", "Hkv", "Lq", "Lk", "D", "Dv"}`` (bound to the size names).
        tensors: the spec tensors by name.
        device: where eval_expr creates its constants (the attention device).
        float_dtype: float arithmetic of the mods: float32 (like the kernels, and
            fast under compiled flex) or float64.

    Raises:
        NotImplementedError: the pattern uses sigmoid normalization, a sink, a gate or
            dot() terms, which flex's score_mod / mask_mod cannot express.

    Returns:
        ``score_mod(score, b, h, q_idx, kv_idx)`` (``None`` when the score is ``s``;
        returns at least float32: a bfloat16 score_mod result is wrong under compiled
        flex on CPU with torch 2.13) and ``mask_mod(b, h, q_idx, kv_idx)`` (``None``
        when the mask is all-true). Grid patterns: ``q_idx`` / ``kv_idx`` are the row-major
        flattened token indices (flex runs on ``(B, H, L, D)`` views of the grid).
    """
    beyond = [w for w, on in (("normalize: sigmoid", ir.normalize == "sigmoid"), ("a sink", ir.sink is not None),
                              ("an output gate", ir.gate is not None), ("dot() terms", bool(ir.lowrank))) if on]
    if beyond:
        raise NotImplementedError(f"FlexAttention cannot express {', '.join(beyond)} (pattern {ir.name!r})")
    consts = {I.SIZES[n]: int(v) for n, v in sizes.items()}
    # sizes substituted before tracing: sympy folds them into the expressions' constants
    # (e.g. a grid's ``Min(G0 - 4, ...)`` becomes a clamp bound, see eval_expr), so the traced
    # mods hold no size tensors
    score_expr, mask_expr = ir.score.subs(consts), ir.mask.subs(consts)

    def env_of(b, h, q_idx, kv_idx):
        env = dict(consts)
        env.update({I.b: b, I.h: h, I.q: q_idx, I.kv: kv_idx})
        return env

    def score_mod(score, b, h, q_idx, kv_idx):
        """The pattern's score expression with ``s`` = flex's scaled score."""
        env = env_of(b, h, q_idx, kv_idx)
        env[I.s] = score
        out = eval_expr(score_expr, env, tensors, float_dtype=float_dtype, device=device)
        return out.to(torch.promote_types(score.dtype, torch.float32))

    def mask_mod(b, h, q_idx, kv_idx):
        """The pattern's mask (True = pair allowed)."""
        return eval_expr(mask_expr, env_of(b, h, q_idx, kv_idx), tensors, float_dtype=float_dtype,
                         device=device).to(torch.bool)

    # one eager evaluation of each mod (scalar indices) before flex traces them: eval_expr
    # memoises its sympy-only analysis (integer floor divisions of grid coordinates), which
    # dynamo cannot trace. Best effort: a mod that fails here fails in flex too, with flex's error.
    zero = torch.zeros((), dtype=torch.int64, device=device)
    for mod, args in ((score_mod, (torch.zeros((), dtype=torch.float32, device=device),) + (zero,) * 4),
                      (mask_mod, (zero,) * 4)):
        try:
            mod(*args)
        except Exception:  # noqa: BLE001
            pass
    return (None if ir.score == I.s else score_mod), (None if ir.mask == sympy.true else mask_mod)


def block_mask_for(ir: I.AttentionIR, mask_mod, sizes: dict, device, compiled: bool = False):
    """``create_block_mask`` for ``mask_mod`` (``None`` for an all-true mask); B/H broadcast
    when the mask does not depend on them."""
    if mask_mod is None:
        return None
    from torch.nn.attention.flex_attention import create_block_mask

    B = sizes["B"] if I.b in ir.mask.free_symbols else None
    H = sizes["H"] if I.h in ir.mask.free_symbols else None
    build = torch.compile(create_block_mask) if compiled else create_block_mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(mask_mod, B, H, sizes["Lq"], sizes["Lk"], device=str(device))
