"""The graph pass on the attention forms real models write by hand (issue 13 sections 2-3):
BLOOM's head-folded ``baddbmm`` / ``bmm`` layout, Falcon's ALiBi with an in-place scale,
a causal mask from one shared ``arange``, in-place steps, and what the report says when
a site cannot be replaced. Each test checks the recovered pattern and compares outputs
(and gradients) with eager."""

import math

import pytest
import torch
import torch.nn.functional as F

import attncc.fx
from attncc.fx import make_backend

EAGER = make_backend("eager")


def _sites(fn, *args, fullgraph=True):
    """Run ``fn`` through the backend: ``(output, [SiteReport])``."""
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    out = torch.compile(fn, backend=EAGER, fullgraph=fullgraph)(*args)
    return out, [s for r in attncc.fx.reports() for s in r.sites]


def _grads_equal(out, ref, params):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    n = 0
    for a, b in zip(got, want):
        if b is None:
            continue
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        n += 1
    assert n > 0


# ------------------------------------------------------------------ transformers' BLOOM and Falcon
def _model(name, **cfg):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{name}Config")(**cfg)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")._from_config(config, attn_implementation="eager")
    return model.train()  # dropout probabilities are 0: train mode only turns gradients on


IDS = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, cfg", [
    ("Bloom", dict(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)),
    ("Falcon", dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, alibi=True)),
])
def test_bloom_falcon_alibi_replaced(name, cfg):
    """BLOOM (``alibi.baddbmm(q3, k3^T)`` in ``(B*H, L, D)``, ``bmm`` for PV) and Falcon
    with ALiBi (the bias added after a same-shape view, ``*= inv_norm``, and added again
    inside its causal mask): one causal_alibi site each, the slopes a ``float32[H]`` tensor
    and no ``(B, H, Lq, Lk)`` bias; logits and every parameter's gradient equal eager."""
    model = _model(name, **cfg)
    ref = model(IDS).logits
    out, sites = _sites(lambda ids: model(ids).logits, IDS, fullgraph=False)
    assert len(sites) == 1 and sites[0].replaced, "\n".join(s.line() for s in sites)
    assert sites[0].pattern.startswith("causal_alibi;") and "mask: kv <= q" in sites[0].pattern, sites[0].pattern
    assert "tensor slope0: float32[H]" in sites[0].spec and "bias" not in sites[0].spec, sites[0].spec
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    _grads_equal(out, ref, list(model.parameters()))


def test_bloom_padding_alibi_reads_the_key_positions():
    """With an ``attention_mask`` BLOOM's ALiBi positions are ``cumsum(mask) - 1`` (times
    the mask): the cumulative sum is passed as an int32 (B, Lk) tensor and the score term
    ``slope0[h] * (pos[b, kv] - 1) * mask[b, kv]`` is computed in the kernel (no (B, H, 1, Lk)
    bias), the padding a key-validity read; logits and every parameter's gradient equal
    eager (train mode, dropout 0)."""
    model = _model("Bloom", vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, 6:] = 0  # right padding: every query row keeps a key
    ref = model(IDS, attention_mask=am).logits
    out, sites = _sites(lambda ids, am: model(ids, attention_mask=am).logits, IDS, am, fullgraph=False)
    assert len(sites) == 1 and sites[0].replaced, "\n".join(s.line() for s in sites)
    p, spec = sites[0].pattern, sites[0].spec
    assert p.startswith("causal_key_padding_alibi_positions;") and "mask: (kv <= q)" in p, p
    assert "bias" not in spec and "bool[" not in spec and spec.count("int32[B, Lk]") == 2 \
        and "tensor slope0: float32[H]" in spec, spec
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    _grads_equal(out, ref, list(model.parameters()))
    # other padding through the same compiled graph: the positions are read, not baked in
    am2 = torch.ones(2, 8, dtype=torch.long)
    am2[0, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(lambda ids, am: model(ids, attention_mask=am).logits,
                                                 backend=EAGER)(IDS, am2), model(IDS, attention_mask=am2).logits,
                                   atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ the head-folded layout by hand
B, H, L, D = 2, 4, 8, 8


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).requires_grad_() for _ in range(3)]


def folded(q, k, v, slopes, beta=1.0, p=0.0):
    """BLOOM's form with ``beta`` and a causal ``0 / finfo.min`` mask added after the view."""
    Lq, Lk = q.shape[2], k.shape[2]
    alibi = (slopes[:, None, None] * torch.arange(Lk)).repeat(q.shape[0], 1, 1)
    s = alibi.baddbmm(batch1=q.reshape(B * H, -1, D), batch2=k.reshape(B * H, -1, D).transpose(-1, -2),
                      beta=beta, alpha=1 / math.sqrt(D)).view(B, H, Lq, -1)
    i, j = torch.arange(Lq), torch.arange(Lk)
    s = s + torch.where(j[None, :] <= i[:, None], 0.0, torch.finfo(torch.float32).min)
    probs = F.dropout(F.softmax(s, dim=-1, dtype=torch.float32), p, training=p > 0)
    return torch.bmm(probs.view(B * H, Lq, -1), v.reshape(B * H, -1, D)).view(B, H, Lq, D)


