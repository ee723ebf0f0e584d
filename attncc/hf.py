"""Hugging Face transformers integration: ``attn_implementation="attncc"``.

::

    import attncc.hf
    attncc.hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attncc")

:func:`register` adds an attention function to transformers' ``AttentionInterface``
and a mask function to its ``AttentionMaskInterface``. The mask function builds no
dense mask when the pattern is the layer's own (causal or causal sliding window, no
padding, queries the last positions of the keys): the attention function then
compiles the layer's pattern from its configuration — causal bottom-right
(``kv <= q + Lk - Lq``, the KV-cache alignment), ``sliding_window``
(``q + Lk - Lq - kv < window``, as transformers' ``sliding_window_overlay``),
``softcap`` (Gemma 2's ``attn_logit_softcapping``), ``scaling``, GQA (native), and
gpt-oss sinks (``s_aux``, the spec's ``sink:`` clause, fused). With padding or any
other mask, transformers' boolean SDPA mask is passed to the kernel as a mask tensor.
Kernels are compiled once per distinct configuration.

Qwen3-Next's output gate is applied by the model after the attention function, so it
needs nothing here. Attention dropout in training is not supported (ValueError).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from .fx import site as S

log = logging.getLogger("attncc")

#: layer_idx -> the pattern description its last call used (for inspection and tests)
SITES: dict = {}


@functools.lru_cache(maxsize=None)
def _kernel(causal: bool, window: Optional[int], softcap: Optional[float], mask_dims: Optional[tuple],
            sinks: bool) -> S.Kernel:
    mask = None
    if mask_dims is None:
        pos = S.q_idx + S.Lk - S.Lq  # the query's position in key coordinates (bottom-right)
        if causal:
            mask = S.kv_idx <= pos
        if window is not None:
            w = pos - S.kv_idx < int(window)
            mask = w if mask is None else mask & w
    ops = (("softcap", float(softcap)),) if softcap else ()
    site = S.Site(mask=mask, mask_tensor=mask_dims, score_ops=ops, sinks=sinks)
    k = S.kernel_for(site)
    log.info("attncc.hf: compiled %s", site.describe())
    return k


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      s_aux: Optional[torch.Tensor] = None, **kwargs):
    """transformers attention function (the ``AttentionInterface`` signature).

    Args:
        module: the attention layer (``is_causal``, ``layer_idx`` are read).
        query: ``(B, Hq, Lq, D)``; key / value: ``(B, Hkv, Lk, D|Dv)`` (not repeated).
        attention_mask: None (the layer's own pattern, see the module docstring) or a
            boolean ``(B|1, 1|H, Lq, Lk)`` mask, True = attend (from :func:`mask_function`).
        dropout: must be 0 (ValueError otherwise).
        scaling: score scale (default ``1/sqrt(D)``).
        sliding_window: causal window (a key is kept when ``q_pos - kv_pos < window``).
        softcap: tanh soft-capping of the scores (Gemma 2).
        s_aux: ``(Hq,)`` sink logits (gpt-oss).

    Returns:
        ``(out, None)`` with ``out`` ``(B, Lq, Hq, Dv)`` contiguous, like transformers'
        ``sdpa_attention_forward``.
    """
    if dropout:
        raise ValueError(f"attncc attention has no attention dropout (got p={dropout}); use model.eval() or "
                         f"attention_dropout=0")
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    dims, tensors = None, []
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask >= 0  # an additive 0 / finfo.min mask
        if attention_mask.dim() != 4:
            raise ValueError(f"attncc expects a 4-D attention mask, got shape {tuple(attention_mask.shape)}")
        sizes = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        dims = tuple("1" if s == 1 else n for s, n in zip(attention_mask.shape, ("B", "H", "Lq", "Lk")))
        dims = tuple(d if d == "1" or attention_mask.shape[i] == sizes[i] else "?" for i, d in enumerate(dims))
        if "?" in dims:
            raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} does not broadcast to "
                             f"(B, H, Lq, Lk) = {sizes}")
        tensors = [attention_mask]
    k = _kernel(causal, sliding_window, softcap, dims, s_aux is not None)
    sink = None if s_aux is None else s_aux.reshape(1, -1, 1)
    SITES[getattr(module, "layer_idx", None)] = k.site.describe()
    out = S.attention(query, key, value, k.key, scaling if scaling is not None else query.shape[-1] ** -0.5,
                      tensors, sink=sink)
    return out.transpose(1, 2).contiguous(), None


def _is_sliding_causal(fn, window: int) -> bool:
    """``fn`` is transformers' ``sliding_window_causal_mask_function(window)``:
    ``and_masks(sliding_window_overlay(window), causal_mask_function)``."""
    cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
    parts = next((c for c in cells if isinstance(c, tuple)), ())
    names = sorted(getattr(p, "__qualname__", "") for p in parts)
    if names != ["causal_mask_function", "sliding_window_overlay.<locals>.inner_mask"]:
        return False
    overlay = next(p for p in parts if p.__qualname__.startswith("sliding"))
    return [c.cell_contents for c in overlay.__closure__] == [window]


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask: Optional[torch.Tensor] = None, local_size: Optional[int] = None,
                  **kwargs):
    """transformers mask function (the ``AttentionMaskInterface`` signature).

    Returns None — no mask is built — when the pattern is the layer's own causal or
    sliding-window mask aligned bottom-right (the queries are the last ``q_length``
    positions of the keys, no padding): :func:`attention_forward` then compiles it.
    Otherwise transformers' boolean SDPA mask ``(B, 1, Lq, Lk)`` (True = attend).
    """
    from transformers import masking_utils as mu

    fn = mask_function or mu.causal_mask_function
    try:
        aligned = int(q_offset) + int(q_length) == int(kv_offset) + int(kv_length)
    except (TypeError, RuntimeError):
        aligned = False
    padded = attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all()))
    standard = fn is mu.causal_mask_function or (local_size is not None and _is_sliding_causal(fn, local_size))
    if aligned and not padded and standard:
        return None
    kwargs.pop("allow_is_causal_skip", None)
    return mu.sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset, mask_function=fn,
                        attention_mask=attention_mask, local_size=local_size, allow_is_causal_skip=False, **kwargs)


def register(name: str = "attncc") -> None:
    """Register ``name`` with transformers' ``AttentionInterface`` (attention function)
    and ``AttentionMaskInterface`` (mask function), so ``attn_implementation=name``
    uses attncc kernels.

    Raises:
        ImportError: transformers is not installed (``pip install attncc[hf]``).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)
