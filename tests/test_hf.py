"""attn_implementation="attncc" (attncc.hf) on real transformers architectures at tiny
random-weight configs: logits match the eager model, each layer uses the pattern its
config implies, KV-cache generation matches, padding masks go through as mask tensors."""

import pytest
import torch

import attncc.hf

pytest.importorskip("transformers", reason="transformers is in the test extra: pip install -e '.[test]'")
from tiny_models import ARCHS, input_ids, tiny_model  # noqa: E402

attncc.hf.register()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_patterns(arch):
    model, ref_impl = tiny_model(arch)
    ids = input_ids()
    attncc.hf.SITES.clear()
    with torch.no_grad():
        ref = model(ids).logits
        model.set_attn_implementation("attncc")
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    names = [attncc.hf.SITES[i].split(";")[0] for i in sorted(attncc.hf.SITES)]
    assert names == ARCHS[arch][5], attncc.hf.SITES


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_oss"])
def test_generate_kv_cache(arch):
    """Greedy decoding with a KV cache (Lq = 1 after the prompt) gives the eager tokens."""
    model, _ = tiny_model(arch)
    ids = input_ids(10)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
        model.set_attn_implementation("attncc")
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.tolist() == ref.tolist()


def test_padding_mask_tensor():
    """Left padding: transformers' boolean mask is passed to the kernel as a mask tensor;
    the rows of real tokens match eager (padded query rows are not compared)."""
    model, _ = tiny_model("mistral", "eager")
    ids = input_ids(12, batch=2)
    am = torch.ones_like(ids)
    am[0, :3] = 0
    attncc.hf.SITES.clear()
    with torch.no_grad():
        ref = model(ids, attention_mask=am).logits
        model.set_attn_implementation("attncc")
        out = model(ids, attention_mask=am).logits
    torch.testing.assert_close(out[0, 3:], ref[0, 3:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)
    assert all("mask tensor" in d for d in attncc.hf.SITES.values())


def test_dropout_rejected():
    model, _ = tiny_model("llama", "attncc")
    layer = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="dropout"):
        attncc.hf.attention_forward(layer, q, k, k, None, dropout=0.1)
