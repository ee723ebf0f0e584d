"""The torch.compile graph pass (attncc.fx): matcher unit tests on hand-written modules
(including near-misses that must stay untouched) and real transformers architectures at
tiny random-weight configs, compared with their eager models."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import attncc.fx
from attncc.fx import make_backend

EAGER = make_backend("eager")


def _compile(fn, *args, dynamic=False):
    """Run ``fn`` through the attncc backend (inner eager); returns (output, report of the
    one graph compiled)."""
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    out = torch.compile(fn, backend=EAGER, fullgraph=True, dynamic=dynamic)(*args)
    reps = attncc.fx.reports()
    assert len(reps) == 1
    return out, reps[0]


def _qkv(B=1, Hq=4, Hkv=2, Lq=24, Lk=24, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g),
            torch.randn(B, Hkv, Lk, D, generator=g))


def repeat_kv(x, n):
    """transformers' GQA repeat."""
    B, H, L, D = x.shape
    return x[:, :, None, :, :].expand(B, H, n, L, D).reshape(B, H * n, L, D)


# ------------------------------------------------------------------ hand-written chains
def causal_chain(q, k, v):
    k, v = repeat_kv(k, 2), repeat_kv(v, 2)
    s = torch.matmul(q, k.transpose(2, 3)) * (1 / math.sqrt(q.shape[-1]))
    i = torch.arange(q.shape[2])
    j = torch.arange(k.shape[2])
    s = s + torch.where(j[None, :] <= i[:, None], 0.0, float("-inf"))
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def test_chain_causal_gqa():
    q, k, v = _qkv()
    out, rep = _compile(causal_chain, q, k, v)
    assert len(rep.replaced) == 1 and not rep.left_alone, str(rep)
    assert rep.sites[0].pattern.startswith("causal;") and "GQA" in rep.sites[0].pattern
    torch.testing.assert_close(out, causal_chain(q, k, v), atol=2e-5, rtol=1e-5)


def windowed_bottom_right(q, k, v):
    """Mistral-style window, bottom-right aligned (a KV-cache step): query i sits at key
    position i + Lk - Lq."""
    s = q @ k.transpose(-2, -1) / 4.0
    qi = torch.arange(q.shape[2]) + (k.shape[2] - q.shape[2])
    kj = torch.arange(k.shape[2])
    keep = (kj[None, :] <= qi[:, None]) & (kj[None, :] > qi[:, None] - 5)
    s = s + torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    return F.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("dynamic", [False, True])
def test_chain_window_bottom_right(dynamic):
    q, k, v = _qkv(Hkv=4, Lq=8, Lk=40)
    out, rep = _compile(windowed_bottom_right, q, k, v, dynamic=dynamic)
    assert len(rep.replaced) == 1, str(rep)
    if dynamic:  # sizes are symbols: the offset is recognised as Lk - Lq
        assert rep.sites[0].pattern.startswith("sliding_window_bottom_right(window=5)"), str(rep)
        assert "Lk" in rep.sites[0].spec
    torch.testing.assert_close(out, windowed_bottom_right(q, k, v), atol=2e-5, rtol=1e-5)


def softcap_sinks(q, k, v, sinks):
    s = torch.matmul(q, k.transpose(2, 3)) * 0.25
    s = torch.tanh(s / 3.0) * 3.0
    s = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], -1)], dim=-1)
    s = s - s.max(dim=-1, keepdim=True).values
    p = F.softmax(s, dim=-1)[..., :-1]
    return torch.matmul(p, v)


def test_chain_softcap_and_sinks():
    q, k, v = _qkv(Hkv=4)
    sinks = torch.randn(4)
    out, rep = _compile(softcap_sinks, q, k, v, sinks)
    assert len(rep.replaced) == 1, str(rep)
    assert rep.sites[0].pattern.startswith("dense_softcap_sinks"), str(rep)
    assert "sink: sink[b, h, q]" in rep.sites[0].spec  # fused as the sink clause
    torch.testing.assert_close(out, softcap_sinks(q, k, v, sinks), atol=2e-5, rtol=1e-5)


