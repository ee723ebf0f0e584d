"""Block-sparse and token-sparse attention against the pure-torch references of the
``fla-core`` package (flash-linear-attention, an independent implementation; a test
dependency): NSA's selected-block attention (``naive_nsa_selection``: per query token, S key
blocks of ``block_size`` tokens, causal inside) is ``kern(q, k, v, block_mask=...)`` of the
causal pattern with blocks of (1, block_size) and one list per KV head; DeepSeek sparse
attention (``naive_dsa`` with given indices) is ``kern(q, k, v, kv_index=...)``."""

from __future__ import annotations

import warnings

import pytest
import torch

import attncc

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fla.ops.dsa.naive import naive_dsa
    from fla.ops.nsa.naive import naive_nsa_selection

CAUSAL = attncc.pattern_path("causal")


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_block_mask_matches_fla_nsa_selection(backend):
    g = torch.Generator().manual_seed(0)
    B, T, Hq, Hkv, D, BS, S = 1, 96, 4, 2, 16, 16, 3
    nk = T // BS
    q = torch.randn(B, T, Hq, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    # per token and KV head: its own block and S - 1 other distinct blocks (some in the future)
    own = (torch.arange(T) // BS)[None, :, None, None].expand(B, T, Hkv, 1)
    other = torch.stack([torch.randperm(nk - 1, generator=g)[:S - 1] for _ in range(B * T * Hkv)]).view(B, T, Hkv, S - 1)
    other = other + (other >= own).long()  # skip the own block: duplicate-free
    idx = torch.cat([own, other], -1)
    want = naive_nsa_selection(q, k, v, idx, block_size=BS)
    bs = attncc.BlockSparse(torch.full((B, Hkv, T), S, dtype=torch.int32),
                            idx.permute(0, 2, 1, 3).to(torch.int32).contiguous(), (1, BS))
    kern = attncc.compile(CAUSAL, backend=backend)
    got = kern(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bs).transpose(1, 2)
    assert (got - want).abs().max() < 2e-5


def test_kv_index_matches_fla_dsa():
    g = torch.Generator().manual_seed(1)
    B, T, Hq, Hkv, D, topk = 1, 64, 4, 2, 16, 12
    q = torch.randn(B, T, Hq, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    # causal keys, distinct per row, padded with -1 (DSA's convention)
    idx = torch.full((B, T, topk), -1, dtype=torch.long)
    for t in range(T):
        sel = torch.randperm(t + 1, generator=g)[:topk]
        idx[0, t, :sel.numel()] = sel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = naive_dsa(q, k, v, q_idx=torch.zeros(B, T, 1, 4), k_idx=torch.zeros(B, T, 4), indices=idx, topk=topk)
    got = attncc.compile(CAUSAL)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 kv_index=idx[:, :, None, :].expand(B, T, Hkv, topk)).transpose(1, 2)
    assert (got - want).abs().max() < 2e-5
