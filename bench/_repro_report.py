"""docs/REPRODUCTION.md from the measurements: per finding, the paper's claim, what was measured, a verdict.

Verdicts are computed from the numbers by the rules stated next to each one, never written by hand:
"holds" (every test of the rule passes), "holds partly" (some do), "does not hold" (none do), "within noise"
(a tie, or the two seeds disagree), or, for what the paper leaves open, which option won here.
"""

from __future__ import annotations

from statistics import mean
from typing import Any

from bench._report import PAPER_SPEEDUP, TEMPLATES, table
from bench._report import fmt_value as fmt
from bench._report import render as render_template
from bench.bench_budget import lr_picks

HOLDS, PARTLY, FAILS, NOISE = "holds", "holds partly", "does not hold", "within noise"
UNMEASURABLE = "not measurable with fewer than 3 blocks"
TIE = {"loss": 0.01, "accuracy": 0.002}  # best values closer than this count as a tie (0.2% = 1 of 500 images)


# --- small helpers --------------------------------------------------------------------------------------


def better(a: float, b: float, metric: str) -> bool:
    return a > b if metric == "accuracy" else a < b


def num(value: float | None) -> str:
    """A learning rate or weight decay, or "-" when there is none."""
    return "-" if value is None else f"{value:g}"


def middle_and_outer(layers: int) -> tuple[list[int], list[int]]:
    """The middle half of the blocks, and the first and last quarters (at least the first and last block)."""
    lo, hi = max(1, layers // 4), layers - max(1, layers // 4)
    middle = list(range(lo, hi))
    return middle, [i for i in range(layers) if i not in middle]


def step0_seeds(part: dict, shape: str, arm: str, metric: str) -> list[float]:
    """An arm's step-0 values on one shape, one per calibration seed."""
    return [r[metric] for r in part["step0"] if r["shape"] == shape and r["arm"] == arm]


def step0_value(part: dict, shape: str, arm: str, metric: str) -> float | None:
    """An arm's step-0 value on one shape, averaged over the calibration seeds."""
    values = [v for v in step0_seeds(part, shape, arm, metric) if v is not None]
    return mean(values) if values else None


def metric_of(part: dict) -> str:
    return part["training"]["metric"]


def trained(part: dict, arm: str) -> dict[str, dict]:
    """seed -> run summary of one arm ({} when it was not trained or diverged)."""
    return part["training"]["runs"].get(arm, {})


def best_by_seed(part: dict, arms: tuple[str, ...] | list[str]) -> dict[str, dict[str, float]]:
    """seed -> {arm: best value} for the seeds in which every listed arm ran."""
    seeds = set.intersection(*(set(trained(part, a)) for a in arms)) if arms else set()
    return {s: {a: trained(part, a)[s]["best"] for a in arms} for s in sorted(seeds)}


def winner(values: dict[str, float | None], metric: str) -> str | None:
    known = {k: v for k, v in values.items() if v is not None}
    return (max if metric == "accuracy" else min)(known, key=known.get) if known else None


def clear_winner(values: dict[str, float | None], metric: str) -> str | None:
    """The best arm, or None when the runner-up is within TIE of it."""
    ranked = sorted((v for v in values.values() if v is not None), reverse=metric == "accuracy")
    if len(ranked) > 1 and abs(ranked[0] - ranked[1]) < TIE[metric]:
        return None
    return winner(values, metric)


def trained_winner(part: dict, arms: tuple[str, ...] | list[str]) -> tuple[str | None, bool, dict]:
    """The arm with the clearly best trained value in every seed run (None: a tie, or the seeds disagree),
    whether there were two seeds, and the values per seed."""
    per_seed = best_by_seed(part, arms)
    if not per_seed:
        return None, False, per_seed
    winners = {clear_winner(v, metric_of(part)) for v in per_seed.values()}
    return next(iter(winners)) if len(winners) == 1 else None, len(per_seed) > 1, per_seed


def label(part: dict, arm: str) -> str:
    return part["training"]["labels"].get(arm, arm)


def seeds_text(part: dict, per_seed: dict[str, dict[str, float]]) -> str:
    m = metric_of(part)
    return "; ".join(f"seed {s}: " + ", ".join(f"{a} {fmt(v, m)}" for a, v in vals.items())
                     for s, vals in per_seed.items())


# --- findings -------------------------------------------------------------------------------------------


def finding_magnitude(part: dict) -> dict[str, str]:
    """1. Relative magnitude is lowest in the middle blocks.

    Tests: the middle half's mean is below the first and last quarters' mean; the lowest block is in the middle half.
    """
    a = part["analysis"]
    rel = next(iter(a["rel_magnitude"].values()))
    middle, outer = middle_and_outer(a["layers"])
    if not middle:
        return {"verdict": UNMEASURABLE, "text": f"relative magnitude per block: {', '.join(f'{r:.3f}' for r in rel)}."}
    lowest = min(range(len(rel)), key=rel.__getitem__)
    mid, out = mean(rel[i] for i in middle), mean(rel[i] for i in outer)
    tests = [mid < out, lowest in middle]
    verdict = HOLDS if all(tests) else PARTLY if any(tests) else FAILS
    argmins = sorted({min(range(len(r)), key=r.__getitem__) for r in a["rel_magnitude"].values()})
    text = (f"lowest at block {lowest} ({rel[lowest]:.3f}) of 0-{a['layers'] - 1}; middle-half mean {mid:.3f} "
            f"against {out:.3f} for the first and last quarters; first block {rel[0]:.3f}, last {rel[-1]:.3f}. "
            f"Lowest block per calibration seed: {', '.join(map(str, argmins))}.")
    return {"verdict": verdict, "text": text}


def finding_removal(part: dict) -> dict[str, str]:
    """2. Removing a middle block hurts the untrained parent least.

    Tests: removing a middle-half block costs less on average than an outer one; the cheapest block is in the middle.
    """
    a = part["analysis"]
    abl = a["ablation"]
    image = "accuracies" in abl
    values, base = (abl["accuracies"], abl["base_accuracy"]) if image else (abl["losses"], abl["base"])
    metric = "accuracy" if image else "loss"
    cost = [(base - v) if image else (v - base) for v in values]  # larger = removal hurts more
    middle, outer = middle_and_outer(a["layers"])
    if not middle:
        return {"verdict": UNMEASURABLE, "text": f"intact parent {fmt(base, metric)}; without each block: "
                f"{', '.join(fmt(v, metric) for v in values)}."}
    cheapest = min(range(len(cost)), key=cost.__getitem__)
    mid, out = mean(cost[i] for i in middle), mean(cost[i] for i in outer)
    tests = [mid < out, cheapest in middle]
    verdict = HOLDS if all(tests) else PARTLY if any(tests) else FAILS
    unit = "accuracy points" if image else "loss"
    scale = 100 if image else 1
    text = (f"intact parent {fmt(base, metric)}; removing block {cheapest} costs least ({cost[cheapest] * scale:+.2f} "
            f"{unit}); mean cost of a middle-half block {mid * scale:+.2f} against {out * scale:+.2f} for the first and "
            f"last quarters; removing the first block costs {cost[0] * scale:+.2f}, the last {cost[-1] * scale:+.2f}. "
            f"Rank correlation of relative magnitude with removal loss: {a['magnitude_vs_removal_spearman']:+.2f}.")
    return {"verdict": verdict, "text": text}


def finding_consistency(part: dict) -> dict[str, str]:
    """3. Neuron importance is consistent across blocks, and a few neurons dominate.

    Tests: mean Spearman correlation between blocks >= 0.5; the top 1% of residual neurons hold >= 5% of the score.
    """
    a = part["analysis"]
    corr, top = a["rank_corr_off_diagonal"], a["residual_top1_share"]
    consistent, dominant = corr >= 0.5, top >= 0.05
    verdict = HOLDS if consistent and dominant else PARTLY if consistent or dominant else FAILS
    pairs = ", ".join(f"blocks {s['a']} vs {s['b']}: {s['spearman']:.2f}" for s in a["scatter"])
    agreement = (f" The shared ranking from two calibration samples agrees at {a['seed_agreement']:.3f} (Spearman)."
                 if a.get("seed_agreement") is not None else "")
    text = (f"mean Spearman rank correlation of residual-neuron scores between two different blocks {corr:.2f} "
            f"(adjacent blocks {a['rank_corr_adjacent']:.2f}; {pairs}). The top 1% of the {a['residual_dims']} "
            f"residual neurons hold {top:.1%} of the total score (uniform would be 1%); per block, the top 1% of "
            f"FFN neurons hold {a['ffn_top1_share']:.1%}.{agreement}")
    return {"verdict": verdict, "text": text}


def _step0_pair(part: dict, a: str, b: str) -> list[tuple[str, float | None, float | None]]:
    m = metric_of(part)
    return [(shape, step0_value(part, shape, a, m), step0_value(part, shape, b, m)) for shape in part["step0_shapes"]]


def pair_finding(part: dict, claimed: str, other: str) -> tuple[str, str]:
    """Tests: the claimed arm is better than the other at step 0 on each shape, and clearly better after training
    in every seed run (a tie or a split between seeds makes the verdict "within noise")."""
    m = metric_of(part)
    s0 = _step0_pair(part, claimed, other)
    s0_wins = [better(x, y, m) for _, x, y in s0 if x is not None and y is not None]
    s0_text = "; ".join(f"{shape}: {fmt(x, m)} vs {fmt(y, m)}" for shape, x, y in s0)
    win, both_seeds, per_seed = trained_winner(part, (claimed, other))
    train_text = seeds_text(part, per_seed) if per_seed else "not trained"
    if per_seed and win is None:
        verdict = NOISE
    else:
        tests = [*s0_wins, win == claimed] if per_seed else s0_wins
        verdict = HOLDS if all(tests) else PARTLY if any(tests) else FAILS
    seeds = " (two seeds)" if both_seeds else ""
    text = (f"step 0, {claimed} vs {other}: {s0_text}. Best after training at the "
            f"{part['training']['shape_key']} shape{seeds}: {train_text}.")
    return verdict, text


def finding_scaling(part: dict) -> dict[str, str]:
    """4. Scaling by sqrt(d/d') helps."""
    scaled, plain = ("scaled", "subclone") if "scaled" in part["training"]["labels"] else ("subclone", "unscaled")
    verdict, text = pair_finding(part, scaled, plain)
    return {"verdict": verdict, "text": text}


def finding_reordering(part: dict) -> dict[str, str]:
    """5. Reordering by importance beats first-k, weight selection and random init.

    Tests: subclone beats each of the three at step 0 on each shape, and is clearly best after training.
    """
    m = metric_of(part)
    others = ("first-k", "uniform", "random")
    lines, tests = [], []
    for shape in part["step0_shapes"]:
        values = {arm: step0_value(part, shape, arm, m) for arm in ("subclone", *others)}
        tests += [better(values["subclone"], values[o], m) for o in others if values[o] is not None]
        lines.append(f"{shape}: " + ", ".join(f"{arm} {fmt(v, m)}" for arm, v in values.items()))
    win, _, per_seed = trained_winner(part, ("subclone", *others))
    if per_seed:
        tests.append(win == "subclone")
    verdict = HOLDS if all(tests) else PARTLY if any(tests) else FAILS
    text = (f"step 0: {'; '.join(lines)}. Best after training: {seeds_text(part, per_seed) or 'not trained'}.")
    return {"verdict": verdict, "text": text}


def sweep_values(part: dict, arm: str) -> dict[float, float]:
    """lr -> best value of one swept arm, seed 0."""
    return {r["lr"]: r["best"] for r in part["training"]["sweep"]
            if r["arm"] == arm and r["seed"] == 0 and r["best"] is not None}


def lr_verdict(part: dict) -> tuple[str, str]:
    """Does the child want a lower lr than random init? Random init's good lrs are those within TIE of its best.

    holds: the child's best lr is below all of them; holds partly: it is not, but the child is clearly worse
    at the highest lr random init does well with (it cannot take what random init can); else does not hold.
    """
    m = metric_of(part)
    rnd, child = sweep_values(part, "random"), sweep_values(part, "subclone")
    if not rnd or not child:
        return FAILS, "a sweep diverged at every lr."
    best_r = (max if m == "accuracy" else min)(rnd.values())
    good = sorted(lr for lr, v in rnd.items() if abs(v - best_r) < TIE[m])
    child_lr = (max if m == "accuracy" else min)(child, key=child.get)
    at_high = child.get(good[-1])
    hurt = at_high is not None and abs(at_high - child[child_lr]) >= TIE[m] and child_lr < good[-1]
    verdict = HOLDS if child_lr < good[0] else PARTLY if hurt else FAILS
    good_text = " and ".join(f"{lr:g}" for lr in good)
    text = (f"random init does best at lr {good_text}" + (" (a tie)" if len(good) > 1 else "")
            + f"; the subcloned child at {child_lr:g}"
            + (f", and at {good[-1]:g} it drops to {fmt(at_high, m)} from {fmt(child[child_lr], m)}" if hurt else "")
            + ".")
    return verdict, text


def finding_lr(part: dict, high_wd: float) -> dict[str, str]:
    """6. The subcloned child prefers a low learning rate (and low weight decay)."""
    t, m = part["training"], metric_of(part)
    swept = t["swept"]
    best_lr = {arm: trained(part, arm).get("0", {}).get("lr") for arm in ("random", "subclone")}
    edge = [arm for arm in ("random", "subclone") if best_lr[arm] is not None and len(swept[arm]) > 1
            and best_lr[arm] in (min(swept[arm]), max(swept[arm]))]
    lr_result, lr_said = lr_verdict(part)
    win, _, per_seed = trained_winner(part, ("subclone", "subclone-wd"))
    wd_verdict = NOISE if win is None else HOLDS if win == "subclone" else FAILS
    verdict = f"learning rate: {lr_result}; weight decay: {wd_verdict}"
    sweep = "; ".join(f"{arm} lr {lr:g}: {fmt(v, m)}" for arm in ("random", "subclone")
                      for lr, v in sorted(sweep_values(part, arm).items()))
    edge_text = (f" The best lr sits at the edge of the sweep for {', '.join(edge)}: a wider sweep could move it."
                 if edge else "")
    wd = trained(part, "subclone").get("0", {}).get("weight_decay")
    child_lr = best_lr["subclone"] or 0.0
    # AdamW's decoupled decay multiplies weights by (1 - lr_t * wd) each step; the cosine averages lr_t to ~lr / 2
    shrink = 1 - (1 - child_lr / 2 * high_wd) ** t["budget"]["steps"]
    text = (f"{lr_said} Best {m} per lr, seed 0: {sweep}.{edge_text} Weight decay at the child's lr, {num(wd)} vs "
            f"{high_wd:g}: {seeds_text(part, per_seed) or 'not trained'}. At this budget and lr, decay {high_wd:g} can "
            f"shrink the weights by only about {shrink:.2%} in all.")
    return {"verdict": verdict, "text": text}


def open_question(part: dict, options: dict[str, str]) -> dict[str, str]:
    """Which option wins at step 0 per shape and after training (for what the paper leaves open).

    ``options`` maps each arm to the name of the option it stands for (e.g. "subclone" -> "magnitude").
    """
    m, arms = metric_of(part), tuple(options)
    lines = []
    step0_winners = []
    for shape in part["step0_shapes"]:
        values = {arm: step0_value(part, shape, arm, m) for arm in arms}
        step0_winners.append(options.get(winner(values, m), "none"))
        lines.append(f"{shape}: " + ", ".join(f"{options[arm]} {fmt(v, m)}" for arm, v in values.items()))
    win, _, per_seed = trained_winner(part, arms)
    named = {s: {options[a]: v for a, v in vals.items()} for s, vals in per_seed.items()}
    trained_text = seeds_text(part, named) or "not trained"
    win = options.get(win) if win else None
    if per_seed and win is None:
        verdict = f"open in the paper; step 0: {', '.join(step0_winners)} (per shape); after training {NOISE}"
    elif len(set(step0_winners + ([win] if win else []))) == 1:
        verdict = f"open in the paper; {step0_winners[0]} wins here"
    else:
        verdict = (f"open in the paper; step 0: {', '.join(step0_winners)} (per shape), after training: "
                   f"{win or 'none'}")
    return {"verdict": verdict, "text": f"step 0: {'; '.join(lines)}. Best after training: {trained_text}."}


def removed_text(part: dict, options: dict[str, str]) -> str:
    """The blocks each policy removed for the trained shape, per calibration seed, where the seeds differ."""
    shape = part["training"]["shape_key"]
    lines = []
    for arm, name in options.items():
        by_seed = {r["seed"]: r["removed_blocks"] for r in part["step0"] if r["arm"] == arm and r["shape"] == shape}
        choices = {tuple(v or ()) for v in by_seed.values()}
        if len(choices) == 1:
            lines.append(f"{name} removes {_blocks(next(iter(by_seed.values())))}")
        else:
            lines.append(f"{name} removes " + " or ".join(f"{_blocks(v)} (calibration seed {k})" for k, v in by_seed.items()))
    return f"Blocks removed at the {shape} shape: " + "; ".join(lines) + "."


def finding_headline(part: dict) -> dict[str, str]:
    """9. The subcloned child reaches random init's best far sooner. Test per seed: a speedup of at least 4x."""
    sp = part["training"]["speedups"].get("subclone", {})
    if not sp:
        return {"verdict": FAILS, "text": "no speedup: the subcloned child or random init did not train."}
    holds = [v["ratio"] is not None and v["ratio"] >= PAPER_SPEEDUP for v in sp.values()]
    verdict = HOLDS if all(holds) else PARTLY if any(holds) else FAILS
    t = part["training"]
    m = metric_of(part)
    rnd = trained(part, "random").get("0", {})
    child = trained(part, "subclone").get("0", {})
    text = (f"head start at a short budget ({t['shape_key']} child): speedup to random init's best {m} "
            f"({fmt(rnd.get('best'), m)} in {t['budget']['steps']} steps): "
            + "; ".join(f"seed {s}: **{v['text']}**" for s, v in sp.items())
            + f". The child starts at {fmt(child.get('start'), m)} (random init {fmt(rnd.get('start'), m)}) and ends at "
            f"{fmt(child.get('final'), m)}.")
    return {"verdict": verdict, "text": text}


def finding_budget(budget: dict) -> dict[str, str]:
    """9 at the longest budget measured (docs/speedup_vs_budget.json, bench/bench_budget.py): the iso-loss
    speedup at random init's final loss, the number the paper's ~4x is about (training to the same loss).
    Test: at least 4x holds; faster than random init but under 4x holds partly."""
    rows = budget["at_drop"].get("subclone") or []
    if not rows:
        return {"verdict": FAILS, "text": "no level to compare at: random init never improved on its first evaluation."}
    early, final = rows[0], rows[-1]
    speedup = final["speedup"]
    verdict = FAILS if speedup is None or speedup <= 1 else HOLDS if speedup >= PAPER_SPEEDUP else PARTLY
    text = render_template("repro_budget", tokens=budget["random_tokens"] / 1e6, size=budget["size"],
                           lrs=_lr_text(budget), final_loss=fmt(final["loss"], "loss"), final=final["text"],
                           early_loss=fmt(early["loss"], "loss"), early=early["text"], seeds=_seed_text(budget),
                           child_end=fmt(budget["arms"]["subclone"]["val_loss"][-1], "loss"), paper=PAPER_SPEEDUP)
    return {"verdict": verdict, "text": text}


def _lr_text(budget: dict) -> str:
    """", each arm at its best lr at this budget: random 1e-3 of 5e-4, 1e-3, 2e-3; ..." where the JSON has a grid
    (rates as sweeps name them: 2.5e-4, not a rounded 3e-04)."""
    picks = lr_picks(budget)
    return f", each arm at its best lr at this budget: {'; '.join(picks)}" if picks else ""


def _seed_text(budget: dict) -> str:
    """" Seed 1 (its own shorter run, at its final loss L): X (seed 0 at L: Y)." or "" without a second seed."""
    rows = [r for r in budget.get("seed_spread", []) if r["fraction"] == 1.0 and r["shape"] == "aggressive"]
    stages = budget.get("stages", {})
    return "".join(f" Seed {r['seed']} ({stages[r['stage']]['tokens'] / 1e3:.0f}k tokens, at its random init's final "
                   f"loss {fmt(r['loss'], 'loss')}): {r['text']} (seed 0 at that loss: {r['text_seed0']})." for r in rows)


# (number, title, the paper's claim, figure, parts) per finding, one a line in bench/templates/repro_findings.md
FINDINGS = [(number, title, claim, figure, tuple(parts.split(","))) for number, title, figure, parts, claim in
            (line.split(" | ", 4) for line in (TEMPLATES / "repro_findings.md").read_text().splitlines() if line)]


def finding_block_policy(part: dict) -> dict[str, str]:
    """7. (open) Which blocks to drop: the lowest relative magnitude, a middle span, or all but the first N."""
    policies = {"subclone": "magnitude", "middle": "middle span", "first-blocks": "first N"}
    found = open_question(part, policies)
    found["text"] += " " + removed_text(part, policies)
    return found


def finding_tied_head(part: dict) -> dict[str, str]:
    """8. (open) With scaling on: the head tied to the embedding (unscaled), or untied and scaled."""
    return open_question(part, {"scaled": "tied unscaled head", "scaled-untied": "untied scaled head"})


def evaluate_findings(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, str]]:
    """(finding number, part) -> {"verdict", "text"} for every finding that applies to a part that ran
    (bench_budget.py's results, part "lm-budget", have their own schema and rule)."""
    rules = {"1": finding_magnitude, "2": finding_removal, "3": finding_consistency, "4": finding_scaling,
             "5": finding_reordering, "6": lambda p: finding_lr(p, results["high_wd"]), "7": finding_block_policy,
             "8": finding_tied_head, "9": finding_headline}
    return {(number, key): (finding_budget if key == "lm-budget" else rules[number])(results[key])
            for number, _, _, _, parts in FINDINGS for key in parts if results.get(key) is not None}


