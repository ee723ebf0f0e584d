"""Launch configurations: the one used under the interpreter, and the candidates the
autotuner may try on a GPU, derived per kernel family, dtype, head dim and target by a rule.

The rule is checked for every library pattern by ``python benchmarks/aot_sweep.py`` (every
dtype, head dims 64 / 128 / 256, sm_90a and sm_80: ``benchmarks/results/aot_sweep.md``) and
``python benchmarks/aot_report.py`` (bf16 D = 128 next to a plain FlashAttention-2:
``aot_sm90a.md`` / ``aot_sm80.md``); the CI gate ``tests/test_aot.py`` compiles a covering set
of patterns at every candidate. Numbers below: spill bytes measured with those tools on the
heaviest patterns (``gated_causal``, ``neighborhood_2d_rpb``, ``lowrank_bias``, ``alibi``,
``softcap``, ``sigmoid_attention``, ``sliding_window``, ``query_temperature``, ``criss_cross``,
``sink_window``) while choosing.

* forward, fp16 / bf16: a 128-row query tile needs 8 warps (at 4 warps each thread holds
  128 rows x D / 128 threads of the fp32 accumulator plus the q tile and spills, as a plain
  FlashAttention-2 forward does at D = 128; at D = 64 ``neighborhood_2d_rpb`` / ``prefix_lm``
  spilled 72-336 B); 64-row tiles keep 4 warps. Head dims above 128 use 64-row tiles at 8
  warps.
  sm_80 has 164 KiB of shared memory per block (sm_90a 227 KiB): 2 stages at D > 64.
* forward, tensor descriptors (:func:`tma_candidates`, sm_90a, 64 < D <= 128, where the
  installed Triton has them): ``128x64:8:3:tma`` and ``64x64:4:3:tma`` after the plain
  candidates. Measured at D = 128 bf16 for every library pattern (27, closed forms, block
  tables and box plans; ``benchmarks/results/aot_sm90a_tma.md``): 0 spill bytes, wgmma and TMA
  loads (``UTMALDG``) at both; registers 137-190 at 128x64:8:3:tma (plain 163-245; median -24)
  and 138-214 at 64x64:4:3:tma (plain 155-255; median -25), SASS -8..+304 / -536..+104
  instructions (head dims 65-127 pad to the same 128-wide tiles). Not measured, so no TMA
  candidates: head dims <= 64 or > 128, fp32; sm_80 has no TMA. Inputs TMA cannot read
  (strides or base pointers not 16-byte aligned, last stride not 1) run the plain loads at
  the same tiles (checked on the host per launch) and the autotuner does not time the
  ``tma`` candidates. Warp specialisation (``ws``: ``tl.range(..., warp_specialize=True)`` on
  the key-tile loops) is no candidate: with Triton 3.9 at 8 warps the pass leaves the kernel
  unchanged (no ``ttg.warp_specialize`` in the TTGIR, the same registers and SASS as
  without; causal 128x64:8:3 174, :tma 150), and at 4 warps it fails in
  ``NVGPUWarpSpecialization`` ("PassManager::run failed": 64x64:4:3 with plain loads
  "unsupported load type for producer commit", 64x64:4:3:tma and 128x64:4:2:tma an MLIR
  assertion), for causal.
* backward (dQ and dK/dV), fp16 / bf16: the dK/dV program keeps two fp32 accumulators (dK,
  dV) and the K / V tile of its key tile; its query tiles are walked in chunks of
  :func:`dkdv_rows` rows. Both kernels launch with :func:`register_cap` (ptxas otherwise
  traded 8-32 B of spills for a second CTA per SM). sm_90a, D <= 64: 128 x 64 then 64 x 64
  at 8 warps, 2 stages (64 x 64 at 4 warps spilled 8-16 B in ``relative_position_bias`` /
  ``query_temperature``'s dK/dV); 64 < D <= 128: 128 x 64 at 8 warps
  without pipelining (wgmma in dQ and in dK/dV, whose GEMMs have M = the key tile: 64 rows
  per warpgroup), then 128 x 32 at 2 stages (wgmma in dQ, mma.sync in dK/dV). With 2
  stages 128 x 64 spilled in the dQ of the patterns with per-query and per-key score
  tensors (``query_temperature`` 16-32 B, ``neighborhood_2d_rpb`` 40-72 B) and 64 x 64 at 1
  stage in ``query_temperature``'s (48-64 B). sm_80 (mma.sync: every accumulator in registers):
  D <= 64 64 x 32 at 4 warps then 32 x 32 (64 x 64 tiles' dK/dV spilled 8-32 B at 4 and 8
  warps); 64 < D <= 128 64 x 32 at 8 warps without pipelining (64 x 64 spilled 8 B in
  ``neighborhood_2d_rpb``'s dQ), then 32 x 32 at 4 warps (64 x 32 at 4 warps spilled 8 B in
  ``lowrank_bias``'s dQ). D > 128 (both targets): 32 x 32 then 32 x 16 at 8 warps,
  mma.sync (wgmma's 64-row tiles spill at D = 256 on sm_90a: dQ 112-408 B at 64 x 64 / 64 x 32,
  dK/dV 56-112 B at 64 x 64). The first backward candidate is the one box plans train at.
* fp32 (exact fp32 products, ``input_precision="ieee"``, torch's default fp32 matmul
  precision; no tensor cores, every operand of a product in registers): forward 32 x 16 at
  8 warps then 16 x 16 at 4 (32 x 32 at 4 or 8 warps and 16 x 32 spilled 200-500 B in
  ``gated_causal`` / ``lowrank_bias`` at D = 128; 32 x 16 at 4 warps 248 B in
  ``global_sliding_window`` on sm_80), backward 16 x 16 at 4 then 8 warps, 1
  stage (32 x 16 spilled 16-352 B; 2 stages 272 B in ``document_causal``'s dK/dV), every
  fp32 kernel with :func:`register_cap`.

At run time the autotuner also drops a candidate whose compiled kernel spills on the device
(``n_spills > 0``) before timing it, and ``attncc explain --target`` lists such configs; the
sweep shows which (if any) library pattern still needs that.
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
        # registers; 32 x 16 at 8 warps and 16 x 16 at 4 are spill-free (32 x 32 at 4 or 8 warps
        # and 16 x 32 spilled 200-500 B in gated_causal / lowrank_bias at D = 128, 32 x 16 at 4
        # warps 248 B in global_sliding_window on sm_80)
        return (Config(32, 16, 8, 2), Config(16, 16, 4, 2))
    stages = 3 if arch >= 90 or head_dim <= 64 else 2
    if head_dim <= 64:
        if arch < 90:  # 128x128 tiles exceed sm_80's shared memory; 128-row tiles spill at 4 warps
            # (128 x 32: 24 B in lowrank_bias; at 8 warps still 8 B in softcap)
            return (Config(128, 64, 8, 2), Config(64, 64, 4, 3), Config(64, 32, 4, 3))
        # sm_90a: 128-row tiles at 8 warps here too (at 4 warps 128 x 64 spilled 72-336 B in
        # neighborhood_2d_rpb / prefix_lm; 128 x 128 exceeded shared memory with a table)
        return (Config(128, 64, 8, stages), Config(64, 64, 4, stages), Config(128, 32, 8, stages))
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
        return (Config(16, 16, 4, 1), Config(16, 16, 8, 1))  # 2 stages: document_causal's dK/dV 272 B
    if head_dim <= 64:
        if arch < 90:  # 64 x 64 tiles' dK/dV spilled 8-32 B here at 4 and 8 warps (even with the
            # register cap: the dK, dV accumulators and two 64-row chunks at mma.sync)
            return (Config(64, 32, 4, 2), Config(32, 32, 4, 2))
        # sm_90a: 8 warps (64 x 64 at 4 warps spilled 8-16 B in the dK/dV of
        # relative_position_bias / query_temperature)
        return (Config(128, 64, 8, 2), Config(64, 64, 8, 2))
    if head_dim <= 128:
        if arch < 90:  # mma.sync keeps every accumulator in registers: 64 x 32 at 8 warps, 1 stage
            # (64 x 64 spilled 8 B in neighborhood_2d_rpb's dQ), then 32 x 32 (64 x 32 at 4 warps
            # spilled 8 B in lowrank_bias's dQ)
            return (Config(64, 32, 8, 1), Config(32, 32, 4, 2))
        return (Config(128, 64, 8, 1), Config(128, 32, 8, 2))
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
