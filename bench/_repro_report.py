"""docs/REPRODUCTION.md and its figures from the measurements: per finding, the paper's claim, what was measured
and a verdict computed from the numbers by the rule stated next to each one: "holds" (every test of the rule
passes), "holds partly" (some do), "does not hold" (none do), "within noise" (a tie, or the two seeds disagree),
or, for what the paper leaves open, which option won here. The prose and tables: bench/templates/repro*.md.j2.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from statistics import mean
from typing import Any

from bench._report import PAPER_SPEEDUP, TEMPLATES, finish, panels, save_figure
from bench._report import render as render_template
from bench.bench_budget import lr_picks
from subclone_core.training.sweep import grid_edge

HOLDS, PARTLY, FAILS, NOISE = "holds", "holds partly", "does not hold", "within noise"
UNMEASURABLE = "not measurable with fewer than 3 blocks"
TIE = {"loss": 0.01, "accuracy": 0.002}  # best values closer than this count as a tie (0.2% = 1 of 500 images)
PART_NAMES = {"lm": "language model", "lm-budget": "language model, longer budget", "vit": "ViT"}
# (number, title, the paper's claim, figure, parts) per finding, one a line in bench/templates/repro_findings.md
FINDINGS = [(number, title, claim, figure, tuple(parts.split(","))) for number, title, figure, parts, claim in
            (line.split(" | ", 4) for line in (TEMPLATES / "repro_findings.md").read_text().splitlines() if line)]


def found(verdict: str, kind: str, **facts: Any) -> dict[str, str]:
    """A finding's verdict, and its text: the ``kind`` paragraph of bench/templates/repro_measured.md.j2."""
    return {"verdict": verdict, "text": render_template("repro_measured", kind=kind, **facts)}


def grade(tests: list[bool]) -> str:
    """holds when every test passes, holds partly when some do, does not hold when none do."""
    return HOLDS if all(tests) else PARTLY if any(tests) else FAILS


def better(a: float, b: float, metric: str) -> bool:
    """Whether value ``a`` beats ``b`` (higher accuracy, lower loss)."""
    return a > b if metric == "accuracy" else a < b


def winner(values: dict[Any, float | None], metric: str) -> Any:
    """The key of the best value (None when there is none)."""
    known = {k: v for k, v in values.items() if v is not None}
    return (max if metric == "accuracy" else min)(known, key=known.get) if known else None


def argmin(values: list[float]) -> int:
    """The index of the lowest value (the first of equals)."""
    return min(range(len(values)), key=values.__getitem__)


