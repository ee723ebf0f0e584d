"""Ahead-of-time compilation of a pattern's kernels for GPU targets, on any machine.

For every kernel the runtime launches (forward ``attn_fwd``, backward preprocessing
``attn_bwd_pre``, ``attn_bwd_dq``, ``attn_bwd_dkdv`` and ``count_tiles``) and every launch
configuration the autotuner may try (:func:`attncc.runtime.configs.forward_candidates` /
``backward_candidates``), this module

1. runs the runtime's own call path on CPU tensors inside :func:`attncc.runtime.capture`,
   which records each :class:`~attncc.runtime.Launch` (grid, arguments, constexprs)
   instead of launching it: the signature is not kept anywhere by hand;
2. binds the arguments with Triton's own JIT binder for the target's backend, so the
   specialisation is the JIT's (integers equal to 1 become constants, 16-divisible
   integers and 16-aligned pointers get ``tt.divisibility``), and compiles them with
   ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` with default options;
3. reads the cubin with the ``cuobjdump`` Triton ships: registers, spill stack bytes,
   local stores (``STL``), SASS instruction count, ``HGMMA`` (wgmma, sm_90a) / ``HMMA``
   (mma) use; shared memory from the kernel's metadata, checked against the target.

Compilation runs in worker subprocesses with the interpreter off (``TRITON_INTERPRET=0``),
so it works from a process that runs kernels under the interpreter (the tests) and on a
machine without a GPU. ``triton.compile`` stores its artifacts in Triton's cache
(``TRITON_CACHE_DIR``): a cache filled here under the same Triton version is the cache the
JIT looks up on a GPU of that architecture, which is how a deployment ships kernels that
compile nothing at run time (see README, "Ahead-of-time compilation"). The resource
records are cached too (``<attncc cache>/aot/``, keyed by the compiled kernel's hash).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: target name -> (compute capability, shared memory per block in bytes: the opt-in maximum)
TARGETS = {
    "sm_80": (80, 166912),
    "sm_86": (86, 101376),
    "sm_89": (89, 101376),
    "sm_90a": (90, 232448),
    "sm_100a": (100, 232448),
}

#: the kernels of each family, as the runtime launches them ("decode": the split-KV decode
#: kernel and its merge, :mod:`attncc.runtime.decode`; not among the default families)
FAMILIES = {"fwd": ("attn_fwd",), "bwd": ("attn_bwd_pre", "attn_bwd_dq", "attn_bwd_dkdv"), "count": ("count_tiles",),
            "decode": ("attn_decode", "decode_merge")}

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

#: batch, query heads, kv heads and (1-D) length of the example call whose launches are compiled
EXAMPLE_SHAPE = {"B": 2, "H": 4, "Hkv": 2, "L": 1024}


def parse_targets(text: str) -> list[str]:
    """``"sm_80,sm_90a"`` -> ``["sm_80", "sm_90a"]``.

    Raises:
        ValueError: an unknown target (the message lists the known ones).
    """
    out = [t.strip() for t in text.split(",") if t.strip()]
    for t in out:
        if t not in TARGETS:
            raise ValueError(f"unknown target {t!r} (known: {', '.join(TARGETS)})")
    return out


def parse_dtypes(text: str) -> list[str]:
    """``"bf16,fp16"`` -> ``["bf16", "fp16"]``.

    Raises:
        ValueError: an unknown dtype name.
    """
    out = [t.strip() for t in text.split(",") if t.strip()]
    for t in out:
        if t not in DTYPES:
            raise ValueError(f"unknown dtype {t!r} (known: {', '.join(DTYPES)})")
    return out


@dataclass(frozen=True)
class Job:
    """One unit of AOT work: the kernels of one family of one pattern at one launch config.

    ``spec`` is a path or ``.attn`` text; ``config`` a ``BMxBN:warps:stages[:tma][:ws]`` string;
    ``positions``: ``""``, ``"offset"`` or ``"ragged"`` (the example call passes those position
    keywords, :func:`example_positions`, so the launches are the twin's,
    :meth:`~attncc.runtime.CompiledAttention.with_positions`)."""

    spec: str
    pattern: str | None
    params: tuple
    target: str
    dtype: str
    head_dim: int
    family: str
    config: str
    positions: str = ""

    def to_json(self) -> dict:
        return {**self.__dict__, "params": list(map(list, self.params))}


# ----------------------------------------------------------------------------- tools
def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def resource_usage(cubin: bytes) -> dict:
    """Resource figures of a cubin from ``cuobjdump``.

    Returns:
        ``{"registers", "spill_bytes" (STACK), "local_bytes", "static_shared_bytes",
        "sass_instructions", "local_stores" (STL), "local_loads" (LDL), "wgmma" (HGMMA
        present), "mma" (HMMA present), "tma_loads" (UTMALDG instructions)}``.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)

    def field(name):
        m = re.search(rf"\b{name}:(\d+)", res)
        return int(m.group(1)) if m else 0

    instrs = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass, flags=re.M)
    ops = [i.split()[0] if not i.startswith("@") else i.split()[1] for i in instrs if i.strip()]
    return {"registers": field("REG"), "spill_bytes": field("STACK"), "local_bytes": field("LOCAL"),
            "static_shared_bytes": field("SHARED"), "sass_instructions": len(ops),
            "local_stores": sum(o.startswith("STL") for o in ops), "local_loads": sum(o.startswith("LDL") for o in ops),
            "wgmma": any(o.startswith("HGMMA") for o in ops), "mma": any(o.startswith("HMMA") for o in ops),
            "tma_loads": sum(o.startswith("UTMALDG") for o in ops)}


