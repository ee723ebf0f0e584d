"""Compile two attention variants, run them, and check them against the dense reference.

Run: python examples/quickstart.py   (CPU: kernels run under the Triton interpreter)
"""

import torch

import attncc

SPEC = '''
pattern sliding_window_sinks:
    """Causal sliding window plus 4 sink tokens (StreamingLLM)."""
    param window: int = 64
    param sinks: int = 4
    mask: kv <= q and (kv < sinks or q - kv < window)

pattern packed_alibi:
    """Packed documents with an ALiBi penalty (Press et al.) inside each document."""
    tensor doc: int32[Lk]
    tensor slope: float32[H]
    mask: doc[q] == doc[kv] and kv <= q
    score: s + slope[h] * (kv - q)
'''


def main():
    torch.manual_seed(0)
    B, Hq, Hkv, L, D = 1, 4, 2, 256, 64
    q = torch.randn(B, Hq, L, D)
    k = torch.randn(B, Hkv, L, D)
    v = torch.randn(B, Hkv, L, D)

    kern = attncc.compile(SPEC, pattern="sliding_window_sinks")
    out = kern(q, k, v)
    ref = attncc.reference(SPEC, q, k, v, pattern="sliding_window_sinks")
    print("sliding_window_sinks: max |out - ref| =", (out - ref).abs().max().item())
    print("  tiles:", kern.tile_stats(L, L))
    print(" ", kern.plan.describe().splitlines()[0])

    doc = torch.repeat_interleave(torch.arange(4, dtype=torch.int32), L // 4)
    slope = 2.0 ** (-8.0 * torch.arange(1, Hq + 1) / Hq)   # ALiBi slopes
    kern = attncc.compile(SPEC, pattern="packed_alibi")
    out, lse = kern(q, k, v, return_lse=True, doc=doc, slope=slope)
    ref = attncc.reference(SPEC, q, k, v, pattern="packed_alibi", doc=doc, slope=slope)
    print("packed_alibi: max |out - ref| =", (out - ref).abs().max().item())
    print("  tiles:", kern.tile_stats(L, L, doc=doc))
    print(" ", kern.plan.describe().splitlines()[0])


if __name__ == "__main__":
    main()
