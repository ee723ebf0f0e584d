"""Hugging Face transformers integration: ``attn_implementation="attncc"``.

::

    import attncc.hf
    attncc.hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attncc")
    attncc.hf.sites(model)          # {module name: the pattern its last call used}

:func:`register` adds an attention function to transformers' ``AttentionInterface``
and a mask function to its ``AttentionMaskInterface``.

**What it computes** (the semantics of transformers' ``sdpa_attention_forward`` and,
for masks it does not build, of its FlashAttention-2 path):

* ``score = q·k * scaling`` (default ``1/sqrt(head_dim)``), then ``softcap`` (Gemma 2's
  ``cap * tanh(score / cap)``), then ``position_bias`` (T5's relative-position bias,
  ``(B|1, H|1, Lq, Lk)``), then a float ``attention_mask`` (an additive bias, e.g. Swin's
  relative-position bias plus shifted-window mask, or a ``0 / finfo.min`` mask). Both
  float tensors are read by the kernel as fused ``bias`` terms of the score, and get
  their gradient from the kernel's backward when they require grad (T5's
  ``relative_attention_bias``, Swin's ``relative_position_bias_table``).
* A boolean ``attention_mask`` (True = attend) is a mask tensor read by the kernel.
* No mask: the mask function built none because the pattern is the layer's own causal
  or causal sliding-window mask aligned bottom-right (the queries are the last ``Lq``
  positions of the keys, no padding): causal ``kv <= q + Lk - Lq`` (right for prefill
  and KV-cache decoding) when the layer is causal (``is_causal``), and the keyword
  ``sliding_window`` as ``q + Lk - Lq - kv < window``; a non-causal layer attends to
  every key. GQA is native; gpt-oss sinks (``s_aux``) are the spec's fused ``sink:``
  clause.
* Refused with a ValueError naming the keyword, before any kernel runs: attention
  dropout ``> 0`` in training, ``output_attentions=True`` (no probabilities are
  formed), ``head_mask``, ``sliding_window`` on a non-causal layer without a mask, and
  any keyword it does not know that is not None. Keywords that do not change the
  attention (``position_ids``, caches, ``use_cache``, flash-attention packing metadata
  whose effect transformers already put into the mask, ...) are accepted.

**Which architectures it serves**: models whose attention layers call the function
registered in ``AttentionInterface`` (``ALL_ATTENTION_FUNCTIONS``): tested at tiny
random configs against eager on GPT-2, BERT, RoBERTa, T5, BART, Whisper, Phi-3, Qwen2,
Gemma 2/3, Cohere, StarCoder2, ViT, Swin, DeiT, DINOv2, CLIP, Llama (dynamic and static
cache), Mistral, ModernBERT, gpt-oss, Qwen3-Next, and Falcon from transformers 5.25 on
(rotary, and ALiBi: added by the model to the float mask it asks for with
``allow_is_causal_skip=False``, read as a ``(1, H, Lq, Lk)`` bias; see
``tests/test_hf.py``). Models that compute attention in their own code (BLOOM, MPT,
Falcon before transformers 5.25: ALiBi with ``baddbmm``) are refused with a ValueError
at construction (Falcon's attention-class table) or at the first call (the mask
function, BLOOM and MPT), pointing to ``torch.compile(model, backend="attncc")``, the
graph pass that serves them. For a model whose modeling code cannot be inspected
(remote code), the mask function always builds the mask, so such a model is never
silently unmasked.

:data:`SITES` records the pattern of each call, keyed by :class:`SiteKey` (one entry
per attention module: encoder self-, decoder self- and cross-attention of one layer,
and modules without ``layer_idx``, get distinct keys); :func:`sites` names them by the
model's module names. Kernels are compiled once per distinct configuration.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import NamedTuple, Optional

import torch

from .fx import site as S

log = logging.getLogger("attncc")


class SiteKey(NamedTuple):
    """Key of :data:`SITES`: one attention module and its role.

    Attributes:
        layer: the module's ``layer_idx`` (-1 when it has none).
        role: ``"causal"`` (decoder self-attention), ``"bidirectional"`` (encoder
            self-attention, vision) or ``"cross"`` (keys from another sequence: a
            module with ``is_cross_attention``, or a non-causal call whose key length
            differs from its query length).
        module: the module's class name.
        uid: ``id(module)`` (distinct modules of one layer never share a key).
    """

    layer: int
    role: str
    module: str
    uid: int


#: SiteKey -> the pattern description (``Site.describe()``) of that module's last call
SITES: dict = {}

#: keywords transformers passes that do not change the attention: the mask already
#: holds what they mean (packing, caches) or they concern other parts of the model
_NEUTRAL = frozenset({
    "position_ids", "cache_position", "cache", "past_key_values", "past_key_value", "use_cache",
    "output_hidden_states", "output_router_logits", "num_items_in_batch", "return_dict", "deterministic",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_embeddings", "layer_idx",
    "output_attentions", "head_mask",
})


def sites(model: torch.nn.Module) -> dict:
    """:data:`SITES` of ``model``'s attention modules, by qualified module name (in
    ``named_modules`` order): ``{"encoder.block.0.layer.0.SelfAttention": "causal...", ...}``."""
    by_id = {k.uid: v for k, v in SITES.items()}
    return {name: by_id[id(m)] for name, m in model.named_modules() if id(m) in by_id}


@functools.lru_cache(maxsize=None)
def _kernel(causal: bool, window: Optional[int], softcap: Optional[float], mask_dims: Optional[tuple],
            biases: tuple, sinks: bool) -> S.Kernel:
    mask = None
    if mask_dims is None:
        pos = S.q_idx + S.Lk - S.Lq  # the query's position in key coordinates (bottom-right)
        if causal:
            mask = S.kv_idx <= pos
        if window is not None:
            w = pos - S.kv_idx < int(window)
            mask = w if mask is None else mask & w
    ops = (("softcap", float(softcap)),) if softcap else ()
    ops += tuple(("bias", dims) for dims in biases)
    site = S.Site(mask=mask, mask_tensor=mask_dims, score_ops=ops, sinks=sinks)
    k = S.kernel_for(site)
    log.info("attncc.hf: compiled %s", site.describe())
    return k


def _check_keywords(module, dropout, kwargs) -> None:
    """Refuse (ValueError, naming the keyword) what this function does not compute."""
    if dropout:
        raise ValueError(f"attncc attention has no attention dropout (got dropout={dropout} in "
                         f"{type(module).__name__}); use model.eval() or set the config's attention dropout to 0")
    if kwargs.get("output_attentions"):
        raise ValueError("attncc attention forms no attention probabilities: output_attentions=True is not "
                         "supported (use attn_implementation='eager' to inspect them)")
    if kwargs.get("head_mask") is not None:
        raise ValueError("attncc attention does not apply head_mask (use attn_implementation='eager')")
    unknown = sorted(k for k, v in kwargs.items() if k not in _NEUTRAL and v is not None)
    if unknown:
        raise ValueError(f"attncc attention does not know the keyword(s) {unknown} passed by "
                         f"{type(module).__name__} and would change the attention by dropping them; "
                         f"use torch.compile(model, backend='attncc') or attn_implementation='eager'")


def _bias(t: torch.Tensor, name: str, sizes: dict, clamp: bool) -> tuple:
    """A float tensor added to the score: ``(dims, float32 tensor)``; ``clamp`` bounds
    ``-inf`` / ``finfo.min`` below at -1e30 (same softmax, no overflow or NaN when two
    biases add up)."""
    if t.dim() > 4:
        raise ValueError(f"{name} of shape {tuple(t.shape)}: expected (B|1, H|1, Lq|1, Lk|1)")
    dims = S.broadcast_dims(tuple(t.shape), sizes, name)
    t = t.float()
    return dims, (t.clamp(min=-1e30) if clamp else t)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      s_aux: Optional[torch.Tensor] = None, position_bias: Optional[torch.Tensor] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function (the ``AttentionInterface`` signature).

    Args:
        module: the attention layer (``is_causal``, ``layer_idx``, ``is_cross_attention``
            are read).
        query: ``(B, Hq, Lq, D)``; key / value: ``(B, Hkv, Lk, D|Dv)`` (not repeated;
            ``Hq`` a multiple of ``Hkv``), float32 / float16 / bfloat16.
        attention_mask: None (the layer's own pattern, see the module docstring), a
            boolean ``(B|1, H|1, Lq|1, Lk)`` mask (True = attend), or a float one added
            to the score (gradient when it requires grad).
        dropout: must be 0 (ValueError otherwise).
        scaling: score scale (default ``1/sqrt(D)``).
        sliding_window: causal window of a layer without a mask (a key is kept when
            ``q_pos - kv_pos < window``, FlashAttention-2's convention in transformers).
        softcap: tanh soft-capping of the scores (Gemma 2).
        s_aux: ``(Hq,)`` sink logits (gpt-oss).
        position_bias: T5's ``(B|1, H|1, Lq, Lk)`` float bias added to the score.
        is_causal: overrides ``module.is_causal`` when there is no mask.
        kwargs: keywords that do not change attention (``position_ids``, caches ...);
            any other non-None keyword is refused.

    Returns:
        ``(out, None)`` with ``out`` ``(B, Lq, Hq, Dv)`` contiguous, like transformers'
        ``sdpa_attention_forward``.

    Raises:
        ValueError: a keyword it does not compute (see the module docstring), or a
            tensor of the wrong rank / shape (named, with the expected shape).
    """
    _check_keywords(module, dropout, kwargs)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"attncc attention: {name} has shape {tuple(t.shape)}, expected (B, H, L, D)")
    sizes = {"B": query.shape[0], "H": query.shape[1], "Lq": query.shape[2], "Lk": key.shape[2]}
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    mask_dims, biases, tensors = None, [], []
    if position_bias is not None:
        dims, t = _bias(position_bias, "position_bias", sizes, clamp=False)
        biases.append(dims)
        tensors.append(t)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            if attention_mask.dim() > 4:
                raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}: expected "
                                 f"(B|1, H|1, Lq|1, Lk)")
            mask_dims = S.broadcast_dims(tuple(attention_mask.shape), sizes, "attention_mask")
            tensors.insert(0, attention_mask)
        else:
            dims, t = _bias(attention_mask, "attention_mask", sizes, clamp=True)
            biases.append(dims)
            tensors.append(t)
    window, layer_causal = None, causal
    if attention_mask is None and sliding_window is not None:
        if not causal:
            raise ValueError(f"attncc attention: sliding_window={sliding_window} on a non-causal layer without a "
                             f"mask ({type(module).__name__}) is ambiguous; pass the mask transformers builds for it")
        window = int(sliding_window)
    if attention_mask is not None:
        causal = False  # the mask holds the pattern (as for transformers' SDPA path)
    k = _kernel(causal, window, softcap, mask_dims, tuple(biases), s_aux is not None)
    cross = getattr(module, "is_cross_attention", False) or (not layer_causal and key.shape[2] != query.shape[2])
    role = "cross" if cross else ("causal" if layer_causal else "bidirectional")
    layer = getattr(module, "layer_idx", None)
    SITES[SiteKey(-1 if layer is None else int(layer), role, type(module).__name__, id(module))] = \
        k.site.describe()
    sink = None if s_aux is None else s_aux.reshape(1, -1, 1)
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


