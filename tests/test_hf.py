"""attn_implementation="attncc" (attncc.hf) on real transformers architectures at tiny
random-weight configs: outputs and the gradient of every parameter match the eager
model (bias tables included), each layer uses the pattern its config implies, KV-cache
generation matches, padding masks go through as mask tensors, and what the attention
function does not compute is refused by name."""

import pytest
import torch

import attncc.hf

pytest.importorskip("transformers", reason="transformers is in the test extra: pip install -e '.[test]'")
from tiny_models import ARCHS, ZOO, input_ids, tiny_model, zoo_inputs, zoo_model  # noqa: E402

attncc.hf.register()

#: trained one SGD step in train mode (T5 and Swin: relative-position tables at random values)
TRAIN = ("t5", "swin", "bert")


def _float_outputs(out) -> list:
    return [v for v in out.values() if torch.is_tensor(v) and v.is_floating_point()]


def _loss(outs) -> torch.Tensor:
    """A fixed random linear functional of every float output (all get a gradient)."""
    g = torch.Generator().manual_seed(2)
    return sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)


def _run(model, inputs, train: bool):
    """Outputs, parameter gradients and (``train``) the outputs after one SGD step."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(train)
    model.zero_grad(set_to_none=True)
    outs = _float_outputs(model(**inputs))
    _loss(outs).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    after = None
    if train:
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        with torch.no_grad():
            after = _float_outputs(model(**inputs))
    model.load_state_dict(state)
    model.eval()
    return [o.detach() for o in outs], grads, after


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("arch", [a for a in ZOO if ZOO[a][4] is not None])
def test_zoo_matches_eager(arch):
    """Outputs and every parameter's gradient equal eager to 1e-4 (T5, Swin, BERT: in
    train mode, and again after one SGD step); every attention module is recorded in
    SITES under its own key."""
    model = zoo_model(arch)
    inputs = zoo_inputs(arch)
    train = arch in TRAIN
    ref = _run(model, inputs, train)
    model.set_attn_implementation("attncc")
    attncc.hf.SITES.clear()
    got = _run(model, inputs, train)
    for i, (a, b) in enumerate(zip(got[0], ref[0])):
        _close(a, b, f"output {i}")
    assert ref[1].keys() == got[1].keys()
    for name, g in ref[1].items():
        assert (g is None) == (got[1][name] is None), f"{name}: gradient {'missing' if g is not None else 'extra'}"
        if g is not None:
            _close(got[1][name], g, f"grad {name}")
    tables = [n for n in ref[1] if "relative" in n and "weight" in n or n.endswith("bias_table")]
    assert all(got[1][n] is not None and got[1][n].abs().sum() > 0 for n in tables), tables
    if train:
        for i, (a, b) in enumerate(zip(got[2], ref[2])):
            _close(a, b, f"output {i} after a step")
    sites = attncc.hf.sites(model)
    assert len(sites) == len(attncc.hf.SITES) > 0  # one key per attention module
    if arch in ("t5", "bart", "whisper"):  # encoder self, decoder self, cross: 3 modules per layer
        assert len(sites) == 3, sites


@pytest.mark.parametrize("arch", [a for a in ZOO if ZOO[a][4] is None])
def test_zoo_refused(arch):
    """Models whose attention is their own code are refused (construction or first
    call) with a message naming the model and pointing to the graph pass."""
    with pytest.raises(ValueError, match=rf"cannot serve '{arch}'.*backend=\"attncc\""):
        model = zoo_model(arch, "attncc")
        model(**zoo_inputs(arch))


@pytest.mark.parametrize("arch", [a for a in ZOO if ZOO[a][4]])
def test_zoo_generate(arch):
    """Greedy decoding with a KV cache (Llama: a static cache) gives the eager tokens."""
    model = zoo_model(arch)
    inputs = zoo_inputs(arch, 6)
    kw = dict(max_new_tokens=2, do_sample=False, min_new_tokens=2)  # the prompt, then one KV-cache step
    if arch == "llama":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        model.set_attn_implementation("attncc")
        out = model.generate(**inputs, **kw)
    assert out.tolist() == ref.tolist()


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
    names = [d.split(";")[0] for d in attncc.hf.sites(model).values()]
    assert names == ARCHS[arch][5], attncc.hf.SITES


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])  # Llama: test_zoo_generate (static cache)
def test_generate_kv_cache(arch):
    """Greedy decoding with a KV cache (Lq = 1 after the prompt) gives the eager tokens."""
    model, _ = tiny_model(arch)
    ids = input_ids(10)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
        model.set_attn_implementation("attncc")
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("arch,cache,padded", [("llama", "static", True), ("llama", "dynamic", False),
                                                ("mistral", "dynamic", True), ("gemma2", "dynamic", False),
                                                ("gpt_oss", "dynamic", True)])
def test_generate_uses_the_decode_kernel(arch, cache, padded, monkeypatch):
    """Greedy ``generate()`` (issue 16 section 4): every KV-cache step (Lq = 1) runs the split-KV
    decode kernel (counted), the prompt the forward, and the tokens equal eager: Llama (static and
    dynamic cache), Mistral (sliding window), Gemma 2 (softcap), gpt-oss (sinks), with a left-padded
    batch (the padding mask reaches the decode kernel as a mask tensor) and without."""
    import attncc.runtime.decode as dec

    launched = []
    real = dec.launch_decode

    def counting(kern, dp, q, *args):
        launched.append(q.shape[2])
        return real(kern, dp, q, *args)

    monkeypatch.setattr(dec, "launch_decode", counting)
    model, _ = tiny_model(arch)
    ids = input_ids(8, batch=2 if padded else 1)
    am = torch.ones_like(ids)
    if padded:
        am[0, :3] = 0
    kw = dict(attention_mask=am, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("attncc")
        out = model.generate(ids, **kw)
    assert out.tolist() == ref.tolist()
    layers = model.config.num_hidden_layers
    assert launched.count(1) == 2 * layers, launched   # two decode steps after the prompt, every layer


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


def test_bert_padding():
    """Key padding on an encoder (create_bidirectional_mask): a boolean mask tensor; every
    row has real keys, so all rows match eager."""
    model = zoo_model("bert")
    ids = zoo_inputs("bert", 8)["input_ids"].repeat(2, 1)
    am = torch.ones_like(ids)
    am[1, 5:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=am).logits
        model.set_attn_implementation("attncc")
        attncc.hf.SITES.clear()
        out = model(ids, attention_mask=am).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert all("mask tensor" in d for d in attncc.hf.SITES.values()), attncc.hf.SITES


def _layer_qkv():
    model, _ = tiny_model("llama", "attncc")
    g = torch.Generator().manual_seed(3)
    return (model.model.layers[0].self_attn, torch.randn(1, 4, 8, 16, generator=g),
            torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g))


@pytest.mark.parametrize("kw,match", [({"dropout": 0.1}, "dropout"), ({"output_attentions": True}, "output_attentions"),
                                      ({"head_mask": torch.ones(4)}, "head_mask"),
                                      ({"alibi_slopes": torch.ones(4)}, "alibi_slopes"),
                                      ({"attention_mask": torch.zeros(1, 3, 8, 8)}, r"attention_mask has shape"),
                                      ({"position_bias": torch.zeros(2, 4, 8, 8)}, r"position_bias has shape"),
                                      ({"sliding_window": 4, "is_causal": False}, "sliding_window")])
def test_refused_keywords(kw, match):
    """What the attention function does not compute is refused by name, never dropped."""
    layer, q, k, v = _layer_qkv()
    mask = kw.pop("attention_mask", None)
    with pytest.raises(ValueError, match=match):
        attncc.hf.attention_forward(layer, q, k, v, mask, **kw)


def test_float_mask_is_a_bias_with_gradient():
    """A float attention_mask is added to the score (not thresholded), with its gradient;
    a fully masked row (-inf) averages the values as eager does with finfo.min, no NaN.
    Independent check: torch SDPA with the same float mask (finite rows) on repeated K/V."""
    layer, q, k, v = _layer_qkv()
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(1, 4, 8, 8, generator=g)
    bias[0, :, 2, :] = float("-inf")
    bias.requires_grad_(True)
    out, _ = attncc.hf.attention_forward(layer, q, k, v, bias, scaling=0.25)
    assert not out.isnan().any()
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    finite = bias.detach().clamp(min=torch.finfo(torch.float32).min)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=finite, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(out.shape, generator=g)
    (gb,) = torch.autograd.grad((out * w).sum(), bias)
    b2 = bias.detach().masked_fill(bias.detach().isinf(), torch.finfo(torch.float32).min).requires_grad_(True)
    ref2 = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=b2, scale=0.25).transpose(1, 2)
    (gr,) = torch.autograd.grad((ref2 * w).sum(), b2)
    assert not gb.isnan().any()
    rows = [i for i in range(8) if i != 2]  # the -inf row's entries have no meaningful gradient
    torch.testing.assert_close(gb[:, :, rows], gr[:, :, rows], atol=1e-5, rtol=1e-5)
