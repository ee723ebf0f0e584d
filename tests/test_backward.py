"""Fused backward kernels: gradients of q, k, v, of the float spec tensors (and through the
LSE output) vs autograd of the dense float64 reference, for every library pattern and edge
shapes; every partial layout of spec tensor gradients, deterministic and atomic; bitwise
determinism; fully masked rows; gradcheck; torch.compile of a training step."""

import pytest
import torch

import attncc
from attncc.inputs import example_inputs

from conftest import TOL, max_err

SHAPES = [
    (1, 4, 2, 77, 90, 32, 48),   # ragged, GQA, Lq != Lk, Dv != D
    (2, 2, 2, 40, 40, 16, 16),   # batch 2
    (1, 2, 1, 1, 33, 16, 16),    # decode row, MQA
    (1, 2, 2, 50, 30, 80, 80),   # Lq > Lk, D = 80
]
LIB = sorted(attncc.library_patterns(grid=False))  # grid patterns: tests/test_grid.py
SMALL = dict(window=24, prefix=20, sinks=3, dilation=3)


def _loss_grads(fn, q, k, v, go, gl, tens=None, dtype=None):
    """Gradients of a fixed linear function of (out, lse) in q, k, v and the float tensors
    of ``tens`` (cast to ``dtype`` when given); returns ``[dq, dk, dv, *d tensors]``."""
    qs = [x.detach().clone().to(dtype or x.dtype).requires_grad_() for x in (q, k, v)]
    ts = {n: (t.detach().clone().to(dtype or t.dtype).requires_grad_() if t.is_floating_point() else t)
          for n, t in (tens or {}).items()}
    out, lse = fn(*qs, **ts)
    lse_f = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out * go.to(out.dtype)).sum() + (lse_f * gl.to(lse.dtype)).sum()).backward()
    return [x.grad for x in qs] + [t.grad for t in ts.values() if t.is_floating_point()]


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
        lse_ok = kern.ir.normalize != "sigmoid"  # sigmoid attention has no LSE: the loss uses out only

        def with_lse(fn):
            return lambda a, b, c, **t: fn(a, b, c, return_lse=True, **t) if lse_ok else \
                (fn(a, b, c, **t), torch.zeros(B, H, Lq, dtype=a.dtype))

        got = _loss_grads(with_lse(kern), q, k, v, go, gl, tens)
        want = _loss_grads(with_lse(lambda a, b, c, **t: attncc.reference(path, a, b, c, pattern=name, **params,
                                                                          **t)),
                           q, k, v, go.double(), gl.double(), tens, dtype=torch.float64)
        names = ["q", "k", "v"] + [n for n, t in tens.items() if t.is_floating_point()]
        assert len(got) == len(want) == len(names)
        for nm, a, b in zip(names, got, want):
            if nm in kern.plan.mask_tensors and nm not in kern.plan.score_tensors:
                assert a is None and b is None or b.abs().max() == 0, (name, nm)
                continue
            assert a is not None and a.dtype == tens.get(nm, q).dtype and a.shape == b.shape, (name, nm)
            assert not torch.isnan(a).any(), (name, nm)
            assert max_err(a, b) < 5e-5 * (1 + b.abs().max().item()), (name, nm, (B, H, Hkv, Lq, Lk, D, Dv), max_err(a, b))


@pytest.mark.parametrize("name", ["causal", "document_causal", "alibi", "lowrank_bias"])
def test_gradients_with_chunked_dkdv_rows(name):
    """64-row query tiles: the dK/dV kernel walks each in chunks of
    attncc.runtime.configs.dkdv_rows rows (32, or 16 with dot() terms), as on a GPU."""
    from attncc.runtime.configs import dkdv_rows

    path = attncc.pattern_path(name)
    kern = attncc.compile(path, block_m=64, block_n=32, num_warps=4, num_stages=1)
    assert dkdv_rows(kern.config, bool(kern.ir.lowrank)) < 64
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 1, 150, 150, 16, 16, seed=3)
    g = torch.Generator().manual_seed(1)
    go, gl = torch.randn(1, 2, 150, 16, generator=g), torch.randn(1, 2, 150, generator=g)
    got = _loss_grads(lambda a, b, c, **t: kern(a, b, c, return_lse=True, **t), q, k, v, go, gl, tens)
    want = _loss_grads(lambda a, b, c, **t: attncc.reference(path, a, b, c, return_lse=True, **t),
                       q, k, v, go.double(), gl.double(), tens, dtype=torch.float64)
    for a, b in zip(got, want):
        assert max_err(a, b) < 5e-5 * (1 + b.abs().max().item()), (name, max_err(a, b))


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


# one spec per partial layout of spec tensor gradients (see attncc.gradients)
GRAD_SPECS = {
    # per-key bias (col partials), fast path
    "col": "pattern kb:\n    tensor kb: float32[B, Lk]\n    mask: kv <= q + 3\n    score: s + kb[b, kv]\n",
    # one tensor read at a row and a column index, another read twice (row partials)
    "multi": "pattern mu:\n    tensor u: float32[Lq + Lk]\n    tensor w: float32[H]\n"
             "    score: s * w[h] + u[q] * u[kv] + w[h] * 0.5\n",
    # a full bias (full partials, fast path)
    "full": "pattern fb:\n    tensor bias: float32[B, H, Lq, Lk]\n    score: s + bias[b, h, q, kv]\n",
    # a transposed bias shared by batch and heads, inside tanh (full partials, segmented sum)
    "shared": "pattern sb:\n    tensor bias: float32[Lk, Lq]\n    mask: kv >= q - 20\n    score: tanh(s + bias[kv, q])\n",
    # T5-style buckets: a float table read through an int tensor (full partials, segmented sum)
    "bucket": "pattern bk:\n    tensor table: float32[H, 8]\n    tensor bucket: int32[Lq + Lk - 1]\n"
              "    score: s + table[h, bucket[kv - q + Lq - 1]]\n",
}


