"""Padding masks through ``torch.compile(backend="attncc")``: a key-validity
``attention_mask`` (B, Lk) broadcast to (B, 1, 1, Lk) and combined with a causal mask
is recovered as a per-batch read ``pad0[b, kv]`` in the kernel's mask, instead of a dense
(B, 1, Lq, Lk) bool tensor; the kernel's tile table skips the padded key tiles.

Run: ``python examples/fx_padding.py`` (CPU, a few seconds under the Triton interpreter).
"""

import torch
import torch.nn.functional as F

import attncc.fx


def attention(q, k, v, attention_mask):
    """Causal self-attention with key padding, as decoder code writes it by hand."""
    keep = attention_mask[:, None, None, :].to(torch.bool)
    i, j = torch.arange(q.shape[2]), torch.arange(k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep & (j[None, :] <= i[:, None]))


def main():
    torch.manual_seed(0)
    B, H, L, D = 2, 2, 48, 16
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 20:] = 0  # sequence 1 is padded after 20 tokens
    attncc.fx.clear_reports()
    out = torch.compile(attention, backend=attncc.fx.make_backend("eager"), fullgraph=True)(q, k, v, am)
    rep = attncc.fx.reports()[-1]
    print(rep)
    print(rep.sites[0].spec)
    ref = attention(q, k, v, am)
    print(f"max |attncc - eager SDPA| = {(out - ref).abs().max().item():.2e}")
    print(f"mask bytes read by the kernel: {B * L * 4} (int32 [B, Lk]) instead of {B * L * L} (bool [B, 1, Lq, Lk])")


if __name__ == "__main__":
    main()
