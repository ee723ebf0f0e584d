"""Tensor-descriptor (TMA) forward candidates: the config syntax, the candidate rule, the host
checks that pick the plain loads for inputs TMA cannot read, and the TMA forward under the
Triton interpreter (which implements tensor descriptors) against the dense reference.
Compilation for sm_90a (wgmma, no spills) is checked by tests/test_aot.py."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.inputs import example_inputs
from attncc.runtime import Config, capture, forward_candidates
from attncc.runtime.configs import tma_candidates, tma_supported, ws_supported
from attncc.runtime.kernel import tma_pointers_ok, tma_strides_ok

from conftest import TOL, max_err

needs_tma = pytest.mark.skipif(not tma_supported(), reason="the installed Triton has no tensor descriptors")


def test_config_text_round_trip():
    for text in ("128x64:8:3", "128x64:8:3:tma", "64x64:4:3:ws", "128x64:8:3:tma:ws"):
        assert str(Config.parse(text)) == text
    cfg = Config.parse("128x64:8:3:ws:tma")
    assert (cfg.tma, cfg.ws) == (True, True) and str(cfg) == "128x64:8:3:tma:ws"
    assert Config.parse("128x64:8:3") == Config(128, 64, 8, 3)
    for bad in ("128x64:8:3:tmx", "128x64:8:3:tma:tma", "128x64:8"):
        with pytest.raises(ValueError, match="BMxBN:warps:stages"):
            Config.parse(bad)


def test_tma_candidates_follow_the_plain_ones():
    """sm_90a at 64 < D <= 128 gets the TMA candidates, after the plain ones (the first
    candidate, the default without timing, stays plain); sm_80 and other head dims none."""
    plain = [c for c in forward_candidates(128, 90) if not (c.tma or c.ws)]
    extra = list(tma_candidates(128, 90))
    assert list(forward_candidates(128, 90)) == plain + extra
    assert not forward_candidates(128, 90)[0].tma
    assert bool(extra) == tma_supported() and all(c.tma for c in extra)
    for hd, arch in ((128, 80), (64, 90), (256, 90), (80, 86)):
        assert not any(c.tma or c.ws for c in forward_candidates(hd, arch)), (hd, arch)


def test_tma_layout_checks():
    x = torch.randn(2, 3, 40, 64)
    assert tma_strides_ok(x, x.transpose(1, 2).contiguous().transpose(1, 2)) and tma_pointers_ok(x)
    assert not tma_strides_ok(x.transpose(2, 3))  # last stride not 1
    assert tma_strides_ok(x[..., :60].contiguous()[..., :30])  # rows of 60 floats (240 B) read 30 wide
    assert not tma_strides_ok(torch.randn(2, 3, 40, 18))  # rows of 72 B
    assert tma_strides_ok(torch.randn(1, 1, 40, 64)[:, :, :, :40])  # size-1 dims' strides do not matter
    assert not tma_pointers_ok(torch.randn(2 * 3 * 40 * 64 + 1)[1:].view(2, 3, 40, 64))


def test_compile_refuses_tma_without_tiles():
    with pytest.raises(ValueError, match="fixed tile size"):
        attncc.compile(attncc.pattern_path("causal"), tma=True)


CASES = [  # (pattern, Lq, Lk, D, Dv, dtype): ragged lengths, head dims that are not powers of two, GQA
    ("causal", 50, 45, 72, 72, torch.float32),
    ("sliding_window", 70, 70, 40, 24, torch.float32),
    ("document_causal", 40, 61, 72, 72, torch.float32),
    ("causal", 37, 37, 48, 48, torch.bfloat16),
    ("neighborhood_2d", None, None, 40, 40, torch.float32),  # a box plan (7 x 9 grid)
]


@needs_tma
@pytest.mark.parametrize("pattern,Lq,Lk,D,Dv,dtype", CASES, ids=[f"{c[0]}-{c[5]}".replace("torch.", "") for c in CASES])
def test_tma_forward_matches_reference(pattern, Lq, Lk, D, Dv, dtype):
    """The TMA forward (descriptor loads, no bounds masks on Q / K / V) equals the reference,
    and it is the TMA kernel that ran (USE_TMA in the launch)."""
    spec = attncc.pattern_path(pattern)
    kern = attncc.compile(spec, block_m=32, block_n=32, num_warps=1, num_stages=1, tma=True, backend="interpret")
    grid = [7, 9] if kern.ir.grid else None
    q, k, v, tensors, _ = example_inputs(kern.ir, B=1, H=4, Hkv=2, Lq=Lq or 64, Lk=Lk, D=D, Dv=Dv, dtype=dtype,
                                         grid=grid)
    with capture() as rec:
        kern(q, k, v, **tensors)
    assert [ln.kwargs["USE_TMA"] for _, ln in rec] == [True]
    out, lse = kern(q, k, v, return_lse=True, **tensors)
    ref, ref_lse = attncc.reference(spec, q.double(), k.double(), v.double(), return_lse=True, **tensors)
    assert max_err(out, ref) < TOL[dtype] * (4 if dtype == torch.bfloat16 else 1)
    assert max_err(lse, ref_lse) < TOL[dtype] * 4


@needs_tma
def test_tma_falls_back_for_unaligned_inputs():
    """Inputs TMA cannot read (rows of 36 bytes; a base pointer off 16 bytes) run the plain
    loads, with the same result."""
    spec = attncc.pattern_path("causal")
    kern = attncc.compile(spec, block_m=32, block_n=32, num_warps=1, num_stages=1, tma=True, backend="interpret")
    for D, shift in ((9, 0), (16, 1)):
        q, k, v, _, _ = example_inputs(kern.ir, B=1, H=2, Hkv=1, Lq=40, D=D)
        qq = torch.empty(q.numel() + shift)[shift:].view_as(q).copy_(q)
        assert tma_strides_ok(qq, k, v) == (D == 16) and tma_pointers_ok(qq, k, v) == (shift == 0)
        with capture() as rec:
            kern(qq, k, v)
        assert rec[0][1].kwargs["USE_TMA"] is False
        assert max_err(kern(qq, k, v), attncc.reference(spec, q.double(), k.double(), v.double())) < TOL[torch.float32]


@pytest.mark.skipif(not ws_supported(), reason="the installed Triton has no warp-specialised loops")
def test_ws_flag_reaches_the_kernel_and_runs():
    """ws=True is passed to the forward (a loop option: the interpreter runs the plain loop)."""
    spec = attncc.pattern_path("causal")
    kern = attncc.compile(spec, block_m=32, block_n=32, num_warps=1, num_stages=1, ws=True, backend="interpret")
    assert "warp_specialize=WS" in kern.source
    q, k, v, _, _ = example_inputs(kern.ir, B=1, H=2, Hkv=2, Lq=40, D=16)
    with capture() as rec:
        kern(q, k, v)
    assert rec[0][1].kwargs["WS"] is True and rec[0][1].kwargs["USE_TMA"] is False
    assert max_err(kern(q, k, v), attncc.reference(spec, q.double(), k.double(), v.double())) < TOL[torch.float32]


def test_autotune_skips_tma_candidates_for_unaligned_inputs(monkeypatch):
    """The autotuner times the TMA candidates only for inputs TMA can read, and keeps the
    choices for the two kinds of input apart (own bucket family)."""
    kern = attncc.compile(attncc.pattern_path("causal"))
    seen = {}

    def fake_tune(family, q, sizes, layout, lowrank, candidates, run):
        seen[family] = candidates(128, 90)
        return seen[family][0]

    monkeypatch.setattr(kern, "_tune", fake_tune)
    for D in (128, 9):
        q, k, v, _, _ = example_inputs(kern.ir, B=1, H=2, Hkv=1, Lq=40, D=D)
        kern._autotune(q, k, v, [], 1.0, {}, [])
    assert set(seen) == {"fwd", "fwd:no-tma"}
    assert any(c.tma for c in seen["fwd"]) == tma_supported()
    assert seen["fwd:no-tma"] == tuple(c for c in forward_candidates(128, 90) if not c.tma)
