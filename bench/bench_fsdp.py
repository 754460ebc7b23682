"""Memory per process when a child trains sharded (--fsdp) against replicated (DDP) under torchrun, on the CPU
(see bench/README.md). Writes docs/fsdp.json and a section of docs/BENCHMARKS.md.

Run: python -m bench.bench_fsdp [--sizes 0.25B,0.5B,1B] [--work DIR] [--smoke | --report-only]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._report import DOCS, bench_parser, machine, render, venv_tool, write_section
from bench.bench_scale import SIZES, run_fresh, write_parent
from subclone_core.io.atomic import write_text

MODES = {"ddp": [], "fsdp": ["--fsdp"]}
PROCS, STEPS, BATCH, SEQ_LEN, EVAL_TOKENS = 2, 3, 2, 256, 512
BUDGET_GIB = 8.0  # the per-process memory budget the table checks: an 8 GB accelerator
VOCAB = 49152  # bench_scale.write_parent's children: the default tokenizer's vocabulary, a tied head
STATE_BYTES = 16  # float32 weights, gradients, AdamW exp_avg and exp_avg_sq per parameter
DDP_BUCKET_BYTES = 4  # DDP's flat gradient buckets, another float32 copy of the gradients
ROOT_BYTES = 8  # FSDP2 keeps the root's parameters whole through forward and backward, with their whole gradient
# under FSDP the main process holds, at the end, the whole trained float32 child it gathered and, while it writes
# it, safetensors' serialized copy of it (4 + 4 bytes per parameter), beside its own shards
GATHER_BYTES = 8
RUNTIME_GIB = 1.0  # torch, transformers, the tokenizer and the data, per process
SAMPLE_S = 0.2  # how often each rank's VmHWM (its peak so far) is read while the run lasts


def launch(procs: int, argv: list[str]) -> dict:
    """One torchrun run in this (fresh) process: its summary, seconds, the largest process's peak RSS and each
    rank's (sampled: a peak reached in the last SAMPLE_S seconds of a rank's life may be missed there)."""
    tag = str(os.getpid())  # marks the environment of this run's processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "BENCH_LAUNCH": tag}
    start, ranks = time.perf_counter(), {}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([venv_tool("torchrun"), "--standalone", "--nproc_per_node", str(procs),
                                 venv_tool("subclone"), *argv], env=env, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            for rank, kib in rank_peaks_kib(tag).items():
                ranks[rank] = max(ranks.get(rank, 0), kib)
            time.sleep(SAMPLE_S)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {' '.join(argv)} failed:\n{stderr[-3000:]}")
    summary = json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "peak_rss_gib": peak_kib / 2**20, "row": summary["rows"][0],
            "rank_peak_rss_gib": [ranks[r] / 2**20 for r in sorted(ranks)]}


def rank_peaks_kib(tag: str) -> dict[int, int]:
    """The VmHWM (peak resident set, KiB) of every torchrun worker whose environment has BENCH_LAUNCH=tag, by its
    RANK (torchrun itself has none)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, StopIteration):
            env = (proc / "environ").read_bytes().split(b"\0")
            if f"BENCH_LAUNCH={tag}".encode() in env:
                rank = next(int(v[5:]) for v in env if v.startswith(b"RANK="))
                status = (proc / "status").read_text().splitlines()
                found[rank] = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
    return found


def state_gib(mode: str, params: int) -> float:
    """Training state per process: replicated (with DDP's buckets) or split PROCS ways."""
    return params * (STATE_BYTES + DDP_BUCKET_BYTES if mode == "ddp" else STATE_BYTES / PROCS) / 2**30


def estimated_peak_gib(mode: str, params: int, size: str) -> float:
    """The largest process's peak: the runtime and its training state, and under FSDP the larger of that with the
    root's whole parameters and gradient, and the main process's gathered child at the end (the template says
    why)."""
    if mode == "ddp":
        return RUNTIME_GIB + state_gib(mode, params)
    training = state_gib(mode, params) + VOCAB * SIZES[size][0] * ROOT_BYTES / 2**30
    return RUNTIME_GIB + max(training, params * (GATHER_BYTES + 4 / PROCS) / 2**30)


def measure(size: str, work: Path) -> list[dict]:
    """Train one synthetic child replicated and sharded (`subclone train` under torchrun, each run from a fresh
    process so that its peak is its own); a mode whose estimated peak over all processes exceeds 90% of this
    machine's memory is not run (the kernel would kill it), only its estimate reported."""
    params, rows = write_parent(work / f"child-{size}", size)["parameters"], []
    for mode, flags in MODES.items():
        row = {"size": size, "parameters": params, "mode": mode, "state_gib": state_gib(mode, params),
               "budget_gib": BUDGET_GIB, "estimated_peak_gib": estimated_peak_gib(mode, params, size)}
        if row["estimated_peak_gib"] * PROCS < 0.9 * machine_gib():
            argv = ["train", "--model", str(work / f"child-{size}"), "--out", str(work / f"run-{size}-{mode}"),
                    "--steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--eval-tokens",
                    str(EVAL_TOKENS), "--eval-every", str(STEPS), "--lr", "1e-4", "--device", "cpu", "--quiet",
                    "--json", "--overwrite", *flags]
            row.update(run_fresh(f"{size} {mode}", "bench.bench_fsdp:launch", PROCS, argv))
        rows.append(row)
    return rows


def machine_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def markdown(report: dict) -> str:
    """The "bench_fsdp" section of docs/BENCHMARKS.md (template bench/templates/bench_fsdp.md.j2)."""
    return render("bench_fsdp", **{**report, "note": report.get("note") or ""}, sizes=SIZES)


def losses_agree(rows: list[dict]) -> bool:
    """Whether, for every child trained both ways, the final validation losses agree (rtol 1e-4)."""
    finals = [[r["row"]["final"] for r in rows if r["size"] == size and "row" in r]
              for size in {r["size"] for r in rows}]
    return all(math.isclose(min(f), max(f), rel_tol=1e-4) for f in finals if f)


def main() -> int:
    """Measure each child (the tiny one with --smoke, nothing written), or redraw the section; 1 where the modes'
    final losses disagree."""
    parser = bench_parser(__doc__, smoke="the tiny child, nothing written to docs/",
                          report_only="rewrite the section from docs/fsdp.json, running nothing")
    parser.add_argument("--sizes", default="0.25B,0.5B,1B", help="children of bench_scale.py's SIZES")
    parser.add_argument("--work", default=None, help="where the child is written (default: a temporary folder)")
    args = parser.parse_args()
    if args.report_only:
        write_section("bench_fsdp", markdown(json.loads((DOCS / "fsdp.json").read_text())))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-fsdp-"))
    report = {"procs": PROCS, "steps": STEPS, "batch_size": BATCH, "seq_len": SEQ_LEN, "budget_gib": BUDGET_GIB,
              "machine_gib": machine_gib(), "machine": machine(), "note": None}
    sizes = ["tiny"] if args.smoke else args.sizes.split(",")
    report["rows"] = [row for size in sizes for row in measure(size, work)]
    if not args.smoke:
        write_text(DOCS / "fsdp.json", json.dumps(report, indent=1))
        write_section("bench_fsdp", markdown(report))
    return 0 if losses_agree(report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
