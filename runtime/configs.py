"""Launch configurations: the one used under the interpreter, and the candidates the
autotuner may try on a GPU, derived per kernel family, head dim and target by a rule.

The rule (checked for every library pattern by ``python benchmarks/aot_report.py``,
results in ``benchmarks/results/aot_sm90a.md`` / ``aot_sm80.md``; the CI gate
``tests/test_aot.py`` compiles a covering set of patterns at every candidate):

* forward: a 128-row query tile needs 8 warps once the head dim passes 64 (at 4 warps each
  thread holds 128 rows x D / 128 threads of the fp32 accumulator plus the q tile and
  spills, as a plain FlashAttention-2 forward does); 64-row tiles keep 4 warps. Key tiles
  of 128 only at head dims <= 64; head dims above 128 use 64-row tiles at 8 warps. sm_80 has 164 KiB
  of shared memory per block (sm_90a 227 KiB): 2 stages at D > 64.
* backward (dQ and dK/dV): the dK/dV program keeps two fp32 accumulators (dK, dV) and the
  K / V tile of its key tile; its query tiles are walked in chunks of :func:`dkdv_rows`
  rows. sm_90a: 128 x 64 (2 stages) then 64 x 64 (1 stage: at 2 stages ``alibi``'s dQ spilled 48 B) tiles at 8 warps (wgmma in dQ and dK/dV needs 64
  rows per warpgroup); sm_80 (mma.sync: accumulators in registers): 64 x 64 at 8 warps
  without pipelining (2 stages spill in the sigmoid dQ), then 64 x 32 at 4. The first backward candidate is the one box plans train at.

* forward, tensor descriptors (:func:`tma_candidates`, sm_90a, 64 < D <= 128, where the
  installed Triton has them): ``128x64:8:3:tma`` and ``64x64:4:3:tma`` after the plain
  candidates. Measured at D = 128 bf16 for every library pattern (27, closed forms, block
  tables and box plans; ``benchmarks/results/aot_sm90a_tma.md``): 0 spill bytes, wgmma and TMA
  loads (``UTMALDG``) at both; registers 137-190 at 128x64:8:3:tma (plain 163-245; median -24)
  and 138-214 at 64x64:4:3:tma (plain 155-255; median -25), SASS -8..+304 / -536..+104
  instructions (head dims 65-127 pad to the same 128-wide tiles). Not measured, so no TMA
  candidates: head dims <= 64 or > 128; sm_80 has no TMA. Inputs TMA cannot read (strides or
  base pointers not 16-byte aligned, last stride not 1) run the plain loads at the same tiles
  (checked on the host per launch) and the autotuner does not time the ``tma`` candidates.
  Warp specialisation (``ws``: ``tl.range(..., warp_specialize=True)`` on the key-tile loops)
  is no candidate: with Triton 3.9 at 8 warps the pass leaves the kernel unchanged (no
  ``ttg.warp_specialize`` in the TTGIR, the same registers and SASS as without; causal
  128x64:8:3 174, :tma 150), and at 4 warps it fails in ``NVGPUWarpSpecialization``
  ("PassManager::run failed": 64x64:4:3 with plain loads "unsupported load type for
  producer commit", 64x64:4:3:tma and 128x64:4:2:tma an MLIR assertion), for causal.

At run time the autotuner also drops a candidate whose compiled kernel spills on the
device (``n_spills > 0``), so a pattern whose extra state makes a config spill never runs
it; ``attncc explain --target`` lists such configs. Measured at D = 128 bf16 (every library
pattern): the forward is spill-free at every candidate on sm_90a and sm_80; the backward's
first candidate is spill-free on sm_90a and sm_80; on sm_90a the second too (every library
pattern, every kernel: 0 spill bytes); on sm_80 the second (64 x 32 at 4 warps, 2 stages) is
dropped for four windowed / soft-capped patterns (dQ, 8-16 B). Tried instead on sm_80: 64 x 32
at 8 warps / 2 stages (dQ spills in ``criss_cross``, ``sigmoid_attention``) and at 4 warps / 1
stage (``lowrank_bias``, ``query_temperature``): each fixes some patterns and breaks others; a
per-kernel (dQ vs dK/dV) config would, and is not done yet.

Not yet spill-free (spot checks, see the issue note): the backward on sm_80 at head dim 64
(dK/dV 8-32 B at every candidate tried), the backward at head dim 256 (dQ
spills 72-300 B at every config tried, 4 to 16 warps) and fp32 inputs (exact fp32
``tl.dot`` without tensor cores). The forward at head dim 256
is spill-free at both candidates (spot check of the heaviest patterns on sm_90a).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """One launch configuration: tile sizes (tokens), warps and pipeline stages; for the
    forward kernel also ``tma`` (Q, K and V loaded through tensor descriptors: TMA on
    sm_90a) and ``ws`` (warp-specialised key-tile loops), see :func:`tma_supported`."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False
    ws: bool = False

    def __str__(self) -> str:
        flags = (":tma" if self.tma else "") + (":ws" if self.ws else "")
        return f"{self.block_m}x{self.block_n}:{self.num_warps}:{self.num_stages}{flags}"

    @classmethod
    def parse(cls, text: str) -> "Config":
        """``"BMxBN:warps:stages[:tma][:ws]"`` (e.g. ``128x64:8:3``, ``128x64:8:3:tma``) -> :class:`Config`.

        Raises:
            ValueError: malformed text, an unknown or repeated flag, or tile sizes that are
                not powers of two >= 16.
        """
        try:
            tiles, warps, stages, *flags = text.split(":")
            bm, bn = (int(x) for x in tiles.lower().split("x"))
            if any(f not in ("tma", "ws") for f in flags) or len(set(flags)) != len(flags):
                raise ValueError
            cfg = cls(bm, bn, int(warps), int(stages), tma="tma" in flags, ws="ws" in flags)
        except ValueError:
            raise ValueError(f"bad launch config {text!r}: expected BMxBN:warps:stages[:tma][:ws], "
                             "e.g. 128x64:8:3 or 128x64:8:3:tma") from None
        for name, val in (("BM", bm), ("BN", bn)):
            if val < 16 or val & (val - 1):
                raise ValueError(f"bad launch config {text!r}: {name} must be a power of two >= 16")
        if cfg.num_warps not in (1, 2, 4, 8, 16) or cfg.num_stages < 1:
            raise ValueError(f"bad launch config {text!r}: warps in 1, 2, 4, 8, 16 and stages >= 1")
        return cfg