def compile_launch(fn, launch, target: str):
    """Compile one launch of the ``@triton.jit`` function ``fn`` for ``target`` as the JIT would.

    Args:
        fn: a ``triton.runtime.jit.JITFunction`` (not an interpreted function).
        launch: a :class:`attncc.runtime.Launch` (its ``args`` / ``kwargs``).
        target: a key of :data:`TARGETS`.

    Returns:
        ``(CompiledKernel, seconds)``.
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    tgt = GPUTarget("cuda", TARGETS[target][0], 32)
    backend = make_backend(tgt)
    kwargs = dict(launch.kwargs)
    # the options JITFunction.run adds before binding (so the cache key is the JIT's)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=tgt, options=options.__dict__)
    return kernel, time.perf_counter() - t0


def jit_module(kern):
    """The generated module of ``kern`` loaded with real ``@triton.jit`` functions (needs
    ``TRITON_INTERPRET`` off in this process, as in the AOT workers).

    Raises:
        RuntimeError: the interpreter is on in this process.
    """
    from attncc.runtime import cache

    if cache.interpreting():
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET=0 (it runs in attncc.aot worker processes)")
    return cache.load_module(kern.path, "aot_" + kern.key[:24])


# ----------------------------------------------------------------------------- example calls
def _grid_for(ir) -> list:
    """A grid shape of about ``EXAMPLE_SHAPE["L"]`` tokens for a grid pattern."""
    n = len(ir.grid)
    return {1: [1024], 2: [32, 32], 3: [8, 16, 16]}[n]


def _example_rows(ir) -> int:
    """``L`` of :func:`example_positions` for ``ir``: the example tokens, or a grid's first-axis rows."""
    return _grid_for(ir)[0] if ir.grid else EXAMPLE_SHAPE["L"]