# --- tables ---------------------------------------------------------------------------------------------


def step0_markdown(part: dict) -> str:
    m = metric_of(part)
    arms = list(dict.fromkeys(r["arm"] for r in part["step0"]))
    shapes = list(part["step0_shapes"])
    rows = []
    for arm in arms:
        cells = []
        for shape in shapes:
            values = step0_seeds(part, shape, arm, m)
            cells.append(" / ".join(fmt(v, m) for v in values))
        removed = next((r["removed_blocks"] for r in part["step0"] if r["arm"] == arm and r["shape"] == shapes[0]), [])
        rows.append([label(part, arm), *cells, _blocks(removed)])
    header = ["initialization", *[f"{s}: step-0 {m} (seed {' / '.join(map(str, sorted({r['seed'] for r in part['step0']})))})"
                                  for s in shapes], f"blocks removed ({shapes[0]})"]
    return table(header, rows)


def _blocks(blocks: list[int] | None) -> str:
    return ", ".join(map(str, blocks)) if blocks else "-"


def training_markdown(part: dict) -> str:
    t, m = part["training"], metric_of(part)
    rows = []
    for arm, by_seed in t["runs"].items():
        for seed, run in by_seed.items():
            sp = t["speedups"].get(arm, {}).get(seed, {}).get("text", "baseline" if arm == "random" else "-")
            rows.append([label(part, arm), seed, f"{run['lr']:g}", f"{run['weight_decay']:g}", fmt(run["start"], m),
                         fmt(run["best"], m), fmt(run["final"], m), sp, f"{run['throughput']:.0f} {run['unit']}"])
    return table(["initialization", "seed", "lr", "weight decay", f"step-0 {m}", f"best {m}", f"final {m}",
                  "speedup vs random init", "throughput"], rows)


