"""Memory per process when a child trains sharded (--fsdp) against replicated (DDP), under torchrun.

Synthetic Llama-shaped children (bench_scale.py's writer: random bf16 weights, the default parent's tokenizer,
never downloaded) are trained by the command users run, `torchrun --nproc_per_node 2 subclone train --model
CHILD`, with and without --fsdp, for a few steps on the CPU. Per run, in a fresh launcher process: the peak
RSS of the largest torchrun process (the launcher's getrusage(RUSAGE_CHILDREN), which Linux keeps as the
largest descendant's peak), the wall time and the final validation loss. Expected: the training state
(float32 weights, gradients and AdamW's two moments: 16 bytes per parameter) is replicated in every process
under DDP (plus DDP's gradient buckets, 4 bytes per parameter) and split N ways under FSDP. A mode whose
estimated peak over all processes exceeds the machine's memory is not run; its estimate is reported.

Writes docs/fsdp.json and a section of docs/BENCHMARKS.md.

    python bench/bench_fsdp.py [--sizes 0.25B,0.5B] [--budget-gib 8] [--procs 2] [--steps 3] [--work DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._report import machine, table, write_section
from bench.bench_scale import SIZES, write_parent
from subclone_core.io.atomic import write_text

DOCS = ROOT / "docs"
MODES = {"ddp": [], "fsdp": ["--fsdp"]}
BATCH, SEQ_LEN, EVAL_TOKENS = 2, 256, 512
STATE_BYTES = 16  # float32 weights, gradients, AdamW exp_avg and exp_avg_sq per parameter
DDP_BUCKET_BYTES = 4  # DDP's flat gradient buckets, another float32 copy of the gradients
LOAD_BYTES = 4  # under FSDP every process first holds the whole float32 child (the allocator keeps most of it)
RUNTIME_GIB = 1.0  # torch, transformers, the tokenizer and the data, per process


def train_argv(child: Path, out: Path, steps: int) -> list[str]:
    return ["train", "--model", str(child), "--out", str(out), "--steps", str(steps), "--batch-size", str(BATCH),
            "--seq-len", str(SEQ_LEN), "--eval-tokens", str(EVAL_TOKENS), "--eval-every", str(steps), "--lr", "1e-4",
            "--device", "cpu", "--quiet", "--json"]


def launch(procs: int, argv: list[str]) -> dict:
    """One torchrun run in this (fresh) process: its summary, seconds and the largest process's peak RSS."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    subclone = shutil.which("subclone", path=str(Path(sys.executable).parent)) or "subclone"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(procs), subclone, *argv], env=env,
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"torchrun {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "peak_rss_gib": peak_kib / 2**20, "row": summary["rows"][0]}


