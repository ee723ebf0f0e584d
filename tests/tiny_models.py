"""Tiny random-weight transformers models for the graph-pass and HF tests (no downloads).

Each entry: architecture -> (config class, model class, config kwargs, the attention
implementation its eager reference uses, expected pattern name per layer for the
graph pass (top-left: the prompt's own graph) and for ``attn_implementation="attncc"``
(bottom-right: KV-cache alignment)).
"""

import pytest
import torch

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa",
              ["causal", "causal"], ["causal_bottom_right", "causal_bottom_right"]),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}, "sdpa",
                ["sliding_window(window=4)"] * 2, ["sliding_window_bottom_right(window=4)"] * 2),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"sliding_window": 4, "attn_logit_softcapping": 5.0, "final_logit_softcapping": None,
                "query_pre_attn_scalar": 16}, "eager",
               ["sliding_window_softcap(window=4)", "causal_softcap"],
               ["sliding_window_bottom_right_softcap(window=4)", "causal_bottom_right_softcap"]),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                {"sliding_window": 4, "num_local_experts": 2, "num_experts_per_tok": 1, "intermediate_size": 32},
                "eager", ["sliding_window_sinks(window=4)", "causal_sinks"],
                ["sliding_window_bottom_right_sinks(window=4)", "causal_bottom_right_sinks"]),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   {"layer_types": ["full_attention", "full_attention"], "num_experts": 2, "num_experts_per_tok": 1,
                    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}, "sdpa",
                   ["causal_gated"] * 2, ["causal_bottom_right"] * 2),
}


def tiny_model(arch: str, impl: str = None):
    """``(model in eval mode, its reference attention implementation)``; skips when the
    installed transformers lacks the architecture."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra: pip install -e '.[test]'")
    cfg_name, model_name, extra, ref_impl, _, _ = ARCHS[arch]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).eval()
    model.set_attn_implementation(impl or ref_impl)
    return model, ref_impl


def input_ids(n: int = 12, batch: int = 1):
    """A fixed random prompt ``(batch, n)``."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, COMMON["vocab_size"], (batch, n), generator=g)


def generate_both(model, ids, backend, **kw):
    """``(eager, compiled)``: greedy ``generate()`` of ``model`` as it is, then with its
    ``forward`` compiled by ``backend`` (restored afterwards); dynamo is reset first."""
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model.generate(ids, do_sample=False, **kw)
        forward = model.forward
        model.forward = torch.compile(model.forward, backend=backend)
        try:
            out = model.generate(ids, do_sample=False, **kw)
        finally:
            model.forward = forward
    return ref, out


# ------------------------------------------------------------------ the architecture zoo
_TXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=64)
_DEC = dict(_TXT, num_key_value_heads=1, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENC = dict(_TXT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)
_VIT = dict(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_S2S = dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)

_FALCON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)


def _falcon_served():
    """Falcon's status under ``attn_implementation="attncc"``: transformers >= 5.25 runs its
    attention through ``AttentionInterface`` (ALiBi added to the float mask it asks for,
    ``allow_is_causal_skip=False``): served (True); before, the fixed attention-class table
    that ``attncc.hf.register`` makes refuse it (``attncc.hf._CLASS_TABLES``): refused (None)."""
    try:
        from transformers.models.falcon import modeling_falcon
    except ImportError:
        return None
    from attncc.hf import _CLASS_TABLES

    return None if hasattr(modeling_falcon, _CLASS_TABLES["falcon"]) else True


_FALCON_SERVED = _falcon_served()


#: architecture -> (config class, model class, config kwargs, inputs kind, what
#: ``attn_implementation="attncc"`` does with it: True = served, greedy generate()
#: compared (decoders); False = served (encoders, vision); None = refused (attention
#: computed in the model's own code))
ZOO = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                                   attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0), "text", True),
    "bert": ("BertConfig", "BertForMaskedLM", _ENC, "text", False),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", _ENC, "text", False),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), "seq2seq", True),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(_S2S, max_position_embeddings=64), "seq2seq", True),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                dict(_S2S, num_mel_bins=8, max_source_positions=8, max_target_positions=32, suppress_tokens=None,
                     begin_suppress_tokens=None), "audio", True),
    "falcon": ("FalconConfig", "FalconForCausalLM", _FALCON, "text", _FALCON_SERVED),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=64, hidden_size=32, n_layer=1, n_head=4), "text", None),
    "mpt": ("MptConfig", "MptForCausalLM", dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=64),
            "text", None),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DEC, sliding_window=4), "text", True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DEC, num_hidden_layers=2, use_sliding_window=True,
                                                      sliding_window=4, max_window_layers=1), "text", True),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_DEC, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                    query_pre_attn_scalar=8), "text", True),
    "cohere": ("CohereConfig", "CohereForCausalLM", _DEC, "text", True),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(_DEC, sliding_window=4, residual_dropout=0.0,
                                                                     embedding_dropout=0.0), "text", True),
    "vit": ("ViTConfig", "ViTModel", _VIT, "vision", False),
    "swin": ("SwinConfig", "SwinModel", dict(image_size=8, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2],
                                             num_heads=[1, 2], window_size=2, drop_path_rate=0.0,
                                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "vision", False),
    "deit": ("DeiTConfig", "DeiTModel", _VIT, "vision", False),
    "dinov2": ("Dinov2Config", "Dinov2Model", dict(_VIT, mlp_ratio=2), "vision", False),
    "clip": ("CLIPConfig", "CLIPModel",
             dict(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=16),
                  vision_config=dict(image_size=8, patch_size=4, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2), projection_dim=16), "clip", False),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DEC, "text", True),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DEC, sliding_window=4), "text", True),
    **({"falcon_alibi": ("FalconConfig", "FalconForCausalLM", dict(_FALCON, alibi=True), "text", True)}
       if _FALCON_SERVED else {}),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM",
                   dict(_TXT, num_hidden_layers=2, global_attn_every_n_layers=2, local_attention=4, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), "text", False),
}


def zoo_model(arch: str, impl: str = "eager", random_tables: bool = True):
    """A tiny random-weight model of ``ZOO[arch]`` (eval mode; skips when the installed
    transformers lacks it). ``random_tables``: relative-position bias tables (T5, Swin)
    drawn at std 1 instead of their zero / small initialisation, so a bias that is
    misread changes the numbers."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra: pip install -e '.[test]'")
    cfg_name, model_name, kw, _, _ = ZOO[arch]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)._from_config(cfg, attn_implementation=impl).eval()
    if random_tables:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "relative" in name:
                    p.normal_(0.0, 1.0)
    return model


def zoo_inputs(arch: str, n: int = 8) -> dict:
    """Fixed random inputs for ``ZOO[arch]``'s model (``n`` tokens for text)."""
    g = torch.Generator().manual_seed(1)
    kind = ZOO[arch][3]
    ids = torch.randint(3, 64, (1, n), generator=g)
    if kind == "text":
        return {"input_ids": ids}
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids[:, : n - 2]}
    if kind == "audio":
        return {"input_features": torch.randn(1, 8, 16, generator=g), "decoder_input_ids": ids[:, :6]}
    pix = torch.randn(1, 3, 8, 8, generator=g)
    return {"pixel_values": pix} if kind == "vision" else {"input_ids": ids, "pixel_values": pix}
