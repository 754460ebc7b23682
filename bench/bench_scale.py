"""How the core scales with the parent: synthetic Llama-shaped parents of about 0.1-3B parameters, measured in
memory and with --max-memory at a quarter (see bench/README.md). Writes docs/scale.json, docs/bench_scale.png
and a BENCHMARKS.md section; --sequential and --ablation (on the 1B parent) write docs/sequential.json and
docs/ablation.json and their sections.

Run: python -m bench.bench_scale [--sizes 0.1B,0.5B,1B,3B] [--sequential | --ablation] [--smoke] [--work DIR]
"""

from __future__ import annotations

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

import numpy as np
import torch

from bench._report import DOCS, ROOT, bench_parser, panels, render, save_figure, write_section
from subclone_core.analysis.probes import ablate_parent
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import write_text
from subclone_core.sources.parents import load_parent
from subclone_core.workflow.children import make_child, make_child_into_folder, measure_importance

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
        for key, field in (("anon", "RssAnon"), ("rss", "VmRSS")):
            peaks[key] = max(peaks[key], int(status[field].split()[0]) / 2**20)

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


def synthetic(size: str, work: Path) -> tuple[Path, dict]:
    """The synthetic parent of a size, written into ``work``, and what every report says of it first: its size,
    parameters, bytes and a quarter of the bytes as a --max-memory budget."""
    parent = work / f"parent-{size}"
    facts = write_parent(parent, size)
    return parent, {"size": size, **facts, "quarter": f"{max(1, facts['bytes'] // 4 // 2**20)}MiB"}


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


def counted() -> None:
    """A worker's start: its torch threads (BENCH_THREADS, default 2) and every tensor read counted."""
    from accelerate.utils import offload

    from subclone_core.io import streaming

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    offload.safe_open = streaming.safe_open = CountingOpen


def make_worker(size: str, parent_dir: str, tokens: int, out: str, max_memory: str | None) -> dict:
    """`make`'s work: calibrate, build and save (the child halves every dimension), with peak memory sampled."""
    counted()
    hidden, blocks, heads, kv, ffn = SIZES[size]
    with peak_memory() as peak:
        start = time.perf_counter()
        parent = load_parent(parent_dir, dtype="bfloat16", max_memory=max_memory)
        loaded = time.perf_counter()
        importance = measure_importance(parent, tokens=tokens)
        calibrated = time.perf_counter()
        target = plan_shape(parent.model, layers=blocks // 2, hidden=hidden // 2, heads=heads // 2,
                            kv_heads=max(1, kv // 2), ffn=ffn // 2)
        child, _ = make_child_into_folder(partial(make_child, parent, target, importance=importance), Path(out),
                                          task=parent.task)  # as `make` does: each child tensor straight to disk
        done = time.perf_counter()
    return {"load_s": loaded - start, "calib_s": calibrated - loaded, "calib_tokens": importance.tokens,
            "calib_s_per_1k": 1000 * (calibrated - loaded) / importance.tokens, "build_save_s": done - calibrated,
            "peak_rss_gib": peak["rss"], "peak_anon_gib": peak["anon"], "read_bytes": READ["bytes"],
            "refit": child.manifest.refit, "selection": child.manifest.selection,
            "kept_blocks": child.manifest.kept_blocks}


def placement_worker(kind: str, mode: str, parent_dir: str, max_memory: str, tokens: int) -> dict:
    """One placement (SEQ_MODES) of the sequential ("calib") or "ablation" bench: load the parent as it says,
    then calibrate or ablate every block with the bytes read, peak memory and seconds counted."""
    counted()
    budget, sequential = SEQ_MODES[mode]
    start = time.perf_counter()
    parent = load_parent(parent_dir, dtype="bfloat16", max_memory=max_memory if budget else None)
    loaded, before = time.perf_counter(), READ["bytes"]
    with peak_memory() as peak:
        if kind == "calib":
            done = measure_importance(parent, tokens=tokens, batch_size=SEQ_BATCH, sequential=sequential)
        else:
            done = ablate_parent(parent, None, tokens, sequential=sequential)
    measured = {"load_s": loaded - start, f"{kind}_s": time.perf_counter() - loaded,
                "read_bytes": READ["bytes"] - before, "peak_rss_gib": peak["rss"], "peak_anon_gib": peak["anon"]}
    if kind == "ablation":
        return {**measured, "base": done["base"], "losses": done["losses"]}
    return {**measured, "calib_tokens": done.tokens, "batches": -(-done.tokens // (SEQ_BATCH * 128)),
            "ffn_top": [row.argsort(descending=True)[:16].tolist() for row in done.ffn],
            "residual_top": done.residual_ranking("read").argsort(descending=True)[:64].tolist()}


def run_fresh(tag: str, target: str, *args: object) -> dict:
    """``module:function`` called with ``args`` in a fresh Python process (so that each peak is its own): its
    result, a dict passed back as JSON on the last line of its output, its floats printed with ``tag``."""
    module, function = target.split(":")
    code = (f"import json, sys\nfrom {module} import {function}\n"
            f"print(json.dumps({function}(*json.loads(sys.argv[1]))))")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{target}{args} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{tag}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)), flush=True)
    return result


def measure_size(size: str, work: Path, tokens: int) -> dict:
    """One parent made into a child in memory and offloaded at a quarter, each in a fresh process."""
    parent, head = synthetic(size, work)
    quarter = head.pop("quarter")  # after the shards in the JSON, as it has always been
    row = {**head, "shards": len(list(parent.glob("*.safetensors"))), "quarter": quarter}
    for mode, budget in (("memory", None), ("offload", quarter)):
        row[mode] = run_fresh(f"{size} {mode}", "bench.bench_scale:make_worker", size, str(parent), tokens,
                              str(work / f"child-{size}-{mode}"), budget)
    row["same_indices"] = all(row["memory"][k] == row["offload"][k] for k in ("selection", "kept_blocks"))
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