def middle_and_outer(layers: int) -> tuple[list[int], list[int]]:
    """The middle half of the blocks, and the first and last quarters (at least the first and last block)."""
    lo, hi = max(1, layers // 4), layers - max(1, layers // 4)
    return list(range(lo, hi)), [i for i in range(layers) if not lo <= i < hi]


def step0_value(part: dict, shape: str, arm: str, metric: str) -> float | None:
    """An arm's step-0 value on one shape, averaged over the calibration seeds."""
    values = [r[metric] for r in part["step0"] if r["shape"] == shape and r["arm"] == arm and r[metric] is not None]
    return mean(values) if values else None


def trained(part: dict, arm: str) -> dict[str, dict]:
    """seed -> run summary of one arm ({} when it was not trained or diverged)."""
    return part["training"]["runs"].get(arm, {})


def trained_winner(part: dict, arms: tuple[str, ...]) -> tuple[str | None, bool, dict]:
    """The arm clearly best (the runner-up not within TIE) after training in every seed that ran them all (None: a
    tie, or the seeds disagree), whether there were two seeds, and seed -> {arm: best value}."""
    metric = part["training"]["metric"]
    per_seed = {s: {a: trained(part, a)[s]["best"] for a in arms}
                for s in sorted(set.intersection(*(set(trained(part, a)) for a in arms)))}
    winners = set()
    for values in per_seed.values():
        ranked = sorted((v for v in values.values() if v is not None), reverse=metric == "accuracy")
        winners.add(None if len(ranked) > 1 and abs(ranked[0] - ranked[1]) < TIE[metric] else winner(values, metric))
    return (next(iter(winners)) if len(winners) == 1 else None), len(per_seed) > 1, per_seed


# --- findings -------------------------------------------------------------------------------------------


def finding_magnitude(part: dict) -> dict[str, str]:
    """1. Relative magnitude is lowest in the middle blocks. Tests: the middle half's mean is below the first and
    last quarters' mean; the lowest block is in the middle half."""
    a = part["analysis"]
    rel = next(iter(a["rel_magnitude"].values()))
    middle, outer = middle_and_outer(a["layers"])
    if not middle:
        return found(UNMEASURABLE, "magnitude-few", rel=rel)
    lowest, mid, out = argmin(rel), mean(rel[i] for i in middle), mean(rel[i] for i in outer)
    return found(grade([mid < out, lowest in middle]), "magnitude", rel=rel, lowest=lowest, mid=mid, out=out,
                 layers=a["layers"], argmins=sorted({argmin(r) for r in a["rel_magnitude"].values()}))


def finding_removal(part: dict) -> dict[str, str]:
    """2. Removing a middle block hurts the untrained parent least. Tests: removing a middle-half block costs less
    on average than an outer one; the cheapest block is in the middle."""
    a, abl = part["analysis"], part["analysis"]["ablation"]
    image = "accuracies" in abl
    values, base = (abl["accuracies"], abl["base_accuracy"]) if image else (abl["losses"], abl["base"])
    cost = [(base - v) if image else (v - base) for v in values]  # larger = removal hurts more
    middle, outer = middle_and_outer(a["layers"])
    metric, scale = ("accuracy", 100) if image else ("loss", 1)  # accuracy costs in points
    if not middle:
        return found(UNMEASURABLE, "removal-few", metric=metric, base=base, values=values)
    cheapest, mid, out = argmin(cost), mean(cost[i] for i in middle), mean(cost[i] for i in outer)
    return found(grade([mid < out, cheapest in middle]), "removal", metric=metric, base=base, cheapest=cheapest,
                 cost=[c * scale for c in cost], mid=mid * scale, out=out * scale,
                 unit="accuracy points" if image else "loss", spearman=a["magnitude_vs_removal_spearman"])


def finding_consistency(part: dict) -> dict[str, str]:
    """3. Neuron importance is consistent across blocks, and a few neurons dominate. Tests: mean Spearman
    correlation between blocks >= 0.5; the top 1% of residual neurons hold >= 5% of the score."""
    a = part["analysis"]
    return found(grade([a["rank_corr_off_diagonal"] >= 0.5, a["residual_top1_share"] >= 0.05]), "consistency", a=a)


def finding_scaling(part: dict) -> dict[str, str]:
    """4. Scaling by sqrt(d/d') helps. Tests: the scaled child is better at step 0 on each shape, and clearly
    better after training in every seed run (a tie or a split between seeds makes the verdict "within noise")."""
    scaled, plain = ("scaled", "subclone") if "scaled" in part["training"]["labels"] else ("subclone", "unscaled")
    m = part["training"]["metric"]
    step0 = [(s, step0_value(part, s, scaled, m), step0_value(part, s, plain, m)) for s in part["step0_shapes"]]
    tests = [better(x, y, m) for _, x, y in step0 if x is not None and y is not None]
    win, two_seeds, per_seed = trained_winner(part, (scaled, plain))
    verdict = NOISE if per_seed and win is None else grade([*tests, win == scaled] if per_seed else tests)
    return found(verdict, "pair", claimed=scaled, other=plain, m=m, step0=step0, two_seeds=two_seeds,
                 per_seed=per_seed, trained_shape=part["training"]["shape_key"])


def finding_reordering(part: dict) -> dict[str, str]:
    """5. Reordering by importance beats first-k, weight selection and random init. Tests: subclone beats each of
    the three at step 0 on each shape, and is clearly best after training."""
    m, arms = part["training"]["metric"], ("subclone", "first-k", "uniform", "random")
    step0 = {s: {arm: step0_value(part, s, arm, m) for arm in arms} for s in part["step0_shapes"]}
    tests = [better(v["subclone"], v[o], m) for v in step0.values() for o in arms[1:] if v[o] is not None]
    win, _, per_seed = trained_winner(part, arms)
    return found(grade(tests + [win == "subclone"] if per_seed else tests), "step0-and-trained", m=m, step0=step0,
                 per_seed=per_seed)


def sweep_values(part: dict, arm: str) -> dict[float, float]:
    """lr -> best value of one swept arm, seed 0."""
    return {r["lr"]: r["best"] for r in part["training"]["sweep"]
            if r["arm"] == arm and r["seed"] == 0 and r["best"] is not None}


def lr_verdict(part: dict) -> tuple[str, dict[str, Any]]:
    """Does the child want a lower lr than random init? Random init's good lrs are those within TIE of its best.

    holds: the child's best lr is below all of them; holds partly: it is not, but the child is clearly worse
    at the highest lr random init does well with (it cannot take what random init can); else does not hold.
    """
    m = part["training"]["metric"]
    rnd, child = sweep_values(part, "random"), sweep_values(part, "subclone")
    if not rnd or not child:
        return FAILS, {"good": []}
    good = sorted(lr for lr, v in rnd.items() if abs(v - rnd[winner(rnd, m)]) < TIE[m])
    child_lr = winner(child, m)
    at_high = child.get(good[-1])
    hurt = at_high is not None and abs(at_high - child[child_lr]) >= TIE[m] and child_lr < good[-1]
    verdict = HOLDS if child_lr < good[0] else PARTLY if hurt else FAILS
    return verdict, {"good": good, "child_lr": child_lr, "hurt": hurt, "at_high": at_high, "at_best": child[child_lr]}


def finding_lr(part: dict, high_wd: float) -> dict[str, str]:
    """6. The subcloned child prefers a low learning rate (lr_verdict) and low weight decay (clearly better than
    ``high_wd`` in every seed run)."""
    t, m, swept = part["training"], part["training"]["metric"], ("random", "subclone")
    best_lr = {arm: trained(part, arm).get("0", {}).get("lr") for arm in swept}
    lr_result, lr_facts = lr_verdict(part)
    win, _, per_seed = trained_winner(part, ("subclone", "subclone-wd"))
    wd_verdict = NOISE if win is None else HOLDS if win == "subclone" else FAILS
    # AdamW's decoupled decay multiplies weights by (1 - lr_t * wd) each step; the cosine averages lr_t to ~lr / 2
    shrink = 1 - (1 - (best_lr["subclone"] or 0.0) / 2 * high_wd) ** t["budget"]["steps"]
    return found(f"learning rate: {lr_result}; weight decay: {wd_verdict}", "lr", m=m, **lr_facts,
                 sweep=[(arm, lr, v) for arm in swept for lr, v in sorted(sweep_values(part, arm).items())],
                 edge=[arm for arm, lr in best_lr.items() if lr is not None and grid_edge(lr, t["swept"][arm])],
                 wd=trained(part, "subclone").get("0", {}).get("weight_decay"), high_wd=high_wd,
                 per_seed=per_seed, shrink=shrink)


def open_question(part: dict, options: dict[str, str], **facts: Any) -> dict[str, str]:
    """Which option wins at step 0 per shape and after training (for what the paper leaves open); ``options`` maps
    each arm to the name of the option it stands for (e.g. "subclone" -> "magnitude")."""
    m = part["training"]["metric"]
    step0 = {s: {name: step0_value(part, s, arm, m) for arm, name in options.items()} for s in part["step0_shapes"]}
    step0_winners = [winner(values, m) or "none" for values in step0.values()]
    win, _, per_seed = trained_winner(part, tuple(options))
    win = options.get(win) if win else None
    if per_seed and win is None:
        verdict = f"step 0: {', '.join(step0_winners)} (per shape); after training {NOISE}"
    elif len(set(step0_winners + ([win] if win else []))) == 1:
        verdict = f"{step0_winners[0]} wins here"
    else:
        verdict = f"step 0: {', '.join(step0_winners)} (per shape), after training: {win or 'none'}"
    per_seed = {s: {options[a]: v for a, v in values.items()} for s, values in per_seed.items()}
    return found(f"open in the paper; {verdict}", "step0-and-trained", m=m, step0=step0, per_seed=per_seed, **facts)


def finding_block_policy(part: dict) -> dict[str, str]:
    """7. (open) Which blocks to drop: the lowest relative magnitude, a middle span, or all but the first N; with
    the blocks each policy removed at the trained shape (once, or per calibration seed where the seeds differ)."""
    policies = {"subclone": "magnitude", "middle": "middle span", "first-blocks": "first N"}
    shape, removed = part["training"]["shape_key"], {}
    for arm, name in policies.items():
        by_seed = {r["seed"]: r["removed_blocks"] for r in part["step0"] if r["arm"] == arm and r["shape"] == shape}
        same = len({tuple(v or ()) for v in by_seed.values()}) == 1
        removed[name] = [(next(iter(by_seed.values())), None)] if same else [(v, s) for s, v in by_seed.items()]
    return open_question(part, policies, removed=removed, trained_shape=shape)


def finding_tied_head(part: dict) -> dict[str, str]:
    """8. (open) With scaling on: the head tied to the embedding (unscaled), or untied and scaled."""
    return open_question(part, {"scaled": "tied unscaled head", "scaled-untied": "untied scaled head"})


def finding_headline(part: dict) -> dict[str, str]:
    """9. The subcloned child reaches random init's best far sooner. Test per seed: a speedup of at least 4x."""
    speedups = part["training"]["speedups"].get("subclone", {})
    if not speedups:
        return found(FAILS, "headline-none")
    return found(grade([v["ratio"] is not None and v["ratio"] >= PAPER_SPEEDUP for v in speedups.values()]),
                 "headline", t=part["training"], m=part["training"]["metric"], speedups=speedups,
                 rnd=trained(part, "random").get("0", {}), child=trained(part, "subclone").get("0", {}))


def finding_budget(budget: dict) -> dict[str, str]:
    """9 at the longest budget measured (docs/speedup_vs_budget.json, bench/bench_budget.py): the iso-loss
    speedup at random init's final loss, the number the paper's ~4x is about (training to the same loss).
    Test: at least 4x holds; faster than random init but under 4x holds partly."""
    rows = budget["at_drop"].get("subclone") or []
    if not rows:
        return found(FAILS, "budget-none")
    speedup = rows[-1]["speedup"]
    verdict = FAILS if speedup is None or speedup <= 1 else HOLDS if speedup >= PAPER_SPEEDUP else PARTLY
    spread = [r for r in budget.get("seed_spread", []) if r["fraction"] == 1.0 and r["shape"] == "aggressive"]
    return found(verdict, "budget", b=budget, early=rows[0], final=rows[-1], lrs=_lr_text(budget), spread=spread,
                 stages=budget.get("stages", {}), paper=PAPER_SPEEDUP)


def _lr_text(budget: dict) -> str:
    """", each arm at its best lr at this budget: random 1e-3 of 5e-4, 1e-3, 2e-3; ..." where the JSON has a grid
    (rates as sweeps name them: 2.5e-4, not a rounded 3e-04)."""
    picks = lr_picks(budget)
    return f", each arm at its best lr at this budget: {'; '.join(picks)}" if picks else ""


def evaluate_findings(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, str]]:
    """(finding number, part) -> {"verdict", "text"} for every finding that applies to a part that ran
    (bench_budget.py's results, part "lm-budget", have their own schema and rule)."""
    rules = {"1": finding_magnitude, "2": finding_removal, "3": finding_consistency, "4": finding_scaling,
             "5": finding_reordering, "6": lambda p: finding_lr(p, results["high_wd"]), "7": finding_block_policy,
             "8": finding_tied_head, "9": finding_headline}
    return {(number, key): (finding_budget if key == "lm-budget" else rules[number])(results[key])
            for number, _, _, _, parts in FINDINGS for key in parts if results.get(key) is not None}


