"""ALiBi through ``torch.compile(backend="attncc")``: a hand-written BLOOM-style attention
whose bias is built in the graph from ``arange`` and learned per-head slopes, folded with
the causal mask by ``masked_fill`` (transformers' SDPA-path form). The graph pass recovers
it as the causal mask plus the score term ``slope0[h] * (kv - q)``: the kernel reads the
slopes (``float32[H]``, their gradient computed by the kernel's backward) instead of a
dense ``(B, H, Lq, Lk)`` bias, and skips the tiles above the diagonal.

Run: ``python examples/fx_alibi.py`` (CPU, a few seconds).
"""

import torch
import torch.nn.functional as F

import attncc.fx


class AlibiAttention(torch.nn.Module):
    """Causal self-attention with ALiBi (Press et al. 2022); the slopes are trainable."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.slopes = torch.nn.Parameter(torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)]))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        i = torch.arange(L)
        bias = self.slopes[:, None, None] * (i[None, :] - i[:, None])       # (H, L, L)
        bias = bias.masked_fill(i[None, :] > i[:, None], torch.finfo(x.dtype).min)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(o.transpose(1, 2).reshape(B, L, -1))


def main():
    """Compile, print the report and the spec, return the max differences vs eager
    (output, slopes gradient)."""
    torch.manual_seed(0)
    model = AlibiAttention(dim=32, heads=4)
    x = torch.randn(2, 40, 32)
    attncc.fx.clear_reports()
    out = torch.compile(model, backend=attncc.fx.make_backend("eager"), fullgraph=True)(x)
    site = attncc.fx.reports()[-1].sites[0]
    print(attncc.fx.reports()[-1])
    print(site.spec)
    ref = model(x)
    g = torch.randn_like(out)
    got, want = (torch.autograd.grad(y, model.slopes, g)[0] for y in (out, ref))
    errs = ((out - ref).abs().max().item(), (got - want).abs().max().item())
    print(f"max |attncc - eager| = {errs[0]:.2e} (output), {errs[1]:.2e} (slopes gradient)")
    return site, errs


if __name__ == "__main__":
    main()