#: the one config used under the Triton interpreter (CPU)
CPU_CONFIG = Config(32, 32, 1, 1)


def dtype_name(dtype) -> str:
    """``torch.float32`` / ``"float32"`` / ``"fp32"`` -> ``"fp32"`` (likewise ``"fp16"``,
    ``"bf16"``); None -> ``"bf16"``. Candidates differ between fp32 (exact fp32 products,
    no tensor cores) and the 16-bit dtypes (tensor cores), not between fp16 and bf16.

    Raises:
        ValueError: an unknown dtype.
    """
    name = str(dtype if dtype is not None else "bf16").replace("torch.", "")
    out = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16", "half": "fp16",
           "bfloat16": "bf16", "bf16": "bf16"}.get(name)
    if out is None:
        raise ValueError(f"no launch configs for dtype {dtype!r} (float32, float16 or bfloat16)")
    return out


def forward_candidates(head_dim: int, arch: int = 90, dtype=None) -> tuple[Config, ...]:
    """The forward configs the autotuner may try for head dim ``head_dim`` (padded to a
    power of two by the kernel) on compute capability ``arch`` (80: Ampere, 90: Hopper)
    for inputs of ``dtype`` (default bf16; see :func:`dtype_name`), fastest-first by
    expectation (the first is used when timing is not possible); for fp16 / bf16 then the
    :func:`tma_candidates` (the runtime skips those for inputs TMA cannot read)."""
    if dtype_name(dtype) == "fp32":
        return _forward_rule(head_dim, arch, dtype)
    base = _forward_rule(head_dim, arch, dtype)
    return base + tuple(c for c in tma_candidates(head_dim, arch) if c not in base)


def _forward_rule(head_dim: int, arch: int, dtype) -> tuple[Config, ...]:
    """The plain (pointer-load) forward candidates of :func:`forward_candidates`."""
    if dtype_name(dtype) == "fp32":
        # exact fp32 products (FMA): the q tile and both operands of each product live in
        # registers; 32 x 16 and 16 x 16 tiles at 4 warps are the spill-free ones at D = 128
        # (32 x 32 at 4 or 8 warps and 16 x 32 spill 200-500 B in gated_causal / lowrank_bias)
        return (Config(32, 16, 4, 2), Config(16, 16, 4, 2))
    stages = 3 if arch >= 90 or head_dim <= 64 else 2
    if head_dim <= 64:
        if arch < 90:  # 128x128 tiles exceed sm_80's shared memory; 128-row tiles spill at 4 warps
            return (Config(128, 64, 8, 2), Config(64, 64, 4, 3), Config(128, 32, 4, 3))
        return (Config(128, 64, 4, stages), Config(128, 128, 8, stages), Config(64, 64, 4, stages),
                Config(128, 32, 4, stages))
    if head_dim <= 128:
        return (Config(128, 64, 8, stages), Config(64, 64, 4, stages), Config(128, 32, 8, stages),
                Config(64, 32, 4, stages))
    return (Config(64, 64, 8, 2), Config(64, 32, 8, 2))  # 4 warps spill at D = 256 (gated: 680-768 B)


