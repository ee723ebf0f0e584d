"""attncc.testing and `attncc test`: the tester passes correct functions and catches wrong ones.

Correct functions are independent implementations (torch SDPA, a naive dense softmax);
wrong ones carry one classic bug each (wrong pattern, off-by-one window, NaN for fully
masked rows, wrong GQA head mapping). Every failure must come back shrunk, with the
worst element, both values and a snippet that reproduces it. attncc's own compiled
kernel runs under the interpreter on a few tiny examples only.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import attncc
import attncc.testing as at
from attncc.cli import main

CAUSAL = attncc.pattern_path("causal")
WINDOW = attncc.pattern_path("sliding_window")
DOC = attncc.pattern_path("document_causal")
SMALL = at.Space(max_len=24, head_dims=(8, 16, 24))


def sdpa_causal(q, k, v):
    """Top-left causal attention by torch SDPA (is_causal=True is top-left)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def naive(q, k, v, allowed, with_lse=False, zero_empty=True):
    """Dense softmax attention in float32 with a bool ``allowed`` (Lq, Lk) or (B, 1, Lq, Lk) mask;
    GQA by repeat_interleave; ``zero_empty=False`` is the classic bug (NaN rows)."""
    g = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(g, dim=1) for x in (k, v))
    s = q.float() @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    if zero_empty:
        p = torch.nan_to_num(p, nan=0.0)
    out = (p @ vf).to(q.dtype)
    return (out, lse) if with_lse else out


def window_mask(Lq, Lk, window, slack=0):
    qi, ki = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    return (ki <= qi) & (qi - ki < window + slack)


def sdpa_window_off_by_one(q, k, v):
    """Sliding window with window + 1 keys (the `<=` instead of `<` bug)."""
    m = window_mask(q.shape[2], k.shape[2], 8, slack=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)


def doc_causal_nan(q, k, v, doc):
    """document_causal by a dense softmax that leaves fully masked rows NaN."""
    Lq, Lk = q.shape[2], k.shape[2]
    qi, ki = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    m = (doc[:Lq, None] == doc[None, :]) & (doc[None, :] >= 0) & (ki <= qi)
    return naive(q, k, v, m, zero_empty=False)