def test_chain_sinks_gradients():
    """Training through the rewritten graph: gradients of q, k, v and the sink logits (from
    the fused sink clause) match the eager chain's autograd."""
    q, k, v = _qkv(Hkv=4, seed=3)
    sinks = torch.randn(4)
    grads = []
    for fn in (lambda *a: _compile(softcap_sinks, *a)[0], softcap_sinks):
        xs = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
        out = fn(*xs)
        out.backward(torch.ones_like(out))
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def gated_sdpa(q, k, v, x):
    """Qwen3-Next-style gated attention: SDPA, heads merged, then * sigmoid(gate)."""
    B, H, L, D = q.shape
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    o = o.transpose(1, 2).contiguous().reshape(B, L, -1)
    return o * torch.sigmoid(x)


def test_gate_after_site_is_fused_with_gradients():
    """The output gate becomes the kernel's gate clause (the multiply and the sigmoid leave
    the graph); outputs and gradients of q, k, v and the gate input match eager."""
    q, k, v = _qkv(seed=4)
    x = torch.randn(1, 24, 4 * 16)
    graphs = []
    backend = make_backend(lambda gm, ex: (graphs.append(gm), gm.forward)[1])
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    xs = [t.clone().requires_grad_() for t in (q, k, v, x)]
    out = torch.compile(gated_sdpa, backend=backend, fullgraph=True)(*xs)
    site = attncc.fx.reports()[0].sites[0]
    assert site.replaced and "output gate (fused gate clause)" in site.pattern, site.line()
    assert not [n for n in graphs[0].graph.nodes if "sigmoid" in str(n.target)], graphs[0].code
    ys = [t.clone().requires_grad_() for t in (q, k, v, x)]
    ref = gated_sdpa(*ys)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    out.backward(w)
    ref.backward(w)
    for a, b in zip(xs, ys):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=1e-4)


def test_broadcast_gate_stays_a_multiply():
    q, k, v = _qkv(seed=5)
    x = torch.randn(1, 24, 1)  # one gate per token: broadcasts, not fused
    out, rep = _compile(gated_sdpa, q, k, v, x)
    assert rep.sites[0].replaced and "output gate left unfused (the gate broadcasts)" in rep.sites[0].pattern
    torch.testing.assert_close(out, gated_sdpa(q, k, v, x), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ SDPA sites
def test_sdpa_causal_and_opaque_masks():
    q, k, v = _qkv()

    def f(q, k, v, allowed, bias):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        b = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=allowed)
        c = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=bias, scale=0.3)
        return a, b, c

    allowed = torch.rand(1, 1, 24, 24) > 0.3
    allowed[..., 0] = True  # no fully masked row
    bias = torch.randn(1, 4, 24, 24)
    out, rep = _compile(f, q, k, v, allowed, bias)
    assert [s.replaced for s in rep.sites] == [True] * 3, str(rep)
    assert rep.sites[0].pattern.startswith("causal;")
    assert "mask tensor [1, 1, Lq, Lk]" in rep.sites[1].pattern and "reads the input tensor" in rep.sites[1].pattern
    assert "bias [1, H, Lq, Lk]" in rep.sites[2].pattern
    for o, r in zip(out, f(q, k, v, allowed, bias)):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ near-misses: left alone
def softmax_wrong_dim(q, k, v):
    return torch.matmul(F.softmax(q @ k.transpose(-2, -1), dim=-2), v)


def mask_from_scores(q, k, v):
    s = q @ k.transpose(-2, -1)
    s = s + torch.where(s > 0, 0.0, float("-inf")).detach()
    return torch.matmul(F.softmax(s, dim=-1), v)


def dropout_training(q, k, v):
    return torch.matmul(F.dropout(F.softmax(q @ k.transpose(-2, -1), dim=-1), p=0.1, training=True), v)


def weights_returned(q, k, v):
    p = F.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
    return torch.matmul(p, v), p


@pytest.mark.parametrize("fn,reason", [
    (softmax_wrong_dim, "softmax over dim -2"),
    (mask_from_scores, "depends on the scores"),
    (dropout_training, "dropout p=0.1 in training"),
    (weights_returned, "used elsewhere"),
])
def test_near_misses_left_alone(fn, reason):
    q, k, v = _qkv(Hkv=4, Lq=16, Lk=16)
    gm = torch.fx.symbolic_trace(fn)
    before = gm.code
    gm, rep = attncc.fx.rewrite(gm, (q, k, v))
    assert len(rep.sites) == 1 and not rep.replaced, str(rep)
    assert reason in rep.sites[0].reason, str(rep)
    assert gm.code == before  # untouched
    if fn is not dropout_training:
        out = gm(q, k, v)
        ref = fn(q, k, v)
        for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            assert torch.equal(o, r)


