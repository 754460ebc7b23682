"""Selection: which residual dimensions, heads, FFN neurons and blocks of the parent the child keeps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape

ORDERS = ("importance", "first", "uniform", "keep")
# policy -> (the Importance field that ranks blocks, lowest dropped first; whether the first and last stay):
# "magnitude" the paper's relative magnitude, inner blocks only; "influence" ShortGPT's block influence
# 1 - cos(x, x + f(x)) (also Minitron's depth ranking), over every block, as both rank them
BLOCK_SCORES: dict[str, tuple[str, bool]] = {"magnitude": ("rel_magnitude", True),
                                             "influence": ("one_minus_cos", False)}
BLOCK_POLICIES = ("middle", "magnitude", "first", "influence")


@dataclass
class Selection:
    """Parent indices kept by the child, each list in the child's order.

    Attributes:
        residual: kept residual (hidden) dimensions.
        blocks: kept parent blocks; child block j is parent block blocks[j].
        heads: per child block, parent query heads, grouped by their KV head.
        kv_heads: per child block, parent KV heads; child query head h uses child KV head h // ratio.
        ffn: per child block, parent FFN neurons.
    """

    residual: list[int]
    blocks: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    ffn: list[list[int]]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Selection:
        return cls(**{k: obj[k] for k in ("residual", "blocks", "heads", "kv_heads", "ffn")})

    def removed_blocks(self, parent_layers: int) -> list[int]:
        return [i for i in range(parent_layers) if i not in set(self.blocks)]


def pick(n_keep: int, scores: Tensor | None, order: str) -> list[int]:
    """Choose n_keep of len(scores) indices: by descending score, the first ones, or evenly strided.

    Args:
        n_keep: how many to keep.
        scores: (N,) importance scores; only their length is used for "first" and "uniform".
        order: one of ORDERS ("keep": all of them, in place, for strategies that change depth only).
    """
    n = scores.numel()
    if order == "keep":
        if n_keep != n:
            raise SubcloneError(f"this strategy removes blocks only and keeps every width: keep {n} of {n}, "
                                f"not {n_keep} (leave the width flags out)")
        return list(range(n))
    if order == "importance":
        # stable sort so ties keep index order and the result is deterministic
        return torch.sort(scores, descending=True, stable=True).indices[:n_keep].tolist()
    if order == "first":
        return list(range(n_keep))
    if order == "uniform":
        return torch.linspace(0, n - 1, n_keep).round().long().tolist() if n_keep > 1 else [0]
    raise SubcloneError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")


def pick_heads(scores: Tensor, parent: Shape, child: Shape, order: str) -> tuple[list[int], list[int]]:
    """Choose KV groups and query heads within them so that each kept query head keeps its own K/V head.

    HF maps query head h to KV head h // (heads / kv_heads): the parent's groups are contiguous runs of
    query heads. The child keeps child.kv_heads groups with child.queries_per_kv heads in each; with
    order "importance" a group's worth is the sum of the scores of the heads it would keep.

    Returns:
        (query heads, KV heads) as parent indices in child order.
    """
    ratio, keep_per_group = parent.queries_per_kv, child.queries_per_kv
    groups = scores.view(parent.kv_heads, ratio)  # (K, H / K)
    within = [pick(keep_per_group, groups[g], order) for g in range(parent.kv_heads)]
    worth = torch.stack([groups[g, within[g]].sum() for g in range(parent.kv_heads)])
    kept_groups = pick(child.kv_heads, worth, order)
    heads = [g * ratio + h for g in kept_groups for h in within[g]]
    return heads, kept_groups


def pick_blocks(parent_layers: int, child_layers: int, policy: str | list[int],
                rel_magnitude: Tensor | None = None) -> list[int]:
    """The parent blocks the child keeps, in order.

    Args:
        parent_layers: blocks in the parent.
        child_layers: blocks in the child.
        policy: "middle" (drop a contiguous span centred in the middle, keep the first and last),
            "magnitude" (drop the blocks of lowest relative magnitude, never the first or last),
            "influence" (drop the blocks of lowest 1 - cos, any of them: ShortGPT),
            "first" (keep the first child_layers blocks), or an explicit list of blocks to drop.
        rel_magnitude: (L,) the per-block scores of the policy (BLOCK_SCORES), needed by "magnitude" and
            "influence".
    """
    n_drop = parent_layers - child_layers
    if isinstance(policy, list):
        return _explicit_blocks(parent_layers, child_layers, policy)
    if policy == "first" or n_drop == 0:
        return list(range(child_layers))
    if policy not in BLOCK_POLICIES:
        raise SubcloneError(f"unknown block policy {policy!r}; valid: {', '.join(BLOCK_POLICIES)} or I,J,...")
    keep_ends = BLOCK_SCORES[policy][1] if policy in BLOCK_SCORES else True
    if keep_ends and child_layers < 2:
        raise SubcloneError(f"layers={child_layers} cannot keep both the first and last block with "
                            f"--drop {policy}; use layers>=2 or --drop first")
    if policy == "middle":
        start = (parent_layers - n_drop) // 2
        dropped = set(range(start, start + n_drop))
    else:
        if rel_magnitude is None:
            raise SubcloneError(f"--drop {policy} needs calibration data for block statistics")
        first = 1 if keep_ends else 0
        ranked = rel_magnitude[first:parent_layers - first]
        dropped = {first + i for i in torch.sort(ranked, stable=True).indices[:n_drop].tolist()}
    return [i for i in range(parent_layers) if i not in dropped]


def _explicit_blocks(parent_layers: int, child_layers: int, drop: list[int]) -> list[int]:
    bad = [i for i in drop if not 0 <= i < parent_layers]
    if bad:
        raise SubcloneError(f"--drop blocks {bad} out of range; valid blocks are 0..{parent_layers - 1}")
    if len(set(drop)) != len(drop):
        raise SubcloneError(f"--drop lists a block twice: {drop}")
    if parent_layers - len(drop) != child_layers:
        raise SubcloneError(f"--drop removes {len(drop)} blocks of {parent_layers}, leaving "
                            f"{parent_layers - len(drop)}, but layers={child_layers}; "
                            f"use layers={parent_layers - len(drop)}")
    return [i for i in range(parent_layers) if i not in set(drop)]


def select(parent: Shape, child: Shape, importance, order: str, blocks: list[int], *,
           residual_score: str | None = "written") -> Selection:
    """Build the whole selection for one ordering of neurons and heads.

    Args:
        parent: the parent's shape.
        child: the validated target shape.
        importance: an Importance (needed for order "importance"; may be None otherwise).
        order: one of ORDERS.
        blocks: kept parent blocks, from pick_blocks.
        residual_score: which residual ranking of the importance to use (calibration.RESIDUAL_SCORES).
    """
    if order == "importance" and importance is None:
        raise SubcloneError("ordering by importance needs calibration data")
    src = importance if order == "importance" else _EqualScores(parent)
    heads, kv = zip(*(pick_heads(src.heads[b], parent, child, order) for b in blocks)) if blocks else ((), ())
    return Selection(
        residual=pick(child.hidden, src.residual_ranking(residual_score or "written"), order),
        blocks=list(blocks),
        heads=[list(h) for h in heads],
        kv_heads=[list(k) for k in kv],
        ffn=[pick(child.ffn, src.ffn[b], order) for b in blocks],
    )


@dataclass
class Scores:
    """What one scoring rule ranks by (method_scores): (L, H) head and (L, F) FFN neuron scores, and the (D,)
    residual ranking, already chosen (select reads it through residual_ranking like an Importance's)."""

    heads: Tensor
    ffn: Tensor
    residual: Tensor

    def residual_ranking(self, score: str) -> Tensor:
        return self.residual


ReaderWeight = Callable[[int, str], Tensor]  # (block, "attn_out" or "ffn_down") -> its weight, (out, in)

# rule -> the score of each input channel of an output projection, from the channel statistics of its input
# (calibration.INPUT_STATS and TAYLOR_STATS without the "heads_"/"ffn_" prefix) and its weight W (out, in):
# - wanda-sp (FLAP's prune_wanda_sp): mean over output rows of |W_ij| x ||x_j||, the L2 norm over tokens
# - flap (its WIFV metric): the input's fluctuation (variance over tokens) x the squared column norm of W
# - minitron (NVIDIA ModelOpt): the L2 norm over sequences of each sequence's mean |x_j|; no weights
# - llm-pruner (its "taylor", "param_first"): the channel's |W * dL/dW| over its whole group, measured as is
_CHANNEL_METRICS: dict[str, Callable[[dict[str, Tensor], Tensor | None], Tensor]] = {
    "wanda-sp": lambda s, w: (w.abs() * s["sq"].sqrt()).mean(0),
    "flap": lambda s, w: (s["sq"] - s["mean"].square()) * w.square().sum(0),
    "minitron": lambda s, w: s["seq"],
    "llm-pruner": lambda s, w: s["taylor"],
}
# rule -> the statistics it reads (each recorded only on request: strategies.needs_input_stats, needs_taylor)
SCORE_STATS: dict[str, tuple[str, ...]] = {"paper": (), "wanda-sp": ("sq",), "flap": ("sq", "mean"),
                                           "minitron": ("seq",), "llm-pruner": ("taylor",)}
# rule -> a head's score from its channels' (..., head_dim): as each code does (FLAP squares the attention metric,
# LLM-Pruner sums the head's consecutive channels)
_HEAD_POOLS: dict[str, Callable[[Tensor], Tensor]] = {
    "wanda-sp": lambda c: c.sum(-1),
    "flap": lambda c: c.square().sum(-1),
    "minitron": lambda c: c.norm(dim=-1),
    "llm-pruner": lambda c: c.sum(-1),
}
_WEIGHTED = ("wanda-sp", "flap")
SCORE_RULES = ("paper", *_CHANNEL_METRICS)


def method_scores(rule: str, importance, parent: Shape, residual_score: str,
                  weight: ReaderWeight | None = None) -> Scores:
    """The head, FFN neuron and residual scores of one rule (SCORE_RULES): "paper" (the mean |activation|), or
    a published method's score of the output projections' input channels, from calibration's input statistics
    and the projections' weights. The residual stream is ranked by ``residual_score`` whatever the rule."""
    residual = importance.residual_ranking(residual_score)
    if rule == "paper":
        return Scores(importance.heads, importance.ffn, residual)
    if rule not in _CHANNEL_METRICS:
        raise SubcloneError(f"unknown score rule {rule!r}; valid: {', '.join(SCORE_RULES)}")
    if rule in _WEIGHTED and weight is None:
        raise SubcloneError(f"the {rule} score reads the output projections' weights; give them")

    def channels(prefix: str, role: str) -> Tensor:  # (L, C)
        metric = _CHANNEL_METRICS[rule]
        return torch.stack([metric({how: importance.stat(f"{prefix}_{how}")[b] for how in SCORE_STATS[rule]},
                                   weight(b, role).double() if rule in _WEIGHTED else None)
                            for b in range(parent.layers)])
    heads = _HEAD_POOLS[rule](channels("heads", "attn_out").view(parent.layers, parent.heads, parent.head_dim))
    return Scores(heads, channels("ffn", "ffn_down"), residual)


class _EqualScores:
    """All-zero stand-in scores for orderings that ignore data ("first", "uniform" use only the sizes)."""

    def __init__(self, shape: Shape) -> None:
        self.residual = torch.zeros(shape.hidden)
        self.residual_ranking = lambda score: self.residual
        self.heads = torch.zeros(shape.layers, shape.heads)
        self.ffn = torch.zeros(shape.layers, shape.ffn)