def sdpa_causal_wrong_gqa(q, k, v):
    """GQA by tiling kv heads (h -> h % Hkv) instead of grouping them (h -> h // group)."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1), is_causal=True)


def caught(fn, spec, **kw) -> tuple[str, at.Inputs]:
    """The AssertionError text of a failing check, and the inputs its snippet rebuilds."""
    with pytest.raises(AssertionError) as e:
        at.check(fn, spec, seed=0, **kw)
    text = str(e.value)
    assert "  case: B=" in text and "  reproduce:" in text, text
    call = re.search(r"q, k, v, tensors = (attncc\.testing\.build\(.*\))", text).group(1)
    x = eval(call, {"attncc": attncc, "Case": at.Case})  # the snippet's own line
    return text, x


def worst_values(text):
    m = re.search(r"got (\S+), expected (\S+) \(", text)
    return float(m.group(1)), float(m.group(2))


def test_sdpa_causal_passes_with_coverage():
    rep = at.check(sdpa_causal, CAUSAL, max_examples=40, seed=0)
    assert rep.examples == 40
    # the space was explored: every dtype, GQA, Lq != Lk, non-contiguous layouts, single-key rows
    assert set(rep.dtypes) == {"float32", "float16", "bfloat16"}
    assert rep.gqa > 0 and rep.ragged > 0 and rep.noncontiguous > 0 and rep.single_key_rows > 0
    assert "causal: 40 examples" in rep.summary()


def test_sdpa_causal_gradients_pass():
    rep = at.check(sdpa_causal, CAUSAL, grads=True, max_examples=15, seed=1, space=SMALL)
    assert rep.examples == 15


def test_causal_sdpa_is_not_sliding_window():
    text, x = caught(sdpa_causal, WINDOW, window=8, max_examples=100, space=SMALL)
    assert "out differs" in text and "(window=8)" in text
    c = x.case
    assert (c.B, c.H, c.dtype, c.layout, c.logit_scale) == (1, 1, "float32", "contiguous", 1.0)  # shrunk
    assert c.Lq > 8  # a window of 8 only differs from causal from query 8 on
    # the snippet's inputs reproduce the reported values
    q, k, v, tensors = x
    got, want = worst_values(text)
    out, ref = sdpa_causal(q, k, v), attncc.reference(WINDOW, q.double(), k.double(), v.double(), window=8)
    idx = tuple(int(i) for i in re.search(r"worst: out\[b=(\d+), h=(\d+), q=(\d+), dv=(\d+)\]", text).groups())
    assert out[idx].item() == got and ref[idx].item() == pytest.approx(want, abs=1e-12)


def test_off_by_one_window_caught():
    text, x = caught(sdpa_window_off_by_one, WINDOW, window=8, max_examples=100, space=SMALL)
    assert "out differs" in text
    # the reported row is one where the extra key q - 8 exists, and its key set is the window's
    qi = int(re.search(r"worst: out\[b=0, h=0, q=(\d+),", text).group(1))
    assert 0 <= qi - 8 < x.case.Lk, text
    lo, hi = qi - 7, min(qi, x.case.Lk - 1)
    keys = "none" if lo > hi else str(lo) if lo == hi else f"{lo}-{hi}"
    assert f"allows kv in {{{keys}}}" in text, text
    assert x.case.H == 1 and x.case.B == 1


def test_nan_for_fully_masked_rows_caught():
    text, x = caught(doc_causal_nan, DOC, max_examples=100, space=SMALL)
    assert "NaN in out" in text
    assert re.search(r"allows kv in \{none\} \(0 of \d+ keys\)", text), text
    assert (x.case.B, x.case.H, x.case.dtype, x.case.layout) == (1, 1, "float32", "contiguous")  # shrunk
    # the same function with the empty rows fixed passes
    def fixed(q, k, v, doc):
        Lq, Lk = q.shape[2], k.shape[2]
        m = (doc[:Lq, None] == doc[None, :]) & (doc[None, :] >= 0) & (torch.arange(Lk)[None] <= torch.arange(Lq)[:, None])
        return naive(q, k, v, m)
    assert at.check(fixed, DOC, max_examples=20, seed=0, space=SMALL).masked_rows > 0


def test_wrong_gqa_mapping_caught():
    text, x = caught(sdpa_causal_wrong_gqa, CAUSAL, max_examples=100, space=SMALL)
    c = x.case
    assert "out differs" in text
    assert c.Hkv == 2 and c.H == 4 and c.B == 1  # the smallest shape where the mappings differ


def test_exception_and_dtype_reported():
    def crashes_on_ragged(q, k, v):
        if q.shape[2] != k.shape[2]:
            raise RuntimeError("Lq must equal Lk")
        return sdpa_causal(q, k, v)

    text, x = caught(crashes_on_ragged, CAUSAL, max_examples=50, space=SMALL)
    assert "it raised RuntimeError: Lq must equal Lk" in text and x.case.Lq != x.case.Lk
    text, _ = caught(lambda q, k, v: sdpa_causal(q, k, v).float(), CAUSAL, max_examples=50, space=SMALL)
    assert "expected q's dtype" in text


def test_param_named_like_a_keyword_refused():
    spec = "pattern p:\n    param seed: int = 3\n    mask: kv <= q + seed\n"
    with pytest.raises(TypeError, match="declares param.*seed"):
        at.check(sdpa_causal, spec, seed=1)


def test_lse_checked():
    def causal_lse(q, k, v, scale_lse=1.0):
        Lq, Lk = q.shape[2], k.shape[2]
        out, lse = naive(q, k, v, window_mask(Lq, Lk, 10 ** 9), with_lse=True)
        return out, lse * scale_lse

    rep = at.check(causal_lse, CAUSAL, return_lse=True, max_examples=20, seed=0, space=SMALL)
    assert rep.examples == 20
    text, _ = caught(lambda q, k, v: causal_lse(q, k, v, 1 / math.log(2)), CAUSAL, return_lse=True,
                     max_examples=50, space=SMALL)
    assert "lse differs" in text


BUCKET_SPEC = """pattern bucket_bias:
    tensor bucket: int32[Lq + Lk - 1]
    tensor table: float32[H, 6]
    tensor flag: bool[Lk]
    mask: flag[kv] or kv <= q
    score: s + table[h, bucket[kv - q + Lq - 1] + 2]
