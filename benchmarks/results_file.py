"""Writing a benchmark's Markdown table to ``benchmarks/results/<kind>_<device>_<date>.md``."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import triton

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(kind: str, title: str, table: str, settings: str) -> Path:
    """Write ``table`` under a heading with the date, the CUDA device, the command line and
    the library versions; returns the path (``results/<kind>_<device-slug>_<date>.md``)."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.date.today().isoformat()
    RESULTS_DIR.mkdir(exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")
    path = RESULTS_DIR / f"{kind}_{slug}_{date}.md"
    path.write_text(f"# {title}, {date}, {dev}\n\n`python {' '.join(sys.argv)}` (torch {torch.__version__}, "
                    f"triton {triton.__version__}, {settings})\n\n{table}\n")
    print(f"wrote {path}")
    return path
