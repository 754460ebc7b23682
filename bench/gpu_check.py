"""The ready GPU check (make gpu-check): one GPU, under 8 minutes, writes docs/GPU.md (see bench/README.md).
``--parent`` checks another parent (e.g. a child saved by ``subclone make``) with the library's suggested shape.

Run: python -m bench.gpu_check [--minutes 1.5] [--out docs/GPU.md] [--parent P] | --dry-run (tiny, on the CPU)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from bench._report import DOCS, PAPER_LIKE, bench_parser, render, spearman, timed, venv_tool
from subclone_core.core.selection import pick_blocks, select
from subclone_core.core.shape import Shape, suggested_shape
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import write_text
from subclone_core.sources.parents import load_parent
from subclone_core.workflow.children import make_child, measure_importance

# The check's device, training batch and sequence length, calibration tokens, probe steps, validation tokens, child.
FULL = {"device": "cuda", "batch": 64, "seq_len": 512, "tokens": 4096, "probe_steps": 10, "eval_tokens": 8192,
        "child": PAPER_LIKE}
DRY = {"device": "cpu", "batch": 4, "seq_len": 32, "tokens": 256, "probe_steps": 1, "eval_tokens": 64,
       "child": {"layers": 2, "hidden": 32, "heads": 2, "kv_heads": 1, "ffn": 64}}


def overlap(a: list[int], b: list[int]) -> float:
    """The share of one kept set that the other keeps too."""
    return len(set(a) & set(b)) / max(1, len(a))


def compare_rankings(parent: Any, first: Any, second: Any, child: dict) -> dict:
    """How the choices of two calibrations of the parent agree for the check's child."""
    target, shape = plan_shape(parent.model, **child), Shape.of(parent.model.config)
    a, b = (select(shape, target, imp, "importance",
                   pick_blocks(shape.layers, target.layers, "magnitude", imp.rel_magnitude)) for imp in (first, second))
    return {"spearman_residual": spearman(first.residual, second.residual),
            "residual_overlap": overlap(a.residual, b.residual),
            "ffn_overlap": sum(map(overlap, a.ffn, b.ffn)) / len(a.ffn),
            "head_overlap": sum(map(overlap, a.heads, b.heads)) / len(a.heads), "same_blocks": a.blocks == b.blocks}


def calibrated(parent_id: str, plan: dict, device: str, dtype: str, **options: Any) -> tuple[Any, Any, float]:
    """The parent loaded on a device in a dtype, its importance on the check's tokens, the calibration's seconds."""
    parent = load_parent(parent_id, device=device, dtype=dtype)
    importance, seconds, _ = timed(lambda: measure_importance(parent, tokens=plan["tokens"], **options))
    return parent, importance, seconds


def calibrations(parent_id: str, plan: dict) -> tuple[dict, Any]:
    """Calibrate on the check's device in bf16 and on the CPU in float32; time both; make the child."""
    cpu_imp, cpu_s = calibrated(parent_id, plan, "cpu", "float32")[1:]  # the CPU parent is freed at once
    gpu, gpu_imp, gpu_s = calibrated(parent_id, plan, plan["device"], "bfloat16")
    out = {"cpu_float32_calib_s": cpu_s, "bf16_calib_s": gpu_s,
           **compare_rankings(gpu, gpu_imp, cpu_imp, plan["child"])}
    child, out["child_s"], _ = timed(lambda: make_child(gpu, plan_shape(gpu.model, **plan["child"]),
                                                        importance=gpu_imp))
    out["child_parameters"] = sum(p.numel() for p in child.model.parameters())
    out["child_dtype"] = str(next(child.model.parameters()).dtype).removeprefix("torch.")
    out["calib_tokens"] = gpu_imp.tokens
    return out, gpu_imp


