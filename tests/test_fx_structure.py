"""The graph pass recovers structure instead of passing dense tensors (issue 13 section 3):
ALiBi biases built from ``arange`` and slopes become the score term ``slope[h] * (kv - q)``
with the slopes as a ``float32[H]`` spec tensor (gradients to a parameter slope through
the kernel), ALiBi folded with a causal mask by ``masked_fill`` becomes causal + ALiBi,
and ModernBERT's ``abs(q - kv) <= w`` band with a padding mask becomes a closed-form band
and a key-validity read. Forms that are not recovered still run, with a tensor."""

import math

import pytest
import torch
import torch.nn.functional as F

import attncc.fx
from attncc.fx import make_backend
from conftest import assert_grads_close
from attncc.fx.ops import value_of
from attncc.fx.site import attention as site_attention

B, H, L, D = 2, 4, 12, 8


class Capture:
    """A backend that rewrites, keeps the rewritten graph, then runs it eagerly."""

    def __init__(self):
        self.gms = []
        self.backend = make_backend(inner=self._keep)

    def _keep(self, gm, example_inputs):
        self.gms.append(gm)
        return gm.forward

    def passed(self):
        """Shapes of the tensors the rewritten graph passes to the attncc kernels."""
        return [tuple(value_of(t).shape) for gm in self.gms for n in gm.graph.nodes
                if n.target is site_attention for t in n.kwargs["tensors"]]


def _run(fn, *args):
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    cap = Capture()
    out = torch.compile(fn, backend=cap.backend, fullgraph=True)(*args)
    reps = attncc.fx.reports()
    assert len(reps) == 1 and len(reps[0].replaced) == 1 and not reps[0].left_alone, str(reps)
    return out, reps[0].sites[0], cap


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).requires_grad_() for _ in range(3)]


def _slopes():
    return torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])


# ------------------------------------------------------------------ ALiBi forms
class AlibiSDPA(torch.nn.Module):
    """``slopes[:, None, None] * (arange(Lk)[None, :] - arange(Lq)[:, None])`` as SDPA's
    float mask; the slopes a parameter (trainable)."""

    def __init__(self):
        super().__init__()
        self.slopes = torch.nn.Parameter(_slopes())

    def bias(self, Lq, Lk):
        i, j = torch.arange(Lq), torch.arange(Lk)
        return self.slopes[:, None, None] * (j[None, :] - i[:, None])

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias(q.shape[2], k.shape[2]))


class AlibiSymmetricChain(torch.nn.Module):
    """A hand-written chain adding ``-(abs(q - kv)) * slope`` (bidirectional ALiBi); the
    slopes a buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", _slopes().view(1, H, 1, 1))

    def bias(self, Lq, Lk):
        i, j = torch.arange(Lq), torch.arange(Lk)
        return -(torch.abs(i[:, None] - j[None, :])) * self.slopes

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        p = torch.softmax(s + self.bias(q.shape[2], k.shape[2]), dim=-1)
        return torch.matmul(p, v)


class AlibiMPT(torch.nn.Module):
    """MPT's form: ``arange(1 - Lk, 1).view(1, 1, 1, Lk) * slopes.view(1, H, 1, 1)`` with the
    slopes computed in the graph (``1 / 2 ** (arange(1, H + 1) * 8 / H)``)."""

    def bias(self, Lq, Lk):
        base = torch.arange(1, H + 1, dtype=torch.float32) * (8.0 / H)
        slopes = 1.0 / torch.pow(2, base)
        return torch.arange(1 - Lk, 1, dtype=torch.int32).view(1, 1, 1, Lk) * slopes.view(1, H, 1, 1)

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias(q.shape[2], k.shape[2]))


@pytest.mark.parametrize("cls, name", [(AlibiSDPA, "dense_alibi"), (AlibiSymmetricChain, "dense_alibi_symmetric"),
                                       (AlibiMPT, "dense_alibi")])
def test_alibi_bias_is_a_score_term_with_slopes(cls, name):
    model = cls()
    q, k, v = _qkv()
    out, site, cap = _run(model, q, k, v)
    assert site.pattern.startswith(name + ";") and "recovered from the graph" in site.pattern, site.pattern
    assert "tensor slope0: float32[H]" in site.spec and "bias" not in site.spec, site.spec
    assert "slope0[h]" in site.spec.split("score:")[1], site.spec
    assert cap.passed() == [(H,)] or cap.passed() == [(1, H, 1, 1)], cap.passed()  # no (B, H, Lq, Lk) tensor
    ref = model(q, k, v)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=model.bias(L, L).detach())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)
    params = [q, k, v] + [p for p in model.parameters()]
    g = torch.randn_like(out)
    got, want = torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if params[3:]:  # the parameter's gradient also against SDPA with the dense bias
        slopes = params[3].detach().clone().requires_grad_()
        i = torch.arange(L)
        other = F.scaled_dot_product_attention(q, k, v, attn_mask=slopes[:, None, None] * (i[None, :] - i[:, None]))
        want = torch.autograd.grad(other, slopes, g)[0]
        torch.testing.assert_close(got[3], want, atol=1e-4, rtol=1e-4)
        assert want.abs().max() > 1e-3  # the slope gradient is not trivially zero


def alibi_causal_sdpa(q, k, v, slopes):
    """transformers' SDPA-path form: the ALiBi bias, then ``masked_fill(~causal, finfo.min)``."""
    i, j = torch.arange(q.shape[2]), torch.arange(k.shape[2])
    bias = slopes[:, None, None] * (j[None, :] - i[:, None])
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.masked_fill(~(j[None, :] <= i[:, None]), torch.finfo(q.dtype).min))