def render(results: dict[str, Any], figures: str) -> str:
    """The whole report as Markdown; ``figures`` is the plots' folder relative to the report."""
    verdicts = evaluate_findings(results)
    findings = [{"number": n, "title": title, "claim": claim, "figure": figure,
                 "parts": [(PART_NAMES[k], verdicts[(n, k)]) for k in keys if (n, k) in verdicts]}
                for n, title, claim, figure, keys in FINDINGS]
    parts = {k: results[k] for k in ("lm", "vit") if results.get(k)}
    return render_template("repro", **{"load_average_end": float("nan"), **results}, findings=findings, parts=parts,
                           figures=figures, part_names=PART_NAMES) + "\n"


# --- figures --------------------------------------------------------------------------------------------

DPI = 72
CURVES = {"scaling": "scaling on / off", "reordering": "neuron order", "block-policy": "which blocks to drop",
          "tied-head": "tied or untied head", "headline": "subclone vs random init"}  # comparison -> title


def draw_all(results: dict[str, Any], folder: Path) -> None:
    """Every figure the report links (one small PNG per finding), into ``folder``."""
    parts = [(k, results[k]) for k in ("lm", "vit") if results.get(k)]
    _figure(folder / "rel_magnitude.png", parts, _rel_magnitude)
    _figure(folder / "block_removal.png", parts, _block_removal)
    _consistency(folder / "consistency.png", parts)
    _figure(folder / "lr.png", parts, _lr_sweep)
    for comparison, title in CURVES.items():
        compared = [(k, p) for k, p in parts if comparison in p["training"]["comparisons"]]
        if compared:
            _figure(folder / f"{comparison.replace('-', '_')}.png", compared, partial(_curves, comparison, title),
                    width=5.2, height=3.5)


