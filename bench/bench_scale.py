"""How the core scales with the parent: synthetic Llama-shaped parents of about 0.1-3B parameters, measured in
memory and with --max-memory at a quarter (see bench/README.md). Writes docs/scale.json, docs/bench_scale.png
and a BENCHMARKS.md section; --sequential and --ablation write docs/sequential.json and docs/ablation.json.

Run: python -m bench.bench_scale [--sizes 0.1B,0.5B,1B,3B] [--sequential | --ablation [--size 1B]] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from bench._report import DOCS, ROOT, bench_parser, panels, render, save_figure, table, write_section
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


class PeakMemory:
    """Samples RssAnon and VmRSS of this process every few milliseconds in a thread; keeps the peaks (GiB)."""

    def __init__(self, every: float = 0.005) -> None:
        self.every, self.anon, self.rss, self._stop = every, 0.0, 0.0, threading.Event()

    def __enter__(self) -> PeakMemory:  # noqa: PYI034 - the class is not subclassed
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        self.anon = max(self.anon, int(status["RssAnon"].split()[0]) / 2**20)
        self.rss = max(self.rss, int(status["VmRSS"].split()[0]) / 2**20)


def write_parent(folder: Path, size: str) -> dict:
    """A Llama-shaped parent with random bf16 weights, written tensor by tensor into two shards
    (a model on the meta device gives names and shapes; no second copy is ever in memory)."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    from subclone_core.sources.gguf import default_folder

    hidden, blocks, heads, kv, ffn = SIZES[size]
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads,
                                      num_key_value_heads=kv, head_dim=hidden // heads, intermediate_size=ffn,
                                      vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                                      bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    with init_empty_weights():
        meta = transformers.LlamaForCausalLM(config)
    shapes = {n: p.shape for n, p in meta.state_dict().items() if n != "lm_head.weight"}
    total = sum(math.prod(s) for s in shapes.values())
    folder.mkdir(parents=True, exist_ok=True)
    _write_shards(folder, shapes, total // 2, torch)
    config.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(default_folder()).save_pretrained(folder)
    return {"parameters": total, "bytes": 2 * total}


def _write_shards(folder: Path, shapes: dict, half: int, torch) -> None:
    """Two shards: tensors in state_dict order until half the parameters, then the rest (norms are ones)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    groups, count, weight_map = [{}, {}], 0, {}
    for name, shape in shapes.items():
        groups[count >= half][name] = shape
        count += math.prod(shape)
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: torch.ones(s, dtype=torch.bfloat16) if n.endswith("norm.weight")
                   else (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in group.items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
        del tensors
    index = {"metadata": {"total_size": 2 * sum(math.prod(s) for s in shapes.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def synthetic(size: str, work: Path) -> tuple[Path, dict, str]:
    """The synthetic parent of a size in ``work`` (written once), its parameters and bytes, and a quarter of
    its bytes as a --max-memory budget."""
    parent = work / f"parent-{size}"
    if (parent / "config.json").exists():
        index = json.loads((parent / "model.safetensors.index.json").read_text())
        facts = {"parameters": index["metadata"]["total_size"] // 2, "bytes": index["metadata"]["total_size"]}
    else:
        facts = write_parent(parent, size)
    return parent, facts, f"{max(1, facts['bytes'] // 4 // 2**20)}MiB"


# --- the workers: one measurement each, in a fresh process -----------------------------------------------


class ReadCounter:
    """Counts the bytes of every tensor read through safetensors' safe_open by accelerate's disk offload and by
    the streaming reader (memory-mapped reads are no read() calls, so /proc/self/io cannot see them)."""

    def __init__(self) -> None:
        self.bytes, self.tensors = 0, 0

    def install(self) -> None:
        from accelerate.utils import offload

        from subclone_core.io import streaming

        real, counter = offload.safe_open, self

        class Counting:
            def __init__(self, *args, **kwargs) -> None:
                self.inner = real(*args, **kwargs)

            def __enter__(self):
                self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def get_tensor(self, name):
                tensor = self.inner.get_tensor(name)
                counter.bytes += tensor.numel() * tensor.element_size()
                counter.tensors += 1
                return tensor

            def __getattr__(self, name):
                return getattr(self.inner, name)

        offload.safe_open = streaming.safe_open = Counting


def _counting() -> ReadCounter:
    """This worker's torch threads (BENCH_THREADS, default 2) and an installed read counter."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    counter = ReadCounter()
    counter.install()
    return counter


def worker(args: argparse.Namespace) -> dict:
    """`make`'s work in this process: calibrate, build and save (the child halves every dimension), with peak
    memory sampled."""
    from subclone_core.core.strategies import plan_shape
    from subclone_core.sources.parents import load_parent
    from subclone_core.workflow.children import make_child, make_child_into_folder, measure_importance

    counter = _counting()
    hidden, blocks, heads, kv, ffn = SIZES[args.size]
    with PeakMemory() as peak:
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
            "peak_rss_gib": peak.rss, "peak_anon_gib": peak.anon, "read_bytes": counter.bytes,
            "refit": child.manifest.refit, "selection": child.manifest.selection,
            "kept_blocks": child.manifest.kept_blocks}