def compare(parent_id: str, plan: dict, steps: int, run: Path, procs: int = 0, fsdp: bool = False
            ) -> tuple[float, dict[str, dict]]:
    """`subclone compare` of subclone and random init on the plan's settings into ``run``, in this process (so
    peak GPU memory is readable; its JSON line kept off stdout) or under torchrun on ``procs``: its seconds and
    its summary rows by candidate."""
    child = [f"--{k.replace('_', '-')}={v}" for k, v in plan["child"].items()]
    argv = ["compare", "--parent", parent_id, "--dtype", "float32", "--device", plan["device"], *child,
            "--strategies", "subclone,random", "--steps", str(steps), "--batch-size", str(plan["batch"]),
            "--seq-len", str(plan["seq_len"]), "--calib-tokens", str(plan["tokens"]), "--out", str(run),
            "--eval-tokens", str(plan["eval_tokens"]), "--eval-every", str(max(1, steps // 5)),
            "--overwrite", "--quiet", "--json", *(["--fsdp"] if fsdp else [])]
    start = time.perf_counter()
    if procs:
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if plan["device"] == "cpu" else None
        subprocess.run([venv_tool("torchrun"), "--standalone", "--nproc_per_node", str(procs), "-m",
                        "subclone_core.cli", *argv], check=True, env=env)
    else:
        from subclone_core.cli.main import main  # late, as before: its import counts in the probe's time

        with contextlib.redirect_stdout(io.StringIO()):
            if code := main(argv):
                raise RuntimeError(f"subclone {' '.join(argv)} failed with exit status {code}")
    seconds = time.perf_counter() - start
    return seconds, {r["name"]: r for r in json.loads((run / "summary.json").read_text())["rows"]}


def summarize(steps: int, plan: dict, peak_bytes: int, seconds: float, rows: dict[str, dict]) -> dict:
    """One comparison for the report: tokens/s of both candidates, peak GPU memory, speedup, final and best."""
    return {"steps": steps, "seconds": seconds, "tokens_per_s": 2 * steps * plan["batch"] * plan["seq_len"] / seconds,
            "peak_gpu_gib": peak_bytes / 2**30, "speedup": rows.get("subclone", {}).get("speedup"),
            "final": {n: r.get("final") for n, r in rows.items()}, "best": {n: r.get("best") for n, r in rows.items()}}


def train_for(parent_id: str, plan: dict, minutes: float, work: Path) -> dict:
    """Subclone vs random init for about ``minutes`` each: a short probe times a step, then the real run."""
    probe_s = compare(parent_id, plan, plan["probe_steps"], work / "probe")[0]
    per_step = probe_s / (2 * plan["probe_steps"])  # two candidates
    steps = max(plan["probe_steps"], int(minutes * 60 / per_step))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds, rows = compare(parent_id, plan, steps, work / "run")
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return summarize(steps, plan, peak, seconds, rows)


def sequential_check(parent_id: str, plan: dict, memory_imp: Any) -> dict:
    """Sequential calibration of the bf16 parent on the check's device against the in-memory one."""
    parent, imp, seconds = calibrated(parent_id, plan, plan["device"], "bfloat16", sequential=True)
    return {"sequential_calib_s": seconds, **compare_rankings(parent, imp, memory_imp, plan["child"])}


def two_gpus(parent_id: str, plan: dict, steps: int, work: Path) -> dict | None:
    """The same comparison data-parallel on two GPUs under torchrun (None with fewer than two GPUs)."""
    if torch.cuda.device_count() < 2:
        return None
    return summarize(steps, plan, 0, *compare(parent_id, {**plan, "device": "cuda"}, steps, work / "two", 2))


def fsdp_check(parent_id: str, plan: dict, steps: int, work: Path) -> dict:
    """`subclone compare --fsdp` under torchrun (two processes: two GPUs, or two CPU processes in a dry run;
    one process on a single GPU) against the same comparison in this process."""
    procs = 2 if plan["device"] == "cpu" else max(1, min(2, torch.cuda.device_count()))
    plain_s, plain = compare(parent_id, plan, steps, work / "plain")
    fsdp_s, sharded = compare(parent_id, plan, steps, work / "fsdp", procs, fsdp=True)
    final = {run: {n: r["final"] for n, r in rows.items()} for run, rows in (("plain", plain), ("fsdp", sharded))}
    loads = type(AutoModelForCausalLM.from_pretrained(work / "fsdp" / "subclone")).__name__
    return {"processes": procs, "steps": steps, "plain_s": plain_s, "fsdp_s": fsdp_s, "final": final,
            "max_rel_diff": max(abs(final["fsdp"][n] - v) / abs(v) for n, v in final["plain"].items()),
            "saved_class": loads}


def check_plan(args: Any, work: Path) -> tuple[str, dict]:
    """The parent to check and the plan: a tiny random bf16 Llama in two shards (bench_scale's writer) on the CPU
    for a dry run; another parent than the default with the library's suggested child shape."""
    if args.dry_run:
        from bench.bench_scale import write_parent  # here only: a GPU run's probe times the CLI's imports

        write_parent(work / "tiny-parent", "tiny")
        return str(work / "tiny-parent"), DRY
    if args.parent == "default":
        return args.parent, FULL
    sizes = suggested_shape(load_parent(args.parent).model).as_dict()
    sizes.pop("head_dim")
    return args.parent, {**FULL, "child": sizes}


def main() -> int:
    """Every check in turn, into docs/GPU.md and GPU.json (or --out); 2 where no GPU is visible."""
    parser = bench_parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="tiny random parent on the CPU (seconds)")
    parser.add_argument("--minutes", type=float, default=None, help="training minutes per candidate (1.5; dry 0.05)")
    parser.add_argument("--out", default=None, help="report file (default docs/GPU.md; dry run: not written)")
    parser.add_argument("--parent", default="default", help="the parent id to check (default: the embedded one)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible; run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    minutes = args.minutes if args.minutes is not None else (0.05 if args.dry_run else 1.5)
    work, start = Path(tempfile.mkdtemp(prefix="gpu-check-")), time.perf_counter()
    parent_id, plan = check_plan(args, work)
    calibration, gpu_imp = calibrations(parent_id, plan)
    training = train_for(parent_id, plan, minutes, work)
    result = {"calibration": calibration, "training": training, "seconds": 0.0,
              "two_gpus": two_gpus(parent_id, plan, training["steps"] // 2 or 1, work),
              "sequential": sequential_check(parent_id, plan, gpu_imp),
              "fsdp": fsdp_check(parent_id, plan, 2 * plan["probe_steps"], work),
              "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "parent": "a tiny random parent" if args.dry_run else parent_id, "child": plan["child"]}
    result["seconds"] = time.perf_counter() - start
    where = "a CPU dry run on a tiny random parent" if args.dry_run else result["device_name"]
    text = render("gpu", r=result, where=where, date=time.strftime("%Y-%m-%d")) + "\n"
    if out := args.out or (None if args.dry_run else str(DOCS / "GPU.md")):
        write_text(Path(out), text)
        write_text(Path(out).with_suffix(".json"), json.dumps(result, indent=1))
    print(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