def _figure(path: Path, parts: list[tuple[str, dict]], draw: Callable[[Any, str, dict], None], *,
            width: float = 4.6, height: float = 3.2) -> None:
    """A row of one panel per part, each drawn by ``draw(ax, part name, part)``."""
    fig, axes = panels(len(parts), width, height)
    for ax, (key, part) in zip(axes[0], parts):
        draw(ax, PART_NAMES[key], part)
    save_figure(fig, path, DPI)


def _rel_magnitude(ax: Any, name: str, part: dict) -> None:
    for seed, values in part["analysis"]["rel_magnitude"].items():
        ax.plot(range(len(values)), values, marker=".", label=f"calibration seed {seed}")
    finish(ax, title=f"{name}: relative magnitude", xlabel="block", ylabel="||f(x)|| / ||x + f(x)||")


def _block_removal(ax: Any, name: str, part: dict) -> None:
    """Each block's removal cost as a bar, the blocks the default (magnitude) policy removes in orange."""
    abl, shape = part["analysis"]["ablation"], part["training"]["shape_key"]
    image = "accuracies" in abl
    values, base = (abl["accuracies"], abl["base_accuracy"]) if image else (abl["losses"], abl["base"])
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.axhline(base, color="black", linestyle="--", linewidth=1, label="intact parent")
    row = next((r for r in part["step0"] if r["arm"] == "subclone" and r["shape"] == shape), None)
    removed = row["removed_blocks"] if row and row["removed_blocks"] else []
    for i in removed:
        ax.bar(i, values[i], color="tab:orange")
    ax.set(title=f"{name}: one block removed", xlabel="block removed",
           ylabel="validation accuracy" if image else "validation loss")
    if not image:
        ax.set_ylim(bottom=min(values + [base]) * 0.9)
    ax.legend(fontsize=7, title="orange: removed by 'magnitude'" if removed else None, title_fontsize=7)


