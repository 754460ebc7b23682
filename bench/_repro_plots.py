"""The figures of docs/REPRODUCTION.md, drawn from the measurements (one small PNG per finding)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench._report import finish, panels, save_figure

DPI = 72
NAMES = {"lm": "language model", "vit": "ViT"}


def _parts(results: dict, keys: tuple[str, ...] = ("lm", "vit")) -> list[tuple[str, dict]]:
    return [(k, results[k]) for k in keys if results.get(k)]


def _panels(n: int, width: float = 4.6, height: float = 3.2) -> tuple[Any, list[Any]]:
    fig, axes = panels(n, width, height)
    return fig, list(axes[0])


def rel_magnitude(results: dict, path: Path) -> None:
    parts = _parts(results)
    fig, axes = _panels(len(parts))
    for ax, (key, part) in zip(axes, parts):
        for seed, values in part["analysis"]["rel_magnitude"].items():
            ax.plot(range(len(values)), values, marker=".", label=f"calibration seed {seed}")
        finish(ax, title=f"{NAMES[key]}: relative magnitude", xlabel="block", ylabel="||f(x)|| / ||x + f(x)||")
    save_figure(fig, path, DPI)


def block_removal(results: dict, path: Path) -> None:
    parts = _parts(results)
    fig, axes = _panels(len(parts))
    for ax, (key, part) in zip(axes, parts):
        abl = part["analysis"]["ablation"]
        image = "accuracies" in abl
        values, base = (abl["accuracies"], abl["base_accuracy"]) if image else (abl["losses"], abl["base"])
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label="intact parent")
        removed = _removed(part)
        for i in removed:
            ax.bar(i, values[i], color="tab:orange")
        ax.set(title=f"{NAMES[key]}: one block removed", xlabel="block removed",
               ylabel="validation accuracy" if image else "validation loss")
        if not image:
            ax.set_ylim(bottom=min(values + [base]) * 0.9)
        ax.legend(fontsize=7, title="orange: removed by 'magnitude'" if removed else None, title_fontsize=7)
    save_figure(fig, path, DPI)


def _removed(part: dict) -> list[int]:
    """Blocks the default (magnitude) policy removes for the trained child, when it removes any."""
    shape = part["training"]["shape_key"]
    row = next((r for r in part["step0"] if r["arm"] == "subclone" and r["shape"] == shape), None)
    return row["removed_blocks"] if row and row["removed_blocks"] else []


def consistency(results: dict, path: Path) -> None:
    parts = _parts(results)
    fig, axes = panels(4, 4, 3.4, len(parts))
    for row, (key, part) in zip(axes, parts):
        a = part["analysis"]
        for ax, pair in zip(row[:2], a["scatter"] + a["scatter"][:1] * (2 - len(a["scatter"]))):
            ax.scatter(pair["x"], pair["y"], s=4, alpha=0.5)
            ax.set(title=f"{NAMES[key]}: block {pair['a']} vs {pair['b']} (Spearman {pair['spearman']:.2f})",
                   xlabel=f"|output| of block {pair['a']}", ylabel=f"|output| of block {pair['b']}",
                   xscale="log", yscale="log")
        image = row[2].imshow(a["rank_corr"], vmin=-1, vmax=1, cmap="RdBu_r")
        row[2].set(title=f"{NAMES[key]}: rank correlation", xlabel="block", ylabel="block")
        fig.colorbar(image, ax=row[2], fraction=0.046)
        row[3].plot(range(1, len(a["residual_sorted"]) + 1), a["residual_sorted"])
        row[3].set(title=f"{NAMES[key]}: shared residual scores, sorted", xlabel="rank", ylabel="score",
                   xscale="log", yscale="log")
        row[3].grid(alpha=0.3)
    for ax in axes.flat:
        ax.title.set_fontsize(9)
    save_figure(fig, path, DPI)


def curves(results: dict, path: Path, comparison: str, title: str) -> None:
    """Validation curves of the arms one comparison names, per part; second-seed runs dashed."""
    parts = [(k, p) for k, p in _parts(results) if comparison in p["training"]["comparisons"]]
    if not parts:
        return
    fig, axes = _panels(len(parts), width=5.2, height=3.5)
    for ax, (key, part) in zip(axes, parts):
        t = part["training"]
        for i, arm in enumerate(t["comparisons"][comparison]):
            for seed, run in t["runs"].get(arm, {}).items():
                if not run["curve"]:
                    continue
                steps, values = zip(*run["curve"])
                ax.plot(steps, values, color=f"C{i}", linestyle="-" if seed == "0" else "--",
                        marker="." if seed == "0" else None,
                        label=f"{arm} (lr {run['lr']:g})" + ("" if seed == "0" else f", seed {seed}"))
        if comparison == "headline" and "random" in t["runs"]:
            ax.axhline(t["runs"]["random"]["0"]["best"], color="grey", linestyle=":", linewidth=1,
                       label="random init's best")
        ax.set(title=f"{NAMES[key]}: {title}", xlabel="step", ylabel=f"validation {t['metric']}")
        if t["metric"] == "loss":
            ax.set_ylim(top=min(12.0, ax.get_ylim()[1]))
        finish(ax)
    save_figure(fig, path, DPI)


def lr_sweep(results: dict, path: Path) -> None:
    parts = _parts(results)
    fig, axes = _panels(len(parts))
    for ax, (key, part) in zip(axes, parts):
        t = part["training"]
        for arm in t["swept"]:
            points = sorted((r["lr"], r["best"]) for r in t["sweep"] if r["arm"] == arm and r["seed"] == 0
                            and r["best"] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{arm}, weight decay "
                        f"{t['runs'][arm]['0']['weight_decay']:g}" if arm in t["runs"] else arm)
        for r in t["sweep"]:
            if r["arm"] == "subclone-wd" and r["seed"] == 0 and r["best"] is not None:
                ax.scatter([r["lr"]], [r["best"]], marker="x", color="red", zorder=3,
                           label=f"subclone, weight decay {r['weight_decay']:g}")
        ax.set(title=f"{NAMES[key]}: best validation {t['metric']} per learning rate", xlabel="peak learning rate",
               ylabel=f"best validation {t['metric']}", xscale="log")
        finish(ax)
    save_figure(fig, path, DPI)


def draw_all(results: dict[str, Any], folder: Path) -> list[Path]:
    """Every figure the report links, into ``folder``; returns their paths."""
    rel_magnitude(results, folder / "rel_magnitude.png")
    block_removal(results, folder / "block_removal.png")
    consistency(results, folder / "consistency.png")
    curves(results, folder / "scaling.png", "scaling", "scaling on / off")
    curves(results, folder / "reordering.png", "reordering", "neuron order")
    lr_sweep(results, folder / "lr.png")
    curves(results, folder / "block_policy.png", "block-policy", "which blocks to drop")
    curves(results, folder / "tied_head.png", "tied-head", "tied or untied head")
    curves(results, folder / "headline.png", "headline", "subclone vs random init")
    return sorted(folder.glob("*.png"))
