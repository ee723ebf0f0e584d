"""T5 through ``torch.compile(backend="attncc")``: transformers' T5 adds a bucketed
relative-position bias, ``embedding(relative_position_bucket(kv - q)).permute([2, 0, 1])``,
to unscaled scores (and the decoder a causal mask). The graph pass checks symbolically that
the bucket index is a function of ``kv - q`` alone and turns the bias into a table read
``table0[bucket0[kv - q + Lq - 1], h]``: the kernel reads the ``(num_buckets, H)`` table and a
vector of ``Lq + Lk - 1`` bucket ids instead of a dense ``(1, H, Lq, Lk)`` bias, and the
table's gradient comes from the kernel's backward.

Run: ``python examples/fx_t5.py`` (CPU, well under a minute).
"""

import torch

import attncc.fx


def tiny_t5():
    """A random-weight T5ForConditionalGeneration (1 encoder + 1 decoder layer, 2 heads,
    8 buckets); the bias tables drawn at std 1 so a misread bias shows."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
    return model


def main():
    """Compile, print the site reports and the encoder's spec, return ``(sites, (logits
    error, largest parameter-gradient error, largest bias-table-gradient error))`` vs eager."""
    model = tiny_t5()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 12), generator=g)
    dec = torch.randint(3, 64, (2, 7), generator=g)
    attncc.fx.clear_reports()
    out = torch.compile(model, backend=attncc.fx.make_backend("eager"))(input_ids=ids, decoder_input_ids=dec).logits
    sites = [s for r in attncc.fx.reports() for s in r.sites]
    for s in sites:
        print(s.line())
    print(sites[0].spec)
    ref = model(input_ids=ids, decoder_input_ids=dec).logits
    gr = torch.randn_like(out)
    names, params = zip(*model.named_parameters())
    got, want = (torch.autograd.grad(y, params, gr, allow_unused=True) for y in (out, ref))
    diffs = {n: (a - b).abs().max().item() for n, a, b in zip(names, got, want) if b is not None}
    tables = [d for n, d in diffs.items() if "relative_attention_bias" in n]
    errs = ((out - ref).abs().max().item(), max(diffs.values()), max(tables))
    print(f"max |attncc - eager| = {errs[0]:.2e} (logits), {errs[1]:.2e} (gradients of {len(diffs)} parameters), "
          f"{errs[2]:.2e} (bias tables' gradients)")
    return sites, errs


if __name__ == "__main__":
    main()
