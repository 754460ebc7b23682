"""How the core scales with the parent: synthetic Llama-shaped parents of about 0.1-3B parameters, measured in
memory and with --max-memory at a quarter (see bench/README.md). Writes docs/scale.json, docs/bench_scale.png
and a BENCHMARKS.md section; --sequential and --ablation write docs/sequential.json and docs/ablation.json.

Run: python -m bench.bench_scale [--sizes 0.1B,0.5B,1B,3B] [--sequential | --ablation [--size 1B]] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from bench._report import DOCS, ROOT, bench_parser, panels, render, save_figure, write_section
from subclone_core.io.atomic import write_text

# name: (hidden, blocks, heads, kv heads, FFN); vocabulary 49,152 (the default parent's tokenizer), tied head
SIZES = {"0.1B": (768, 12, 12, 4, 2048), "0.25B": (1024, 16, 16, 4, 2816), "0.5B": (1024, 24, 16, 4, 5120),
         "1B": (2048, 20, 32, 8, 5632), "3B": (3072, 28, 24, 8, 8192), "tiny": (64, 4, 4, 2, 128)}
# calibration tokens per size: what fits in minutes on 2 shared cores (times are reported per 1,000 tokens)
TOKENS = {"0.1B": 2048, "0.5B": 1024, "1B": 512, "3B": 256, "tiny": 512}
# the sequential bench: several batches, so that plain offload's per-batch re-reads show
SEQ_TOKENS, SEQ_BATCH = {"tiny": (512,), "1B": (1024, 4096)}, 2
SEQ_MODES = {"memory": (False, False), "offload": (True, False), "sequential": (True, True)}  # (budget, sequential)
ABL_TOKENS = 256  # per evaluation, as in the published table (the app and CLI default, probes.ABLATION_TOKENS, is 128)
COSTS = {"calibration s / 1k tokens": "calib_s_per_1k", "refit+build+save s": "build_save_s",
         "peak RSS GiB": "peak_rss_gib", "peak RssAnon GiB": "peak_anon_gib"}
SAME_CHILD_RTOL = 1e-5  # the offloaded child is "the same" when no weight differs by more, relative to its tensor
READ = {"bytes": 0}  # in a worker: the bytes of every tensor read through safetensors' safe_open (CountingOpen)


@contextlib.contextmanager
def peak_memory(every: float = 0.005) -> Iterator[dict[str, float]]:
    """Samples RssAnon and VmRSS of this process every few milliseconds in a thread while the block runs; the
    peaks (GiB) are in the dict it yields, "anon" and "rss"."""
    peaks, stop = {"anon": 0.0, "rss": 0.0}, threading.Event()

    def sample() -> None:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        peaks["anon"] = max(peaks["anon"], int(status["RssAnon"].split()[0]) / 2**20)
        peaks["rss"] = max(peaks["rss"], int(status["VmRSS"].split()[0]) / 2**20)

    def watch() -> None:
        while not stop.wait(every):
            sample()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()
        sample()


def write_parent(folder: Path, size: str) -> dict:
    """A Llama-shaped parent with random bf16 weights (norms are ones), written tensor by tensor in state_dict
    order into two shards split at half the parameters (a model on the meta device gives names and shapes; no
    second copy is ever in memory)."""
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    from subclone_core.sources.gguf import default_folder

    hidden, blocks, heads, kv, ffn = SIZES[size]
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads,
                                      num_key_value_heads=kv, head_dim=hidden // heads, intermediate_size=ffn,
                                      vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                                      bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    with init_empty_weights():
        meta = transformers.LlamaForCausalLM(config)
    shapes = {n: p.shape for n, p in meta.state_dict().items() if n != "lm_head.weight"}
    total, count, groups, weight_map = sum(math.prod(s) for s in shapes.values()), 0, ({}, {}), {}
    for name, shape in shapes.items():
        groups[count >= total // 2][name] = shape
        count += math.prod(shape)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: torch.ones(s, dtype=torch.bfloat16) if n.endswith("norm.weight")
                   else (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in group.items()},
                  str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(default_folder()).save_pretrained(folder)
    return {"parameters": total, "bytes": 2 * total}


def synthetic(size: str, work: Path) -> tuple[Path, dict, str]:
    """The synthetic parent of a size in ``work`` (written once), its parameters and bytes, and a quarter of
    its bytes as a --max-memory budget."""
    parent = work / f"parent-{size}"
    if (parent / "config.json").exists():
        total = json.loads((parent / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        facts = {"parameters": total // 2, "bytes": total}
    else:
        facts = write_parent(parent, size)
    return parent, facts, f"{max(1, facts['bytes'] // 4 // 2**20)}MiB"


# --- the workers: one measurement each, in a fresh process (run_fresh) -----------------------------------


class CountingOpen:
    """safetensors' safe_open for accelerate's disk offload and the streaming reader, adding the bytes of every
    tensor read to READ (memory-mapped reads are no read() calls, so /proc/self/io cannot see them)."""

    def __init__(self, *args, **kwargs) -> None:
        from safetensors import safe_open

        self.inner = safe_open(*args, **kwargs)

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def get_tensor(self, name: str) -> torch.Tensor:
        tensor = self.inner.get_tensor(name)
        READ["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def make_worker(args: argparse.Namespace) -> dict:
    """`make`'s work: calibrate, build and save (the child halves every dimension), with peak memory sampled."""
    from subclone_core.core.strategies import plan_shape
    from subclone_core.sources.parents import load_parent
    from subclone_core.workflow.children import make_child, make_child_into_folder, measure_importance

    hidden, blocks, heads, kv, ffn = SIZES[args.size]
    with peak_memory() as peak:
        start = time.perf_counter()
        parent = load_parent(args.parent, dtype="bfloat16", max_memory=args.max_memory)
        loaded = time.perf_counter()
        importance = measure_importance(parent, tokens=args.tokens)
        calibrated = time.perf_counter()
        target = plan_shape(parent.model, layers=blocks // 2, hidden=hidden // 2, heads=heads // 2,
                            kv_heads=max(1, kv // 2), ffn=ffn // 2)
        child, _ = make_child_into_folder(partial(make_child, parent, target, importance=importance), Path(args.out),
                                          task=parent.task)  # as `make` does: each child tensor straight to disk
        done = time.perf_counter()
    return {"load_s": loaded - start, "calib_s": calibrated - loaded, "calib_tokens": importance.tokens,
            "calib_s_per_1k": 1000 * (calibrated - loaded) / importance.tokens, "build_save_s": done - calibrated,
            "peak_rss_gib": peak["rss"], "peak_anon_gib": peak["anon"], "read_bytes": READ["bytes"],
            "refit": child.manifest.refit, "selection": child.manifest.selection,
            "kept_blocks": child.manifest.kept_blocks}


def placement_worker(args: argparse.Namespace) -> dict:
    """One placement (SEQ_MODES) of the sequential (``--worker calib``) or ablation bench: load the parent as it
    says, then calibrate or ablate every block with the bytes read, peak memory and seconds counted."""
    from subclone_core.analysis.probes import ablate_parent
    from subclone_core.sources.parents import load_parent
    from subclone_core.workflow.children import measure_importance

    budget, sequential = SEQ_MODES[args.mode]
    start = time.perf_counter()
    parent = load_parent(args.parent, dtype="bfloat16", max_memory=args.max_memory if budget else None)
    loaded, before = time.perf_counter(), READ["bytes"]
    with peak_memory() as peak:
        if args.worker == "calib":
            done = measure_importance(parent, tokens=args.tokens, batch_size=SEQ_BATCH, sequential=sequential)
        else:
            done = ablate_parent(parent, None, args.tokens, sequential=sequential)
    measured = {"load_s": loaded - start, f"{args.worker}_s": time.perf_counter() - loaded,
                "read_bytes": READ["bytes"] - before, "peak_rss_gib": peak["rss"], "peak_anon_gib": peak["anon"]}
    if args.worker == "ablation":
        return {**measured, "base": done["base"], "losses": done["losses"]}
    return {**measured, "calib_tokens": done.tokens, "batches": -(-done.tokens // (SEQ_BATCH * 128)),
            "ffn_top": [row.argsort(descending=True)[:16].tolist() for row in done.ffn],
            "residual_top": done.residual_ranking("read").argsort(descending=True)[:64].tolist()}


def run_fresh(module: str, *args: str) -> dict:
    """Run a bench module in a fresh process (so that each peak is its own) and return its last line, JSON."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the three benches ----------------------------------------------------------------------------------


def measure_size(size: str, work: Path, tokens: int) -> dict:
    """One parent in memory and offloaded at a quarter (a finished measurement survives a killed run)."""
    parent, facts, quarter = synthetic(size, work)
    row = {"size": size, **facts, "shards": len(list(parent.glob("*.safetensors"))), "quarter": quarter}
    for mode, budget in (("memory", None), ("offload", quarter)):
        saved = work / f"child-{size}-{mode}.result.json"  # written by the worker
        result = row[mode] = json.loads(saved.read_text()) if saved.exists() else run_fresh(
            "bench.bench_scale", "--worker", "make", "--size", size, "--parent", str(parent), "--tokens", str(tokens),
            "--out", str(work / f"child-{size}-{mode}"), *(["--max-memory", budget] if budget else []))
        print(f"{size} {mode}: calib {result['calib_s_per_1k']:.1f} s/1k tok, build+save "
              f"{result['build_save_s']:.1f} s, peak RSS {result['peak_rss_gib']:.2f} GiB, anon "
              f"{result['peak_anon_gib']:.2f} GiB", flush=True)
    row["same_indices"] = (row["memory"]["selection"] == row["offload"]["selection"]
                           and row["memory"]["kept_blocks"] == row["offload"]["kept_blocks"])
    row["child_max_rel_diff"] = child_difference(work / f"child-{size}-memory", work / f"child-{size}-offload")
    row["store_gib"] = row["memory"]["calib_tokens"] * SIZES[size][0] * 2 / 2**30  # bf16 hidden states
    row["limit_gib"] = int(quarter.removesuffix("MiB")) / 1024 + row["store_gib"] + 1
    row["within"] = row["offload"]["peak_anon_gib"] < row["limit_gib"]
    for mode in ("memory", "offload"):
        row[mode].pop("selection")
    return row


def child_difference(a: Path, b: Path) -> float:
    """The largest |x - y| of any weight of two saved children, relative to the largest |y| of its tensor (0.0:
    identical)."""
    from safetensors.torch import load_file

    def weights(folder: Path) -> dict:
        return {k: v.double() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    x, y = weights(a), weights(b)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max() / y[k].abs().max().clamp_min(1e-30)) for k in y)


def header(size: str, work: Path) -> tuple[Path, dict]:
    """The synthetic parent of a size, and what the sequential and ablation reports begin with."""
    parent, facts, quarter = synthetic(size, work)
    return parent, {"size": size, **facts, "quarter": quarter, "hidden": SIZES[size][0], "blocks": SIZES[size][1]}


def placements(kind: str, parent: Path, head: dict, tokens: int, line: str) -> dict:
    """One fresh ``kind`` worker per placement (SEQ_MODES) at a quarter budget, each printed: ``line`` (a format
    of its results), then the bytes read and the peak RssAnon."""
    runs = {}
    for mode in SEQ_MODES:
        r = runs[mode] = run_fresh("bench.bench_scale", "--worker", kind, "--mode", mode, "--parent", str(parent),
                                   "--max-memory", head["quarter"], "--tokens", str(tokens))
        print(line.format(size=head["size"], tokens=tokens, mode=mode, **r) + f", read {r['read_bytes'] / 2**30:.2f} "
              f"GiB, peak RssAnon {r['peak_anon_gib']:.2f} GiB", flush=True)
    return runs


def sequential_bench(size: str, work: Path, smoke: bool) -> dict:
    """The three placements of calibration alone on one parent (SEQ_TOKENS), each in a fresh process."""
    parent, head = header(size, work)
    report = {**head, "batch_size": SEQ_BATCH, "seq_len": 128, "machine": _machine(), "runs": []}
    for tokens in SEQ_TOKENS[size]:
        run = {"tokens": tokens, **placements("calib", parent, head, tokens,
                                              "{size} {tokens} tokens {mode}: calibration {calib_s:.1f} s")}
        run["same_rankings"] = all(run[m]["ffn_top"] == run["memory"]["ffn_top"]
                                   and run[m]["residual_top"] == run["memory"]["residual_top"] for m in SEQ_MODES)
        for mode in SEQ_MODES:
            del run[mode]["ffn_top"], run[mode]["residual_top"]
        report["runs"].append(run)
    report["same_rankings"] = all(run["same_rankings"] for run in report["runs"])
    if not smoke:
        publish("sequential", report)
    return report


def ablation_bench(size: str, work: Path, smoke: bool) -> dict:
    """The three placements of the block ablation on one parent, each in a fresh process."""
    parent, head = header(size, work)
    report = {**head, "tokens": ABL_TOKENS, "machine": _machine()}
    modes = report["modes"] = placements("ablation", parent, head, ABL_TOKENS, "{size} ablation {mode}: {ablation_s:.1f} s")
    ref = modes["memory"]
    report["max_loss_difference"] = max(abs(a - b) for r in modes.values()
                                        for a, b in zip([r["base"], *r["losses"]], [ref["base"], *ref["losses"]]))
    report["same_order"] = all(sorted(range(len(r["losses"])), key=r["losses"].__getitem__)
                               == sorted(range(len(ref["losses"])), key=ref["losses"].__getitem__)
                               for r in modes.values())
    if not smoke:
        publish("ablation", report)
    return report


def slope(rows: list[dict], mode: str, key: str) -> float | None:
    """The least-squares slope of log(cost) against log(parameters): 1 means cost grows like the parent."""
    points = [(math.log(r["parameters"]), math.log(v)) for r in rows if (v := r[mode][key]) and v > 0]
    if len(points) < 2:
        return None
    mx, my = (sum(p[i] for p in points) / len(points) for i in (0, 1))
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def plot(rows: list[dict], path: Path) -> None:
    """Each cost against the parent's parameters, log-log, in memory and offloaded, with the fitted slopes."""
    fig, axes = panels(len(COSTS), 4, 3.4)
    for ax, (label, key) in zip(axes[0], COSTS.items()):
        for mode, style in (("memory", "o-"), ("offload", "s--")):
            ax.loglog([r["parameters"] / 1e9 for r in rows], [r[mode][key] for r in rows], style,
                      label=f"{mode} (slope {slope(rows, mode, key) or 0.0:.2f})")
        ax.set_xlabel("parent parameters (billions)")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


# --- reports (templates bench/templates/scale*.md.j2) ---------------------------------------------------


def markdown(report: dict) -> str:
    """The "bench_scale" section (template bench/templates/scale.md.j2)."""
    return render("scale", **{"notes": "", **report}, budgets=TOKENS, costs=COSTS, rtol=SAME_CHILD_RTOL)


def sequential_markdown(report: dict) -> str:
    """The "bench_sequential" section (template bench/templates/scale_sequential.md.j2)."""
    return render("scale_sequential", **report, modes=SEQ_MODES)


def ablation_markdown(report: dict) -> str:
    """The "bench_ablation" section (template bench/templates/scale_ablation.md.j2)."""
    return render("scale_ablation", **report)


# which bench: its section of BENCHMARKS.md, its JSON under docs/ and its report
SECTIONS = {"scale": ("bench_scale", "scale.json", markdown),
            "sequential": ("bench_sequential", "sequential.json", sequential_markdown),
            "ablation": ("bench_ablation", "ablation.json", ablation_markdown)}


def publish(bench: str, report: dict, *, save: bool = True) -> None:
    """A bench's JSON under docs/ (unless ``save`` is off: a redrawn report), the scale bench's plot, and its
    section of BENCHMARKS.md."""
    section, name, markdown_of = SECTIONS[bench]
    if save:
        write_text(DOCS / name, json.dumps(report, indent=1))
    if bench == "scale":
        plot(report["rows"], DOCS / "bench_scale.png")
    write_section(section, markdown_of(report))


def _machine() -> dict:
    return {"cores": os.cpu_count(), "load_average": os.getloadavg()[0]}


# --- command line ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, smoke="only the tiny parent, nothing written to docs/",
                          report_only="rewrite the plot and section from docs/scale.json")
    parser.add_argument("--sizes", default="0.1B,0.5B,1B,3B")
    parser.add_argument("--work", default=None, help="where parents are written (default: a temporary folder)")
    parser.add_argument("--sequential", action="store_true", help="the sequential calibration bench")
    parser.add_argument("--ablation", action="store_true", help="the block ablation bench")
    parser.add_argument("--worker", choices=("make", "calib", "ablation"), help=argparse.SUPPRESS)
    for flag in ("--mode", "--size", "--parent", "--out", "--max-memory"):
        parser.add_argument(flag, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def run_worker(args: argparse.Namespace) -> None:
    """A worker's measurement as one JSON line (make's is also kept beside its child, for a rerun), with its torch
    threads (BENCH_THREADS, default 2) and every tensor read counted."""
    from accelerate.utils import offload

    from subclone_core.io import streaming

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    offload.safe_open = streaming.safe_open = CountingOpen
    result = json.dumps((make_worker if args.worker == "make" else placement_worker)(args))
    if args.worker == "make":
        write_text(Path(args.out + ".result.json"), result)
    print(result)


def main() -> int:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return 0
    bench = "ablation" if args.ablation else "sequential" if args.sequential else "scale"
    if args.report_only:
        publish(bench, json.loads((DOCS / SECTIONS[bench][1]).read_text()), save=False)
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    if bench != "scale":
        report = (ablation_bench if args.ablation else sequential_bench)(
            "tiny" if args.smoke else args.size or "1B", work, args.smoke)
        return 0 if report["same_order" if args.ablation else "same_rankings"] else 1
    rows = [measure_size(size, work, TOKENS[size]) for size in (["tiny"] if args.smoke else args.sizes.split(","))]
    if args.smoke:
        return 0 if all(r["same_indices"] for r in rows) else 1
    slopes = {mode: {label: slope(rows, mode, key) for label, key in COSTS.items()} for mode in ("memory", "offload")}
    publish("scale", {"rows": rows, "slopes": slopes, "machine": _machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
