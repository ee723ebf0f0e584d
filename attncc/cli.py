"""The ``attncc`` command line: check, explain, compile, aot and demo.

::

    attncc check patterns/*.attn
    attncc explain patterns/sliding_window.attn --lq 1024 --param window=128 --plot tiles.png
    attncc explain patterns/causal.attn --target sm_90a
    attncc compile patterns/alibi.attn -o build/
    attncc aot patterns/causal.attn --target sm_80,sm_90a --dtype bf16 --head-dim 64,128 -o build/aot
    attncc demo --patterns causal,alibi
    attncc test patterns/sliding_window.attn --param window=8 [--against mymod:attn] [--grads]

Exit status: 0 on success, 1 for user errors (spec errors, bad arguments, missing
files: one message on stderr, never a traceback), 2 for usage errors and for
``--plot`` without matplotlib.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .dsl import PatternSpec, parse
from .errors import SpecError

if TYPE_CHECKING:
    import torch

# torch, triton and sympy are imported inside the commands that need them, so that
# ``attncc --help`` / ``attncc list`` answer without importing them (``check`` needs sympy only)

#: the errors a user can cause; reported as a message, never as a traceback
USER_ERRORS = (SpecError, TypeError, ValueError, FileNotFoundError, KeyError)

#: characters of the ASCII tile map
TILE_FULL, TILE_PARTIAL, TILE_EMPTY = "#", "+", "."



class UsageError(ValueError):
    """A bad command-line value (``--param`` syntax, unknown pattern name...)."""


# ----------------------------------------------------------------------------- helpers
def _error_text(e: BaseException) -> str:
    """The message of a user error (KeyError's str() would add quotes)."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, FileNotFoundError) and e.filename and not str(e).startswith("spec file"):
        return f"{e.filename}: file not found"
    return str(e)


def parse_params(items) -> dict:
    """Parse ``--param NAME=VALUE`` items; values with :func:`ast.literal_eval`.

    Raises:
        UsageError: an item without ``=``, an invalid name or a value that is not
            a Python literal.
    """
    out = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise UsageError(f"--param expects NAME=VALUE, got {item!r}")
        try:
            out[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise UsageError(f"--param {name}: value {text!r} is not a literal (e.g. 128, 0.5, True)") from None
    return out


def read_patterns(file: str) -> list[PatternSpec]:
    """Read and parse a ``.attn`` file.

    Raises:
        FileNotFoundError: the file does not exist.
        UsageError: the path cannot be read as text (a directory, permissions...).
        SpecError: a syntax error in the file.
    """
    p = Path(file)
    if not p.exists():
        raise FileNotFoundError(f"{file}: file not found")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{file}: cannot read: {e}") from None
    return parse(text, str(file))


def select_pattern(file: str, pats: list[PatternSpec], name: str | None) -> PatternSpec:
    """The pattern ``name`` of a file, or its only pattern when ``name`` is None.

    Raises:
        UsageError: no such pattern, or several patterns and no ``--pattern``.
    """
    names = ", ".join(p.name for p in pats)
    if name is None:
        if len(pats) > 1:
            raise UsageError(f"{file} holds several patterns ({names}): pass --pattern NAME")
        return pats[0]
    for p in pats:
        if p.name == name:
            return p
    raise UsageError(f"no pattern {name!r} in {file} (it holds: {names})")


def params_for(pat: PatternSpec, params: dict) -> dict:
    """The subset of ``params`` that ``pat`` declares."""
    declared = {p.name for p in pat.params}
    return {k: v for k, v in params.items() if k in declared}


def _default_device() -> torch.device:
    """Where kernels can run here: CPU under the Triton interpreter, else CUDA."""
    import torch

    from attncc.runtime import cache

    if cache.interpreting() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


# ----------------------------------------------------------------------------- tile analysis
def kernel_tile_counts(kern, sizes: dict, tensors: dict, config=None, device=None) -> torch.Tensor:
    """Per (batch*head, query tile): key tiles the kernel visits and how many are full.

    :meth:`~attncc.runtime.CompiledAttention.tile_stats` with ``per_query_tile=True``
    (the forward kernel's own tile iteration, run by the generated ``count_tiles``).

    Returns:
        int64 tensor ``(B * H, n_m, 2)`` on the CPU.

    Raises:
        TypeError / ValueError: missing or misshapen mask tensors, out-of-bounds reads.
    """
    from .ir import grid_of

    st = kern.tile_stats(sizes["Lq"], sizes["Lk"], B=sizes["B"], H=sizes["H"], Hkv=sizes["Hkv"], D=sizes["D"],
                         Dv=sizes["Dv"], config=config, device=device or _default_device(), per_query_tile=True,
                         grid=grid_of(sizes), **{n: tensors[n] for n in kern.plan.mask_tensors})
    return st["per_query_tile"]


def reference_tile_map(ir, sizes: dict, tensors: dict, block_m: int, block_n: int) -> tuple:
    """Non-empty and full (query tile, key tile) pairs of the mask, evaluated densely.

    The mask is evaluated with :func:`attncc.dense.eval_expr` (the evaluator of
    :func:`attncc.dense.dense_mask`) a chunk of query tiles at a time; a tile is
    non-empty when some valid pair in it is allowed and full when every valid pair
    (rows < Lq, columns < Lk) is. Only batch 0 / head 0 are mapped.

    Returns:
        ``(nonempty, full)``: bool tensors ``(n_m, n_n)``.

    Raises:
        ValueError: the mask reads a tensor out of its bounds (as :func:`attncc.dense.dense_mask`).
    """
    from .dense import tile_classes

    nonempty, full = tile_classes(ir, sizes, tensors, block_m, block_n, "cpu", ragged_full=True)
    return nonempty[0, 0].cpu(), full[0, 0].cpu()


def tile_chars(nonempty: torch.Tensor, full: torch.Tensor) -> list[str]:
    """One string per query tile: ``#`` full, ``+`` partial, ``.`` empty key tiles."""
    out = []
    for ne_row, f_row in zip(nonempty.tolist(), full.tolist()):
        out.append("".join(TILE_FULL if f else TILE_PARTIAL if ne else TILE_EMPTY for ne, f in zip(ne_row, f_row)))
    return out


def tile_report(kern, sizes: dict, tensors: dict, config=None) -> dict:
    """Everything ``explain`` prints about tiles: the reference map and the kernel's counts.

    Returns:
        dict with ``rows`` (ASCII map lines), ``nonempty`` / ``full`` (reference,
        bool ``(n_m, n_n)``), ``kernel`` (int ``(n_m, 2)``: visited, full for
        batch 0 / head 0), ``stats`` (batch 0 / head 0 totals:
        ``total, visited, full, nonempty, ref_full``), ``block_m``, ``block_n``.
    """
    from .dense import dense_mask

    from attncc.runtime import CPU_CONFIG

    cfg = config or kern.config or CPU_CONFIG
    counts = kernel_tile_counts(kern, sizes, tensors, cfg)  # first: its read checks give the clearer message
    if kern.plan.path == "box":  # the kernel's tiles are boxes: map the mask in its permuted token order
        mask = kern.layout_for(sizes, cfg).permute_mask(dense_mask(kern.ir, sizes, tensors, "cpu")[:1, :1])[0, 0]
        n_m, n_n = mask.shape[0] // cfg.block_m, mask.shape[1] // cfg.block_n
        blocks = mask.view(n_m, cfg.block_m, n_n, cfg.block_n)
        nonempty, full = blocks.any(3).any(1), blocks.all(3).all(1)
    else:
        nonempty, full = reference_tile_map(kern.ir, sizes, tensors, cfg.block_m, cfg.block_n)
    n_m, n_n = nonempty.shape
    stats = {"total": n_m * n_n, "visited": int(counts[0, :, 0].sum()), "full": int(counts[0, :, 1].sum()),
             "nonempty": int(nonempty.sum()), "ref_full": int(full.sum())}
    return {"rows": tile_chars(nonempty, full), "nonempty": nonempty, "full": full, "kernel": counts[0],
            "stats": stats, "block_m": cfg.block_m, "block_n": cfg.block_n}


def format_tile_map(rep: dict) -> str:
    """The ASCII tile map with, per query tile, the kernel's counts next to the mask's."""
    lines = [f"(rows: query tiles of {rep['block_m']}, columns: key tiles of {rep['block_n']}; "
             f"'{TILE_FULL}' full, '{TILE_PARTIAL}' partial, '{TILE_EMPTY}' skipped -- from the reference mask)"]
    width = max(len(r) for r in rep["rows"]) if rep["rows"] else 0
    for m, row in enumerate(rep["rows"]):
        kv_vis, kv_full = (int(x) for x in rep["kernel"][m])
        ne, fu = int(rep["nonempty"][m].sum()), int(rep["full"][m].sum())
        if kv_vis < ne or kv_full > fu:  # skips needed keys, or leaves a masked tile unmasked
            flag = "  !! kernel disagrees with the mask"
        else:
            notes = [f"{kv_vis - ne} empty tile(s) visited"] if kv_vis > ne else []
            notes += [f"{fu - kv_full} full tile(s) masked anyway"] if kv_full < fu else []
            flag = f"  ({'; '.join(notes)}: conservative)" if notes else ""
        lines.append(f"{m:>5} {row:<{width}}  kernel {kv_vis:>4} visited {kv_full:>4} full | "
                     f"mask {ne:>4} non-empty {fu:>4} full{flag}")
    return "\n".join(lines)


def plot_tile_map(rep: dict, path: str, title: str) -> None:
    """Write the tile map as a PNG (needs matplotlib)."""
    import torch

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grid = rep["nonempty"].to(torch.int64) + rep["full"].to(torch.int64)  # 0 empty, 1 partial, 2 full
    n_m, n_n = grid.shape
    colors = ["#f0f0f0", "#f4a261", "#264653"]
    # at most 10 x 9 inches: a larger map gets more tiles per pixel, not smaller text
    w = min(10.0, max(5.0, n_n * 0.18 + 3))
    h = min(9.0, max(3.5, n_m * 0.18 + 1.5))
    fig, ax = plt.subplots(figsize=(w, h))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # tile numbers, not -0.5, 0.5, ...
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.imshow(grid.numpy(), cmap=ListedColormap(colors), vmin=0, vmax=2, interpolation="nearest", aspect="auto")
    ax.set_xlabel(f"key tile ({rep['block_n']} keys)")
    ax.set_ylabel(f"query tile ({rep['block_m']} queries)")
    # wrapped to the figure's width (about 13 characters per inch at 9 pt), so a long title
    # stays readable on a narrow map and does not overflow a wide one
    import textwrap

    ax.set_title("\n".join(textwrap.fill(line, max(30, int(w * 13))) for line in title.splitlines()),
                 fontsize=9)
    ax.legend(handles=[Patch(color=colors[2], label="full"), Patch(color=colors[1], label="partial"),
                       Patch(color=colors[0], label="skipped")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- commands
def cmd_check(args) -> int:
    """``attncc check FILE...``: parse and lower every pattern of every file."""
    from .ir import lower

    status = 0
    for file in args.files:
        try:
            pats = read_patterns(file)
            for p in pats:
                lower(p)
        except USER_ERRORS as e:
            msg = _error_text(e)
            if not msg.startswith(str(file)):
                msg = f"{file}: {msg}"
            print(msg, file=sys.stderr)
            status = 1
            continue
        n = len(pats)
        print(f"{file}: ok ({n} pattern{'s' if n != 1 else ''}: {', '.join(p.name for p in pats)})")
    return status


def _compile(pat: PatternSpec, params: dict, block_m=None, block_n=None):
    """:func:`attncc.compile` of a parsed pattern (tile sizes checked there)."""
    import attncc

    return attncc.compile(pat, pat.name, block_m=block_m, block_n=block_n, **params)


def cmd_explain(args) -> int:
    """``attncc explain FILE``: IR, analysis, tile map (and optional PNG), kernel source."""
    import torch

    from .compiler import describe
    from .ir import grid_of, grid_sizes
    from attncc.inputs import example_tensors
    from attncc.runtime import CPU_CONFIG

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (only checks that it is installed)
        except ImportError:
            print("error: --plot needs matplotlib: pip install matplotlib (or pip install 'attncc[plot]')",
                  file=sys.stderr)
            return 2
    params = parse_params(args.param)
    pat = select_pattern(args.file, read_patterns(args.file), args.pattern)
    Lq = args.lq
    Lk = args.lk if args.lk is not None else Lq
    if Lq < 1 or Lk < 1:
        raise UsageError(f"--lq and --lk must be >= 1, got {Lq}, {Lk}")
    bm = args.block_m or (CPU_CONFIG.block_m if args.block_n else None)
    bn = args.block_n or (CPU_CONFIG.block_n if args.block_m else None)
    kern = _compile(pat, params, bm, bn)
    cfg = kern.config or CPU_CONFIG
    plan = kern.plan

    notes = []
    sizes = {"B": 1, "H": 1, "Hkv": 1, "Lq": Lq, "Lk": Lk, "D": 64, "Dv": 64}
    if kern.ir.grid:  # a grid pattern: the tile map is over the flattened (row-major) grid
        grid = args.grid or [max(1, round(Lq ** (1.0 / len(kern.ir.grid))))] * len(kern.ir.grid)
        if len(grid) != len(kern.ir.grid):
            raise UsageError(f"--grid needs {len(kern.ir.grid)} sizes ({', '.join(kern.ir.grid)}), got {len(grid)}")
        Lq = Lk = math.prod(grid)
        sizes.update(Lq=Lq, Lk=Lk, **grid_sizes(grid))
        if plan.path == "box":
            lay = kern.layout_for(sizes, cfg)
            notes.append(f"(grid {' x '.join(map(str, grid))} = {Lq} tokens; layout: dilation groups "
                         f"{' x '.join(map(str, lay.groups))}, query tiles {' x '.join(map(str, lay.tm))}, key tiles "
                         f"{' x '.join(map(str, lay.tn))} tokens, {lay.length} permuted tokens"
                         f"{' (identity: no permutation)' if lay.is_identity() else ''}; the map below is in that order)")
        else:
            notes.append(f"(grid {' x '.join(map(str, grid))} = {Lq} tokens, flattened row-major)")
    tensors = {}
    given = dict(args.tensor)
    declared = {t.name for t in kern.ir.tensors}
    unknown = sorted(set(given) - declared)
    if unknown:
        raise UsageError(f"--tensor {unknown[0]}: pattern {kern.ir.name!r} has no tensor of that name "
                         f"(its tensors: {', '.join(sorted(declared)) or 'none'})")
    if plan.mask_tensors or given:
        gen = torch.Generator().manual_seed(0)
        allt = example_tensors(kern.ir, sizes, generator=gen)
        for n, src in given.items():
            allt[n] = load_tensor(n, src, tuple(allt[n].shape), allt[n].dtype, gen)
        tensors = {n: allt[n] for n in plan.mask_tensors}
    print(describe(plan))
    print()
    for line in notes:
        print(line)
    rep = tile_report(kern, sizes, tensors, cfg)
    st = rep["stats"]
    print(f"== tiles (Lq={Lq}, Lk={Lk}, tiles {rep['block_m']}x{rep['block_n']}, B=1, H=1)")
    if plan.mask_tensors:
        src = [f"{n} = {given[n]}" if n in given else f"{n}: example values (attncc.inputs.example_tensors, seed 0)"
               for n in plan.mask_tensors]
        print(f"(mask tensors: {'; '.join(src)})")
    if plan.mask_uses_b or plan.mask_uses_h:
        print("(the mask depends on the batch/head index: shown for b=0, h=0)")
    print(format_tile_map(rep))
    if args.query is not None:
        if not kern.ir.grid:
            raise UsageError("--query is for grid patterns (the key set drawn on the grid)")
        print(query_key_map(kern, sizes, tensors, args.query))
    # cross-check the per-tile counts against CompiledAttention.tile_stats where it can run
    from attncc.runtime import cache

    if cache.interpreting() or plan.mask_tensors:
        dev = _default_device()
        ts = kern.tile_stats(Lq, Lk, D=64, config=cfg, grid=grid_of(sizes),
                             **{n: t.to(dev) for n, t in tensors.items()})
        if (ts["visited"], ts["full"]) != (st["visited"], st["full"]):
            print(f"warning: tile_stats reports visited={ts['visited']} full={ts['full']}, "
                  f"the per-tile counts sum to visited={st['visited']} full={st['full']}")
    print(f"visited (kernel) = {st['visited']}, non-empty (reference mask) = {st['nonempty']}, "
          f"total = {st['total']}")
    print(f"full (kernel) = {st['full']}, full (reference mask) = {st['ref_full']}")
    print(f"density = visited / total = {st['visited']}/{st['total']} = {100.0 * st['visited'] / st['total']:.1f}%")
    if args.plot:
        title = (f"{kern.ir.name}: Lq={Lq}, Lk={Lk}, tiles {rep['block_m']}x{rep['block_n']}\n"
                 f"visited {st['visited']}/{st['total']} ({100.0 * st['visited'] / st['total']:.1f}%), "
                 f"non-empty {st['nonempty']}, full {st['ref_full']} (kernel: {st['full']})")
        plot_tile_map(rep, args.plot, title)
        print(f"wrote {args.plot}")
    if args.target:
        from attncc import aot

        print()
        print(f"== GPU kernels ({args.target}; {args.dtype}, head dim {', '.join(map(str, args.head_dim))}; every "
              "launch config the autotuner may try; a config that spills is dropped by the autotuner)")
        recs = _aot_records(args, args.file, pat.name, params_for(pat, params))
        print(aot.resource_table(recs))
        print(aot.summary(recs))
        dropped = sorted({f"{r['target']} {r['kernel']} {r['launch']}" for r in recs
                          if not r.get("error") and r["spill_bytes"]})
        print("configs dropped (spill): " + (", ".join(dropped) if dropped else "none"))
    if args.source:
        print()
        print(f"== kernel source ({kern.path})")
        print(kern.source)
    return 0


def cmd_compile(args) -> int:
    """``attncc compile FILE -o DIR``: write ``<pattern>.py`` and ``<pattern>.explain.txt``."""
    from .compiler import describe

    params = parse_params(args.param)
    pats = read_patterns(args.file)
    chosen = [select_pattern(args.file, pats, args.pattern)] if args.pattern else pats
    declared = {p.name for pat in chosen for p in pat.params}
    unknown = sorted(set(params) - declared)
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise TypeError(f"no pattern compiled here declares param {unknown[0]!r} (declared params: {known})")
    kerns = [_compile(pat, params_for(pat, params)) for pat in chosen]
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory {out}: {e}") from None
    for kern in kerns:
        name = kern.ir.name
        src = out / f"{name}.py"
        txt = out / f"{name}.explain.txt"
        src.write_text(kern.source)
        txt.write_text(describe(kern.plan) + "\n")
        print(src)
        print(txt)
    return 0


def _aot_records(args, file, pattern, params) -> list:
    """Run :func:`attncc.aot.aot` for one pattern with the command's options, printing progress."""
    from attncc import aot

    def progress(recs):
        print(f"  compiled {len(recs)} kernels ({aot.summary(recs)})", file=sys.stderr, flush=True)

    return aot.aot(file, pattern, targets=aot.parse_targets(args.target), dtypes=aot.parse_dtypes(args.dtype),
                   head_dims=args.head_dim, configs=args.config or None, bwd_configs=args.bwd_config or None,
                   out_dir=getattr(args, "output", None), workers=args.workers,
                   triton_cache=getattr(args, "triton_cache", None), progress=progress, **params)


def cmd_aot(args) -> int:
    """``attncc aot FILE|--all``: compile every kernel for GPU targets, print the resource table.

    Exit status 1 when a kernel does not compile, spills, exceeds the target's shared memory
    or (forward / backward on sm_90a) uses no wgmma."""
    from attncc import aot
    from attncc.compiler import library_patterns

    if args.all == bool(args.file):
        raise UsageError("give a FILE or --all (every library pattern)")
    params = parse_params(args.param)
    if args.all:
        todo = [(str(path), None, {}) for path in library_patterns().values()]
    else:
        pat = select_pattern(args.file, read_patterns(args.file), args.pattern)
        todo = [(args.file, pat.name, params_for(pat, params))]
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
    records = []
    for file, name, prm in todo:
        print(f"aot {file}{' --pattern ' + name if name else ''}", file=sys.stderr, flush=True)
        records += _aot_records(args, file, name, prm)
    table = aot.resource_table(records)
    print(table)
    print(aot.summary(records))
    if args.output:
        out = Path(args.output)
        (out / "aot.json").write_text(json.dumps(records, indent=1))
        (out / "aot.md").write_text(table + "\n\n" + aot.summary(records) + "\n")
        print(f"wrote {out / 'aot.json'}, {out / 'aot.md'} and the cubins under {out}")
    return 1 if any(aot.problems(r) for r in records) else 0


def cmd_list(args) -> int:
    """``attncc list``: the pattern library, one line each (name, file, first docstring line)."""
    from .library import library_patterns, library_specs

    files = library_patterns()
    specs = library_specs()
    width = max(map(len, specs))
    for name, spec in specs.items():
        kind = "grid" if "grid" in spec.clauses else "1-D "
        first = spec.doc.splitlines()[0] if spec.doc else ""
        print(f"{name:<{width}}  {kind}  {files[name].name:<34} {first}")
    return 0


def _dir_size(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    n = size = 0
    for f in path.rglob("*"):
        if f.is_file():
            n += 1
            size += f.stat().st_size
    return n, size


def cmd_cache(args) -> int:
    """``attncc cache info|clear``: where attncc keeps generated kernels, block tables'
    metadata and AOT records (``ATTNCC_CACHE_DIR``, else the platform's user cache dir),
    and how much is there; ``clear`` deletes it."""
    import shutil

    from attncc.runtime import cache

    root = cache.cache_dir()
    if args.action == "info":
        n, size = _dir_size(root)
        print(f"attncc cache: {root}")
        print(f"  {n} files, {size / 2**20:.1f} MiB")
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            sn, ssize = _dir_size(sub)
            print(f"  {sub.name + '/':<12} {sn:6d} files {ssize / 2**20:8.1f} MiB")
        print("(Triton's own compiled kernels live in TRITON_CACHE_DIR, default ~/.triton/cache)")
        return 0
    n, size = _dir_size(root)
    for sub in root.iterdir():
        if sub.is_dir():
            shutil.rmtree(sub)
        else:
            sub.unlink()
    print(f"removed {n} files ({size / 2**20:.1f} MiB) from {root}")
    return 0


def cmd_demo(args) -> int:
    """``attncc demo``: run every library pattern against the reference and FlexAttention."""
    from attncc import demo

    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()] if args.patterns else None
    return demo.run(patterns=patterns, device=args.device, length=args.length)


# ----------------------------------------------------------------------------- parser
def _grid_shape(text: str) -> list:
    """``--grid`` value: sizes joined by ``x`` (``32x32``, ``8x16x16``), each >= 1, at most 3 axes."""
    try:
        sizes = [int(x) for x in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes joined by 'x' (e.g. 32x32 or 8x16x16), got {text!r}") from None
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected 1 to 3 sizes >= 1 joined by 'x', got {text!r}")
    return sizes


def _tensor_item(text: str) -> tuple:
    """``--tensor NAME=SOURCE`` value -> ``(NAME, SOURCE)`` (SOURCE checked when the pattern is known)."""
    name, sep, src = text.partition("=")
    if not sep or not name.strip().isidentifier() or not src.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.pt or NAME=GENERATOR (e.g. glob=bernoulli:0.1), "
                                         f"got {text!r}")
    return name.strip(), src.strip()


#: ``--tensor NAME=GENERATOR`` generators: name -> (arguments, what it draws)
TENSOR_GENERATORS = {
    "bernoulli": "bernoulli:P  -- True with probability P (bool / int / float 0-1 values)",
    "randint": "randint:LO:HI -- integers uniform in [LO, HI)",
    "randn": "randn[:STD] -- normal values (float)",
    "zeros": "zeros -- all 0 / False",
    "ones": "ones -- all 1 / True",
    "arange": "arange[:DIV] -- i // DIV along the last axis (e.g. document ids of DIV tokens)",
}


def load_tensor(name: str, src: str, shape: tuple, dtype, generator):
    """The value of ``--tensor NAME=SOURCE`` for a declared tensor of ``shape`` / ``dtype``:
    a ``torch.save``'d file (``.pt``; its shape must be the declared one) or a generator of
    :data:`TENSOR_GENERATORS`.

    Raises:
        UsageError: an unknown generator, bad generator arguments, a file that does not hold a
            tensor of the declared shape.
    """
    import torch

    if src.endswith((".pt", ".pth")) or Path(src).exists():
        try:
            t = torch.load(src, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UsageError(f"--tensor {name}: file not found: {src}") from None
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
            raise UsageError(f"--tensor {name}: cannot load {src}: {e}") from None
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"--tensor {name}: {src} holds a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(shape):
            raise UsageError(f"--tensor {name}: {src} has shape {tuple(t.shape)}, the pattern declares "
                             f"{tuple(shape)} at these sizes")
        return t.to(dtype)
    kind, *args = src.split(":")
    try:
        nums = [float(a) for a in args]
    except ValueError:
        raise UsageError(f"--tensor {name}: bad generator arguments in {src!r} ({TENSOR_GENERATORS.get(kind, '')})") \
            from None
    g = generator
    if kind == "bernoulli" and len(nums) == 1 and 0 <= nums[0] <= 1:
        t = torch.rand(shape, generator=g) < nums[0]
    elif kind == "randint" and len(nums) == 2 and nums[0] < nums[1]:
        t = torch.randint(int(nums[0]), int(nums[1]), shape, generator=g)
    elif kind == "randn" and len(nums) <= 1:
        t = torch.randn(shape, generator=g) * (nums[0] if nums else 1.0)
    elif kind in ("zeros", "ones") and not nums:
        t = (torch.zeros if kind == "zeros" else torch.ones)(shape)
    elif kind == "arange" and len(nums) <= 1 and (not nums or nums[0] >= 1):
        idx = torch.arange(shape[-1]) // int(nums[0] if nums else 1) if shape else torch.tensor(0)
        t = idx.expand(shape).clone()
    else:
        known = "; ".join(TENSOR_GENERATORS.values())
        raise UsageError(f"--tensor {name}: unknown generator or bad arguments {src!r} (known: {known}; "
                         f"or a .pt file)")
    return t.to(dtype)


def query_key_map(kern, sizes: dict, tensors: dict, query: list) -> str:
    """The key set of one query on the grid, as NATTEN's figures draw it: one character per
    key token in grid coordinates (``Q`` the query itself when allowed, ``q`` when not, ``#``
    allowed keys, ``.`` masked keys), for batch 0 / head 0, from the reference mask. 3-D grids:
    one block per leading coordinate.

    Raises:
        UsageError: a query coordinate outside the grid, or the wrong number of them.
    """
    from .dense import dense_mask

    grid = [sizes[f"G{i}"] for i in range(len(kern.ir.grid))]
    if len(query) != len(grid) or any(not 0 <= c < n for c, n in zip(query, grid)):
        raise UsageError(f"--query needs {len(grid)} coordinates inside the grid {'x'.join(map(str, grid))}, "
                         f"got {','.join(map(str, query))}")
    flat = 0
    for c, n in zip(query, grid):
        flat = flat * n + c
    row = dense_mask(kern.ir, sizes, tensors, "cpu")[0, 0, flat].reshape(grid)
    if len(grid) == 1:
        row = row[None]
    blocks = [row] if row.dim() == 2 else list(row)
    lines = [f"(keys of query {tuple(query)} on the {'x'.join(map(str, grid))} grid: '#' allowed, '.' masked, "
             f"'Q' the query itself (allowed), 'q' (masked); {int(row.sum())} keys)"]
    for bi, blk in enumerate(blocks):
        if len(blocks) > 1:
            lines.append(f"{kern.ir.grid[0]} = {bi}:")
        for y, r in enumerate(blk.tolist()):
            chars = []
            for x, ok in enumerate(r):
                here = (query[-2:] == [y, x]) if len(grid) > 1 else (x == query[0])
                if len(grid) == 3:
                    here = here and query[0] == bi
                chars.append(("Q" if ok else "q") if here else ("#" if ok else "."))
            lines.append("".join(chars))
    return "\n".join(lines)


def _int_list(text: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def aot_options(p, output: bool) -> None:
    """The options of ``attncc aot`` shared with ``explain --target``."""
    p.add_argument("--dtype", default="bf16", metavar="bf16,fp16,fp32", help="comma-separated dtypes (default bf16)")
    p.add_argument("--head-dim", type=_int_list, default=[128], metavar="64,128",
                   help="comma-separated head dims (default 128)")
    p.add_argument("--config", action="append", default=[], metavar="BMxBN:warps:stages[:tma][:ws]",
                   help="a forward launch config to compile instead of the autotuner's candidates (:tma: Q, K, V "
                        "through tensor descriptors, :ws: warp-specialised key loops); repeatable")
    p.add_argument("--bwd-config", action="append", default=[], metavar="BMxBN:warps:stages",
                   help="a backward launch config (default: --config, else the backward candidates); repeatable")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: the CPU count)")
    if output:
        p.add_argument("-o", "--output", default=None, metavar="DIR",
                       help="write the cubins, one JSON record per kernel, aot.json and aot.md there")
        p.add_argument("--triton-cache", default=None, metavar="DIR",
                       help="Triton's cache directory for the compiles (ship it: TRITON_CACHE_DIR on the GPU machine)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``attncc`` command."""
    import attncc

    ap = argparse.ArgumentParser(prog="attncc", description="A compiler for attention patterns "
                                 "(.attn specs -> sympy IR -> fused Triton kernels).")
    ap.add_argument("--version", action="version", version=f"attncc {attncc.__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("check", help="parse and type-check .attn files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_check)

    def common(p):
        """Arguments shared by explain and compile."""
        p.add_argument("file", metavar="FILE")
        p.add_argument("--pattern", metavar="NAME", help="the pattern block to use (when the file holds several)")
        p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a param value (Python literal); repeatable")

    p = sub.add_parser("explain", help="print the IR, the analysis and the tile map (and the kernel source with --source)")
    common(p)
    p.add_argument("--lq", type=int, default=1024, help="query length for the tile map (default 1024)")
    p.add_argument("--lk", type=int, default=None, help="key length (default: --lq)")
    p.add_argument("--grid", type=_grid_shape, default=None, metavar="YxX",
                   help="grid patterns: the grid shape, e.g. 32x32 or 8x16x16 (default: about --lq tokens)")
    p.add_argument("--query", type=lambda t: [int(x) for x in t.split(",")], default=None, metavar="Y,X",
                   help="grid patterns: also draw the key set of this query on the grid (coordinates, e.g. 0,5)")
    p.add_argument("--tensor", type=_tensor_item, action="append", default=[], metavar="NAME=FILE.pt|GEN",
                   help="the value of a spec tensor for the analysis: a torch.save'd file or a generator "
                        "(bernoulli:P, randint:LO:HI, randn[:STD], zeros, ones, arange[:DIV]); repeatable "
                        "(default: example values)")
    p.add_argument("--block-m", type=int, default=None, help="query tile size (default: the CPU config, 32)")
    p.add_argument("--block-n", type=int, default=None, help="key tile size (default: the CPU config, 32)")
    p.add_argument("--plot", metavar="PNG", help="also write the tile map as a PNG (needs matplotlib)")
    p.add_argument("--source", action="store_true", help="also print the generated kernel source")
    p.add_argument("--target", default=None, metavar="sm_80,sm_90a",
                   help="also compile the kernels for these GPU targets and print their resources (as attncc aot)")
    aot_options(p, output=False)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("compile", help="write the kernel source and the explanation of patterns to a directory")
    common(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("aot", help="compile a pattern's kernels for GPU targets (no GPU needed): cubins and resources")
    p.add_argument("file", metavar="FILE", nargs="?")
    p.add_argument("--pattern", metavar="NAME", help="the pattern block to use (when the file holds several)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a param value (Python literal); repeatable")
    p.add_argument("--all", action="store_true", help="every library pattern")
    p.add_argument("--target", default="sm_80,sm_90a", metavar="sm_80,sm_90a",
                   help="comma-separated targets (sm_80, sm_86, sm_89, sm_90a, sm_100a; default sm_80,sm_90a)")
    aot_options(p, output=True)
    p.set_defaults(func=cmd_aot)

    p = sub.add_parser("list", help="list the pattern library, one line each")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("cache", help="show (info) or delete (clear) attncc's cache of generated kernels")
    p.add_argument("action", choices=("info", "clear"))
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("demo", help="run the pattern library against the reference and FlexAttention")
    p.add_argument("--patterns", metavar="A,B", help="comma-separated library pattern names (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu (Triton interpreter)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default: 384 on CPU, 8192 on CUDA)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("test", help="property-test attncc's kernel (or your function) against the reference")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--pattern", metavar="NAME", help="test only this pattern of FILE (default: every pattern)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a param value (Python literal); repeatable")
    p.add_argument("--against", metavar="MODULE:FUNCTION",
                   help="test fn(q, k, v, **tensors) from MODULE (or FILE.py) instead of attncc's kernel")
    p.add_argument("--lse", action="store_true", help="with --against: the function returns (out, lse)")
    p.add_argument("--grads", action="store_true", help="also compare gradients of q, k, v and float tensors")
    p.add_argument("--examples", type=int, default=100, metavar="N", help="Hypothesis examples per pattern (100)")
    p.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: a fresh random run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.set_defaults(func=cmd_test)
    return ap


def cmd_test(args) -> int:
    """``attncc test FILE``: :func:`attncc.testing.cmd_test` (hypothesis imported only here)."""
    try:
        from .testing import cmd_test as run
    except ImportError as e:  # hypothesis is optional
        print(e, file=sys.stderr)
        return 1
    return run(args)


def main(argv=None) -> int:
    """Entry point of the ``attncc`` console script.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 user error (message on stderr), 2 usage error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(_error_text(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