def header(size: str, work: Path, **extra: object) -> tuple[Path, dict]:
    """The synthetic parent of a size, and what the sequential and ablation reports begin with."""
    parent, head = synthetic(size, work)
    return parent, {**head, "hidden": SIZES[size][0], "blocks": SIZES[size][1], **extra, "machine": _machine()}


def placements(kind: str, parent: Path, head: dict, tokens: int) -> dict:
    """One fresh ``kind`` worker per placement (SEQ_MODES), the budget a quarter of the parent."""
    return {mode: run_fresh(f"{head['size']} {kind} {tokens} tokens {mode}", "bench.bench_scale:placement_worker",
                            kind, mode, str(parent), head["quarter"], tokens) for mode in SEQ_MODES}


def sequential_bench(size: str, work: Path) -> dict:
    """The three placements of calibration alone on one parent (SEQ_TOKENS): whether they rank alike."""
    parent, report = header(size, work, batch_size=SEQ_BATCH, seq_len=128)
    report["runs"] = [{"tokens": tokens, **placements("calib", parent, report, tokens)} for tokens in SEQ_TOKENS[size]]
    for run in report["runs"]:
        tops = [(run[mode].pop("ffn_top"), run[mode].pop("residual_top")) for mode in SEQ_MODES]
        run["same_rankings"] = all(top == tops[0] for top in tops)
    report["same_rankings"] = all(run["same_rankings"] for run in report["runs"])
    return report


def ablation_bench(size: str, work: Path) -> dict:
    """The three placements of the block ablation on one parent: their largest loss difference from the
    in-memory run and whether they order the blocks alike."""
    parent, report = header(size, work, tokens=ABL_TOKENS)
    modes = report["modes"] = placements("ablation", parent, report, ABL_TOKENS)
    losses = {mode: [r["base"], *r["losses"]] for mode, r in modes.items()}
    report["max_loss_difference"] = max(abs(a - b) for v in losses.values() for a, b in zip(v, losses["memory"]))
    order = {mode: sorted(range(len(r["losses"])), key=r["losses"].__getitem__) for mode, r in modes.items()}
    report["same_order"] = all(o == order["memory"] for o in order.values())
    return report


def slope(rows: list[dict], mode: str, key: str) -> float | None:
    """The least-squares slope of log(cost) against log(parameters): 1 means cost grows like the parent."""
    points = [(math.log(r["parameters"]), math.log(v)) for r in rows if (v := r[mode][key]) and v > 0]
    return float(np.polyfit(*zip(*points), 1)[0]) if len(points) >= 2 else None


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


def markdown(report: dict, template: str = "scale") -> str:
    """A section of BENCHMARKS.md drawn by its template (bench/templates/TEMPLATE.md.j2) from its report: the
    scale bench's, or (sequential_markdown, ablation_markdown) the sequential or ablation bench's."""
    return render(template, **{"notes": "", "budgets": TOKENS, "costs": COSTS, "rtol": SAME_CHILD_RTOL,
                               "modes": SEQ_MODES, **report})


sequential_markdown = partial(markdown, template="scale_sequential")
ablation_markdown = partial(markdown, template="scale_ablation")
# which bench: its section of BENCHMARKS.md, its JSON under docs/ and its template
SECTIONS = {"scale": ("bench_scale", "scale.json", "scale"),
            "sequential": ("bench_sequential", "sequential.json", "scale_sequential"),
            "ablation": ("bench_ablation", "ablation.json", "scale_ablation")}


def _machine() -> dict:
    return {"cores": os.cpu_count(), "load_average": os.getloadavg()[0]}


def run_bench(bench: str, size: str, sizes: list[str], work: Path) -> tuple[dict, bool]:
    """A bench's report, and whether its placements agree (the same child, rankings or order of blocks)."""
    if bench == "scale":
        rows = [measure_size(s, work, TOKENS[s]) for s in ([size] if size == "tiny" else sizes)]
        slopes = {mode: {label: slope(rows, mode, key) for label, key in COSTS.items()}
                  for mode in ("memory", "offload")}
        return {"rows": rows, "slopes": slopes, "machine": _machine()}, all(r["same_indices"] for r in rows)
    report = (sequential_bench if bench == "sequential" else ablation_bench)(size, work)
    return report, report["same_rankings" if bench == "sequential" else "same_order"]


def main() -> int:
    """One bench (scale, --sequential or --ablation), or its report redrawn; 1 where its placements disagree."""
    parser = bench_parser(__doc__, smoke="only the tiny parent, nothing written to docs/",
                          report_only="rewrite the plot and section from the saved JSON")
    parser.add_argument("--sizes", default="0.1B,0.5B,1B,3B")
    parser.add_argument("--work", default=None, help="where parents are written (default: a temporary folder)")
    bench = parser.add_mutually_exclusive_group()
    bench.add_argument("--sequential", action="store_const", const="sequential", dest="bench", default="scale")
    bench.add_argument("--ablation", action="store_const", const="ablation", dest="bench")
    args = parser.parse_args()
    section, name, template = SECTIONS[args.bench]
    if args.report_only:
        report, ok = json.loads((DOCS / name).read_text()), True
    else:
        work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
        report, ok = run_bench(args.bench, "tiny" if args.smoke else "1B", args.sizes.split(","), work)
        if args.smoke:
            return 0 if ok else 1
        write_text(DOCS / name, json.dumps(report, indent=1))
    if args.bench == "scale":
        plot(report["rows"], DOCS / "bench_scale.png")
    write_section(section, markdown(report, template))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
