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
