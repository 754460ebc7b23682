"""Analyses of models (ranking consistency, block removal, generation), the shape search and parameter
counts, on tiny models."""

from __future__ import annotations

import copy

import pytest
import scipy.stats
import torch

from subclone_core.analysis import probes as analysis
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import SIZE_ROLES, nearest_valid_shape, suggested_shape
from subclone_core.core.strategies import parameter_count, plan_shape, subclone_model
from subclone_core.sources import load_parent
from subclone_core.training.evaluate import evaluate
from tests import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parent(tiny_llama_dir):
    return load_parent(str(tiny_llama_dir))


def test_rank_consistency_measures():
    shared = torch.tensor([5.0, 4, 3, 2, 1])
    same = shared.repeat(3, 1)
    assert torch.allclose(analysis.rank_correlation(same), torch.ones(3, 3, dtype=torch.float64))
    reversed_rows = torch.stack([shared, shared.flip(0)])
    assert analysis.rank_correlation(reversed_rows)[0, 1] == pytest.approx(-1.0)
    assert analysis.topk_overlap(reversed_rows, shared, 2).tolist() == [1.0, 0.0]
    assert analysis.off_diagonal_mean(analysis.rank_correlation(reversed_rows)) == pytest.approx(-1.0)


def test_rank_correlation_gives_tied_scores_their_average_rank_as_scipy_does():
    scores = torch.tensor([[1.0, 2, 2, 3, 5, 5, 5, 0], [4.0, 1, 1, 1, 9, 2, 2, 7], [3.0, 3, 3, 3, 3, 3, 3, 3]])
    matrix = analysis.rank_correlation(scores)
    for i, j in ((0, 1), (1, 0)):
        expected = scipy.stats.spearmanr(scores[i].numpy(), scores[j].numpy()).statistic
        assert matrix[i, j].item() == pytest.approx(expected, abs=1e-12)
    # no shared order beyond the ties: 0 (ties broken by position would rank both 0, 1, 2, 3 and say 0.8)
    halves = torch.tensor([[1.0, 1, 2, 2], [1.0, 2, 1, 2]])
    assert analysis.rank_correlation(halves)[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert matrix[2, :2].tolist() == [0.0, 0.0] and matrix.diagonal().tolist() == [1.0, 1.0, 1.0]  # constant row


def test_block_ablation_leaves_the_model_as_it_was(parent):
    model = parent.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1, 200, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = batch["input_ids"]
    seen = []
    result = analysis.block_ablation(model, [batch], progress=lambda done, total: seen.append((done, total)))
    assert len(result["losses"]) == 2 and seen[-1] == (3, 3)
    assert all(loss != pytest.approx(result["base"]) for loss in result["losses"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(block._forward_hooks for block in model.model.layers)


def test_block_ablation_reports_accuracy_for_image_models():
    model = tm.make("vit", dtype=torch.float32)
    batch = {**tm.inputs(model, batch=6), "labels": torch.arange(6) % 5}
    result = analysis.block_ablation(model, [batch])
    assert result["base_accuracy"] == evaluate(model, [batch])["accuracy"]
    skipped = copy.deepcopy(model)
    skipped.vit.layers[1] = _Identity()
    assert result["accuracies"][1] == evaluate(skipped, [batch])["accuracy"]
    assert result["losses"][1] == pytest.approx(evaluate(skipped, [batch])["loss"], rel=1e-6)
    assert result["losses"][1] != pytest.approx(result["base"], rel=1e-6)


class _Identity(torch.nn.Module):
    """A ViT layer that returns its input: the block removed outright."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_parameter_count_and_nearest_valid_shape(parent):
    target = plan_shape(parent.model, layers=1, hidden=16, heads=2, kv_heads=1, ffn=8)
    child = subclone_model(parent.model, target, strategy="random")
    assert parameter_count(parent.model, target) == sum(p.numel() for p in child.model.parameters())
    wanted = {"layers": 1, "hidden": 16, "heads": 3, "kv_heads": 1, "ffn": 8}
    nearest = nearest_valid_shape(parent.model, wanted)
    plan_shape(parent.model, **{r: getattr(nearest, r) for r in SIZE_ROLES})  # valid
    assert nearest.layers == 1 and nearest.ffn == 8 and nearest.hidden % nearest.heads == 0
    assert suggested_shape(parent.model).layers == 2


def _greedy_ids(model, ids: torch.Tensor, steps: int, eos: int) -> torch.Tensor:
    """The greedy continuation by hand: append the argmax token `steps` times, stopping at EOS."""
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=ids).logits[0, -1].argmax()  # logits: (1, T, V)
            if int(token) == eos:
                break
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return ids


def test_generate_text_is_the_greedy_continuation_of_the_prompt(parent):
    model, tokenizer = parent.model, parent.preprocessor
    prompt_ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    expected = _greedy_ids(model, prompt_ids, 5, tokenizer.eos_token_id)
    assert expected.shape[1] > prompt_ids.shape[1], "the tiny model stops at once: pick another prompt"
    seen = []
    text = analysis.generate_text(model, tokenizer, "the cat", max_new_tokens=5,
                                  progress=lambda done, total: seen.append((done, total)))
    assert text == tokenizer.decode(expected[0, prompt_ids.shape[1]:])  # the new text only, not the prompt
    assert seen[-1] == (expected.shape[1] - prompt_ids.shape[1], 5)


def test_generate_text_refuses_an_empty_prompt_and_one_that_fills_the_context(parent):
    with pytest.raises(SubcloneError, match="empty"):
        analysis.generate_text(parent.model, parent.preprocessor, "", max_new_tokens=5)
    context = parent.model.config.max_position_embeddings  # one byte is one token in the tiny tokenizer
    with pytest.raises(SubcloneError, match=f"as many as the model's context \\({context}\\)"):
        analysis.generate_text(parent.model, parent.preprocessor, "a" * context, max_new_tokens=5)
