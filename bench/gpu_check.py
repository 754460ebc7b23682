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

import torch

from bench._report import PAPER_LIKE, ROOT, bench_parser, render, spearman, table, venv_tool
from subclone_core.io.atomic import write_text

# (device, dtype of the check, training batch, sequence length, calibration tokens, child shape)
FULL = {"device": "cuda", "batch": 64, "seq_len": 512, "tokens": 4096, "probe_steps": 10, "eval_tokens": 8192,
        "child": PAPER_LIKE}
DRY = {"device": "cpu", "batch": 4, "seq_len": 32, "tokens": 256, "probe_steps": 1, "eval_tokens": 64,
       "child": {"layers": 2, "hidden": 32, "heads": 2, "kv_heads": 1, "ffn": 64}}


def overlap(a: list[int], b: list[int]) -> float:
    """The share of one kept set that the other keeps too."""
    return len(set(a) & set(b)) / max(1, len(a))


def compare_rankings(parent, gpu_imp, cpu_imp, child: dict) -> dict:
    """How the GPU bf16 calibration's choices agree with the CPU float32 one's, for the check's child."""
    from subclone_core.core.selection import pick_blocks, select
    from subclone_core.core.shape import Shape
    from subclone_core.core.strategies import plan_shape

    target, shape = plan_shape(parent.model, **child), Shape.of(parent.model.config)
    sels = []
    for imp in (gpu_imp, cpu_imp):
        blocks = pick_blocks(shape.layers, target.layers, "magnitude", imp.rel_magnitude)
        sels.append(select(shape, target, imp, "importance", blocks))
    gpu, cpu = sels
    return {"spearman_residual": spearman(gpu_imp.residual, cpu_imp.residual),
            "residual_overlap": overlap(gpu.residual, cpu.residual),
            "ffn_overlap": sum(map(overlap, gpu.ffn, cpu.ffn)) / len(gpu.ffn),
            "head_overlap": sum(map(overlap, gpu.heads, cpu.heads)) / len(gpu.heads),
            "same_blocks": gpu.blocks == cpu.blocks}


def calibrations(parent_id: str, plan: dict) -> tuple[dict, object]:
    """Calibrate on the check's device in bf16 and on the CPU in float32; time both; make the child."""
    from subclone_core.core.strategies import plan_shape
    from subclone_core.sources.parents import load_parent
    from subclone_core.workflow.children import make_child, measure_importance

    out = {}
    cpu = load_parent(parent_id, device="cpu", dtype="float32")
    start = time.perf_counter()
    cpu_imp = measure_importance(cpu, tokens=plan["tokens"])
    out["cpu_float32_calib_s"] = time.perf_counter() - start
    del cpu
    gpu = load_parent(parent_id, device=plan["device"], dtype="bfloat16")
    start = time.perf_counter()
    gpu_imp = measure_importance(gpu, tokens=plan["tokens"])
    out["bf16_calib_s"] = time.perf_counter() - start
    out.update(compare_rankings(gpu, gpu_imp, cpu_imp, plan["child"]))
    start = time.perf_counter()
    child = make_child(gpu, plan_shape(gpu.model, **plan["child"]), importance=gpu_imp)
    out["child_s"] = time.perf_counter() - start
    out["child_parameters"] = sum(p.numel() for p in child.model.parameters())
    out["child_dtype"] = str(next(child.model.parameters()).dtype).removeprefix("torch.")
    out["calib_tokens"] = gpu_imp.tokens
    return out, gpu_imp


