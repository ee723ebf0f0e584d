"""The graph pass on KV-cache decode steps and padding masks (issue 13 section 3): masks
whose positions are offset by the cache length (a run-time size the graph does not tie
to Lq / Lk) are aligned bottom-right (``attncc.fx.positions``), and key-validity masks
reach the kernel as O(B * Lk) tensors. Each test checks the recovered pattern, the
tensors the kernel receives, and the outputs against eager / SDPA."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import attncc.fx
import attncc.fx.positions as P
from attncc.fx import make_backend
from attncc.fx import site as S

EAGER = make_backend("eager")


@contextlib.contextmanager
def kernel_calls():
    """Record every compiled site's kernel call: a list of ``(spec text, {name: shape})``
    of the tensors passed besides q, k, v."""
    calls, saved = [], {}

    def wrap(key, kern):
        def call(q, k, v, **kw):
            calls.append((key, {n: tuple(t.shape) for n, t in kw.items() if isinstance(t, torch.Tensor)}))
            return kern(q, k, v, **kw)
        return call

    old_kernel_for = S.kernel_for

    def kernel_for(site):
        k = old_kernel_for(site)
        if k.key not in saved:
            saved[k.key] = k.kern
            k.kern = wrap(k.key, k.kern)
        return k

    for key, k in S._KERNELS.items():
        saved[key] = k.kern
        k.kern = wrap(key, k.kern)
    S.kernel_for = kernel_for
    import attncc.fx.match as M
    M.S.kernel_for = kernel_for
    try:
        yield calls
    finally:
        S.kernel_for = old_kernel_for
        for key, kern in saved.items():
            S._KERNELS[key].kern = kern


# ------------------------------------------------------------------ a hand-written decode step
def decode(q, k, v, past: int):
    """A sliding-window (6) decode step over a cache that keeps the last 5 keys: query
    positions ``past + i``, key positions ``j + max(past - 5, 0)`` (transformers'
    ``DynamicSlidingWindowLayer`` offsets)."""
    qp = torch.arange(q.shape[2]) + past
    kp = torch.arange(k.shape[2]) + torch.sym_max(past - 5, 0)
    keep = (kp[None, :] <= qp[:, None]) & (kp[None, :] > qp[:, None] - 6)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def test_decode_offset_is_aligned_bottom_right_with_a_checked_fallback():
    """``past`` (a SymInt after the second call) offsets the positions: the site becomes
    sliding_window_bottom_right(window=6) with no mask tensor; calls whose ``past`` keeps
    the alignment (here ``past >= Lk - Lq = 5``) run that kernel, the others (``past`` 0,
    2: the cache not full, keys not at the end) the fallback kernel with the graph's mask.
    Every call equals eager and SDPA with the mask built here."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 2, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    fn = torch.compile(decode, backend=EAGER, fullgraph=True)
    with kernel_calls() as calls:
        for past in (5, 9, 30, 2, 0):
            out = fn(q, k, v, past)
            torch.testing.assert_close(out, decode(q, k, v, past), atol=1e-5, rtol=1e-5)
            qp, kp = torch.arange(2) + past, torch.arange(7) + max(past - 5, 0)
            dense = (kp[None, :] <= qp[:, None]) & (qp[:, None] - kp[None, :] < 6)
            torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=dense), atol=1e-5,
                                       rtol=1e-5)
    sites = [s for r in attncc.fx.reports() for s in r.sites]
    dyn = sites[-1]  # the graph compiled with past dynamic
    assert dyn.replaced and dyn.pattern.startswith("sliding_window_bottom_right(window=6);"), dyn.pattern
    assert "aligned bottom-right" in dyn.pattern and "L_past_" in dyn.pattern, dyn.pattern
    assert "allowed" not in dyn.spec, dyn.spec
    # past 9, 30 aligned (no tensor), past 2, 0 the fallback with a (Lq, Lk) mask
    tail = calls[-4:]
    assert [("allowed" in names) for _, names in tail] == [False, False, True, True], tail


def test_offset_in_the_index_part_is_not_aligned():
    """A size that scales the positions (``kv * past``) is not an offset: the mask stays a
    tensor and the report says why; outputs equal eager."""
    def scaled(q, k, v, past: int):
        qp = torch.arange(q.shape[2]) + past
        kp = torch.arange(k.shape[2]) * past
        return F.scaled_dot_product_attention(q, k, v, attn_mask=kp[None, :] <= qp[:, None] * past)

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    fn = torch.compile(scaled, backend=EAGER, fullgraph=True)
    for past in (1, 2, 3):
        torch.testing.assert_close(fn(q, k, v, past), scaled(q, k, v, past), atol=1e-5, rtol=1e-5)
    site = [s for r in attncc.fx.reports() for s in r.sites][-1]
    assert "mask tensor" in site.pattern and "is not a bottom-right offset" in site.pattern, site.pattern


def test_alignment_conditions_unit():
    """:func:`attncc.fx.positions.align` on Mistral's decode mask (window 4, static Lq=1,
    Lk=4): the aligned mask is the bottom-right window and the condition holds exactly for
    ``s >= 3`` (checked against the graph's mask at every ``s``)."""
    import sympy
    from attncc.fx.site import Lk, Lq, kv_idx as kv, mask_name, q_idx as q

    s = sympy.Symbol("s", integer=True)
    off = sympy.Max(s - 3, 0)
    e = sympy.And(kv + off <= s + q, kv + off > s + q - 4)
    out, how = P.align(e, {s}, {"s": "cache length"}, (sympy.Integer(1), sympy.Integer(4)))
    assert mask_name(out) == "sliding_window_bottom_right(window=4)", out
    for sv in range(0, 12):
        ok = all(P._value(c, {s: sv, Lq: 1, Lk: 4}) == 0 for c in how.conditions)
        same = all(bool(e.subs({s: sv, q: 0, kv: j})) == bool(out.subs({Lq: 1, Lk: 4, q: 0, kv: j}))
                   for j in range(4))
        assert ok == (sv >= 3), sv
        assert same or not ok, sv  # the condition is sufficient