def run_fresh(procs: int, argv: list[str]) -> dict:
    """launch() in a new process, so that each run's peak is its own."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--launch", json.dumps([procs, argv])], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_child(size: str, work: Path) -> dict:
    """The synthetic child of this size (written once per work folder); its parameter count and bytes."""
    child = work / f"child-{size}"
    facts_file = work / f"child-{size}.json"
    if not facts_file.exists():
        facts_file.write_text(json.dumps(write_parent(child, size)))
    return {"folder": child, **json.loads(facts_file.read_text())}


def state_gib(mode: str, params: int, procs: int) -> float:
    """Training state per process: replicated (with DDP's buckets) or split ``procs`` ways."""
    per_param = STATE_BYTES + DDP_BUCKET_BYTES if mode == "ddp" else STATE_BYTES / procs
    return params * per_param / 2**30


def estimated_peak_gib(mode: str, params: int, procs: int) -> float:
    """A process's peak: the runtime and its training state (replicated weights are the ones it loaded), plus,
    when sharded, the whole float32 child it loads before sharding (0.23B child: 5.3 and 3.6 GiB estimated,
    5.4 and 3.6 measured)."""
    loaded = params * LOAD_BYTES / 2**30 if mode == "fsdp" else 0.0
    return RUNTIME_GIB + loaded + state_gib(mode, params, procs)


def machine_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def measure(size: str, procs: int, steps: int, work: Path, budget_gib: float) -> list[dict]:
    """Train one child replicated and sharded; a mode whose estimated peak over all processes exceeds 90% of
    this machine's memory is not run (the kernel would kill it), only its estimate reported."""
    child = write_child(size, work)
    rows = []
    for mode, flags in MODES.items():
        row = {"size": size, "parameters": child["parameters"], "mode": mode,
               "state_gib": state_gib(mode, child["parameters"], procs), "budget_gib": budget_gib,
               "estimated_peak_gib": estimated_peak_gib(mode, child["parameters"], procs)}
        if row["estimated_peak_gib"] * procs < 0.9 * machine_gib():
            argv = [*train_argv(child["folder"], work / f"run-{size}-{mode}", steps), "--overwrite", *flags]
            row.update(run_fresh(procs, argv))
            print(f"{size} {mode}: peak RSS {row['peak_rss_gib']:.2f} GiB per process (largest), training state "
                  f"{row['state_gib']:.2f} GiB, {row['seconds']:.0f} s, final loss {row['row']['final']:.4f}",
                  flush=True)
        rows.append(row)
    return rows


def _cells(row: dict) -> list[str]:
    hidden, blocks, heads, kv, ffn = SIZES[row["size"]]
    shape = f"{row['parameters'] / 1e9:.2f}B ({blocks} x {hidden}, {heads} heads / {kv} KV, FFN {ffn})"
    if "peak_rss_gib" not in row:
        estimate = row["estimated_peak_gib"]
        return [shape, row["mode"], f"not run: about {estimate:.1f} (estimate)", f"{row['state_gib']:.2f}",
                "yes" if estimate <= row["budget_gib"] else "no", "-", "-"]
    fits = "yes" if row["peak_rss_gib"] <= row["budget_gib"] else "no"
    return [shape, row["mode"], f"{row['peak_rss_gib']:.2f}", f"{row['state_gib']:.2f}", fits,
            f"{row['seconds']:.0f}", f"{row['row']['final']:.4f}"]


def markdown(report: dict) -> str:
    procs, budget = report["procs"], report["budget_gib"]
    return "\n".join([
        "## Sharded training of a child (bench_fsdp.py)",
        "",
        (f"Synthetic Llama-shaped children (random weights, the default tokenizer's 49,152-token tied embedding), "
         f"trained by `torchrun --nproc_per_node {procs} subclone train --model CHILD` for {report['steps']} steps "
         f"of {report['batch_size']} x {report['seq_len']} tokens on the CPU, replicated (DDP) and with `--fsdp`. "
         "Peak RSS: the largest process's (getrusage of the launcher's children). Training state: float32 weights, "
         "gradients and AdamW's two moments, 16 bytes per parameter, in every process under DDP (plus 4 for its "
         f"gradient buckets) and split {procs} ways under FSDP. Budget: {budget:g} GiB per process (as on an "
         f"{budget:g} GB accelerator; this machine has {report['machine_gib']:.0f} GiB for all {procs} processes). A mode "
         "whose estimated peak (1 GiB of runtime and the training state, plus under FSDP the whole float32 child "
         "every process loads before sharding) over all processes exceeds 90% of the machine is not run: its "
         f"estimate is shown. {report['machine']}."),
        "",
        table(["child", "mode", "peak RSS per process (GiB)", "training state per process (GiB)",
               f"fits {budget:.1f} GiB", "seconds", "final loss"], [_cells(r) for r in report["rows"]]),
        "",
        ("Every process loads the whole child before sharding it (each reads the folder, as `subclone compare` "
         "builds the child in each), so the peak under FSDP is at least the float32 model plus the runtime; what "
         "sharding removes is the replicated gradients and optimizer state. Where both ran, the final losses agree "
         "to float summation order (tests/test_fsdp.py checks a tiny child against a one-process run to rtol 1e-5)."),
    ])


def losses_agree(rows: list[dict]) -> bool:
    """Whether, for every child trained both ways, the final validation losses agree (rtol 1e-4)."""
    finals: dict[str, list[float]] = {}
    for row in rows:
        if "row" in row:
            finals.setdefault(row["size"], []).append(row["row"]["final"])
    return all(math.isclose(min(v), max(v), rel_tol=1e-4) for v in finals.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.25B,0.5B", help="children of bench_scale.py's SIZES")
    parser.add_argument("--budget-gib", type=float, default=8.0,
                        help="the per-process memory budget the table checks (default 8, an 8 GB accelerator)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default=None, help="where the child is written (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="the tiny child, nothing written to docs/")
    parser.add_argument("--launch", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.launch:
        print(json.dumps(launch(*json.loads(args.launch))))
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    sizes = ["tiny"] if args.smoke else args.sizes.split(",")
    budget = args.budget_gib
    report = {"procs": args.procs, "steps": args.steps, "batch_size": BATCH, "seq_len": SEQ_LEN,
              "budget_gib": budget, "machine_gib": machine_gib(), "machine": machine(),
              "rows": [row for size in sizes for row in measure(size, args.procs, args.steps, work, budget)]}
    if not args.smoke:
        write_text(DOCS / "fsdp.json", json.dumps(report, indent=1))
        write_section("bench_fsdp", markdown(report))
    return 0 if losses_agree(report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