def sweep_markdown(part: dict) -> str:
    m = metric_of(part)
    rows = [[r["arm"], r["seed"], f"{r['lr']:g}", f"{r['weight_decay']:g}", fmt(r["best"], m), fmt(r["final"], m),
             r["status"]] for r in part["training"]["sweep"]]
    return table(["run", "seed", "lr", "weight decay", f"best {m}", f"final {m}", "status"], rows)


def ablation_markdown(part: dict) -> str:
    a = part["analysis"]
    abl = a["ablation"]
    rel = next(iter(a["rel_magnitude"].values()))
    image = "accuracies" in abl
    rows = [[i, f"{rel[i]:.3f}", f"{a['one_minus_cos'][i]:.3f}", fmt(abl["losses"][i]),
             fmt(abl["accuracies"][i], "accuracy") if image else ""] for i in range(a["layers"])]
    header = ["block", "relative magnitude", "1 - cos", "loss without it", "accuracy without it" if image else ""]
    if not image:
        rows = [r[:-1] for r in rows]
        header = header[:-1]
    return table(header, rows)


# --- the document ---------------------------------------------------------------------------------------

PART_NAMES = {"lm": "language model", "lm-budget": "language model, longer budget", "vit": "ViT"}


def render(results: dict[str, Any], figures: str) -> str:
    """The whole report as Markdown; ``figures`` is the plots' folder relative to the report."""
    found = evaluate_findings(results)
    parts = {k: results[k] for k in ("lm", "vit") if results.get(k)}
    head = render_template("repro_header", **{"load_average_end": float("nan"), **results})
    out = [head, "## Summary", summary_table(found), names(parts)]
    for number, title, claim, fig, part_keys in FINDINGS:
        out.append(f"## {number}. {title}")
        out.append(f"**Paper:** {claim}")
        for key in part_keys:
            if (number, key) in found:
                f = found[(number, key)]
                out.append(f"**{PART_NAMES[key]}**: {f['text']} **Verdict: {f['verdict']}.**")
        out.append(f"![{title}]({figures}/{fig}.png)")
        out.extend(extra_tables(number, parts))
    out.append(settings(results, parts))
    return "\n\n".join(out) + "\n"


