"""Fused backward kernels: gradients of q, k, v (and through the LSE output) vs autograd of
the dense float64 reference, for every library pattern and edge shapes; determinism;
fully masked rows; gradcheck; torch.compile of a training step."""

import pytest
import torch

import attncc
from attncc.inputs import example_inputs

from conftest import max_err

SHAPES = [
    (1, 4, 2, 77, 90, 32, 48),   # ragged, GQA, Lq != Lk, Dv != D
    (2, 2, 2, 40, 40, 16, 16),   # batch 2
    (1, 2, 1, 1, 33, 16, 16),    # decode row, MQA
    (1, 2, 2, 50, 30, 80, 80),   # Lq > Lk, D = 80
]
LIB = sorted(attncc.library_patterns())
SMALL = dict(window=24, prefix=20, sinks=3, dilation=3)


def _loss_grads(fn, q, k, v, go, gl):
    qs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*qs)
    lse_f = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out * go.to(out.dtype)).sum() + (lse_f * gl.to(lse.dtype)).sum()).backward()
    return [x.grad for x in qs]


@pytest.mark.parametrize("name", LIB)
def test_library_gradients_match_reference(name):
    path = attncc.pattern_path(name)
    ir0 = attncc.lower(path, name)
    params = {k: SMALL[k] for k, _ in ir0.params if k in SMALL}
    kern = attncc.compile(path, name, **params)
    for i, (B, H, Hkv, Lq, Lk, D, Dv) in enumerate(SHAPES):
        if name == "document_causal" and Lq > Lk:
            continue
        q, k, v, tens, _ = example_inputs(kern.ir, B, H, Hkv, Lq, Lk, D, Dv, seed=10 + i)
        g = torch.Generator().manual_seed(i)
        go = torch.randn(B, H, Lq, Dv, generator=g)
        gl = torch.randn(B, H, Lq, generator=g)
        got = _loss_grads(lambda a, b, c: kern(a, b, c, return_lse=True, **tens), q, k, v, go, gl)
        want = _loss_grads(lambda a, b, c: attncc.reference(path, a, b, c, pattern=name, return_lse=True,
                                                            **params, **tens),
                           q.double(), k.double(), v.double(), go.double(), gl.double())
        for nm, a, b in zip("qkv", got, want):
            assert not torch.isnan(a).any(), (name, nm)
            assert max_err(a, b) < 5e-5 * (1 + b.abs().max().item()), (name, nm, (B, H, Hkv, Lq, Lk, D, Dv), max_err(a, b))


def test_fully_masked_rows_have_zero_gradients():
    src = "pattern late:\n    mask: kv <= q - 6\n"
    kern = attncc.compile(src)
    q, k, v, _, _ = example_inputs(kern.ir, 1, 2, 1, 30, 30, 16)
    q.requires_grad_()
    kern(q, k, v).sum().backward()
    assert torch.equal(q.grad[:, :, :6], torch.zeros_like(q.grad[:, :, :6]))
    assert torch.isfinite(q.grad).all()


def test_gradients_are_bitwise_deterministic():
    kern = attncc.compile(attncc.pattern_path("document_causal"))
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 4, 1, 70, 70, 32, seed=5)
    go = torch.randn(1, 4, 70, 32)
    runs = [_loss_grads(lambda a, b, c: kern(a, b, c, return_lse=True, **tens), q, k, v, go, torch.zeros(1, 4, 70))
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradcheck_fp32():
    kern = attncc.compile(attncc.pattern_path("softcap"), cap=5.0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 9, 16, generator=g, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: kern(a, b, c), (q, k, v), eps=1e-2, atol=2e-2, rtol=2e-2,
                                    nondet_tol=0.0, fast_mode=True)


def test_spec_tensor_requiring_grad_is_a_clear_error():
    kern = attncc.compile(attncc.pattern_path("alibi"))
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 2, 8, 8, 16)
    with pytest.raises(NotImplementedError, match="tensor 'slope' requires grad"):
        kern(q, k, v, slope=tens["slope"].requires_grad_())
    with torch.no_grad():
        kern(q, k, v, slope=tens["slope"])


class _TinyAttentionModel(torch.nn.Module):
    def __init__(self, kern, dim=32, heads=2):
        super().__init__()
        self.kern, self.heads = kern, heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = self.kern(q, k, v)
        return self.out(o.transpose(1, 2).reshape(B, L, C))


def test_training_step_compiles_fullgraph_and_matches_eager():
    kern = attncc.compile(attncc.pattern_path("sliding_window"), window=8)
    torch.manual_seed(0)
    model = _TinyAttentionModel(kern)
    x = torch.randn(2, 40, 32)

    def step(m, x):
        loss = m(x).pow(2).mean()
        loss.backward()
        return loss

    eager = step(model, x)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # forward + loss compiled as one graph (no graph break); AOTAutograd builds the backward
    # graph around the attncc backward op
    compiled = torch.compile(model, fullgraph=True)
    loss = step(compiled, x)
    assert abs(loss.item() - eager.item()) < 1e-5
    for p, g in zip(model.parameters(), grads):
        assert max_err(p.grad, g) < 1e-5