def alibi_causal_chain(q, k, v, slopes):
    """The bias added to the scores, the causal mask filled with -inf afterwards."""
    i, j = torch.arange(q.shape[2]), torch.arange(k.shape[2])
    s = torch.matmul(q, k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
    s = s + slopes.view(1, -1, 1, 1) * (j[None, :] - i[:, None])
    s = s.masked_fill(j[None, :] > i[:, None], float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def alibi_causal_where(q, k, v, slopes):
    """``where(causal, bias, -inf)`` as one additive mask."""
    i, j = torch.arange(q.shape[2]), torch.arange(k.shape[2])
    bias = torch.where(j[None, :] <= i[:, None], slopes[:, None, None] * (j[None, :] - i[:, None]), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def alibi_plus_causal_mask(q, k, v, slopes):
    """The ALiBi bias plus a ``0 / finfo.min`` causal mask, summed into one SDPA mask."""
    i, j = torch.arange(q.shape[2]), torch.arange(k.shape[2])
    causal = torch.where(j[None, :] <= i[:, None], 0.0, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=slopes[:, None, None] * (j[None, :] - i[:, None]) + causal)


@pytest.mark.parametrize("fn", [alibi_causal_sdpa, alibi_causal_chain, alibi_causal_where, alibi_plus_causal_mask])
def test_alibi_folded_with_causal_is_causal_plus_alibi(fn):
    q, k, v = _qkv(1)
    slopes = _slopes().requires_grad_()
    out, site, cap = _run(fn, q, k, v, slopes)
    assert site.pattern.startswith("causal_alibi;") and "mask: kv <= q" in site.pattern, site.pattern
    assert cap.passed() == [(H,)] or cap.passed() == [(1, H, 1, 1)], cap.passed()
    i = torch.arange(L)
    dense = (slopes[:, None, None] * (i[None, :] - i[:, None])).masked_fill(i[None, :] > i[:, None], float("-inf"))
    want_out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, fn(q, k, v, slopes), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)
    assert_grads_close(out, want_out, (q, k, v, slopes))


# ------------------------------------------------------------------ ModernBERT's band
def band_modernbert(q, k, v, am):
    """ModernBERT's local attention mask (the pre-masking_utils code): ``abs(rows - rows.T)
    <= w`` filled into the ``(1 - mask) * finfo.min`` padding mask."""
    Lq = q.shape[2]
    rows = torch.arange(Lq).unsqueeze(0)
    window = (torch.abs(rows - rows.T) <= 3).unsqueeze(0).unsqueeze(0)
    inv = 1.0 - am[:, None, None, :].expand(am.shape[0], 1, Lq, Lq).to(q.dtype)
    glob = inv.masked_fill(inv.to(torch.bool), torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=glob.masked_fill(window.logical_not(),
                                                                               torch.finfo(q.dtype).min))


def band_index(q, k, v, am):
    """transformers' ``abs(q_idx - kv_idx) <= w`` and ``padding_mask[b, kv]`` by index tensors."""
    b = torch.arange(q.shape[0])[:, None, None, None]
    kv = torch.arange(k.shape[2])[None, None, None, :]
    i = torch.arange(q.shape[2])[None, None, :, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=am.bool()[b, kv] & (torch.abs(i - kv) <= 3))


@pytest.mark.parametrize("fn", [band_modernbert, band_index])
def test_band_with_padding_is_closed_form(fn):
    q, k, v = _qkv(2)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 9:] = 0  # padded keys; every query row keeps a key inside its band
    out, site, cap = _run(fn, q, k, v, am)
    assert site.pattern.startswith("sliding_window_bidirectional_key_padding(window=3);"), site.pattern
    assert "abs(kv - q) <= 3" in site.spec and "tensor pad0: int32[B, Lk]" in site.spec, site.spec
    assert cap.passed() == [(B, L)], cap.passed()
    i = torch.arange(L)
    dense = am[:, None, None, :].bool() & ((i[:, None] - i[None, :]).abs() <= 3)
    want_out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, fn(q, k, v, am), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want_out, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ forms that stay tensors
def per_query_slopes(q, k, v, w):
    """A float tensor read along the query axis: not a closed form, passed as a bias."""
    i, j = torch.arange(q.shape[2]), torch.arange(k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=w[:, None] * (j[None, :] - i[:, None]))


def two_forms(q, k, v, slopes):
    """Different closed forms below and above the diagonal: passed as a bias."""
    i, j = torch.arange(q.shape[2]), torch.arange(k.shape[2])
    d = (j[None, :] - i[:, None]) * slopes[:, None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(j[None, :] <= i[:, None], d, 2 * d))


@pytest.mark.parametrize("fn, extra, why", [
    (per_query_slopes, torch.linspace(0.1, 1.0, L), "along the query / key axes stays a tensor"),
    (two_forms, _slopes(), "different closed forms on different pairs"),
])
def test_unrecovered_bias_stays_a_tensor_with_the_reason(fn, extra, why):
    q, k, v = _qkv(3)
    out, site, cap = _run(fn, q, k, v, extra)
    assert "passed as a tensor" in site.pattern and why in site.pattern, site.pattern
    assert "slope0" not in site.spec and "bias0" in site.spec, site.spec
    torch.testing.assert_close(out, fn(q, k, v, extra), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ score-op order
def softcap_then_bias(q, k, v, bias):
    """Gemma 2's order: softcap the scores, then add the (dense, input) mask."""
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = 5.0 * torch.tanh(s / 5.0)
    return torch.matmul(torch.softmax(s + bias, dim=-1), v)


def test_bias_after_softcap_is_added_after_it():
    """A bias tensor added after the softcap is not moved inside it (it was, before: the
    spec read ``5 * tanh((s + bias) / 5)``)."""
    q, k, v = (x.detach() * 3 for x in _qkv(4))
    bias = torch.randn(1, H, L, L) * 3
    out, site, _ = _run(softcap_then_bias, q, k, v, bias)
    assert "tanh((s) / 5.0)) + bias" in site.spec, site.spec
    torch.testing.assert_close(out, softcap_then_bias(q, k, v, bias), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ T5's bucketed relative position bias
def t5_bucket(rel, bidirectional=True, num_buckets=8, max_distance=16):
    """transformers' ``T5Attention._relative_position_bucket`` (log buckets)."""
    rb = 0
    if bidirectional:
        num_buckets //= 2
        rb += (rel > 0).to(torch.long) * num_buckets
        rel = torch.abs(rel)
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    rb += torch.where(is_small, rel, large)
    return rb


class T5Style(torch.nn.Module):
    """A hand-written T5 attention: no scaling, ``embedding(bucket(kv - q)).permute([2, 0, 1])``
    added to the scores; the decoder form adds a ``0 / finfo.min`` causal mask, or (``sdpa``)
    folds the bias into SDPA's mask with ``where(causal, bias, finfo.min)``."""

    def __init__(self, causal=False, sdpa=False, distance=lambda i, j: j[None, :] - i[:, None]):
        super().__init__()
        self.causal, self.sdpa, self.distance = causal, sdpa, distance
        self.emb = torch.nn.Embedding(8, H)
        torch.nn.init.normal_(self.emb.weight, std=2.0)

    def bias(self, Lq, Lk):
        rel = self.distance(torch.arange(Lq), torch.arange(Lk))
        return self.emb(t5_bucket(rel, not self.causal)).permute([2, 0, 1]).unsqueeze(0)

    def forward(self, q, k, v):
        Lq, Lk = q.shape[2], k.shape[2]
        bias = self.bias(Lq, Lk)
        keep = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None]
        if self.sdpa:
            if self.causal:
                bias = torch.where(keep.view(1, 1, Lq, Lk), bias, torch.finfo(q.dtype).min)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        s = torch.matmul(q, k.transpose(3, 2)) + bias
        if self.causal:
            s = s + torch.where(keep, 0.0, torch.finfo(q.dtype).min)
        return torch.matmul(F.softmax(s, dim=-1), v)


@pytest.mark.parametrize("causal, sdpa, name", [(False, False, "dense"), (True, False, "causal"),
                                                (False, True, "dense"), (True, True, "causal")])
def test_t5_bucketed_bias_is_a_table_read_at_the_distance(causal, sdpa, name):
    """T5's bias ``embedding(bucket(kv - q))`` becomes ``table0[bucket0[kv - q + Lq - 1], h]``:
    the (8, H) table and a bucket vector of Lq + Lk - 1 ints are passed, no (1, H, Lq, Lk)
    bias; outputs and gradients (the table's too, through the kernel) equal eager."""
    model = T5Style(causal, sdpa)
    q, k, v = _qkv(5)
    out, site, cap = _run(model, q, k, v)
    assert site.pattern.startswith(f"{name}_relative_position_bias;"), site.pattern
    assert "score: (s) + (table0[bucket0[Lq + kv - q - 1], h])" in site.spec, site.spec
    assert "tensor table0: float32[8, H]" in site.spec and "tensor bucket0: int32[Lq + Lk - 1]" in site.spec
    assert sorted(cap.passed()) == sorted([(8, H), (2 * L - 1,)]), cap.passed()
    ref = model(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    params = [q, k, v, model.emb.weight]
    g = torch.randn_like(out)
    got, want = torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert want[3].abs().max() > 1e-3  # the table's gradient is not trivially zero


def test_bucket_not_of_the_distance_stays_a_tensor():
    """A bucket index of ``2 * kv - q`` (not a function of ``kv - q``): the bias is passed
    as a tensor, and the report says why."""
    model = T5Style(distance=lambda i, j: 2 * j[None, :] - i[:, None])
    q, k, v = _qkv(6)
    out, site, cap = _run(model, q, k, v)
    assert "passed as a tensor" in site.pattern and "not a function of the relative position" in site.pattern, \
        site.pattern
    assert "table0" not in site.spec and "bias0" in site.spec, site.spec
    torch.testing.assert_close(out, model(q, k, v), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_t5_model_relative_bias_trains_through_the_kernel(impl):
    """transformers' T5 (tiny, train mode with dropout 0) through the backend: the encoder's
    bias is a table read at the bucket of ``kv - q``, the decoder's the same under the
    recovered causal mask, cross-attention's ``zeros`` bias vanishes; no (B|1, H, Lq, Lk)
    tensor is passed; logits and every parameter's gradient (both
    ``relative_attention_bias`` weights included) equal eager."""
    from tiny_models import zoo_inputs, zoo_model

    model = zoo_model("t5", impl)
    model.train()
    inputs = zoo_inputs("t5")
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    cap = Capture()
    ref = model(**inputs).logits
    out = torch.compile(model, backend=cap.backend)(**inputs).logits
    sites = [s for r in attncc.fx.reports() for s in r.sites]
    names = [s.pattern.split(";")[0] for s in sites]
    assert names == ["dense_relative_position_bias", "causal_relative_position_bias", "dense"], \
        "\n".join(s.line() for s in sites)
    assert all(len(shape) < 4 for shape in cap.passed()), cap.passed()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    params = [p for p in model.parameters()]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    for (n, _), a, b in zip(model.named_parameters(), got, want):
        if b is None:
            continue
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=n)
        if "relative_attention_bias" in n:
            assert b.abs().max() > 1e-3, n