def test_folded_baddbmm_with_beta():
    """``beta`` scales the bias: the term is ``beta * slope[h] * kv``, still ALiBi;
    outputs and the gradients of q, k, v and the slopes equal eager."""
    q, k, v = _qkv()
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)]).requires_grad_()
    fn = lambda q, k, v, s: folded(q, k, v, s, beta=0.5)  # noqa: E731
    out, sites = _sites(fn, q, k, v, slopes)
    assert len(sites) == 1 and sites[0].pattern.startswith("causal_alibi;"), "\n".join(s.line() for s in sites)
    assert "0.5*kv*slope0[h]" in sites[0].pattern, sites[0].pattern
    ref = fn(q, k, v, slopes)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    _grads_equal(out, ref, [q, k, v, slopes])


def test_folded_site_left_alone_is_put_back():
    """A head-folded site that is not replaced (attention dropout in training) keeps its
    own ops: the 4-D rewrite made for matching is undone, op for op."""
    q, k, v = _qkv()
    slopes = torch.ones(H)
    gm = torch.fx.symbolic_trace(lambda q, k, v, s: folded(q, k, v, s, p=0.1))
    before = [(n.op, n.target, len(n.args)) for n in gm.graph.nodes]
    gm, rep = attncc.fx.rewrite(gm, (q, k, v, slopes))
    assert len(rep.sites) == 1 and not rep.sites[0].replaced and "dropout p=0.1" in rep.sites[0].reason, str(rep)
    assert [(n.op, n.target, len(n.args)) for n in gm.graph.nodes] == before
    torch.manual_seed(3)
    a = gm(q, k, v, slopes)
    torch.manual_seed(3)
    torch.testing.assert_close(a, folded(q, k, v, slopes, p=0.1))


# ------------------------------------------------------------------ shared arange, in-place steps
def shared_arange_full(q, k, v):
    """``full(-inf).masked_fill(pos[None, :] <= pos[:, None], 0)`` from one shared ``arange``."""
    pos = torch.arange(q.shape[2])
    m = torch.full((q.shape[2], q.shape[2]), float("-inf")).masked_fill(pos[None, :] <= pos[:, None], 0.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def shared_arange_where(q, k, v):
    pos = torch.arange(q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(pos[None, :] <= pos[:, None], 0.0,
                                                                         float("-inf")))


def inplace_unbound(q, k, v):
    """``s.div_(c)`` not rebound, then ``s += mask`` (later readers read the mutated ``s``)."""
    s = q @ k.transpose(-1, -2)
    s.div_(math.sqrt(q.shape[-1]))
    pos = torch.arange(q.shape[2])
    s += torch.where(pos[None, :] <= pos[:, None], 0.0, float("-inf"))
    return F.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("fn", [shared_arange_full, shared_arange_where, inplace_unbound])
def test_shared_arange_and_inplace_forms_are_causal(fn):
    q, k, v = (x.detach() for x in _qkv(1))
    out, sites = _sites(fn, q, k, v)
    assert len(sites) == 1 and sites[0].replaced, "\n".join(s.line() for s in sites)
    assert sites[0].pattern == "causal; mask: kv <= q", sites[0].pattern
    torch.testing.assert_close(out, fn(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def two_sites_sharing_inplace_scores(q, k, v):
    """Two in-place sites on one score tensor: the second reads it after another ``/=``."""
    s = q @ k.transpose(-1, -2)
    s /= 4.0
    a = F.softmax(s, dim=-1) @ v
    s /= 2.0
    return a + F.softmax(s, dim=-1) @ v


def test_second_of_two_inplace_sites_gives_the_reason():
    """The first site is replaced; the second is left alone because its scores are also
    read by the first site's softmax, and the report says so (not a generic no-match)."""
    q, k, v = (x.detach() for x in _qkv(2))
    out, sites = _sites(two_sites_sharing_inplace_scores, q, k, v)
    assert [s.replaced for s in sites] == [True, False], "\n".join(s.line() for s in sites)
    assert "are also read by softmax" in sites[1].reason, sites[1].reason
    torch.testing.assert_close(out, two_sites_sharing_inplace_scores(q, k, v), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ KV-cache decode under a sliding window
def test_mistral_sliding_window_decode_is_bottom_right():
    """Greedy generate() (dynamic cache, window 4) through the backend equals eager. The
    prompt's sites are sliding_window(window=4); in the decode steps the positions are
    offset by the cache's ``cumulative_length`` (a run-time size the graph does not tie to
    Lq / Lk): the sites are sliding_window_bottom_right(window=4) with that size named and
    the alignment checked per call (``attncc.fx.positions``), no mask tensor."""
    from tiny_models import generate_both, input_ids, tiny_model

    model, _ = tiny_model("mistral", "sdpa")
    attncc.fx.clear_reports()
    ref, out = generate_both(model, input_ids(10), EAGER, max_new_tokens=4)
    assert out.tolist() == ref.tolist()
    reps = attncc.fx.reports()
    assert len(reps) >= 2 and all(s.replaced for r in reps for s in r.sites)
    assert [s.pattern.split(";")[0] for s in reps[0].sites] == ["sliding_window(window=4)"] * 2
    for s in (s for r in reps[1:] for s in r.sites):
        assert s.pattern.startswith("sliding_window_bottom_right(window=4);") and "cumulative_length" in s.pattern \
            and "aligned bottom-right" in s.pattern and "mask tensor" not in s.pattern, s.pattern
        assert "allowed" not in s.spec, s.spec
