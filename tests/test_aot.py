"""CI gate for the GPU path: every kernel the runtime launches, for a set of patterns that
covers every code path, compiled for sm_90a and sm_80 with real Triton (no interpreter, no
GPU: ``attncc.aot`` worker processes), at every launch config the autotuner may try.

Asserted per kernel: it compiles with Triton's default settings, 0 spill bytes and no
local-memory stores, shared memory within the target's limit, wgmma (``HGMMA``) on sm_90a
for the forward, dQ and dK/dV kernels (bf16; mma.sync for the backward at D > 128; exact
fp32 FMA for fp32), TMA loads (``UTMALDG``) in the forward at the ``tma`` candidates
(sm_90a), at every candidate config. Besides bf16 at D = 128, one pattern is compiled at
fp32, at D = 256 and on sm_80 at D = 64. The launches compiled are recorded from the
runtime's own call path (``attncc.runtime.capture``), so they are the JIT's launches.

Compiled kernels are cached by Triton (``~/.triton/cache`` or ``TRITON_CACHE_DIR``) and
their resource records by attncc, so a second run is fast.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import attncc
from attncc import aot
from attncc.runtime import Launch, backward_candidates, capture, forward_candidates

from conftest import max_err

DILATED_3D = '''
pattern dilated_neighborhood_3d:
    """3-D neighborhood attention with dilation 2 (NATTEN na3d, dilation=2)."""
    grid: t, y, x
    mask: neighborhood(q, kv, kernel=3, dilation=2)
'''

#: a kernel kern(q, k, v, block_mask=...) runs for causal (attncc.ir.with_block_mask), with blocks
#: of 48 x 24: tiles span several blocks, so the per-pair block read is compiled (at the key
#: tiles launch_candidates keeps); tiles inside one block (blocks of 128) compile to the
#: document_causal-like table loop without it (measured 2026-12-03: 24 kernels, 0 problems)
BLOCKS_48x24 = '''
pattern causal_blocks_48x24:
    """Causal inside the 48 x 24 blocks of a run-time block mask (one list per key/value head)."""
    tensor blocks: bool[B, Hkv, (Lq + 47) // 48, (Lk + 23) // 24]
    mask: kv <= q and blocks[b, h // (H // Hkv), q // 48, kv // 24]
'''

#: every code path: one interval, a union of intervals, a block table, a block-read table, 2-D
#: and 3-D box plans with dilation, a relative-position table, gate, sink, sigmoid, low-rank,
#: key ranges bounded by run-time scalars (duo_attention: per-head flags, two intervals),
#: run-time scalars of the closed form (per-head windows)
GATE_SET = ["causal", "prefix_lm", "document_causal", BLOCKS_48x24, "dilated_neighborhood_2d",
            DILATED_3D, "relative_position_bias", "gated_causal", "sink_window", "sigmoid_attention", "lowrank_bias",
            "duo_attention"]
TARGETS = ("sm_90a", "sm_80")


def _spec(entry: str) -> str:
    return entry if "pattern " in entry else str(attncc.pattern_path(entry))


def _name(entry: str) -> str:
    if "pattern " in entry:
        return entry.split("pattern ", 1)[1].split(":", 1)[0]
    return entry


@pytest.fixture(scope="module")
def records():
    """Compile the gate set: forward, backward and counting kernels, bf16, D = 128."""
    jobs = []
    for entry in GATE_SET:
        jobs += aot.plan_jobs(_spec(entry), targets=TARGETS, dtypes=("bf16",), head_dims=(128,))
    recs = aot.run_jobs(jobs, workers=2)
    by_pattern = {}
    for r in recs:
        by_pattern.setdefault(r["pattern"], []).append(r)
    return by_pattern


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("entry", GATE_SET, ids=_name)
def test_kernels_compile_without_spills(records, entry, target):
    recs = [r for r in records.get(_name(entry), []) if r["target"] == target]
    kern = attncc.compile(_spec(entry))
    expected = {"attn_fwd", "count_tiles"} | ({"attn_bwd_pre", "attn_bwd_dq", "attn_bwd_dkdv"}
                                              if not kern.backward_error else set())
    arch = aot.TARGETS[target][0]
    got = {r["kernel"] for r in recs}
    assert got == expected, f"{target}: kernels compiled {sorted(got)}, expected {sorted(expected)}"
    assert ({r["config"] for r in recs if r["kernel"] == "attn_fwd"}
            == {str(c) for c in kern.launch_candidates(forward_candidates, 128, arch, "bf16")})
    # the TMA candidates (sm_90a) launch the TMA forward for the (aligned) example call; problems()
    # below fails a TMA launch without TMA loads in its SASS
    assert all(":tma" in r["launch"] for r in recs if r["kernel"] == "attn_fwd" and ":tma" in r["config"])
    if not kern.backward_error:
        bwd = {r["config"] for r in recs if r["kernel"] == "attn_bwd_dkdv"}
        assert bwd == {str(c) for c in kern.launch_candidates(backward_candidates, 128, arch, "bf16")}
    # every kernel at every candidate: compiles, 0 spill bytes, shared memory within the
    # target, wgmma (sm_90a) / mma (sm_80)
    bad = [f"{r['target']} {r['kernel']} {r['launch']}: {'; '.join(aot.problems(r))}" for r in recs if aot.problems(r)]
    assert not bad, "\n".join(bad)


#: beyond bf16 at D = 128: fp32 (exact fp32 products, small tiles), the 256 head dim (the
#: backward on 32-row mma.sync tiles) and sm_80 at D = 64, for the pattern with the most
#: per-tile state among the 1-D plans (gate + its tensor, a relative-position-like bias)
OTHER_CASES = [("sm_90a", "fp32", 128), ("sm_90a", "bf16", 256), ("sm_80", "bf16", 64)]


@pytest.mark.parametrize("target,dtype,head_dim", OTHER_CASES, ids=lambda x: str(x))
def test_other_dtypes_and_head_dims_compile_without_spills(target, dtype, head_dim):
    jobs = aot.plan_jobs(_spec("gated_causal"), targets=(target,), dtypes=(dtype,), head_dims=(head_dim,))
    recs = aot.run_jobs(jobs, workers=2)
    arch = aot.TARGETS[target][0]
    assert {r["config"] for r in recs if r["kernel"] == "attn_fwd"} == {
        str(c) for c in forward_candidates(head_dim, arch, dtype)}
    assert {r["config"] for r in recs if r["kernel"] == "attn_bwd_dq"} == {
        str(c) for c in backward_candidates(head_dim, arch, dtype)}
    bad = [f"{r['kernel']} {r['launch']}: {'; '.join(aot.problems(r))}" for r in recs if aot.problems(r)]
    assert not bad, "\n".join(bad)


def test_at_least_two_forward_candidates():
    for arch in (80, 90):
        for hd in (16, 32, 64, 80, 96, 128, 192, 256):
            assert len(forward_candidates(hd, arch)) >= 2
            assert len(backward_candidates(hd, arch)) >= 2


def test_capture_records_the_runtime_launches():
    """capture() records what the runtime would launch (and launches nothing)."""
    kern = attncc.compile(attncc.pattern_path("sliding_window"), block_m=64, block_n=32, num_warps=4, num_stages=3)
    q = torch.randn(2, 4, 100, 64)
    k = v = torch.randn(2, 2, 100, 64)
    with capture() as rec:
        kern(q, k, v)
    assert [ln.kernel for _, ln in rec] == ["attn_fwd"]
    ln = rec[0][1]
    assert isinstance(ln, Launch) and ln.grid == (2, 8)
    assert (ln.kwargs["BLOCK_M"], ln.kwargs["BLOCK_N"], ln.kwargs["num_warps"], ln.kwargs["num_stages"]) == (64, 32, 4, 3)
    assert ln.args[0] is q


def test_aot_cli_writes_cubins_and_records(tmp_path):
    from attncc.cli import main

    rc = main(["aot", str(attncc.pattern_path("causal")), "--target", "sm_90a", "--config", "64x64:4:3",
               "--bwd-config", "64x64:8:2", "-o", str(tmp_path), "--workers", "1"])
    assert rc == 0
    cubins = sorted(p.name for p in tmp_path.rglob("*.cubin"))
    assert any(n.startswith("attn_fwd_bf16_d128_64x64_4_3") for n in cubins), cubins
    assert any(n.startswith("attn_bwd_dkdv") for n in cubins), cubins
    assert (tmp_path / "aot.json").exists() and (tmp_path / "aot.md").exists()


def test_aot_cli_errors(capsys):
    from attncc.cli import main

    assert main(["aot", str(attncc.pattern_path("causal")), "--target", "sm_99"]) == 1
    assert "unknown target 'sm_99'" in capsys.readouterr().err
    assert main(["aot"]) == 1
    assert "give a FILE or --all" in capsys.readouterr().err


def _fa2():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fa2_reference.py"
    spec = importlib.util.spec_from_file_location("fa2_reference", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fa2_reference"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("causal", [True, False])
def test_fa2_yardstick_matches_sdpa(causal):
    """The plain FA2 forward that benchmarks/aot_report.py compares against is a correct kernel."""
    fa2 = _fa2()
    q, k, v = (torch.randn(1, 2, 80, 32) for _ in range(3))
    out, lse = fa2.forward(q, k, v, causal=causal, block_m=32, block_n=16, num_warps=1, num_stages=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert max_err(out, ref) < 2e-5
    s = (q @ k.transpose(-1, -2)) / 32 ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(80, 80, dtype=torch.bool).triu(1), float("-inf"))
    assert max_err(lse, torch.logsumexp(s, -1)) < 2e-5


#: the split-KV decode kernels (attncc.runtime.decode: attn_decode at every packed row tile and
#: decode_merge) of the heaviest closed form (a gate tensor read in the epilogue) and of a block
#: table, bf16 D = 128; benchmarks/results/aot_decode.md has 15 patterns at D = 64 / 128 / 256
DECODE_SET = ["gated_causal", "document_causal"]


@pytest.mark.parametrize("target", TARGETS)
def test_decode_kernels_compile_without_spills(target):
    from attncc.runtime.decode import decode_candidates

    jobs = []
    for name in DECODE_SET:
        jobs += aot.plan_jobs(_spec(name), targets=(target,), dtypes=("bf16",), head_dims=(128,), families=("decode",))
    recs = aot.run_jobs(jobs, workers=2)
    arch = aot.TARGETS[target][0]
    for name in DECODE_SET:
        mine = [r for r in recs if r["pattern"] == name]
        assert {r["launch"] for r in mine if r["kernel"] == "attn_decode"} == {
            str(c) for c in decode_candidates(128, arch, "bf16")}, name
        assert {r["kernel"] for r in mine} == {"attn_decode", "decode_merge"}, name
    bad = [f"{r['pattern']} {r['kernel']} {r['launch']}: {'; '.join(aot.problems(r))}" for r in recs if aot.problems(r)]
    assert not bad, "\n".join(bad)