# ------------------------------------------------------------------ tiny transformers models, greedy decode
@pytest.mark.parametrize("arch, impl, padded", [("qwen2", "sdpa", True), ("gemma3", "sdpa", False)])
def test_sliding_window_decode_sites(arch, impl, padded, monkeypatch):
    """Qwen2 / Gemma 3 (a sliding layer, window 4, and a full layer; ``attention_mask``
    given, as ``generate`` does; Qwen2 with a left-padded batch of 2): greedy generate() with a dynamic cache through the
    backend equals eager; in the decode steps the sliding layer's site is
    sliding_window_bottom_right(window=4) (with the key-validity mask, when transformers
    keeps one, narrowed to the cached keys: int32 [Lk], not a (1, 1, 1, Lk) bool mask
    tensor), and no kernel call
    receives a tensor with more than Lk elements per batch row."""
    from tiny_models import generate_both, input_ids, zoo_model

    model = zoo_model(arch, impl)
    ids, kw = input_ids(8), {}
    if padded:
        ids = input_ids(8, batch=2)
        kw["attention_mask"] = torch.ones_like(ids)
        kw["attention_mask"][1, :2] = 0  # left padding of the second prompt
    import attncc.runtime.decode as dec

    decoded, real = [], dec.launch_decode
    monkeypatch.setattr(dec, "launch_decode", lambda kern, dp, q, *a: decoded.append(q.shape[2]) or real(kern, dp, q, *a))
    attncc.fx.clear_reports()
    with kernel_calls() as calls:
        ref, out = generate_both(model, ids, EAGER, max_new_tokens=3, **kw)
    assert out.tolist() == ref.tolist()
    # the rewritten sites' decode steps (Lq = 1) run the split-KV decode kernel (issue 16 section 4)
    assert decoded.count(1) >= 2 * model.config.num_hidden_layers, decoded
    reps = attncc.fx.reports()
    assert len(reps) >= 2 and all(s.replaced for r in reps for s in r.sites), "\n".join(map(str, reps))
    decode_sites = [s for r in reps[1:] for s in r.sites]
    sliding = [s for s in decode_sites if "window" in s.pattern.split(";")[0]]
    assert sliding and all(s.pattern.split("(")[0] in ("sliding_window_bottom_right",
                                                       "sliding_window_bottom_right_key_padding")
                           and "(window=4);" in s.pattern for s in sliding), [s.pattern for s in decode_sites]
    assert all("mask tensor" not in s.pattern and "bias [" not in s.pattern for s in decode_sites), \
        [s.pattern for s in decode_sites]
    assert calls
    for key, names in calls:
        for n, shape in names.items():
            if n in ("sink", "g"):
                continue
            assert len(shape) <= 2 and shape[-1] <= 16, (key, n, shape)  # (B|1, Lk): never (Lq, Lk)
    if padded:  # the key-validity mask of every token seen, read at the cached keys' offset
        assert any(s.pattern.startswith("sliding_window_bottom_right_key_padding(window=4);")
                   and "offset by Max(0, " in s.pattern for s in sliding), [s.pattern for s in sliding]


# ------------------------------------------------------------------ padding: O(B * Lk) tensors
def padded_sdpa(q, k, v, am):
    keep = am[:, None, None, :].to(torch.bool)
    i, j = torch.arange(q.shape[2]), torch.arange(k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep & (j[None, :] <= i[:, None]))


def padded_expanded(q, k, v, am):
    """A (B, 1, Lq, Lk) additive mask built from the (B, Lk) key validity, expanded."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    add = torch.where(am[:, None, None, :] == 1, 0.0, float("-inf")).expand(-1, 1, q.shape[2], -1)
    return torch.softmax(s + add, dim=-1) @ v


@pytest.mark.parametrize("fn", [padded_sdpa, padded_expanded])
def test_padding_reaches_the_kernel_as_b_by_lk(fn):
    """The tensors the kernel receives for a padding mask are O(B * Lk) (an int32 (B, Lk)
    key-validity read), never the (B, 1, Lq, Lk) mask; outputs equal eager and SDPA with
    the dense mask."""
    B, H, L, D = 2, 2, 24, 8
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 9:] = 0
    torch._dynamo.reset()
    attncc.fx.clear_reports()
    with kernel_calls() as calls:
        out = torch.compile(fn, backend=EAGER, fullgraph=True)(q, k, v, am)
    site = attncc.fx.reports()[-1].sites[0]
    assert site.replaced and "key_padding" in site.pattern, site.pattern
    assert len(calls) == 1
    sizes = {n: shape for n, shape in calls[0][1].items()}
    assert sizes == {"pad0": (B, L)}, sizes
    assert sum(torch.Size(s).numel() for s in sizes.values()) <= B * L
    torch.testing.assert_close(out, fn(q, k, v, am), atol=2e-5, rtol=1e-5)
    dense = am[:, None, None, :].bool().expand(B, 1, L, L)
    if fn is padded_sdpa:
        dense = dense & torch.ones(L, L, dtype=torch.bool).tril()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=dense), atol=2e-5, rtol=1e-5)