def _consistency(path: Path, parts: list[tuple[str, dict]]) -> None:
    """Per part: two block-vs-block scatters, the rank correlation matrix, the sorted shared residual scores."""
    fig, axes = panels(4, 4, 3.4, len(parts))
    for row, (key, part) in zip(axes, parts):
        a, name = part["analysis"], PART_NAMES[key]
        for ax, pair in zip(row[:2], a["scatter"] + a["scatter"][:1] * (2 - len(a["scatter"]))):
            ax.scatter(pair["x"], pair["y"], s=4, alpha=0.5)
            ax.set(title=f"{name}: block {pair['a']} vs {pair['b']} (Spearman {pair['spearman']:.2f})",
                   xlabel=f"|output| of block {pair['a']}", ylabel=f"|output| of block {pair['b']}",
                   xscale="log", yscale="log")
        image = row[2].imshow(a["rank_corr"], vmin=-1, vmax=1, cmap="RdBu_r")
        row[2].set(title=f"{name}: rank correlation", xlabel="block", ylabel="block")
        fig.colorbar(image, ax=row[2], fraction=0.046)
        row[3].plot(range(1, len(a["residual_sorted"]) + 1), a["residual_sorted"])
        row[3].set(title=f"{name}: shared residual scores, sorted", xlabel="rank", ylabel="score", xscale="log",
                   yscale="log")
        row[3].grid(alpha=0.3)
    for ax in axes.flat:
        ax.title.set_fontsize(9)
    save_figure(fig, path, DPI)


def _curves(comparison: str, title: str, ax: Any, name: str, part: dict) -> None:
    """Validation curves of the arms one comparison names; second-seed runs dashed."""
    t = part["training"]
    for i, arm in enumerate(t["comparisons"][comparison]):
        for seed, run in t["runs"].get(arm, {}).items():
            if run["curve"]:
                first = seed == "0"
                ax.plot(*zip(*run["curve"]), color=f"C{i}", linestyle="-" if first else "--",
                        marker="." if first else None,
                        label=f"{arm} (lr {run['lr']:g})" + ("" if first else f", seed {seed}"))
    if comparison == "headline" and "random" in t["runs"]:
        ax.axhline(t["runs"]["random"]["0"]["best"], color="grey", linestyle=":", linewidth=1,
                   label="random init's best")
    ax.set(title=f"{name}: {title}", xlabel="step", ylabel=f"validation {t['metric']}")
    if t["metric"] == "loss":
        ax.set_ylim(top=min(12.0, ax.get_ylim()[1]))
    finish(ax)


def _lr_sweep(ax: Any, name: str, part: dict) -> None:
    """Best value per learning rate of each swept arm, seed 0; the high weight decay run as a red cross."""
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
    ax.set(title=f"{name}: best validation {t['metric']} per learning rate", xlabel="peak learning rate",
           ylabel=f"best validation {t['metric']}", xscale="log")
    finish(ax)
