"""Gated attention, a learned sink, sigmoid attention and a folded low-rank bias: compile
each, train one step's gradients, and compare with the unfused torch composition.

These are the variants FlexAttention cannot fuse (an output gate, a sink in the
denominator, sigmoid normalization, a low-rank bias read without an Lq x Lk tensor).

Run: python examples/beyond_score_mod.py   (CPU: kernels run under the Triton interpreter)
"""

import math

import torch
import torch.nn.functional as F

import attncc

SPEC = '''
pattern gated_causal:
    """Gated attention (Qiu et al. 2025): head-specific sigmoid gate after SDPA."""
    tensor g: float32[B, Lq, H, Dv]
    mask: kv <= q
    gate: sigmoid(g[b, q, h, dv])

pattern sink_window:
    """Sliding window with a learned sink logit per head (gpt-oss)."""
    tensor sink: float32[H]
    param window: int = 32
    mask: kv <= q and q - kv < window
    sink: sink[h]

pattern sigmoid_attention:
    """Sigmoid attention (Ramapuram et al. 2024), b = -log(n)."""
    normalize: sigmoid
    score: s - log(Lk)

pattern lowrank_bias:
    """FlashBias: a rank-R bias U W^T folded into QK^T (R is read from U and W)."""
    tensor U: float32[B, H, Lq, R]
    tensor W: float32[B, H, Lk, R]
    score: s + dot(U[b, h, q], W[b, h, kv])
'''


def compositions(B, H, L, D):
    """pattern -> (its tensors, the unfused torch version)."""
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    causal = j <= i
    g, sink = torch.randn(B, L, H, D), torch.randn(H)
    U, W = torch.randn(B, H, L, 8) * 0.3, torch.randn(B, H, L, 8) * 0.3

    def sink_ref(q, k, v, sink):
        sc = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~(causal & (i - j < 32)), -math.inf)
        sc = torch.cat([sc, sink.view(1, H, 1, 1).expand(B, H, L, 1)], -1)
        return torch.softmax(sc, -1)[..., :-1] @ v

    return {
        "gated_causal": ({"g": g}, lambda q, k, v, g: F.scaled_dot_product_attention(q, k, v, is_causal=True)
                         * torch.sigmoid(g.transpose(1, 2))),
        "sink_window": ({"sink": sink}, sink_ref),
        "sigmoid_attention": ({}, lambda q, k, v: torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(D)
                                                                - math.log(L)) @ v),
        "lowrank_bias": ({"U": U, "W": W}, lambda q, k, v, U, W: F.scaled_dot_product_attention(
            q, k, v, attn_mask=U @ W.transpose(-1, -2))),
    }


def main() -> dict:
    """Print and return ``{pattern: (max output error, max gradient error)}`` vs torch."""
    torch.manual_seed(0)
    errors = {}
    B, H, L, D = 1, 2, 96, 32
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    for name, (tensors, torch_version) in compositions(B, H, L, D).items():
        kern = attncc.compile(SPEC, pattern=name)
        ours = [x.clone().requires_grad_() for x in (q, k, v, *tensors.values())]
        theirs = [x.clone().requires_grad_() for x in (q, k, v, *tensors.values())]
        out = kern(*ours[:3], **dict(zip(tensors, ours[3:])))
        ref = torch_version(*theirs)
        out.square().sum().backward()
        ref.square().sum().backward()
        grad_err = max((a.grad - b.grad).abs().max().item() for a, b in zip(ours, theirs))
        errors[name] = ((out - ref).abs().max().item(), grad_err)
        print(f"{name:18s} max |out - torch| = {(out - ref).abs().max().item():.2e}   "
              f"max |grad - torch grad| over q, k, v, {', '.join(tensors) or '-'} = {grad_err:.2e}")
    return errors


if __name__ == "__main__":
    main()