def compare_argv(parent_id: str, plan: dict, steps: int, run: Path) -> list[str]:
    child = [f"--{k.replace('_', '-')}={v}" for k, v in plan["child"].items()]
    return ["compare", "--parent", parent_id, "--dtype", "float32", "--device", plan["device"], *child,
            "--strategies", "subclone,random", "--steps", str(steps), "--batch-size", str(plan["batch"]),
            "--seq-len", str(plan["seq_len"]), "--calib-tokens", str(plan["tokens"]), "--out", str(run),
            "--eval-tokens", str(plan["eval_tokens"]), "--eval-every", str(max(1, steps // 5)),
            "--overwrite", "--quiet", "--json"]


def train_for(parent_id: str, plan: dict, minutes: float, work: Path) -> dict:
    """Subclone vs random init for about ``minutes`` each: a short probe times a step, then the real run."""
    probe = work / "probe"
    start = time.perf_counter()
    _compare(compare_argv(parent_id, plan, plan["probe_steps"], probe))
    per_step = (time.perf_counter() - start) / (2 * plan["probe_steps"])  # two candidates
    steps = max(plan["probe_steps"], int(minutes * 60 / per_step))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = work / "run"
    start = time.perf_counter()
    _compare(compare_argv(parent_id, plan, steps, run))
    seconds = time.perf_counter() - start
    summary = json.loads((run / "summary.json").read_text())
    return summarize(summary, steps, seconds, plan, torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)


def _compare(argv: list[str]) -> None:
    """`subclone compare` in this process (so peak GPU memory is readable), its JSON line kept off stdout."""
    from subclone_core.cli.main import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    if code:
        raise RuntimeError(f"subclone {' '.join(argv)} failed with exit status {code}")


def summarize(summary: dict, steps: int, seconds: float, plan: dict, peak_bytes: int) -> dict:
    tokens = steps * plan["batch"] * plan["seq_len"]
    rows = {r["name"]: r for r in summary["rows"]}
    sub = rows.get("subclone", {})
    return {"steps": steps, "seconds": seconds, "tokens_per_s": 2 * tokens / seconds,
            "peak_gpu_gib": peak_bytes / 2**30, "speedup": sub.get("speedup"),
            "final": {name: r.get("final") for name, r in rows.items()},
            "best": {name: r.get("best") for name, r in rows.items()}}


def two_gpus(parent_id: str, plan: dict, steps: int, work: Path) -> dict | None:
    """The same comparison data-parallel on two GPUs under torchrun (None with fewer than two GPUs)."""
    if torch.cuda.device_count() < 2:
        return None
    run = work / "two"
    seconds = _torchrun(2, compare_argv(parent_id, {**plan, "device": "cuda"}, steps, run))
    return summarize(json.loads((run / "summary.json").read_text()), steps, seconds, plan, 0)


def _torchrun(procs: int, argv: list[str], env: dict | None = None) -> float:
    """`subclone ARGV` under torchrun on ``procs`` processes; its wall seconds."""
    start = time.perf_counter()
    subprocess.run([venv_tool("torchrun"), "--standalone", "--nproc_per_node", str(procs), "-m", "subclone_core.cli",
                    *argv], check=True, env=env)
    return time.perf_counter() - start


def sequential_check(parent_id: str, plan: dict, memory_imp) -> dict:
    """Sequential calibration of the bf16 parent on the check's device against the in-memory one (step 1)."""
    from subclone_core.sources.parents import load_parent
    from subclone_core.workflow.children import measure_importance

    parent = load_parent(parent_id, device=plan["device"], dtype="bfloat16")
    start = time.perf_counter()
    imp = measure_importance(parent, tokens=plan["tokens"], sequential=True)
    out = {"sequential_calib_s": time.perf_counter() - start}
    out.update(compare_rankings(parent, imp, memory_imp, plan["child"]))
    return out


def fsdp_check(parent_id: str, plan: dict, steps: int, work: Path) -> dict:
    """`subclone compare --fsdp` under torchrun (two processes: two GPUs, or two CPU processes in a dry run;
    one process on a single GPU) against the same comparison in this process."""
    from transformers import AutoModelForCausalLM

    procs = 2 if plan["device"] == "cpu" else max(1, min(2, torch.cuda.device_count()))
    plain, sharded = work / "plain", work / "fsdp"
    start = time.perf_counter()
    _compare(compare_argv(parent_id, plan, steps, plain))
    plain_s = time.perf_counter() - start
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if plan["device"] == "cpu" else None
    fsdp_s = _torchrun(procs, [*compare_argv(parent_id, plan, steps, sharded), "--fsdp"], env)
    final = {name: {r["name"]: r["final"] for r in json.loads((run / "summary.json").read_text())["rows"]}
             for name, run in (("plain", plain), ("fsdp", sharded))}
    loads = type(AutoModelForCausalLM.from_pretrained(sharded / "subclone")).__name__
    return {"processes": procs, "steps": steps, "plain_s": plain_s, "fsdp_s": fsdp_s, "final": final,
            "max_rel_diff": max(abs(final["fsdp"][n] - v) / abs(v) for n, v in final["plain"].items()),
            "saved_class": loads}


def report(result: dict, *, dry_run: bool) -> str:
    """docs/GPU.md (template bench/templates/gpu.md)."""
    t, two, fsdp = result["training"], result.get("two_gpus"), result["fsdp"]
    training = table(["run", "steps each", "tokens/s", "peak GPU GiB", "speedup", "final loss subclone / random"],
                     [_row("one device", t), *([_row("two GPUs (torchrun)", two)] if two else [])])
    sharded = table(["run", "steps", "seconds", "final loss subclone / random"], [
        [name, fsdp["steps"], f"{fsdp[name + '_s']:.1f}", _finals(fsdp["final"][name])] for name in ("plain", "fsdp")])
    return render("gpu", where="a CPU dry run on a tiny random parent" if dry_run else result["device_name"],
                  date=time.strftime("%Y-%m-%d"), seconds=result["seconds"], parent=result["parent"],
                  child_text=", ".join(f"{k} {v}" for k, v in result["child"].items()), c=result["calibration"],
                  child_m=result["calibration"]["child_parameters"] / 1e6, seq=result["sequential"], fsdp=fsdp,
                  training=training, sharded=sharded) + "\n"


def _row(name: str, t: dict) -> list:
    return [name, t["steps"], f"{t['tokens_per_s']:,.0f}", f"{t['peak_gpu_gib']:.2f}",
            "-" if t["speedup"] is None else f"{t['speedup']:.2f}x", _finals(t["final"])]


def _finals(final: dict) -> str:
    """"subclone / random" final losses, "-" for a missing one."""
    return " / ".join("-" if final.get(k) is None else f"{final[k]:.3f}" for k in ("subclone", "random"))


def suggested_child(parent_id: str) -> dict:
    """The library's suggested child shape for a parent (a fifth of the blocks, a third of every width)."""
    from subclone_core.core.shape import suggested_shape
    from subclone_core.sources.parents import load_parent

    sizes = suggested_shape(load_parent(parent_id).model).as_dict()
    sizes.pop("head_dim")
    return sizes


def dry_parent(work: Path) -> str:
    """A tiny random bf16 Llama in two shards with the default tokenizer (bench_scale's writer)."""
    from bench.bench_scale import write_parent

    folder = work / "tiny-parent"
    write_parent(folder, "tiny")
    return str(folder)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="tiny random parent on the CPU (seconds)")
    parser.add_argument("--minutes", type=float, default=None, help="training minutes per candidate (1.5; dry 0.05)")
    parser.add_argument("--out", default=None, help="report file (default docs/GPU.md; dry run: not written)")
    parser.add_argument("--parent", default="default", help="the parent id to check (default: the embedded one)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible; run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    plan = DRY if args.dry_run else FULL
    minutes = args.minutes if args.minutes is not None else (0.05 if args.dry_run else 1.5)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    start = time.perf_counter()
    parent_id = dry_parent(work) if args.dry_run else args.parent
    if parent_id != "default" and not args.dry_run:
        plan = {**plan, "child": suggested_child(parent_id)}
    calibration, gpu_imp = calibrations(parent_id, plan)
    training = train_for(parent_id, plan, minutes, work)
    result = {"calibration": calibration, "training": training, "seconds": 0.0,
              "two_gpus": two_gpus(parent_id, plan, training["steps"] // 2 or 1, work),
              "sequential": sequential_check(parent_id, plan, gpu_imp),
              "fsdp": fsdp_check(parent_id, plan, 2 * plan["probe_steps"], work),
              "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "parent": "a tiny random parent" if args.dry_run else parent_id, "child": plan["child"]}
    result["seconds"] = time.perf_counter() - start
    text = report(result, dry_run=args.dry_run)
    out = args.out or (None if args.dry_run else str(ROOT / "docs" / "GPU.md"))
    if out:
        write_text(Path(out), text)
        write_text(Path(out).with_suffix(".json"), json.dumps(result, indent=1))
    print(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
