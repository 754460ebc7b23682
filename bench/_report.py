"""Shared by the benchmarks: the machine line, the child shapes they share, report templates, plot helpers, the
common flags and section updates of docs/BENCHMARKS.md."""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from subclone_core.io.atomic import building_file, write_text

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC = DOCS / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun it to refresh the numbers.\n"
TEMPLATES = Path(__file__).resolve().parent / "templates"
PAPER_SPEEDUP = 4.0  # the paper's headline: about 4x fewer steps than random init
# The two child shapes of the default parent (SmolLM2-135M: 30 x 576, 9 heads / 3 KV, FFN 1536) that the
# benchmarks share: the paper's ratio, and a much smaller child.
PAPER_LIKE = {"layers": 20, "hidden": 384, "heads": 6, "kv_heads": 2, "ffn": 1024}
AGGRESSIVE = {"layers": 6, "hidden": 192, "heads": 3, "kv_heads": 1, "ffn": 512}
SHAPES = {"paper-like": PAPER_LIKE, "aggressive": AGGRESSIVE}


# the widest vector instructions of a CPU, widest first: the same model name has come with either (this VM's
# "AMD EPYC" is Zen 2 with AVX2 on some days and Zen 4 with AVX-512 and bfloat16 on others)
VECTOR_FLAGS = (("avx512_bf16", "AVX-512 with bfloat16"), ("amx_bf16", "AMX with bfloat16"),
                ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def machine() -> str:
    """One line: CPU model and its widest vector instructions, cores, torch version and the GPU if there is one."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("model name") and not flags:
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    cpu += next((f" ({name})" for flag, name in VECTOR_FLAGS if flag in flags), "")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def log(text: str) -> None:
    """A progress line on stderr (stdout carries a script's report)."""
    print(text, file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """fn's result, its wall seconds and its CPU seconds (all threads of this process)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


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


def replace_marked(path: Path, name: str, text: str) -> bool:
    """Replace the text between a file's ``<!-- begin NAME -->`` and ``<!-- end NAME -->``; unlike write_section
    it never appends (False: no such markers, the file is left alone)."""
    if not path.is_file():
        return False
    content = path.read_text()
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    if begin not in content or end not in content.split(begin, 1)[1]:
        return False
    head, rest = content.split(begin, 1)
    write_text(path, head + begin + text + end + rest.split(end, 1)[1])
    return True


def render(name: str, **values: Any) -> str:
    """bench/templates/NAME.md filled in by str.format, or NAME.md.j2 rendered by Jinja (filters ``f`` = format,
    ``value`` = fmt_value, global ``table``); one paragraph per line, the final newline not part of the text."""
    if (TEMPLATES / f"{name}.md.j2").is_file():
        return _jinja().get_template(f"{name}.md.j2").render(**values).removesuffix("\n")
    return (TEMPLATES / f"{name}.md").read_text().removesuffix("\n").format(**values)


@functools.cache
def _jinja() -> Any:
    """The templates' Jinja environment: block tags take their own line away, an unknown name is an error."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters.update(f=format, value=fmt_value)
    env.globals.update(table=table)
    return env


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (imported late: only the plotting paths need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panels(cols: int, width: float, height: float, rows: int = 1) -> tuple[Any, Any]:
    """A figure of rows x cols panels of the given size each; axes always 2-D."""
    return pyplot().subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)


def finish(ax: Any, *, legend: float = 7, which: str = "major", **labels: Any) -> None:
    """Titles and labels (``ax.set``), a legend of the given font size and a light grid."""
    if labels:
        ax.set(**labels)
    ax.legend(fontsize=legend)
    ax.grid(alpha=0.3, which=which)


def save_figure(fig: Any, path: Path, dpi: int = 90) -> None:
    """Lay out, write and close a figure; the file appears whole or not at all, its folder made if needed."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with building_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip("."))
    pyplot().close(fig)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally long score vectors, ties at their average rank (the library's
    analysis.probes.rank_correlation, as scipy.stats.spearmanr)."""
    from subclone_core.analysis.probes import rank_correlation

    return float(rank_correlation(torch.stack([a.flatten().double().cpu(), b.flatten().double().cpu()]))[0, 1])


def venv_tool(name: str) -> str:
    """The path of a console script installed beside this Python (torchrun, subclone), else its bare name."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


THREADS_HELP = "torch CPU threads (default: one per core)"


def bench_parser(doc: str | None, *, smoke: str | None = None, gpu: str | None = None, threads: str | None = None,
                 report_only: str | None = None) -> argparse.ArgumentParser:
    """A benchmark's parser (its docstring's first line) with each shared flag whose help is given: ``--smoke``
    or ``--gpu`` (exclusive sizes), ``--threads`` and ``--report-only`` (redraw from the saved results)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    sizes = parser.add_mutually_exclusive_group() if smoke or gpu else None  # an empty group breaks --help
    for flag, text in (("--smoke", smoke), ("--gpu", gpu)):
        if text:
            sizes.add_argument(flag, action="store_true", help=text)
    if threads:
        parser.add_argument("--threads", type=int, help=threads)
    if report_only:
        parser.add_argument("--report-only", action="store_true", help=report_only)
    return parser
