"""Swin through ``torch.compile(backend="attncc")`` (issue 13): the relative-position bias
``relative_position_bias_table[relative_position_index].view(N, N, -1).permute(2, 0, 1)``
becomes a table read ``table0[index0[N*q + kv], h]`` (the ``(T, H)`` table and the flat int
index are passed, the table's gradient comes from the kernel), and the shifted-window mask
(``0`` / ``-100`` between the cyclic-shift regions of each window, broadcast over the batch
folded with the windows) a closed form ``where(regions[..q..] - regions[..kv..] == 0, 0,
-100)`` over the graph's small region map: no ``(B * nW, H, N, N)`` tensor is passed."""

import copy

import pytest
import torch
import torch.nn.functional as F

import attncc.fx
from conftest import assert_grads_close
from test_fx_structure import Capture

SWIN_SITES = ["dense_table_bias", "dense_region_mask_table_bias", "dense_table_bias", "dense_table_bias"]


def _swin(impl):
    from tiny_models import zoo_model

    return zoo_model("swin", impl)  # 4x4 patches, window 2 (N = 4), shift 1 in stage 1; random tables


def _compiled(model, x):
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    cap = Capture()
    out = torch.compile(model, backend=cap.backend)(pixel_values=x).last_hidden_state
    sites = [s for r in attncc.fx.reports() for s in r.sites]
    return out, sites, cap


def _check_grads(model, ref_model, out, ref):
    g = torch.randn_like(out)
    params = list(model.parameters())
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, list(ref_model.parameters()), g, allow_unused=True)
    for (n, _), a, b in zip(model.named_parameters(), got, want):
        if b is None:
            assert a is None, n
            continue
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=n)
        if "relative_position_bias_table" in n:
            assert b.abs().max() > 1e-3, n  # the table's gradient is not trivially zero


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_swin_bias_is_a_table_read_and_the_shift_mask_a_closed_form(impl):
    """Each window attention reads its (9, H) table at the flat index buffer; the shifted
    layer adds the region mask in closed form; outputs and every parameter's gradient
    (the tables' included) equal eager (a batch of 2 over 4 windows: the window of a
    folded batch index is ``b mod 4``)."""
    model = _swin(impl)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    out, sites, cap = _compiled(model, x)
    assert [s.pattern.split(";")[0] for s in sites] == SWIN_SITES, "\n".join(s.line() for s in sites)
    assert all(s.replaced for s in sites)
    for s in sites:
        assert "tensor index0: int32[16]" in s.spec and "index0[kv + 4*q]" in s.spec, s.spec
    shifted = sites[1].spec
    assert "% (4)" in shifted and "== 0, 0, -100.0)" in shifted and "tensor table0: float32[4, 4]" in shifted, shifted
    # tables (9, H), the flat index (16,) and the (1, 4, 4, 1) region map: no (B*nW|1, H|1, N, N) bias
    assert set(cap.passed()) == {(9, 1), (9, 2), (16,), (1, 4, 4, 1)}, cap.passed()
    ref = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    _check_grads(model, model, out, ref)


def test_swin_training_step_matches_eager():
    """One SGD step in train mode (dropout 0): gradients of every parameter and the
    outputs after the step equal eager's."""
    model = _swin("eager").train()
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    out, sites, _ = _compiled(model, x)
    assert [s.pattern.split(";")[0] for s in sites] == SWIN_SITES, "\n".join(s.line() for s in sites)
    ref = ref_model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    loss, ref_loss = out.square().mean(), ref.square().mean()
    loss.backward()
    ref_loss.backward()
    for (n, p), r in zip(model.named_parameters(), ref_model.parameters()):
        if r.grad is not None:
            torch.testing.assert_close(p.grad, r.grad, atol=1e-4, rtol=1e-4, msg=n)
    for opt in (torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(ref_model.parameters(), lr=0.5)):
        opt.step()
    table = "encoder.layers.0.blocks.1.attention.relative_position_bias.relative_position_bias_table"
    assert not torch.equal(model.get_parameter(table), _swin("eager").get_parameter(table))  # the step moved it
    compiled = torch.compile(model, backend=attncc.fx.make_backend("eager"))
    torch.testing.assert_close(compiled(pixel_values=x).last_hidden_state, ref_model(pixel_values=x).last_hidden_state,
                               atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ the reshape rules
def window_blocks(q, k, v):
    """A 1-D window (block-diagonal) mask from a merging reshape:
    ``arange(L // P)[:, None].expand(L // P, P).reshape(L)`` is each token's window."""
    P = 4
    win = torch.arange(q.shape[2] // P)[:, None].expand(q.shape[2] // P, P).reshape(q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=win[:, None] == win[None, :])


def window_partition_bias(q, k, v, table, index):
    """A bias gathered from a table by a flat index and viewed ``(N, N, H)``, and a
    per-window additive mask ``(nW, N, N)`` broadcast over a batch folded with the windows."""
    nW, N = 3, q.shape[2]
    bias = table[index].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
    w = torch.arange(nW)[:, None, None]
    i = torch.arange(N)
    shift = torch.where((i[None, :, None] + w) % 2 == (i[None, None, :] + w) % 2, 0.0, -50.0)  # (nW, N, N)
    mask = shift.unsqueeze(1).unsqueeze(0).expand(q.shape[0] // nW, -1, -1, -1, -1).reshape(-1, 1, N, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias + mask)


def test_merging_reshape_is_a_closed_form_window_mask():
    """A merging reshape of an ``arange`` is recovered as ``floor`` of the flat index: the
    block-diagonal mask is a closed form (outputs and gradients equal the dense mask's)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 12, 8, generator=g).requires_grad_() for _ in range(3))
    out, sites, cap = _run(window_blocks, q, k, v)
    assert "mask: (((kv) // 4) == ((q) // 4))" in sites[0].spec, sites[0].spec  # nothing passed, no bias
    assert cap.passed() == [] and "tensor" not in sites[0].spec, cap.passed()
    i = torch.arange(12)
    dense = (i[:, None] // 4) == (i[None, :] // 4)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert_grads_close(out, want, (q, k, v))


def test_gathered_bias_and_folded_window_mask():
    """The hand-written form of Swin's two biases: a (T, H) table at a flat index buffer
    and a closed-form per-window mask at ``b mod nW``; table gradient through the kernel."""
    g = torch.Generator().manual_seed(6)
    B, H, N = 6, 2, 5  # 2 images x 3 windows
    q, k, v = (torch.randn(B, H, N, 8, generator=g).requires_grad_() for _ in range(3))
    table = torch.randn(7, H, generator=g).requires_grad_()
    index = torch.randint(0, 7, (N * N,), generator=g)
    out, sites, cap = _run(window_partition_bias, q, k, v, table, index)
    s = sites[0]
    assert s.pattern.startswith("dense_region_mask_table_bias;"), s.pattern
    assert "table0[index0[kv + 5*q], h]" in s.spec and "% (3)" in s.spec, s.spec
    assert sorted(cap.passed()) == sorted([(7, H), (N * N,)]), cap.passed()
    ref = window_partition_bias(q, k, v, table, index)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    want = assert_grads_close(out, ref, (q, k, v, table))
    assert want[3].abs().max() > 1e-3


def _run(fn, *args):
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    cap = Capture()
    out = torch.compile(fn, backend=cap.backend, fullgraph=True)(*args)
    sites = [s for r in attncc.fx.reports() for s in r.sites]
    assert len(sites) == 1 and sites[0].replaced, "\n".join(s.line() for s in sites)
    return out, sites, cap
