"""Writing a benchmark's Markdown table to ``benchmarks/results/<kind>_<device>_<date>.md``."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import triton

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    """``torch.cuda.get_device_name()`` on a CUDA machine, else ``"cpu"``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def results_path(kind: str, date: str | None = None) -> Path:
    """The default results file ``results/<kind>_<device-slug>_<date>.md`` (date: today)."""
    date = date or datetime.date.today().isoformat()
    slug = "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-")
    return RESULTS_DIR / f"{kind}_{slug}_{date}.md"


def write_results(kind: str, title: str, table: str, settings: str, path: Path | str | None = None,
                  date: str | None = None, command: str | None = None) -> Path:
    """Write ``table`` under a heading with the date, the CUDA device, the command line and
    the library versions; returns the path (default :func:`results_path`, else ``path``;
    ``date`` default: today, local time; ``command`` default: ``python`` and ``sys.argv``)."""
    dev = device_name()
    date = date or datetime.date.today().isoformat()
    path = Path(path) if path is not None else results_path(kind, date)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = command or f"python {' '.join(sys.argv)}"
    path.write_text(f"# {title}, {date}, {dev}\n\n`{command}` (torch {torch.__version__}, "
                    f"triton {triton.__version__}, {settings})\n\n{table}\n")
    print(f"wrote {path}")
    return path