"""


@settings(max_examples=25, deadline=None)
@given(x=at.inputs(BUCKET_SPEC, space=SMALL))
def test_inputs_respect_index_bounds(x):
    q, k, v, t = x
    # bucket indexes table's axis of 6 with an offset of 2: values in [-2, 3]
    assert at.index_bounds(x.ir)["bucket"]
    assert int(t["bucket"].min()) >= -2 and int(t["bucket"].max()) <= 3
    assert t["bucket"].shape == (x.case.Lq + x.case.Lk - 1,) and t["flag"].dtype == torch.bool
    assert q.shape == (x.case.B, x.case.H, x.case.Lq, x.case.D) and q.dtype == getattr(torch, x.case.dtype)
    assert repr(x).startswith("attncc.testing.build(")
    at.compare(lambda q, k, v, **t: x.reference().to(q.dtype), x)  # the reference agrees with itself


@settings(max_examples=15, deadline=None)
@given(x=at.inputs(attncc.pattern_path("neighborhood_2d"), space=at.Space(grid_extra=3), kernel=5))
def test_grid_shapes_meet_size_conditions(x):
    q, k, v, _ = x
    assert len(x.case.grid) == 2 and min(x.case.grid) >= 5  # every axis holds the 5-wide neighborhood
    assert q.shape[2:4] == x.case.grid and k.shape[2:4] == x.case.grid


def test_document_causal_draws_edge_values():
    seen = set()

    @settings(max_examples=60, deadline=None)
    @given(x=at.inputs(DOC, space=SMALL))
    def collect(x):
        assert x.case.Lq <= x.case.Lk  # doc[q] needs Lq <= Lk; other shapes are refused by the kernel
        seen.add(dict(x.case.modes).get("doc", "segments"))

    collect()
    assert {"padding", "singletons"} <= seen


def test_attncc_kernel_passes_few_examples():
    kern = attncc.compile(WINDOW, window=8)
    tiny = at.Space(max_len=20, head_dims=(16,), max_batch=1, max_kv_heads=2, max_group=2)
    rep = at.check(kern, WINDOW, return_lse=True, max_examples=3, seed=0, space=tiny, window=8)
    assert rep.examples == 3


def test_attncc_kernel_alibi_fp16_gradient_within_the_delta_allowance(monkeypatch):
    """A case shrunk by `attncc test patterns/alibi.attn --grads`: in fp16, FlashAttention-2's
    delta = rowsum(dO * O) from the rounded O moves the slope gradient by 0.08 (2%), which
    the (kv - q) factor amplifies. The allowance that models it accepts the kernel; without
    it the same comparison fails."""
    path = attncc.pattern_path("alibi")
    x = at.build(path, at.Case(B=1, H=1, Hkv=1, Lq=30, Lk=2, D=8, Dv=8, dtype="float16", seed=0))
    kern = attncc.compile(path)
    at.compare(kern, x, grads=True)
    monkeypatch.setattr(at, "DELTA_SLACK", 0.0)
    with pytest.raises(AssertionError, match="grad of slope differs"):
        at.compare(kern, x, grads=True)


def test_cli_test_command(tmp_path, capsys):
    mod = tmp_path / "my_attn.py"
    mod.write_text("import torch.nn.functional as F\n"
                   "def causal(q, k, v):\n"
                   "    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)\n")
    assert main(["test", str(CAUSAL), "--against", f"{mod}:causal", "--examples", "10", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS causal: 10 examples") and len(out.strip().splitlines()) == 1
    assert main(["test", str(WINDOW), "--param", "window=8", "--against", f"{mod}:causal", "--examples", "60",
                 "--seed", "0"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL sliding_window") and "worst: out[" in out and "attncc.testing.build(" in out
    assert main(["test", str(CAUSAL), "--examples", "2", "--seed", "0"]) == 0  # attncc's own kernel
    assert capsys.readouterr().out.startswith("PASS causal: 2 examples")
    assert main(["test", str(CAUSAL), "--against", "no_such_module_xyz:f"]) == 1
    assert "cannot import module" in capsys.readouterr().err


def test_readme_example_runs():
    """The README's attncc.testing section: its first Python example runs as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Test your own attention code", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.+?)\n```", section, re.S)[0]
    env = {}
    exec(compile(code, "README.md", "exec"), env)
    assert env["report"].examples == 20