@functools.lru_cache(maxsize=None)
def tma_supported() -> bool:
    """Whether the installed Triton has device-side tensor descriptors
    (``tl.make_tensor_descriptor``) and ``triton.set_allocator`` for their global scratch
    (Triton >= 3.4): without them there are no ``tma`` candidates."""
    import triton
    import triton.language as tl

    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


@functools.lru_cache(maxsize=None)
def ws_supported() -> bool:
    """Whether the installed Triton's ``tl.range`` takes ``warp_specialize`` (Triton >= 3.4)."""
    import triton.language as tl

    try:
        return "warp_specialize" in inspect.signature(tl.range).parameters
    except (TypeError, ValueError):
        return False


#: forward candidates added on arch >= 90 when the installed Triton supports them: the head
#: dims ``(lo, hi]`` they were measured at (see the module docstring) and the configs
TMA_FORWARD = (((64, 128), (Config(128, 64, 8, 3, tma=True), Config(64, 64, 4, 3, tma=True))),)


def tma_candidates(head_dim: int, arch: int = 90) -> tuple[Config, ...]:
    """The tensor-descriptor (``tma``) / warp-specialised (``ws``) forward configs for head
    dim ``head_dim`` on compute capability ``arch``: none below 90, outside the head dims of
    :data:`TMA_FORWARD` or where the installed Triton lacks the feature (see
    :func:`tma_supported`, :func:`ws_supported`)."""
    if arch < 90:
        return ()
    cfgs = next((c for (lo, hi), c in TMA_FORWARD if lo < head_dim <= hi), ())
    return tuple(c for c in cfgs if (not c.tma or tma_supported()) and (not c.ws or ws_supported()))


def backward_candidates(head_dim: int, arch: int = 90, dtype=None) -> tuple[Config, ...]:
    """The backward (dQ, dK/dV) configs the autotuner may try; see the module docstring.
    Box plans train at the tiles of the first one."""
    if dtype_name(dtype) == "fp32":
        return (Config(16, 16, 4, 1), Config(16, 16, 4, 2))
    if head_dim <= 64:
        if arch < 90:  # 64 x 64 tiles' dK/dV spilled 8-32 B here at 4 and 8 warps (even with the
            # register cap: the dK, dV accumulators and two 64-row chunks at mma.sync)
            return (Config(64, 32, 4, 2), Config(32, 32, 4, 2))
        return (Config(128, 64, 8, 2), Config(64, 64, 4, 2), Config(64, 64, 8, 2))
    if head_dim <= 128:
        if arch < 90:  # mma.sync keeps every accumulator in registers: 64-row tiles, 1 stage;
            # then 32 x 32 (64 x 32 at 4 warps spilled 8 B in lowrank_bias's dQ)
            return (Config(64, 64, 8, 1), Config(32, 32, 4, 2))
        return (Config(128, 64, 8, 2), Config(64, 64, 8, 1))
    # head dims above 128: wgmma's 64-row tiles spill (sm_90a bf16 D = 256: dQ 112-408 B at
    # 64x64 / 64x32 tiles, dK/dV 56-112 B at 64x64); 32-row tiles at 8 warps do not (mma.sync)
    return (Config(32, 32, 8, 1), Config(32, 16, 8, 1))


def register_cap(num_warps: int) -> int:
    """``maxnreg`` of the backward's dQ and dK/dV kernels: the register file of one SM
    (65,536 32-bit registers on sm_80 and sm_90) divided among the CTA's threads, at most 255.

    Without an explicit cap ptxas may trade a few spilled bytes for a second CTA per SM
    (measured, sm_80 bf16 D = 128: ``neighborhood_2d_rpb``'s dQ at 32x32:8:1 compiled to 128
    registers and 16 B of spills; with ``maxnreg=255``: 172 registers, no spill). The cap
    says that a CTA may use the whole register file, so those kernels never spill to raise
    occupancy. The fp32 forward takes the cap too (at D = 256 ``neighborhood_2d_rpb``'s
    16 x 16 tiles compiled to 128 registers and 8 B of spills without it); the fp16 / bf16
    forward keeps ptxas' default (spill-free at every candidate, and fewer registers than
    with the cap: causal 174 vs 206 at 128x64:8:3 on sm_90a)."""
    return min(255, 65536 // (32 * num_warps))


def dkdv_rows(cfg: Config, extra_state: bool = False) -> int:
    """Query rows the dK/dV kernel processes at a time within a query tile of
    ``cfg.block_m`` rows: 32 (the score, dP and dS chunks are what is live next to
    the dK / dV accumulators and the K / V tile), 16 for kernels with extra per-tile state
    (box plans' per-axis indices, dot() factors), which spill at 32 rows (measured at
    D = 128 on sm_90a: ``neighborhood_2d_rpb`` 8 B at 128x64:8:2, ``lowrank_bias`` 8 B at
    64x64:8:2; 0 at 16 rows)."""
    return min(cfg.block_m, 16 if extra_state else 32)