@functools.lru_cache(maxsize=None)
def _served(config_module: str) -> Optional[bool]:
    """Whether the modeling code next to a config module calls transformers'
    ``ALL_ATTENTION_FUNCTIONS`` (True), computes attention itself (False), or cannot be
    inspected (None: remote code)."""
    if not config_module.startswith("transformers.models.") or ".configuration_" not in config_module:
        return None
    try:
        mod = importlib.import_module(config_module.replace(".configuration_", ".modeling_"))
    except ImportError:
        return None
    return hasattr(mod, "ALL_ATTENTION_FUNCTIONS")


def not_served_message(model_type: str) -> str:
    """The error text for a model whose attention does not go through AttentionInterface."""
    return (f"attn_implementation='attncc' cannot serve {model_type!r}: its attention is computed in its own "
            f"modeling code (not through transformers' AttentionInterface), so attncc's attention function would "
            f"never run and its masks would be misread. Use the graph pass instead: "
            f"torch.compile(model, backend=\"attncc\") on a model built with attn_implementation='eager' or 'sdpa'.")


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask: Optional[torch.Tensor] = None, local_size: Optional[int] = None,
                  config=None, **kwargs):
    """transformers mask function (the ``AttentionMaskInterface`` signature).

    Returns None — no mask is built — when the pattern is the layer's own causal or
    sliding-window mask aligned bottom-right (the queries are the last ``q_length``
    positions of the keys, no padding) and the model's attention goes through
    :func:`attention_forward`, which then compiles the pattern; a plain bidirectional
    mask without padding is None as well (transformers' SDPA convention: every key).
    Otherwise — and always when the caller passes ``allow_is_causal_skip=False``, as models
    that edit the mask they get do (Falcon adds ALiBi to it) — transformers' boolean SDPA
    mask ``(B, 1, Lq, Lk)`` (True = attend), which any model code can use.

    Raises:
        ValueError: ``config`` is a model whose attention does not go through
            ``AttentionInterface`` (BLOOM, MPT, ...; see :func:`not_served_message`).
    """
    from transformers import masking_utils as mu

    served = _served(type(config).__module__) if config is not None else None
    if served is False:
        raise ValueError(not_served_message(getattr(config, "model_type", type(config).__name__)))
    fn = mask_function or mu.causal_mask_function
    try:
        aligned = int(q_offset) + int(q_length) == int(kv_offset) + int(kv_length)
    except (TypeError, RuntimeError):
        aligned = False
    padded = attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all()))
    standard = fn is mu.causal_mask_function or (local_size is not None and _is_sliding_causal(fn, local_size))
    # a model that edits the mask it asks for (Falcon adds ALiBi to it) passes allow_is_causal_skip=False
    may_skip = bool(kwargs.pop("allow_is_causal_skip", True))
    if served and aligned and not padded and standard and may_skip:
        return None
    skip = bool(kwargs.pop("allow_is_bidirectional_skip", False)) and served and fn is mu.bidirectional_mask_function
    return mu.sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset, mask_function=fn,
                        attention_mask=attention_mask, local_size=local_size, allow_is_causal_skip=False,
                        allow_is_bidirectional_skip=skip, config=config, **kwargs)


#: modeling modules that pick their attention class from a fixed table by
#: ``config._attn_implementation`` (a KeyError at construction otherwise)
_CLASS_TABLES = {"falcon": "FALCON_ATTENTION_CLASSES"}


def _refusing_class(model_type: str) -> type:
    class NotServedAttention(torch.nn.Module):
        """Stands in the model's attention-class table: raises at construction."""

        def __init__(self, *args, **kwargs):
            raise ValueError(not_served_message(model_type))

    return NotServedAttention


def register(name: str = "attncc") -> None:
    """Register ``name`` with transformers' ``AttentionInterface`` (attention function)
    and ``AttentionMaskInterface`` (mask function), so ``attn_implementation=name``
    uses attncc kernels; models with a fixed attention-class table (Falcon) get an
    entry that refuses ``name`` at construction with a clear ValueError.

    Raises:
        ImportError: transformers is not installed (``pip install attncc[hf]``).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)
    for model_type, table in _CLASS_TABLES.items():
        try:
            mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            continue
        classes = getattr(mod, table, None)
        if isinstance(classes, dict):
            classes.setdefault(name, _refusing_class(model_type))
