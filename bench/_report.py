"""Shared by the benchmarks: the machine description and section updates of docs/BENCHMARKS.md."""

from __future__ import annotations

import math
import os
import platform
import re
from pathlib import Path

import numpy as np
import torch

from subclone_core.io.atomic import write_text

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun it to refresh the numbers.\n"


def machine() -> str:
    """One line: CPU model, cores, torch version and the GPU if there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def log_eval_steps(steps: int, count: int) -> tuple[int, ...]:
    """About ``count`` evaluation steps from 1 to ``steps``, evenly spaced in log(step) (for a log x axis)."""
    if steps < 2:
        return ()
    points = np.unique(np.round(np.geomspace(1, steps, count)).astype(int))
    return tuple(int(s) for s in points if 1 <= s < steps)


def json_default(value: object) -> None:
    """json.dumps' fallback for the benchmarks' results: a non-finite float is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_value(value: float | None, metric: str = "loss") -> str:
    """A validation value for a table: accuracy as a percentage, loss to two decimals, "-" for none."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.1%}" if metric == "accuracy" else f"{value:.2f}"


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replace (or append) the section between this name's markers, leaving the others as they are."""
    text = doc.read_text() if doc.exists() else HEADER
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text(doc, text)