def names(parts: dict) -> str:
    """What the short names in the findings stand for."""
    lines = []
    for key, part in parts.items():
        labels = part["training"]["labels"]
        lines.append(f"Names, {PART_NAMES[key]}: " + "; ".join(f"`{n}` = {text}" for n, text in labels.items()) + ".")
    return "\n\n".join(lines)


def summary_table(found: dict) -> str:
    rows = []
    for number, title, _, _, part_keys in FINDINGS:
        for key in part_keys:
            if (number, key) in found:
                rows.append([number, title, PART_NAMES[key], found[(number, key)]["verdict"]])
    return table(["#", "finding", "model", "verdict"], rows)


# finding -> the caption ({name}: the part, {metric}: its metric) and the table shown under it for each part
EXTRA_TABLES = {
    "2": ("Per block, {name}:", ablation_markdown),
    "5": (("Step-0 {metric} of every initialization, {name} (one value per calibration seed; random init: one per "
           "initialization seed):"), step0_markdown),
    "6": ("Learning-rate sweep, {name} (every run, full budget):", sweep_markdown),
    "9": ("Every trained initialization, {name}:", training_markdown),
}


def extra_tables(number: str, parts: dict) -> list[str]:
    """The tables of a finding, each part's under its caption."""
    caption, make = EXTRA_TABLES.get(number, ("", None))
    return [text for key, part in parts.items() if make
            for text in (caption.format(name=PART_NAMES[key], metric=metric_of(part)), make(part))]


def settings(results: dict, parts: dict) -> str:
    lines = ["## Settings, seeds and caveats"]
    for key, part in parts.items():
        t, b = part["training"], part["training"]["budget"]
        lm = key == "lm"
        lines.append(render_template("repro_settings", **{
            **t["shape"], **b, "part": PART_NAMES[key], "parent": part["parent"], "data": part["data"],
            "calib_tokens": part["analysis"]["calib_tokens"], "shape_key": t["shape_key"],
            "unit": f"{b['batch_size']} x {b['seq_len']} tokens" if lm else f"{b['batch_size']} images",
            "val": f"{b['val_tokens']} validation tokens" if lm else f"{b['val_images']} validation images",
            "eval_at": ", ".join(map(str, b["eval_at"])), "child_lr": t["child_lr"], "minutes": part["minutes"],
            "reruns": ", ".join(t["reruns"]) or "none", "close": fmt(t["close"], t["metric"])}))
    lines.append(render_template("repro_caveats", seeds=", ".join(map(str, results["seeds"]))))
    return "\n".join(lines)
