"""The core on the embedded default parent: calibration overhead, slicing + saving time and peak memory
(targets: calibration at most 1.2x a plain forward pass, slicing and saving under 2 s, peak memory under 2x the
parent's float32 size; section "core"), then the step-0 loss of children under each slicing option at the two
shared ratios, which chose the defaults (section "defaults").

Run: python -m bench.bench_core [--tokens 4096] [--val-tokens 8192]
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench._report import SHAPES, bench_parser, machine, render, timed, write_section
from subclone_core.core.strategies import plan_shape, subclone_model
from subclone_core.pipeline.calibration import calibrate
from subclone_core.sources import make_data
from subclone_core.sources.parents import load_parent
from subclone_core.training.evaluate import evaluate
from subclone_core.workflow.children import measure_importance, save_child

VARIANTS = {  # the slicing options of the "defaults" section, as subclone_model's keywords
    "subclone, no scaling, tied head, drop magnitude": {"strategy": "subclone", "scale": False, "drop": "magnitude"},
    "subclone, no scaling, tied head, drop middle": {"strategy": "subclone", "scale": False, "drop": "middle"},
    "subclone, scaling, tied unscaled head": {"strategy": "subclone", "scale": True, "drop": "magnitude"},
    "subclone, scaling, untied scaled head": {"strategy": "subclone", "scale": True, "drop": "magnitude",
                                              "untie_head": True},
    "first-k (no reordering), no scaling, drop middle": {"strategy": "first-k", "scale": False, "drop": "middle"},
    "uniform (weight selection), first N blocks": {"strategy": "uniform", "scale": False},
    "random init": {"strategy": "random"},
}


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


@torch.no_grad()
def plain_forward(model: torch.nn.Module, batches: list[dict]) -> None:
    """The model over every batch without hooks: what calibration's cost is set against."""
    for b in batches:
        model(**b, use_cache=False)


def best_of_alternating(first: Callable[[], Any], second: Callable[[], Any], repeats: int = 3) -> tuple[float, float]:
    """Best time of each of two functions, run in turns so that both see the same machine load."""
    times = [timed(fn)[1] for _ in range(repeats) for fn in (first, second)]
    return min(times[0::2]), min(times[1::2])


def child_row(parent: Any, name: str, sizes: dict, importance: Any, start_mb: float, param_mb: float) -> list[str]:
    """Slice and save one child: the seconds of each, and the peak memory above the start while doing both."""
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    child, slice_s, _ = timed(lambda: subclone_model(parent.model, plan_shape(parent.model, **sizes),
                                                     importance=importance))
    child.preprocessor = parent.preprocessor
    with tempfile.TemporaryDirectory() as tmp:
        save_s = timed(lambda: save_child(child, Path(tmp) / "child", task=parent.task))[1]
    peak = rss_mb("VmHWM") - start_mb
    return [name, f"{slice_s:.2f}", f"{save_s:.2f}", f"{slice_s + save_s:.2f}", f"{peak:.0f}",
            f"{peak / param_mb:.2f}x"]


def core_report(parent: Any, load_s: float, start_mb: float, tokens: int) -> str:
    """The "core" section: calibration against plain forward passes over ``tokens``, then each shared child."""
    load_avg = os.getloadavg()[0]  # other work on the machine slows the hooks' many small ops most
    param_mb = sum(p.numel() * p.element_size() for p in parent.model.parameters()) / 2**20
    batches = list(make_data(parent, "default", "train", seq_len=128, max_tokens=tokens).batches(8))
    plain_forward(parent.model, batches[:1])  # warm-up
    forward_s, calib_s = best_of_alternating(lambda: plain_forward(parent.model, batches),
                                             lambda: calibrate(parent.model, batches))
    importance = calibrate(parent.model, batches)
    resident = rss_mb("VmRSS") - start_mb
    rows = [child_row(parent, name, sizes, importance, start_mb, param_mb) for name, sizes in SHAPES.items()]
    return render("core", machine=machine(), load_avg=load_avg, param_mb=param_mb, load_s=load_s,
                  tokens=sum(b["input_ids"].numel() for b in batches), forward_s=forward_s, calib_s=calib_s,
                  rows=rows, resident=resident)


def defaults_report(parent: Any, calib_tokens: int, val_tokens: int) -> str:
    """The "defaults" section: every VARIANTS child of both shared shapes at step 0."""
    importance = measure_importance(parent, "default", tokens=calib_tokens)
    val = make_data(parent, "default", "validation", seq_len=128, max_tokens=val_tokens)
    start = time.perf_counter()
    parent_loss = evaluate(parent.model, val.batches(8))["loss"]
    rows = []
    for shape, sizes in SHAPES.items():
        target = plan_shape(parent.model, **sizes)
        label = "{} {layers} x {hidden} ({heads} heads / {kv_heads} KV, FFN {ffn})".format(shape, **sizes)
        for name, options in VARIANTS.items():
            loss = evaluate(subclone_model(parent.model, target, importance=importance, **options).model,
                            val.batches(8))["loss"]
            rows.append([label, name, f"{loss:.2f}", f"{math.exp(min(loss, 50)):.0f}"])
            print(rows[-1], flush=True)
    return render("defaults", machine=machine(), parent_loss=parent_loss, calib_tokens=importance.tokens,
                  val_tokens=val.num_tokens, uniform=math.log(49152), seconds=time.perf_counter() - start, rows=rows)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens of both sections")
    parser.add_argument("--val-tokens", type=int, default=8192, help="validation tokens of the defaults' table")
    args = parser.parse_args()
    start_mb = rss_mb("VmRSS")
    parent, load_s, _ = timed(lambda: load_parent("default"))
    for name, report in (("core", lambda: core_report(parent, load_s, start_mb, args.tokens)),
                         ("defaults", lambda: defaults_report(parent, args.tokens, args.val_tokens))):
        text = report()
        print(text)
        write_section(name, text)


if __name__ == "__main__":
    main()