def example_call(kern, dtype: str, head_dim: int, requires_grad: bool = False, total: int | None = None,
                 lq: int | None = None):
    """Inputs of the example call whose launches are compiled: ``B, Hq, Hkv = 2, 4, 2``,
    ``L = 1024`` (grids: 32 x 32 or 8 x 16 x 16 tokens), head dim ``head_dim``, the
    pattern's tensors drawn by :func:`attncc.inputs.example_tensors` (float tensors that
    get gradients require grad when ``requires_grad``; ``total``: their ``Lq`` / ``Lk`` dims
    are this whole-sequence length, for calls with position keywords; grid patterns: the
    whole grid's rows of the first axis, ``G0``); ``lq``: 1-D patterns, that many queries
    (the decode family) against ``L`` keys.

    Returns:
        ``(q, k, v, tensors, sizes)`` on the CPU.
    """
    import torch

    from attncc.inputs import example_inputs, example_tensors

    s = EXAMPLE_SHAPE
    grid = _grid_for(kern.ir) if kern.ir.grid else None
    q, k, v, tensors, sizes = example_inputs(kern.ir, B=s["B"], H=s["H"], Hkv=s["Hkv"], Lq=lq or s["L"], Lk=s["L"],
                                             D=head_dim, dtype=getattr(torch, DTYPES[dtype]), grid=grid)
    if total is not None:  # grid patterns: ``total`` rows of the first grid axis (attncc.grid_positions)
        whole = ({"G0": total, "Lq": total * sizes["Lq"] // grid[0], "Lk": total * sizes["Lq"] // grid[0]} if grid
                 else {"Lq": total, "Lk": total})
        tensors = example_tensors(kern.ir, {**sizes, **whole}, generator=torch.Generator().manual_seed(0))
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        for n in kern.grad_tensor_names():
            tensors[n] = tensors[n].requires_grad_()
    return q, k, v, tensors, sizes


def example_positions(kind: str, B: int, L: int) -> dict:
    """The position keywords of the AOT example call (see :class:`Job`): ``"offset"`` a query
    / key shard far from position 0 (context parallelism), ``"ragged"`` a ragged KV cache
    (``kv_lens`` differing per batch row, bottom-right queries), for ``B`` rows of ``L`` tokens
    (grid patterns: ``L`` rows of the first grid axis, the unit of their offsets; the shard
    pair is then rows ``[3L, 4L)`` against rows ``[2L, 3L)`` of a grid of ``4L`` rows).

    Raises:
        KeyError: another ``kind``.
    """
    import torch

    if kind == "offset":
        return dict(q_offset=3 * L, kv_offset=2 * L, q_total=4 * L, kv_total=4 * L)
    if kind == "ragged" or kind.startswith("paged"):  # paged<N>: the ragged lengths in a paged cache
        return dict(kv_lens=torch.arange(L - 7 * B + 7, L + 1, 7, dtype=torch.int32)[-B:])
    raise KeyError(f"unknown positions {kind!r} (known: offset, ragged)")


def capture_family(kern, family: str, dtype: str, head_dim: int, positions: str = "") -> list:
    """The launches of one kernel family, recorded from the runtime's call path.

    Returns:
        a list of ``(kernel, launch)``: the :class:`attncc.runtime.CompiledAttention` whose
        module holds the launched function (``kern``, or the block-mask kernel a routed
        pattern's call runs, see :meth:`~attncc.runtime.CompiledAttention.with_blocks`; with
        ``positions``, the twin of :meth:`~attncc.runtime.CompiledAttention.with_positions`) and the
        :class:`attncc.runtime.Launch` (empty for ``bwd`` when the pattern has no backward).
    """
    import torch

    from attncc.runtime import capture

    if family == "bwd" and kern.backward_error:
        return []
    lq = None
    if family == "decode":  # as many queries as fill the packed row tile (G = H / Hkv heads each)
        from attncc.runtime.decode import decode_error

        if decode_error(kern):
            return []
        rows = kern.config.block_m if kern.config is not None else 16
        lq = max(1, rows * EXAMPLE_SHAPE["Hkv"] // EXAMPLE_SHAPE["H"])
    s = EXAMPLE_SHAPE
    pos = example_positions(positions, s["B"], _example_rows(kern.ir)) if positions else {}
    q, k, v, tensors, sizes = example_call(kern, dtype, head_dim, requires_grad=family == "bwd",
                                           total=pos.get("kv_total", s["L"]) if pos else None, lq=lq)
    if positions.startswith("paged"):  # "paged<page size>" (default 16): a paged KV cache, forward only
        if family not in ("fwd", "decode"):
            return []
        page = int(positions[5:] or 16)
        n = -(-s["L"] // page)
        bt = torch.randperm(s["B"] * n, generator=torch.Generator().manual_seed(0)).view(s["B"], n).to(torch.int32)
        k = k.new_zeros(s["B"] * n, page, k.shape[1], k.shape[3])
        v = v.new_zeros(s["B"] * n, page, v.shape[1], v.shape[3])
        pos = dict(pos, block_table=bt)
    with capture() as rec:
        if family == "decode":  # two splits: the merge kernel is launched too
            from attncc.runtime.decode import decode_attention

            with torch.no_grad():
                if "block_table" in pos:
                    from attncc.runtime.paged import paged_attention

                    paged_attention(kern, q, k, v, pos.pop("block_table"), pos.pop("kv_lens"), decode=True,
                                    num_splits=2, **tensors, **pos)
                else:
                    decode_attention(kern, q, k, v, num_splits=2, **tensors, **pos)
        elif family == "count":
            kern.tile_stats(sizes["Lq"], sizes["Lk"], B=sizes["B"], H=sizes["H"], Hkv=sizes["Hkv"], D=head_dim,
                            grid=[sizes[f"G{i}"] for i in range(len(kern.ir.grid))] or None, device="cpu",
                            **{n: tensors[n] for n in kern.plan.mask_tensors}, **pos)
        elif family == "fwd":
            with torch.no_grad():
                kern(q, k, v, **tensors, **pos, **({"decode": False} if "block_table" in pos else {}))
        else:
            out = kern(q, k, v, **tensors, **pos)
            out.backward(torch.ones_like(out))
    names = FAMILIES[family]
    return [(k, ln) for k, ln in rec if ln.kernel in names]


def _config_text(launch) -> str:
    kw = launch.kwargs
    flags = ":tma" * bool(kw.get("USE_TMA")) + ":ws" * bool(kw.get("WS"))
    return f"{kw.get('BLOCK_M', '-')}x{kw.get('BLOCK_N', '-')}:{kw.get('num_warps', 4)}:{kw.get('num_stages', 3)}{flags}"


# ----------------------------------------------------------------------------- worker
def _record_cache(hash_: str, target: str) -> Path:
    from attncc.runtime import cache

    return cache.cache_dir() / "aot" / f"{hash_}-{target}.json"


def run_job(job: Job, out_dir: str | None = None) -> list[dict]:
    """Compile the kernels of ``job`` (in this process: the interpreter must be off).

    Returns:
        one record per kernel: ``pattern, kernel, target, dtype, head_dim, config`` (the
        candidate), ``launch`` (the launched ``BMxBN:warps:stages``, box plans: the layout's
        tiles), the :func:`resource_usage` figures, ``shared_bytes`` / ``shared_limit`` /
        ``shared_ok``, ``compile_s``, ``cubin`` (path, with ``out_dir``) and ``error`` (the
        compile error, else None).
    """
    import attncc
    from attncc.runtime import Config

    cfg = Config.parse(job.config)
    kern = attncc.compile(job.spec, job.pattern, block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages, tma=cfg.tma, ws=cfg.ws, **dict(job.params))
    base = {"pattern": kern.ir.name + (f"[{job.positions}]" if job.positions else ""), "target": job.target, "dtype": job.dtype, "head_dim": job.head_dim,
            "family": job.family, "config": job.config}
    launches = capture_family(kern, job.family, job.dtype, job.head_dim, job.positions)
    mods: dict = {}
    out = []
    for k, ln in launches:
        rec = {**base, "kernel": ln.kernel, "launch": _config_text(ln), "error": None}
        try:
            mod = mods.get(k.key) or mods.setdefault(k.key, jit_module(k))
            ck, secs = compile_launch(getattr(mod, ln.kernel), ln, job.target)
        except Exception as e:  # noqa: BLE001 - reported in the record (and failed by the gate)
            rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            out.append(rec)
            continue
        shared = int(ck.metadata.shared)
        cached = _record_cache(ck.metadata.hash, job.target)
        try:
            usage = json.loads(cached.read_text())
        except (OSError, ValueError):
            usage = {**resource_usage(ck.asm["cubin"]), "compile_s": round(secs, 3)}
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(usage))
        rec.update(usage, shared_bytes=shared, shared_limit=TARGETS[job.target][1],
                   shared_ok=shared <= TARGETS[job.target][1], hash=ck.metadata.hash, cubin=None)
        if out_dir:
            d = Path(out_dir) / kern.ir.name / job.target
            d.mkdir(parents=True, exist_ok=True)
            stem = f"{ln.kernel}_{job.dtype}_d{job.head_dim}_{rec['launch'].replace(':', '_')}"
            (d / f"{stem}.cubin").write_bytes(ck.asm["cubin"])
            (d / f"{stem}.json").write_text(json.dumps(rec, indent=1))
            rec["cubin"] = str(d / f"{stem}.cubin")
        out.append(rec)
    return out


def _worker_main() -> int:
    """``python -m attncc.aot --worker``: jobs as JSON on stdin, one JSON list of records on stdout."""
    import warnings

    warnings.filterwarnings("ignore")
    req = json.load(sys.stdin)
    out = []
    for j in req["jobs"]:
        job = Job(**{**j, "params": tuple(tuple(p) for p in j["params"])})
        try:
            out += run_job(job, req.get("out_dir"))
        except Exception as e:  # noqa: BLE001 - a job that cannot run is a record with an error
            out.append({"pattern": job.pattern or job.spec, "kernel": job.family, "target": job.target,
                        "dtype": job.dtype, "head_dim": job.head_dim, "family": job.family, "config": job.config,
                        "launch": job.config, "error": f"{type(e).__name__}: {e}"})
    sys.stdout.write("\n@@AOT@@" + json.dumps(out))
    return 0


def run_jobs(jobs: list[Job], out_dir: str | None = None, workers: int | None = None,
             triton_cache: str | None = None, progress=None) -> list[dict]:
    """Run ``jobs`` in worker subprocesses (``workers``, default: the CPU count, at most 8)
    with the interpreter off.

    Args:
        out_dir: write each kernel's cubin and JSON record there.
        triton_cache: Triton's cache directory for the workers (``TRITON_CACHE_DIR``),
            e.g. a directory to ship to a deployment.
        progress: called with each finished worker's records (e.g. to print).

    Returns:
        the records of :func:`run_job`.

    Raises:
        RuntimeError: a worker process failed (its stderr is in the message).
    """
    if not jobs:
        return []
    n = max(1, min(workers or os.cpu_count() or 1, 8, len(jobs)))
    # patterns spread over the workers: each worker compiles each of its patterns once
    chunks = [jobs[i::n] for i in range(n)]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    if triton_cache:
        env["TRITON_CACHE_DIR"] = str(triton_cache)
    procs = []
    for chunk in chunks:
        p = subprocess.Popen([sys.executable, "-m", "attncc.aot", "--worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        p.stdin.write(json.dumps({"jobs": [j.to_json() for j in chunk], "out_dir": out_dir}))
        p.stdin.close()
        procs.append(p)
    results = []
    for p in procs:
        stdout = p.stdout.read()
        stderr = p.stderr.read()
        p.wait()
        if p.returncode != 0 or "@@AOT@@" not in stdout:
            raise RuntimeError(f"attncc.aot worker failed (exit {p.returncode}):\n{stderr[-4000:]}")
        recs = json.loads(stdout.rsplit("@@AOT@@", 1)[1])
        if progress:
            progress(recs)
        results.append(recs)
    return [r for recs in results for r in recs]


def plan_jobs(spec: str, pattern: str | None = None, *, targets=("sm_90a",), dtypes=("bf16",), head_dims=(128,),
              configs=None, bwd_configs=None, families=("fwd", "bwd", "count"), params=None,
              positions: str = "") -> list[Job]:
    """The jobs for one pattern: every family at every candidate config of each
    (target, head dim) (or the ``configs`` / ``bwd_configs`` given), every dtype
    (``positions``: see :class:`Job`; the candidates are then the twin's)."""
    import torch

    import attncc
    from attncc.runtime import backward_candidates, forward_candidates
    from attncc.runtime.paged import paged_candidates

    kern = attncc.compile(spec, pattern, **(params or {}))
    if positions:
        s = EXAMPLE_SHAPE
        x = torch.empty(s["B"], 1, *(_grid_for(kern.ir) if kern.ir.grid else [s["L"]]), 1)
        kern, _ = kern.with_positions(x, x, **example_positions(positions, s["B"], _example_rows(kern.ir)))
    params = tuple(sorted((params or {}).items()))
    jobs = []
    for target in targets:
        arch = TARGETS[target][0]
        for hd in head_dims:
            for dt in dtypes:
                for fam in families:
                    if fam == "fwd":
                        # paged: every config the paged forward's tuner may try
                        rule = paged_candidates if positions.startswith("paged") else forward_candidates
                        cands = configs or [str(c) for c in kern.launch_candidates(rule, hd, arch, dt)]
                    elif fam == "bwd":
                        cands = bwd_configs or configs or [
                            str(c) for c in kern.launch_candidates(backward_candidates, hd, arch, dt)]
                    elif fam == "decode":  # every packed row tile the runtime may launch
                        from attncc.runtime.decode import decode_candidates

                        cands = configs or [str(c) for c in decode_candidates(hd, arch, dt)]
                    else:  # the counting kernel runs at the CPU / first forward config (no math: small)
                        cands = [str(forward_candidates(hd, arch, dt)[0])] if not configs else configs[:1]
                    jobs += [Job(str(spec), pattern, params, target, dt, hd, fam, c, positions) for c in cands]
    return jobs


def aot(spec, pattern: str | None = None, *, targets=("sm_90a",), dtypes=("bf16",), head_dims=(128,), configs=None,
        bwd_configs=None, families=("fwd", "bwd", "count"), out_dir=None, workers=None, triton_cache=None,
        progress=None, positions: str = "", **params) -> list[dict]:
    """Compile the kernels of a pattern for GPU targets (no GPU needed).

    Args:
        spec: a ``.attn`` path or text; ``pattern``: the block, when the file has several.
        targets: keys of :data:`TARGETS` (e.g. ``("sm_80", "sm_90a")``).
        dtypes: ``"bf16"``, ``"fp16"``, ``"fp32"``; head_dims: head dims D (= Dv).
        configs / bwd_configs: ``BMxBN:warps:stages`` strings; default: every candidate
            the autotuner may try for the target and head dim.
        families: which of ``"fwd"``, ``"bwd"``, ``"count"``.
        out_dir: write cubins and JSON records there.
        positions: ``""``, ``"offset"`` or ``"ragged"``: compile the kernels a call with those
            position keywords runs (:func:`example_positions`; the twin
            :meth:`~attncc.runtime.CompiledAttention.with_positions`).
        **params: the spec's params.

    Returns:
        a list of records (see :func:`run_job`).

    Raises:
        ValueError: unknown target or dtype; SpecError: the spec does not compile.
    """
    import attncc

    for t in targets:
        parse_targets(t)
    for d in dtypes:
        parse_dtypes(d)
    attncc.compile(spec, pattern, **params)  # spec errors here, before any worker starts
    jobs = plan_jobs(str(spec), pattern, targets=targets, dtypes=dtypes, head_dims=head_dims, configs=configs,
                     bwd_configs=bwd_configs, families=families, params=params, positions=positions)
    return run_jobs(jobs, out_dir=out_dir, workers=workers, triton_cache=triton_cache, progress=progress)


# ----------------------------------------------------------------------------- reports
def _mma_sync_by_design(rec: dict) -> bool:
    """wgmma needs 64 rows (M) per warpgroup: the forward's and dQ's GEMMs have M = the
    query tile, the dK/dV kernel's (dK += dS^T Q, dV += P^T dO) M = the key tile. A launch
    whose M tile is below 64 (the backward's 32-row tiles at D > 128, a 32-key dK/dV tile)
    uses mma.sync, still tensor cores, by design."""
    if not rec["mma"] or rec["kernel"] not in ("attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv"):
        return False
    try:
        bm, bn = (int(x) for x in rec["launch"].split(":")[0].split("x"))
    except ValueError:
        return False
    return (bn if rec["kernel"] == "attn_bwd_dkdv" else bm) < 64


def problems(rec: dict) -> list[str]:
    """What is wrong with one kernel record: a compile error, spills, local memory
    traffic, shared memory over the target's limit, no tensor-core MMA for fp16 / bf16
    (wgmma on sm_90a; fp32 computes exact fp32 products without tensor cores), a ``tma``
    launch without TMA loads on sm_90a."""
    if rec.get("error"):
        return [f"does not compile: {rec['error']}"]
    out = []
    if rec["spill_bytes"] or rec["local_stores"]:
        out.append(f"spills {rec['spill_bytes']} B ({rec['local_stores']} local stores)")
    if not rec["shared_ok"]:
        out.append(f"shared memory {rec['shared_bytes']} B > {rec['shared_limit']} B")
    if rec["kernel"] in ("attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv") and rec["dtype"] != "fp32":
        # fp32 inputs use exact fp32 products (input_precision="ieee", torch's default matmul
        # precision): FMA, no tensor cores, by design
        if rec["target"] == "sm_90a" and not rec["wgmma"] and not _mma_sync_by_design(rec):
            out.append("no wgmma")
        elif not (rec["wgmma"] or rec["mma"]):
            out.append("no tensor-core mma")
    if ":tma" in rec.get("launch", "") and rec["target"] == "sm_90a" and not rec.get("tma_loads"):
        out.append("no TMA loads (UTMALDG)")
    return out


def resource_table(records: list[dict]) -> str:
    """A Markdown table of the records (one row per kernel and config)."""
    head = ("| pattern | target | dtype | D | kernel | config | regs | spill B | STL | SASS | smem KiB | MMA "
            "| compile s | status |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    order = [name for names in FAMILIES.values() for name in names]
    for r in sorted(records, key=lambda r: (r["pattern"], r["target"], r["dtype"], r["head_dim"],
                                            order.index(r["kernel"]) if r["kernel"] in order else len(order),
                                            r["config"])):
        if r.get("error"):
            rows.append(f"| {r['pattern']} | {r['target']} | {r['dtype']} | {r['head_dim']} | {r['kernel']} "
                        f"| {r['config']} | | | | | | | | {r['error'][:80]} |")
            continue
        mma = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "-")
        status = "; ".join(problems(r)) or "ok"
        rows.append(f"| {r['pattern']} | {r['target']} | {r['dtype']} | {r['head_dim']} | {r['kernel']} | {r['launch']} "
                    f"| {r['registers']} | {r['spill_bytes']} | {r['local_stores']} | {r['sass_instructions']} "
                    f"| {r['shared_bytes'] / 1024:.0f} | {mma} | {r.get('compile_s', 0):.1f} | {status} |")
    return "\n".join(rows)


def summary(records: list[dict]) -> str:
    """One line: kernels compiled, failing, spilling."""
    bad = [r for r in records if problems(r)]
    spill = [r for r in records if not r.get("error") and r["spill_bytes"]]
    return (f"{len(records)} kernels compiled, {len(bad)} with problems ({len(spill)} spilling, "
            f"{sum(bool(r.get('error')) for r in records)} not compiling)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(_worker_main())
    sys.exit("usage: attncc aot ... (this module's own entry point is for its worker processes)")