def test_no_attention_no_sites():
    gm = torch.fx.symbolic_trace(lambda x: F.softmax(x, dim=-1) * 2)
    gm, rep = attncc.fx.rewrite(gm, (torch.randn(3, 4),))
    assert rep.sites == [] and "no attention sites" in str(rep)


def test_rewrite_symbolic_trace_and_log(caplog):
    q, k, v = _qkv(Hkv=4)
    gm = torch.fx.symbolic_trace(windowed_bottom_right)
    with caplog.at_level(logging.INFO, logger="attncc"):
        gm, rep = attncc.fx.rewrite(gm, (q, k, v))
    assert len(rep.replaced) == 1
    assert any("replaced chain site" in r.message and "sliding_window" in r.message for r in caplog.records)
    assert "attention" in gm.code
    torch.testing.assert_close(gm(q, k, v), windowed_bottom_right(q, k, v), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ forms real models write
def gpt2_type_cast(q, k, v):
    """GPT-2 eager: the probabilities cast back with ``Tensor.type(dtype)``."""
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
    p = F.softmax(s, dim=-1).type(v.dtype)
    return torch.matmul(p, v)


def falcon_inplace_scale(q, k, v):
    """Falcon: in-place ``scores /= sqrt(d)``."""
    s = q @ k.transpose(-1, -2)
    s /= math.sqrt(q.shape[-1])
    return F.softmax(s, dim=-1, dtype=torch.float32) @ v


def mpt_masked_fill(q, k, v):
    """MPT: ``scores.masked_fill(drop, finfo.min)`` with True = masked out."""
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
    i, j = torch.arange(q.shape[2]), torch.arange(k.shape[2])
    s = s.masked_fill(j[None, :] > i[:, None], torch.finfo(q.dtype).min)
    return torch.matmul(F.softmax(s.float(), dim=-1).to(v.dtype), v)


def shared_arange_causal(q, k, v):
    """A causal mask from one shared ``arange`` (query and key positions alike)."""
    s = q @ k.transpose(-1, -2) * 0.25
    pos = torch.arange(q.shape[2])
    s = s + torch.where(pos[None, :] <= pos[:, None], 0.0, float("-inf"))
    return F.softmax(s, dim=-1) @ v


def float_mask_cast_to_bool(q, k, v):
    """An additive 0 / finfo.min causal mask cast to bool (True = masked out, as MPT does
    with transformers' eager mask), then used by masked_fill."""
    i, j = torch.arange(q.shape[2]), torch.arange(k.shape[2])
    add = torch.where(j[None, :] <= i[:, None], 0.0, torch.finfo(q.dtype).min)
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
    return F.softmax(s.masked_fill(add.to(torch.bool), torch.finfo(q.dtype).min), dim=-1) @ v


@pytest.mark.parametrize("fn,causal", [(gpt2_type_cast, False), (falcon_inplace_scale, False),
                                       (mpt_masked_fill, True), (shared_arange_causal, True),
                                       (float_mask_cast_to_bool, True)])
def test_real_model_forms(fn, causal):
    """Each form is replaced with the right pattern; the result equals the eager function
    and torch SDPA (an independent implementation)."""
    q, k, v = _qkv(Hkv=4, Lq=16, Lk=16)
    out, rep = _compile(fn, q, k, v)
    assert len(rep.replaced) == 1 and not rep.left_alone, str(rep)
    assert rep.sites[0].pattern.split(";")[0] == ("causal" if causal else "dense"), str(rep)
    torch.testing.assert_close(out, fn(q, k, v), atol=2e-5, rtol=1e-5)
    scale = 0.25 if fn is not falcon_inplace_scale else 1 / math.sqrt(16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_masked_fill_input_mask():
    """masked_fill with a mask read from an input (True = masked out): passed to the kernel
    as a drop mask tensor; equals eager and SDPA with the complementary keep mask."""
    def fill(q, k, v, drop):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        return F.softmax(s.masked_fill(drop, float("-inf")), dim=-1) @ v

    q, k, v = _qkv(Hkv=4, Lq=8, Lk=8)
    drop = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(5)) > 0.6
    drop[..., 0] = False  # every row keeps a key (eager would give NaN otherwise)
    out, rep = _compile(fill, q, k, v, drop)
    assert len(rep.replaced) == 1 and "drop mask tensor" in rep.sites[0].pattern, str(rep)
    torch.testing.assert_close(out, fill(q, k, v, drop), atol=2e-5, rtol=1e-5)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~drop, scale=0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_two_inplace_sites():
    """Two identical in-place sites in one graph are both replaced."""
    def two(q, k, v):
        return falcon_inplace_scale(q, k, v) + falcon_inplace_scale(q * 2, k, v)

    q, k, v = _qkv(Hkv=4, Lq=8, Lk=8)
    out, rep = _compile(two, q, k, v)
    assert len(rep.replaced) == 2 and not rep.left_alone, str(rep)
    torch.testing.assert_close(out, two(q, k, v), atol=2e-5, rtol=1e-5)


def test_backend_registered():
    assert "attncc" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("attncc") is attncc.fx.backend


# ------------------------------------------------------------------ real architectures
from tiny_models import ARCHS, input_ids, tiny_model  # noqa: E402


# gemma2 and gpt-oss have no SDPA path in transformers (softcap / sinks): eager only
@pytest.mark.parametrize("arch,impl", [(a, i) for a in ARCHS for i in ("eager", "sdpa")
                                       if i == "eager" or ARCHS[a][3] == "sdpa"])
def test_transformers_models(arch, impl):
    """Logits match the eager model; every attention site replaced with the expected pattern."""
    model, _ = tiny_model(arch, impl)
    ids = input_ids()
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=EAGER)(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    sites = [s for r in attncc.fx.reports() for s in r.sites]
    assert sites and all(s.replaced for s in sites), "\n".join(s.line() for s in sites)
    names = [s.pattern.split(";")[0] for s in sites]
    assert names == ARCHS[arch][4], names
    if arch == "qwen3_next":  # the sigmoid output gate is fused: no multiply left in the graph
        assert all("output gate (fused gate clause)" in s.pattern and "gate: sigmoid(g[b, h, q, dv])" in s.spec
                   for s in sites)


def test_mpt_eager_masked_fill():
    """MPT (eager): causal mask from transformers' additive mask cast to bool and applied
    with masked_fill; its ALiBi tensor (``arange(1 - L, 1) * slopes``, sliced to the key
    length) recovered as the score term ``slope0[h] * (kv - Lk + 1)``; logits equal eager."""
    from tiny_models import zoo_inputs, zoo_model

    model = zoo_model("mpt", "eager")
    inputs = zoo_inputs("mpt")
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    with torch.no_grad():
        ref = model(**inputs).logits
        out = torch.compile(model, backend=EAGER)(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    sites = [s for r in attncc.fx.reports() for s in r.sites]
    assert sites and all(s.replaced and s.pattern.startswith("causal_alibi;") for s in sites), \
        "\n".join(s.line() for s in sites)
    assert all("tensor slope0: float32[H]" in s.spec and "bias" not in s.spec for s in sites), sites[0].spec


def test_default_backend_inductor():
    """``backend="attncc"``: the rewritten graph goes on to inductor."""
    model, _ = tiny_model("mistral", "sdpa")
    ids = input_ids()
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="attncc")(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert all(s.replaced for r in attncc.fx.reports() for s in r.sites)


def _masked_fill_not(q, k, v):
    """``masked_fill(~keep, -inf)``: the most common hand-written causal form."""
    i, j = torch.arange(q.shape[-2]), torch.arange(k.shape[-2])
    keep = j[None, :] <= i[:, None]
    return F.softmax((q @ k.transpose(-1, -2) * 0.25).masked_fill(~keep, float("-inf")), dim=-1) @ v


def _where_keep(q, k, v):
    """``torch.where(keep, s, -inf)``."""
    i, j = torch.arange(q.shape[-2]), torch.arange(k.shape[-2])
    s = torch.where(j[None, :] <= i[:, None], q @ k.transpose(-1, -2) * 0.25, float("-inf"))
    return F.softmax(s, dim=-1) @ v


def _where_chain_window(q, k, v):
    """A chain of ``where`` (causal, then a window of 4 with ``finfo.min``) and a ``where(drop, min, s)``."""
    i, j = torch.arange(q.shape[-2]), torch.arange(k.shape[-2])
    s = torch.where(j[None, :] <= i[:, None], q @ k.transpose(-1, -2) * 0.25, float("-inf"))
    s = torch.where(i[:, None] - j[None, :] < 4, s, torch.finfo(s.dtype).min)
    s = torch.where(i[:, None] - j[None, :] > 100, torch.finfo(s.dtype).min, s)
    return F.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("fn,window", [(_masked_fill_not, None), (_where_keep, None), (_where_chain_window, 4)])
def test_where_and_masked_fill_not_chains(fn, window):
    """``masked_fill(~mask, -inf)`` and ``torch.where(mask, s, -inf)`` chains are matched like the
    additive form: the mask is recovered (no tensor), results equal eager and SDPA."""
    q, k, v = _qkv(Hkv=4, Lq=16, Lk=16)
    out, rep = _compile(fn, q, k, v)
    assert len(rep.replaced) == 1 and not rep.left_alone, str(rep)
    assert rep.sites[0].pattern.split(";")[0] == ("causal" if window is None else f"sliding_window(window={window})")
    torch.testing.assert_close(out, fn(q, k, v), atol=2e-5, rtol=1e-5)
    i = torch.arange(16)
    keep = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ padding masks (issue 13 section 3)
def padded_sdpa(q, k, v, am):
    """A (B, 1, 1, Lk) key-validity mask from an int attention_mask, and causal."""
    keep = am[:, None, None, :].to(torch.bool)
    i, j = torch.arange(q.shape[2]), torch.arange(k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep & (j[None, :] <= i[:, None]))


def padded_chain(q, k, v, am):
    """A (B, 1, Lq, Lk) additive padding mask where(am == 1, 0, -inf), expanded."""
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    add = torch.where(am[:, None, None, :] == 1, 0.0, float("-inf")).expand(-1, 1, q.shape[2], -1)
    p = torch.softmax(s + add, dim=-1)
    return torch.matmul(p, v)


def padded_gather(q, k, v, am):
    """transformers' padding_mask_function form: ``am[batch_idx, kv_idx]`` by index tensors."""
    b = torch.arange(q.shape[0])[:, None, None, None]
    kv = torch.arange(k.shape[2])[None, None, None, :]
    i = torch.arange(q.shape[2])[None, None, :, None]
    keep = am.bool()[b, kv] & (kv <= i)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("fn", [padded_sdpa, padded_chain, padded_gather])
def test_padding_mask_is_a_key_validity_read(fn):
    q, k, v = (x.repeat(2, 1, 1, 1) for x in _qkv(Hq=2, Lq=20, Lk=20))
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, 7:] = 0  # the second sequence is padded after 7 keys
    out, rep = _compile(fn, q, k, v, am)
    assert len(rep.replaced) == 1 and not rep.left_alone, str(rep)
    site = rep.sites[0]
    assert "key_padding" in site.pattern and "pad0[B, Lk]" in site.pattern, site.pattern
    assert "tensor pad0: int32[B, Lk]" in site.spec and "bool[" not in site.spec, site.spec
    ref = fn(q, k, v, am)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    # independent: SDPA with the dense mask built here
    dense = am[:, None, None, :].bool().expand(2, 1, 20, 20)
    if fn is not padded_chain:
        dense = dense & torch.ones(20, 20, dtype=torch.bool).tril()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=dense), atol=2e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    # other padding values through the same compiled graph: the mask is read, not baked in
    am2 = torch.ones(2, 20, dtype=torch.long)
    am2[0, 3:] = 0
    comp = torch.compile(fn, backend=EAGER, fullgraph=True)
    torch.testing.assert_close(comp(q, k, v, am2), fn(q, k, v, am2), atol=2e-5, rtol=1e-5)


def test_float_input_mask_stays_a_tensor():
    """A float mask read from the input is not a key-validity read (its values are biases)."""
    q, k, v = _qkv(Hq=2, Lq=12, Lk=12)
    bias = torch.randn(1, 1, 1, 12)
    out, rep = _compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, :, :, :]),
                        q, k, v, bias)
    assert "pad0" not in rep.sites[0].spec and "bias" in rep.sites[0].pattern, str(rep)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), atol=2e-5, rtol=1e-5)
