"""Runtime behaviour: torch.compile integration, the on-disk cache, argument checks."""

import torch
import pytest

import attncc
from attncc.inputs import example_inputs
from attncc.runtime import cache

from conftest import max_err


def _doc_kernel():
    return attncc.compile(attncc.pattern_path("document_causal"))


def test_torch_compile_fullgraph_no_recompile():
    kern = _doc_kernel()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(q, k, v, doc):
        return kern(q, k, v, doc=doc) * 2.0

    cfn = torch.compile(fn, fullgraph=True, backend=backend)
    for seed in range(3):  # new tensor values each time, same shapes
        q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 1, 48, 48, 32, seed=seed)
        out = cfn(q, k, v, tens["doc"])
        assert max_err(out, 2.0 * attncc.reference(attncc.pattern_path("document_causal"), q, k, v, **tens)) < 5e-5
    assert len(graphs) == 1
    # the kernel is one custom op node in the graph
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("attncc" in t for t in targets), targets


def test_torch_compile_inductor_with_lse():
    kern = attncc.compile(attncc.pattern_path("alibi"))

    @torch.compile(fullgraph=True)
    def fn(q, k, v, slope):
        out, lse = kern(q, k, v, return_lse=True, slope=slope)
        return out + 1.0, lse

    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 2, 40, 40, 32)
    out, lse = fn(q, k, v, tens["slope"])
    ref, rlse = attncc.reference(attncc.pattern_path("alibi"), q, k, v, return_lse=True, **tens)
    assert max_err(out, ref + 1.0) < 5e-5
    assert max_err(lse, rlse) < 1e-4


def test_cache_entry_written_deterministic_and_rebuilt_when_corrupt():
    src = "pattern cache_probe:\n    param window: int = 7\n    mask: kv <= q and q - kv < window\n"
    k1 = attncc.compile(src)
    assert k1.path.exists() and str(k1.path).startswith(str(cache.cache_dir()))
    text = k1.path.read_text()
    assert text == k1.source and "def attn_fwd" in text
    k2 = attncc.compile(src)
    assert k2.source == text  # deterministic, same key
    k1.path.write_text("def broken(:\n")  # corrupt the entry
    from attncc import compiler as C

    C._COMPILED.clear()  # as a new process would: no in-process memo
    k3 = attncc.compile(src)
    assert k3.source == text and k3.path.read_text() == text
    q, k, v, _, _ = example_inputs(k3.ir, 1, 1, 1, 30, 30, 16)
    assert max_err(k3(q, k, v), attncc.reference(src, q, k, v)) < 2e-5
    # different params -> different kernel
    assert attncc.compile(src, window=9).key != k1.key


def test_cache_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    kern = attncc.compile("pattern where_am_i:\n    mask: kv <= q\n")
    assert str(kern.path).startswith(str(tmp_path))


def test_explain_and_source_name_the_path():
    assert "closed form" in attncc.explain(attncc.pattern_path("sliding_window"))
    assert "block table" in attncc.explain(attncc.pattern_path("document_causal"))
    kern = attncc.compile(attncc.pattern_path("sliding_window"))
    assert "@triton.jit" in kern.source and "def attn_fwd" in kern.source


# ---------------------------------------------------------------- argument checks
def _inputs():
    kern = _doc_kernel()
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 1, 16, 16, 16)
    return kern, q, k, v, tens


@pytest.mark.parametrize("mutate,exc,fragment", [
    (lambda q, k, v, t: (q[0], k, v, t), ValueError, "q must have 4 dims"),
    (lambda q, k, v, t: (q, k[..., :8], v, t), ValueError, "k must have shape (B, Hkv, Lk, D) with D=16"),
    (lambda q, k, v, t: (q, k, v[:, :, :5], t), ValueError, "v must have shape"),
    (lambda q, k, v, t: (q, k.half(), v, t), TypeError, "same dtype"),
    (lambda q, k, v, t: (q.long(), k.long(), v.long(), t), TypeError, "q has dtype int64"),
    (lambda q, k, v, t: (q, k.to("meta"), v, t), ValueError, "same device"),
    (lambda q, k, v, t: (q[:, :1].expand(1, 3, 16, 16), k.expand(1, 2, 16, 16), v.expand(1, 2, 16, 16), t),
     ValueError, "multiple of the number of key/value heads"),
    (lambda q, k, v, t: (q, k, v, {}), TypeError, "missing tensor 'doc'"),
    (lambda q, k, v, t: (q, k, v, {"doc": t["doc"][:5]}), ValueError, "tensor 'doc' must have shape int32[Lk] = (16,), got (5,)"),
    (lambda q, k, v, t: (q, k, v, {"doc": t["doc"].float()}), TypeError, "declared int32"),
    (lambda q, k, v, t: (q, k, v, {"doc": t["doc"], "dco": t["doc"]}), TypeError, "no tensor or param 'dco'"),
    (lambda q, k, v, t: (q, k, v, {"doc": t["doc"].tolist()}), TypeError, "must be a torch.Tensor"),
])
def test_bad_arguments_raise_before_launch(mutate, exc, fragment):
    kern, q, k, v, tens = _inputs()
    q2, k2, v2, t2 = mutate(q, k, v, tens)
    with pytest.raises(exc) as ei:
        kern(q2, k2, v2, **t2)
    assert fragment in str(ei.value)
    with pytest.raises(exc):
        attncc.reference(attncc.pattern_path("document_causal"), q2, k2, v2, **t2)


def test_mask_read_out_of_bounds_is_an_error():
    kern = _doc_kernel()
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 1, 40, 24, 16)
    with pytest.raises(ValueError, match=r"doc\[q\]"):
        kern(q, k, v, **tens)
    with pytest.raises(ValueError, match="out of its bounds"):
        attncc.reference(attncc.pattern_path("document_causal"), q, k, v, **tens)


def test_head_dim_limits_and_block_sizes():
    kern = attncc.compile("pattern d:\n    score: s\n")
    q = torch.randn(1, 1, 4, 300)
    with pytest.raises(ValueError, match="outside the supported range"):
        kern(q, q, q)
    with pytest.raises(ValueError, match="power of two"):
        attncc.compile("pattern d:\n    score: s\n", block_m=24)


def test_fixed_block_sizes_and_tile_stats_follow_config():
    src = attncc.pattern_path("causal")
    kern = attncc.compile(src, block_m=16, block_n=64)
    q, k, v, _, _ = example_inputs(kern.ir, 1, 1, 1, 70, 70, 16)
    assert max_err(kern(q, k, v), attncc.reference(src, q, k, v)) < 2e-5
    st = kern.tile_stats(70, 70)
    assert (st["block_m"], st["block_n"]) == (16, 64)
    assert st["total"] == 5 * 2


def test_int32_row_offsets_are_refused_not_overflowed():
    """A (batch, head) slice whose row/feature offsets pass 2**31 elements would overflow
    the kernels' 32-bit offsets: refused before any launch, naming the argument."""
    kern = attncc.compile(attncc.pattern_path("causal"))
    ok = torch.empty_strided((1, 1, 4, 4), (16, 16, 4, 1), dtype=torch.bfloat16, device="meta")
    big = torch.empty_strided((1, 1, 4, 4), (0, 0, 2 ** 30, 1), dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match=r"k: one \(batch, head\) slice spans 3221225475 elements"):
        kern(ok, big, ok)
