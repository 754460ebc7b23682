"""Core costs on the embedded default parent: calibration overhead, slicing + saving time, peak memory.

Targets: calibration at most 1.2x a plain forward pass over the same tokens; slicing and saving a child
under 2 s once the parent is loaded; peak memory while subcloning under 2x the parent's float32 size.
Run: python -m bench.bench_core [--tokens 4096] (writes a section of docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from bench._report import SHAPES, bench_parser, machine, render, table, write_section
from subclone_core.core.strategies import plan_shape, subclone_model
from subclone_core.pipeline.calibration import calibrate
from subclone_core.sources import make_data
from subclone_core.sources.parents import load_parent
from subclone_core.workflow.children import save_child


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


@torch.no_grad()
def plain_forward(model, batches) -> None:
    for b in batches:
        model(**b, use_cache=False)


def best_of_alternating(first, second, repeats: int = 3) -> tuple[float, float]:
    """Best time of each of two functions, run in turns so that both see the same machine load."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    load_avg = os.getloadavg()[0]  # other work on the machine slows the hooks' many small ops most
    before_load = rss_mb("VmRSS")
    start = time.perf_counter()
    parent = load_parent("default")
    load_s = time.perf_counter() - start
    param_mb = sum(p.numel() * p.element_size() for p in parent.model.parameters()) / 2**20
    batches = list(make_data(parent, "default", "train", seq_len=128, max_tokens=args.tokens).batches(8))
    plain_forward(parent.model, batches[:1])  # warm-up
    forward_s, calib_s = best_of_alternating(lambda: plain_forward(parent.model, batches),
                                             lambda: calibrate(parent.model, batches))
    importance = calibrate(parent.model, batches)
    after_load = rss_mb("VmRSS")
    rows = []
    for name, sizes in SHAPES.items():
        reset_peak()
        start = time.perf_counter()
        child = subclone_model(parent.model, plan_shape(parent.model, **sizes), importance=importance)
        slice_s = time.perf_counter() - start
        child.preprocessor = parent.preprocessor
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            save_child(child, Path(tmp) / "child", task=parent.task)
            save_s = time.perf_counter() - start
        peak = rss_mb("VmHWM")
        rows.append([name, f"{slice_s:.2f}", f"{save_s:.2f}", f"{slice_s + save_s:.2f}",
                     f"{peak - before_load:.0f}", f"{(peak - before_load) / param_mb:.2f}x"])
        del child
    steps = table(["step", "seconds", "target"], [
        ["plain forward pass over the tokens", f"{forward_s:.2f}", ""],
        ["calibration (same tokens, with hooks)", f"{calib_s:.2f}", f"{calib_s / forward_s:.2f}x forward (target <= 1.2x)"],
    ])
    children = table(["child", "slice s", "save s", "slice + save s (target < 2)", "peak MB above start",
                      "peak / parent size (target < 2x)"], rows)
    report = render("core", machine=machine(), load_avg=load_avg, param_mb=param_mb, load_s=load_s,
                    tokens=sum(b["input_ids"].numel() for b in batches), steps_table=steps,
                    children_table=children, resident=after_load - before_load)
    print(report)
    write_section("core", report)


if __name__ == "__main__":
    main()
