"""Swin through ``torch.compile(backend="attncc")``: transformers' ``SwinModel`` builds its
window attention by hand (windows folded into the batch, ``torch.roll`` for the shifted
layers). Its relative-position bias is gathered from a ``(T, H)`` table by an index buffer
(``table[index].view(N, N, -1).permute(2, 0, 1)``) and the shifted layers add a ``0 / -100``
mask between the cyclic-shift regions of each window. The graph pass recovers both: the
kernel reads ``table0[index0[N*q + kv], h]`` (the table gets its gradient from the kernel's
backward) and computes the region mask in closed form from the graph's small region map
(the window of a folded batch index ``b`` is ``b mod nW``), so no ``(B * nW, H, N, N)`` bias
tensor is built.

Run: ``python examples/fx_swin.py`` (CPU, well under a minute).
"""

import torch

import attncc.fx


def tiny_swin():
    """A random-weight SwinModel: 8x8 patches, 4x4 windows (N = 16), 2 stages; the bias
    tables drawn at std 1 (their initialisation is zero) so a misread bias shows."""
    from transformers import SwinConfig, SwinModel

    cfg = SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                     window_size=4, drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = SwinModel._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0.0, 1.0)
    return model


def main():
    """Compile, print the site reports and one spec, return ``(sites, (output error,
    largest parameter-gradient error, largest bias-table-gradient error))`` vs eager."""
    model = tiny_swin()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    attncc.fx.clear_reports()
    out = torch.compile(model, backend=attncc.fx.make_backend("eager"))(pixel_values=x).last_hidden_state
    sites = [s for r in attncc.fx.reports() for s in r.sites]
    for s in sites:
        print(s.line())
    shifted = [s for s in sites if "region_mask" in s.pattern]
    print((shifted or sites)[0].spec)
    ref = model(pixel_values=x).last_hidden_state
    g = torch.randn_like(out)
    names, params = zip(*model.named_parameters())
    got, want = (torch.autograd.grad(y, params, g, allow_unused=True) for y in (out, ref))
    diffs = {n: (a - b).abs().max().item() for n, a, b in zip(names, got, want) if b is not None}
    tables = [d for n, d in diffs.items() if "relative_position_bias_table" in n]
    errs = ((out - ref).abs().max().item(), max(diffs.values()), max(tables))
    print(f"max |attncc - eager| = {errs[0]:.2e} (output), {errs[1]:.2e} (gradients of {len(diffs)} parameters), "
          f"{errs[2]:.2e} (bias tables' gradients)")
    return sites, errs


if __name__ == "__main__":
    main()