def _grad_case(src, deterministic, B=2, H=4, Hkv=2, Lq=45, Lk=70, D=16, seed=1):
    kern = attncc.compile(src, deterministic=deterministic)
    q, k, v, tens, _ = example_inputs(kern.ir, B, H, Hkv, Lq, Lk, D, seed=seed)
    if "bucket" in tens:
        tens["bucket"] = torch.randint(0, 8, tens["bucket"].shape, dtype=torch.int32,
                                       generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    go, gl = torch.randn(B, H, Lq, D, generator=g), torch.randn(B, H, Lq, generator=g)
    got = _loss_grads(lambda a, b, c, **t: kern(a, b, c, return_lse=True, **t), q, k, v, go, gl, tens)
    return kern, q, k, v, tens, go, gl, got


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("case", sorted(GRAD_SPECS))
def test_spec_tensor_gradients_every_layout(case, deterministic):
    src = GRAD_SPECS[case]
    kern, q, k, v, tens, go, gl, got = _grad_case(src, deterministic)
    want = _loss_grads(lambda a, b, c, **t: attncc.reference(src, a, b, c, return_lse=True, **t),
                       q, k, v, go.double(), gl.double(), tens, dtype=torch.float64)
    names = ["q", "k", "v"] + [n for n, t in tens.items() if t.is_floating_point()]
    for nm, a, b in zip(names, got, want):
        assert a is not None and a.shape == b.shape, (case, nm)
        assert b.abs().max() > 0, (case, nm)  # the case exercises a non-zero gradient
        assert max_err(a, b) < 5e-5 * (1 + b.abs().max().item()), (case, nm, max_err(a, b))


def test_spec_tensor_gradients_are_bitwise_deterministic():
    for case in ("bucket", "multi", "col"):
        runs = [_grad_case(GRAD_SPECS[case], True)[-1] for _ in range(2)]
        for a, b in zip(*runs):
            assert torch.equal(a, b), case


def test_gradcheck_spec_tensor_fp32():
    kern = attncc.compile(attncc.pattern_path("relative_position_bias"))
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 2, 9, 11, 16, seed=3)
    table = tens["table"].requires_grad_()
    assert torch.autograd.gradcheck(lambda t: kern(q, k, v, table=t), (table,), eps=1e-2, atol=2e-2, rtol=2e-2,
                                    nondet_tol=0.0, fast_mode=True)


def test_tensors_without_gradient_are_fine():
    # a float tensor only the mask reads, and one whose score derivative is 0 (floor is
    # piecewise constant, as in torch): no error, no gradient
    src = ("pattern nog:\n    tensor lim: float32[Lq]\n    tensor w: float32[H]\n"
           "    mask: kv <= lim[q]\n    score: s + floor(w[h] * 3) * 0.1\n")
    kern = attncc.compile(src)
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 2, 20, 20, 16)
    lim = (torch.arange(20) * 0.7).requires_grad_()
    w = tens["w"].requires_grad_()
    q.requires_grad_()
    out = kern(q, k, v, lim=lim, w=w)
    out.sum().backward()
    assert lim.grad is None and w.grad is None and torch.isfinite(q.grad).all()
    ref = attncc.reference(src, q.detach().double(), k.double(), v.double(), lim=lim.detach(), w=w.detach())
    assert max_err(out, ref) < TOL[torch.float32]


class _TinyAttentionModel(torch.nn.Module):
    def __init__(self, kern, dim=32, heads=2, table_len=0):
        super().__init__()
        self.kern, self.heads = kern, heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        # a learned relative-position table (a spec tensor that trains), when the pattern reads one
        self.table = torch.nn.Parameter(0.1 * torch.randn(heads, table_len)) if table_len else None

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = self.kern(q, k, v) if self.table is None else self.kern(q, k, v, table=self.table)
        return self.out(o.transpose(1, 2).reshape(B, L, C))


@pytest.mark.parametrize("pattern", ["sliding_window", "relative_position_bias"])
def test_training_step_compiles_fullgraph_and_matches_eager(pattern):
    kern = attncc.compile(attncc.pattern_path(pattern), **({"window": 8} if pattern == "sliding_window" else {}))
    torch.manual_seed(0)
    model = _TinyAttentionModel(kern, table_len=79 if pattern == "relative_position_bias" else 0)
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
        assert p.grad is not None and g.abs().max() > 0
        assert max_err(p.grad, g) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(dtype):
    # fp16 / bf16 inputs (fp32 accumulation): q, k, v and table gradients in the input dtype,
    # close to the float64 reference at the dtype's precision
    src = attncc.pattern_path("relative_position_bias")
    kern = attncc.compile(src)
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 1, 40, 56, 32, dtype=dtype, seed=4)
    g = torch.Generator().manual_seed(4)
    go, gl = torch.randn(1, 2, 40, 32, generator=g), torch.zeros(1, 2, 40)
    got = _loss_grads(lambda a, b, c, **t: kern(a, b, c, return_lse=True, **t), q, k, v, go, gl, tens)
    want = _loss_grads(lambda a, b, c, **t: attncc.reference(src, a, b, c, return_lse=True, **t),
                       q, k, v, go.double(), gl.double(), tens, dtype=torch.float64)
    for a, b, x in zip(got, want, [q, k, v, tens["table"]]):
        assert a.dtype == x.dtype and torch.isfinite(a).all()  # the table is float32: its gradient too
        assert max_err(a, b) < 20 * TOL[dtype] * (1 + b.abs().max().item()), max_err(a, b)