def _timed_worker(args: argparse.Namespace, seconds_key: str, work) -> tuple[object, dict]:
    """One mode of the sequential and ablation benches in this (fresh) process: load the parent as the mode says,
    then ``work(parent, sequential)`` with the bytes read from its files, peak memory and seconds counted."""
    from subclone_core.sources.parents import load_parent

    counter = _counting()
    budget, sequential = SEQ_MODES[args.mode]
    start = time.perf_counter()
    parent = load_parent(args.parent, dtype="bfloat16", max_memory=args.max_memory if budget else None)
    loaded, before = time.perf_counter(), counter.bytes
    with PeakMemory() as peak:
        result = work(parent, sequential)
    return result, {"load_s": loaded - start, seconds_key: time.perf_counter() - loaded,
                    "read_bytes": counter.bytes - before, "peak_rss_gib": peak.rss, "peak_anon_gib": peak.anon}


def calib_worker(args: argparse.Namespace) -> dict:
    """Sequential bench, one mode: calibrate with read bytes counted."""
    from subclone_core.workflow.children import measure_importance

    importance, measured = _timed_worker(args, "calib_s", lambda parent, sequential: measure_importance(
        parent, tokens=args.tokens, batch_size=SEQ_BATCH, sequential=sequential))
    return {**measured, "calib_tokens": importance.tokens, "batches": -(-importance.tokens // (SEQ_BATCH * 128)),
            "ffn_top": [row.argsort(descending=True)[:16].tolist() for row in importance.ffn],
            "residual_top": importance.residual_ranking("read").argsort(descending=True)[:64].tolist()}


def ablation_worker(args: argparse.Namespace) -> dict:
    """Ablation bench, one mode: ablate every block with read bytes counted."""
    from subclone_core.analysis.probes import ablate_parent

    ablation, measured = _timed_worker(args, "ablation_s", lambda parent, sequential: ablate_parent(
        parent, None, args.tokens, sequential=sequential))
    return {**measured, "base": ablation["base"], "losses": ablation["losses"]}


def run_child(*args: str) -> dict:
    """Run this script in a fresh process (so each peak is its own) and return its JSON line."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "bench.bench_scale", *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench_scale worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the three benches ----------------------------------------------------------------------------------


def measure_size(size: str, work: Path, tokens: int) -> dict:
    """One parent in memory and offloaded at a quarter (a finished measurement survives a killed run)."""
    parent, facts, quarter = synthetic(size, work)
    row = {"size": size, **facts, "shards": len(list(parent.glob("*.safetensors"))), "quarter": quarter}
    for mode, budget in (("memory", None), ("offload", quarter)):
        extra = ["--max-memory", budget] if budget else []
        saved = work / f"child-{size}-{mode}.result.json"
        result = json.loads(saved.read_text()) if saved.exists() else run_child(
            "--worker", "--size", size, "--parent", str(parent), "--tokens", str(tokens),
            "--out", str(work / f"child-{size}-{mode}"), *extra)
        write_text(saved, json.dumps(result))
        row[mode] = result
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


def sequential_bench(size: str, work: Path, smoke: bool) -> dict:
    """The three modes of the sequential bench on one parent, each in a fresh process."""
    parent, facts, quarter = synthetic(size, work)
    hidden, blocks = SIZES[size][:2]
    report = {"size": size, **facts, "quarter": quarter, "hidden": hidden, "blocks": blocks,
              "batch_size": SEQ_BATCH, "seq_len": 128, "machine": _machine(), "runs": []}
    for tokens in SEQ_TOKENS[size]:
        run = {"tokens": tokens}
        for mode in SEQ_MODES:
            run[mode] = r = run_child("--calib-worker", "--mode", mode, "--parent", str(parent), "--max-memory",
                                      quarter, "--tokens", str(tokens))
            print(f"{size} {tokens} tokens {mode}: calibration {r['calib_s']:.1f} s, read "
                  f"{r['read_bytes'] / 2**30:.2f} GiB, peak RssAnon {r['peak_anon_gib']:.2f} GiB", flush=True)
        run["same_rankings"] = all(run[m]["ffn_top"] == run["memory"]["ffn_top"]
                                   and run[m]["residual_top"] == run["memory"]["residual_top"] for m in SEQ_MODES)
        for mode in SEQ_MODES:
            run[mode].pop("ffn_top")
            run[mode].pop("residual_top")
        report["runs"].append(run)
    report["same_rankings"] = all(run["same_rankings"] for run in report["runs"])
    if not smoke:
        write_text(DOCS / "sequential.json", json.dumps(report, indent=1))
        write_section("bench_sequential", sequential_markdown(report))
    return report


def ablation_bench(size: str, work: Path, smoke: bool) -> dict:
    """The three modes of the ablation bench on one parent, each in a fresh process."""
    parent, facts, quarter = synthetic(size, work)
    report = {"size": size, **facts, "quarter": quarter, "hidden": SIZES[size][0], "blocks": SIZES[size][1],
              "tokens": ABL_TOKENS, "machine": _machine(), "modes": {}}
    for mode in SEQ_MODES:
        r = report["modes"][mode] = run_child("--ablation-worker", "--mode", mode, "--parent", str(parent),
                                              "--max-memory", quarter, "--tokens", str(ABL_TOKENS))
        print(f"{size} ablation {mode}: {r['ablation_s']:.1f} s, read {r['read_bytes'] / 2**30:.2f} GiB, "
              f"peak RssAnon {r['peak_anon_gib']:.2f} GiB", flush=True)
    ref = report["modes"]["memory"]
    report["max_loss_difference"] = max(abs(a - b) for r in report["modes"].values()
                                        for a, b in zip([r["base"], *r["losses"]], [ref["base"], *ref["losses"]]))
    report["same_order"] = all(sorted(range(len(r["losses"])), key=r["losses"].__getitem__)
                               == sorted(range(len(ref["losses"])), key=ref["losses"].__getitem__)
                               for r in report["modes"].values())
    if not smoke:
        write_text(DOCS / "ablation.json", json.dumps(report, indent=1))
        write_section("bench_ablation", ablation_markdown(report))
    return report


# --- reports --------------------------------------------------------------------------------------------


def _memory(r: dict, parent_bytes: int) -> list[str]:
    """GiB read, the share of the parent read, peak RSS and peak RssAnon of one run: the tables' last cells."""
    return [f"{r['read_bytes'] / 2**30:.2f}", f"{r['read_bytes'] / parent_bytes:.2f}", f"{r['peak_rss_gib']:.2f}",
            f"{r['peak_anon_gib']:.2f}"]


def markdown(report: dict) -> str:
    """The "bench_scale" section (template bench/templates/scale.md)."""
    rows = report["rows"]
    body = [[r["size"], f"{r['parameters'] / 1e9:.2f}B", f"{r['bytes'] / 2**30:.2f}", r["shards"],
             r["quarter"] if mode == "offload" else "-", mode, "on" if r[mode]["refit"] else "OFF",
             r[mode]["calib_tokens"], f"{r[mode]['calib_s_per_1k']:.1f}", f"{r[mode]['build_save_s']:.1f}",
             *_memory(r[mode], r["bytes"])[1:], f"{r['child_max_rel_diff']:.1g}" if mode == "offload" else "-"]
            for r in rows for mode in ("memory", "offload")]
    slopes = [[label, *("-" if (v := report["slopes"][m][label]) is None else f"{v:.2f}" for m in ("memory", "offload"))]
              for label in COSTS]
    checks = [[r["size"], r["quarter"], f"{r['store_gib']:.2f}", f"{r['limit_gib']:.2f}",
               f"{r['offload']['peak_anon_gib']:.2f}", "yes" if r["within"] else "NO",
               "yes" if r["child_max_rel_diff"] <= 1e-5 else "NO"] for r in rows]
    return render("scale", **{"notes": "", **report}, budgets=", ".join(
        f"{k} {v:,}" for k, v in TOKENS.items() if k != "tiny"),
        table=table(["parent", "parameters", "GiB", "shards", "budget", "placement", "refit", "calib tokens",
                     "calib s / 1k tok", "refit+build+save s", "x parent read", "peak RSS GiB", "peak RssAnon GiB",
                     "child diff"], body),
        checks=table(["parent", "budget", "hidden states GiB", "limit GiB", "peak RssAnon GiB", "within",
                      "same child"], checks),
        slopes_table=table(["cost", "in memory", "offloaded"], slopes))


def sequential_markdown(report: dict) -> str:
    """The "bench_sequential" section (template bench/templates/scale_sequential.md)."""
    body = [[mode, "-" if mode == "memory" else report["quarter"], r["calib_tokens"], r["batches"],
             f"{r['calib_s']:.1f}", *_memory(r, report["bytes"])]
            for run in report["runs"] for mode, r in ((m, run[m]) for m in SEQ_MODES)]
    tokens = report["runs"][-1]["tokens"]
    overheads = "; ".join(f"{run['tokens']:,} tokens: offload {run['offload']['calib_s'] / run['memory']['calib_s']:.2f}x, "
                          f"sequential {run['sequential']['calib_s'] / run['memory']['calib_s']:.2f}x"
                          for run in report["runs"])
    return render("scale_sequential", **report, billions=report["parameters"] / 1e9, gib=report["bytes"] / 2**30,
                  budgets=" and ".join(f"{run['tokens']:,}" for run in report["runs"]), tokens=tokens,
                  same="yes" if report["same_rankings"] else "NO", stored_mib=tokens * report["hidden"] * 2 / 2**20,
                  overheads=overheads, table=table(["placement", "budget", "tokens", "batches", "calibration s",
                                                    "GiB read", "x parent", "peak RSS GiB", "peak RssAnon GiB"], body))


def ablation_markdown(report: dict) -> str:
    """The "bench_ablation" section (template bench/templates/scale_ablation.md)."""
    body = [[mode, "-" if mode == "memory" else report["quarter"], f"{r['ablation_s']:.1f}",
             *_memory(r, report["bytes"])] for mode, r in report["modes"].items()]
    memory = report["modes"]["memory"]["ablation_s"]
    ratios = ", ".join(f"{mode} {r['ablation_s'] / memory:.2f}x" for mode, r in report["modes"].items()
                       if mode != "memory")
    streams = report["blocks"] + 1
    return render("scale_ablation", **report, gib=report["bytes"] / 2**30, ratios=ratios, streams_count=streams,
                  same="yes" if report["same_order"] else "NO",
                  streams_mib=streams * report["tokens"] * report["hidden"] * 2 / 2**20,
                  table=table(["placement", "budget", "ablation s", "GiB read", "x parent", "peak RSS GiB",
                               "peak RssAnon GiB"], body))


def slope(rows: list[dict], key) -> float | None:
    """The least-squares slope of log(cost) against log(parameters): 1 means cost grows like the parent."""
    points = [(math.log(r["parameters"]), math.log(v)) for r in rows if (v := key(r)) and v > 0]
    if len(points) < 2:
        return None
    mx, my = (sum(p[i] for p in points) / len(points) for i in (0, 1))
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def plot(rows: list[dict], path: Path) -> None:
    """Each cost against the parent's parameters, log-log, in memory and offloaded, with the fitted slopes."""
    fig, axes = panels(len(COSTS), 4, 3.4)
    for ax, (label, key) in zip(axes[0], COSTS.items()):
        xs = [r["parameters"] / 1e9 for r in rows]
        for mode, style in (("memory", "o-"), ("offload", "s--")):
            ys = [r[mode][key] for r in rows]
            fit = slope(rows, lambda r, m=mode, k=key: r[m][k]) or 0.0
            ax.loglog(xs, ys, style, label=f"{mode} (slope {fit:.2f})")
        ax.set_xlabel("parent parameters (billions)")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def write_report(report: dict) -> None:
    """The plot and the BENCHMARKS.md section, from the measured report (docs/scale.json)."""
    plot(report["rows"], DOCS / "bench_scale.png")
    write_section("bench_scale", markdown(report))


def _machine() -> dict:
    return {"cores": os.cpu_count(), "load_average": os.getloadavg()[0]}


# --- command line ---------------------------------------------------------------------------------------

WORKERS = {"worker": worker, "calib_worker": calib_worker, "ablation_worker": ablation_worker}
REPORTS = {"ablation": ("bench_ablation", "ablation.json", ablation_markdown),
           "sequential": ("bench_sequential", "sequential.json", sequential_markdown)}


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, smoke="only the tiny parent, nothing written to docs/",
                          report_only="rewrite the plot and section from docs/scale.json")
    parser.add_argument("--sizes", default="0.1B,0.5B,1B,3B")
    parser.add_argument("--work", default=None, help="where parents are written (default: a temporary folder)")
    parser.add_argument("--sequential", action="store_true", help="the sequential calibration bench")
    parser.add_argument("--ablation", action="store_true", help="the block ablation bench")
    for flag in ("--worker", "--calib-worker", "--ablation-worker"):
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in ("--mode", "--size", "--parent", "--out", "--max-memory"):
        parser.add_argument(flag, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if name := next((n for n in WORKERS if getattr(args, n)), None):
        result = json.dumps(WORKERS[name](args))
        if args.worker:
            write_text(Path(args.out + ".result.json"), result)  # kept for a rerun (measure_size)
        print(result)
        return 0
    which = "ablation" if args.ablation else "sequential" if args.sequential else None
    if args.report_only:
        if which:
            section, name, markdown_of = REPORTS[which]
            write_section(section, markdown_of(json.loads((DOCS / name).read_text())))
        else:
            write_report(json.loads((DOCS / "scale.json").read_text()))
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    if which:
        bench = ablation_bench if which == "ablation" else sequential_bench
        report = bench("tiny" if args.smoke else args.size or "1B", work, args.smoke)
        return 0 if report["same_order" if which == "ablation" else "same_rankings"] else 1
    rows = [measure_size(size, work, TOKENS[size]) for size in (["tiny"] if args.smoke else args.sizes.split(","))]
    if args.smoke:
        return 0 if all(r["same_indices"] for r in rows) else 1
    report = {"rows": rows, "slopes": {mode: {label: slope(rows, lambda r, k=key, m=mode: r[m][k])
                                              for label, key in COSTS.items()} for mode in ("memory", "offload")},
              "machine": _machine()}
    write_text(DOCS / "scale.json", json.dumps(report, indent=1))
    write_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
