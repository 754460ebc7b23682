"""Memory per process when a child trains sharded (--fsdp) against replicated (DDP) under torchrun, on the CPU
(see bench/README.md). Writes docs/fsdp.json and a section of docs/BENCHMARKS.md.

Run: python -m bench.bench_fsdp [--sizes 0.25B,0.5B,1B] [--modes ddp,fsdp] [--budget-gib 8] [--procs 2] [--steps 3]
[--work DIR] [--smoke]
"""

from __future__ import annotations

import argparse
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
BATCH, SEQ_LEN, EVAL_TOKENS = 2, 256, 512
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    start, ranks = time.perf_counter(), {}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([venv_tool("torchrun"), "--standalone", "--nproc_per_node", str(procs),
                                 venv_tool("subclone"), *argv], env=env, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            for rank, kib in rank_peaks_kib(proc.pid).items():
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


def rank_peaks_kib(root: int) -> dict[int, int]:
    """The VmHWM (peak resident set, KiB) of every torchrun worker under process ``root``, by its RANK."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError, ValueError, StopIteration):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next(int(v[5:]) for v in env if v.startswith(b"RANK="))
            status = Path(f"/proc/{pid}/status").read_text()
            found[rank] = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    return found


def write_child(size: str, work: Path) -> dict:
    """The synthetic child of this size (written once per work folder); its parameter count and bytes."""
    facts_file = work / f"child-{size}.json"
    if not facts_file.exists():
        facts_file.write_text(json.dumps(write_parent(work / f"child-{size}", size)))
    return {"folder": work / f"child-{size}", **json.loads(facts_file.read_text())}


def state_gib(mode: str, params: int, procs: int) -> float:
    """Training state per process: replicated (with DDP's buckets) or split ``procs`` ways."""
    per_param = STATE_BYTES + DDP_BUCKET_BYTES if mode == "ddp" else STATE_BYTES / procs
    return params * per_param / 2**30


def estimated_peak_gib(mode: str, params: int, procs: int, size: str) -> float:
    """The largest process's peak: the runtime and its training state (replicated weights are the ones it
    loaded). Sharded, nothing is loaded whole (each process reads its shards from the files); a process peaks in
    training, when the root's parameters (the tied embedding and head) are whole with their gradient from the
    first forward to the last backward, or, the main process, at the end, when, its gradients and AdamW state
    freed, it gathers the whole trained child beside its own shards and writes it (0.23B, 0.49B and 1.00B
    children on 2 processes: 3.15, 5.57 and 10.34 GiB estimated, 3.03, 5.58 and 10.55 measured)."""
    if mode == "ddp":
        return RUNTIME_GIB + state_gib(mode, params, procs)
    training = state_gib(mode, params, procs) + VOCAB * SIZES[size][0] * ROOT_BYTES / 2**30
    gather = params * (GATHER_BYTES + 4 / procs) / 2**30
    return RUNTIME_GIB + max(training, gather)


def measure(size: str, modes: list[str], procs: int, steps: int, work: Path, budget_gib: float) -> list[dict]:
    """Train one child replicated and sharded (`subclone train` under torchrun, each run from a fresh process so
    that its peak is its own); a mode whose estimated peak over all processes exceeds 90% of this machine's
    memory is not run (the kernel would kill it), only its estimate reported."""
    child, rows = write_child(size, work), []
    for mode in modes:
        row = {"size": size, "parameters": child["parameters"], "mode": mode,
               "state_gib": state_gib(mode, child["parameters"], procs), "budget_gib": budget_gib,
               "estimated_peak_gib": estimated_peak_gib(mode, child["parameters"], procs, size)}
        if row["estimated_peak_gib"] * procs < 0.9 * machine_gib():
            argv = ["train", "--model", str(child["folder"]), "--out", str(work / f"run-{size}-{mode}"),
                    "--steps", str(steps), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--eval-tokens",
                    str(EVAL_TOKENS), "--eval-every", str(steps), "--lr", "1e-4", "--device", "cpu", "--quiet",
                    "--json", "--overwrite", *MODES[mode]]
            row.update(run_fresh("bench.bench_fsdp", "--launch", json.dumps([procs, argv])))
            ranks = " / ".join(f"{g:.2f}" for g in row["rank_peak_rss_gib"])
            print(f"{size} {mode}: peak RSS {row['peak_rss_gib']:.2f} GiB per process (largest; by rank {ranks}), "
                  f"estimated {row['estimated_peak_gib']:.2f}, training state {row['state_gib']:.2f} GiB, "
                  f"{row['seconds']:.0f} s, final loss {row['row']['final']:.4f}", flush=True)
        rows.append(row)
    return rows


def machine_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def markdown(report: dict) -> str:
    """The "bench_fsdp" section of docs/BENCHMARKS.md (template bench/templates/bench_fsdp.md.j2)."""
    return render("bench_fsdp", **{**report, "note": report.get("note") or ""}, sizes=SIZES)


def losses_agree(rows: list[dict]) -> bool:
    """Whether, for every child trained both ways, the final validation losses agree (rtol 1e-4)."""
    finals: dict[str, list[float]] = {}
    for row in rows:
        if "row" in row:
            finals.setdefault(row["size"], []).append(row["row"]["final"])
    return all(math.isclose(min(v), max(v), rel_tol=1e-4) for v in finals.values())


def with_kept_rows(report: dict, measured: list[dict]) -> list[dict]:
    """The measured rows and those of the previous docs/fsdp.json that this run did not remeasure, when its
    settings were the same; by child size, then DDP before FSDP."""
    path, kept = DOCS / "fsdp.json", []
    if path.exists():
        previous = json.loads(path.read_text())
        done = {(r["size"], r["mode"]) for r in measured}
        if all(previous.get(k) == report[k] for k in ("procs", "steps", "batch_size", "seq_len", "budget_gib")):
            kept = [r for r in previous["rows"] if (r["size"], r["mode"]) not in done]
    sizes, modes = list(SIZES), list(MODES)
    return sorted(measured + kept, key=lambda r: (sizes.index(r["size"]), modes.index(r["mode"])))


def publish(report: dict) -> None:
    write_text(DOCS / "fsdp.json", json.dumps(report, indent=1))
    write_section("bench_fsdp", markdown(report))


def report_again(note: str | None) -> None:
    """docs/fsdp.json's rows again, with this version's estimates (and the note, when given), into both files."""
    report = json.loads((DOCS / "fsdp.json").read_text())
    for row in report["rows"]:
        row["estimated_peak_gib"] = estimated_peak_gib(row["mode"], row["parameters"], report["procs"], row["size"])
    report["note"] = note if note is not None else report.get("note")
    publish(report)


def main() -> int:
    parser = bench_parser(__doc__, smoke="the tiny child, nothing written to docs/",
                          report_only="rewrite the section from docs/fsdp.json (estimates recomputed), running nothing")
    parser.add_argument("--sizes", default="0.25B,0.5B,1B", help="children of bench_scale.py's SIZES")
    parser.add_argument("--modes", default="ddp,fsdp", help="ddp, fsdp or both (default both)")
    parser.add_argument("--budget-gib", type=float, default=8.0,
                        help="the per-process memory budget the table checks (default 8, an 8 GB accelerator)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default=None, help="where the child is written (default: a temporary folder)")
    parser.add_argument("--note", default=None, help="a sentence printed under the table (e.g. the machine's load)")
    parser.add_argument("--launch", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.launch:
        print(json.dumps(launch(*json.loads(args.launch))))
        return 0
    if args.report_only:
        report_again(args.note)
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    modes = [m for m in MODES if m in args.modes.split(",")]
    report = {"procs": args.procs, "steps": args.steps, "batch_size": BATCH, "seq_len": SEQ_LEN,
              "budget_gib": args.budget_gib, "machine_gib": machine_gib(), "machine": machine(), "note": args.note}
    measured = [row for size in (["tiny"] if args.smoke else args.sizes.split(","))
                for row in measure(size, modes, args.procs, args.steps, work, args.budget_gib)]
    report["rows"] = measured if args.smoke else with_kept_rows(report, measured)
    if not args.smoke:
        publish(report)
    return 0 if losses_agree(report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
