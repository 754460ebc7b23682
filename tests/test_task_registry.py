"""The task registry: a task is chosen by the checkpoint's architecture class, and a new task is one registered
TaskSpec plus its family table's head entry (here a Llama sequence classifier, made and evaluated end to end)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    ViTConfig,
)

from subclone_core.core.archs import arch_for, arch_for_task, arch_of_model
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.slicing import TensorSlicer
from subclone_core.core.strategies import plan_shape, subclone_model
from subclone_core.data.text import row_batches
from subclone_core.io.gguf_export import export_gguf
from subclone_core.io.saving import read_manifest
from subclone_core.pipeline.calibration import calibrate, calibrate_sequential
from subclone_core.pipeline.refitting import refit_items
from subclone_core.tasks import TASKS, TaskSpec, register_task, task_of_config, task_of_model
from tests import tiny_models as tm
from tests.cli_runner import run_cli_json

TASK = "sequence-classification"
LABELS = 3
ATOL = 1e-5  # RMSNorm computes in float32 even for float64 models (test_core_exactness)


class LabelledSequences:
    """Deterministic random token sequences, each labelled by its first token (a rule a model can learn)."""

    def __init__(self, split: str, seq_len: int, rows: int) -> None:
        gen = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.tokens = torch.randint(3, tm.VOCAB, (rows, seq_len), generator=gen)  # (N, T), no pad ids
        self.labels = self.tokens[:, 0] % LABELS  # (N,)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epochs: int | None = 1,
                drop_last: bool = False):
        for rows in row_batches(len(self.tokens), batch_size, shuffle, seed, epochs, drop_last):
            ids = self.tokens[rows]  # (B, T)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[rows]}


def labelled_sequences(parent, data_id: str, split: str, *, seq_len: int, max_tokens: int | None,
                       max_images: int | None) -> LabelledSequences:
    if data_id != "synthetic":
        raise SubcloneError(f"unknown data {data_id!r}; valid: 'synthetic'")
    return LabelledSequences(split, seq_len, rows=max(1, (max_tokens or 32 * seq_len) // seq_len))


def classification_batch_sums(model, batch: dict, **extra) -> tuple[float, int, int]:
    """Summed cross-entropy, sequences, and correct predictions of one batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **extra).logits
    logits, labels = logits.float(), batch["labels"]  # (B, num_labels), (B,)
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return float(loss), int(labels.numel()), int((logits.argmax(-1) == labels).sum())


SEQUENCE_CLASSIFICATION = TaskSpec(
    name=TASK, model_class="AutoModelForSequenceClassification", preprocessor_class="AutoTokenizer",
    preprocessor_name="tokenizer", preprocessor_files=("tokenizer.json", "tokenizer_config.json"),
    unit_name="sequences", metric="accuracy", headline="accuracy", default_data="synthetic",
    data_choices={"synthetic": "Synthetic labelled sequences"}, local_data_label="none", sequences=True,
    batch_sums=classification_batch_sums, make_data=labelled_sequences,
    config_facts=lambda config: {"num_labels": config.num_labels},
)


@pytest.fixture
def registered():
    register_task(SEQUENCE_CLASSIFICATION)
    yield SEQUENCE_CLASSIFICATION
    TASKS.pop(TASK, None)


def classifier(seed: int = 0) -> LlamaForSequenceClassification:
    """A tiny random Llama sequence classifier (GQA 8 heads / 2 KV heads, hidden 64), float64, eval mode."""
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(LlamaConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=48,
        vocab_size=tm.VOCAB, head_dim=8, num_labels=LABELS, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # non-trivial norms, so a wrongly sliced one shows
                p.add_(0.1 * torch.randn_like(p))
    return model.to(torch.float64).eval()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parents") / "llama-classifier"
    classifier().save_pretrained(path)
    tm.tokenizer().save_pretrained(path)
    return path


# --- detection -----------------------------------------------------------------------------------------------

def test_the_architecture_class_picks_the_task(registered):
    assert task_of_config(LlamaConfig(architectures=["LlamaForCausalLM"])).name == TASKS["causal-lm"].name
    assert task_of_config(LlamaConfig(architectures=["LlamaForSequenceClassification"])) is registered
    assert task_of_config(ViTConfig(architectures=["ViTForImageClassification"])).name == "image-classification"


@pytest.mark.parametrize("architectures", [None, [], ["LlamaModel"]])
def test_no_task_class_falls_back_to_the_family_default(architectures):
    assert task_of_config(LlamaConfig(architectures=architectures)).name == arch_for("llama").task
    assert task_of_config(ViTConfig(architectures=architectures)).name == arch_for("vit").task


@pytest.mark.parametrize("name", ["LlamaForSequenceClassification", "LlamaForTokenClassification"])
def test_a_task_class_no_registered_task_handles_is_refused_not_loaded_as_the_default(name):
    # (unregistered here) as a causal LM its score head would be dropped for a random lm_head
    with pytest.raises(SubcloneError, match=f"{name}.*ForCausalLM .causal-lm.*register_task"):
        task_of_config(LlamaConfig(architectures=[name]))


def test_a_loaded_model_is_known_by_its_class_through_wrappers(registered):
    model = classifier()  # its config names no class
    assert model.config.architectures is None and task_of_model(model) is registered
    assert task_of_model(_Wrapper(model)) is registered
    assert task_of_model(torch.compile(_Wrapper(model))) is registered  # compiled (._orig_mod) around DDP-like
    assert task_of_model(_Wrapper(tm.llama())).name == "causal-lm"
    fsdp_class = type(f"FSDP{type(model).__name__}", (type(model),), {})  # how FSDP2 renames a sharded model
    sharded = classifier()
    sharded.__class__ = fsdp_class
    assert task_of_model(sharded) is registered


class _Wrapper(torch.nn.Module):
    """A DDP-like wrapper: the model under `.module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_register_task_refuses_a_duplicate(registered):
    with pytest.raises(SubcloneError, match="already registered"):
        register_task(SEQUENCE_CLASSIFICATION)
    with pytest.raises(SubcloneError, match="already loads AutoModelForSequenceClassification"):
        register_task(replace(SEQUENCE_CLASSIFICATION, name="another"))
    assert "another" not in TASKS


# --- the family table's head of each task ------------------------------------------------------------------

def test_the_table_of_a_classifier_has_its_head():
    arch = arch_for_task("llama", TASK)
    assert "score.weight" in arch.global_params and "lm_head.weight" not in arch.global_params
    assert arch.tied_head is None and not arch.gguf and arch.task == TASK
    assert arch_of_model(classifier()) == arch and arch_of_model(tm.llama()) is arch_for("llama")
    with pytest.raises(SubcloneError, match="no head for task"):
        arch_for_task("vit", TASK)


def test_a_narrower_classifier_slices_the_score_on_its_input():
    parent = classifier()
    child = subclone_model(parent, plan_shape(parent, hidden=32), strategy="first-k", scale=False)
    kept = child.selection.residual
    assert child.model.score.weight.shape == (LABELS, 32)
    torch.testing.assert_close(child.model.score.weight, parent.score.weight[:, kept], atol=0, rtol=0)


def test_calibration_and_the_refit_read_the_classifiers_head_in_memory_and_block_by_block(registered,
                                                                                         classifier_dir):
    data = LabelledSequences("train", 16, 8)
    model = classifier()
    in_memory = calibrate(model, data.batches(4))
    sequential = calibrate_sequential(classifier_dir, data.batches(4), dtype=torch.float64)
    torch.testing.assert_close(sequential.residual_read, in_memory.residual_read)
    sel = subclone_model(model, plan_shape(model, hidden=32), importance=in_memory, refit=False).selection
    arch = replace(arch_of_model(model), refit_inputs="parent")  # the parent's inputs: the same sums either way
    slicer = TensorSlicer(arch, Shape.of(model.config), sel, scale=False)
    grams = [{name: gram for name, _, gram in refit_items(source, data.batches(4), slicer,
                                                          config=model.config, model_class=type(model),
                                                          dtype=torch.float64) if gram is not None}
             for source in (model.state_dict(), classifier_dir)]
    assert "score.weight" in grams[0] and "lm_head.weight" not in grams[0]
    torch.testing.assert_close(grams[1]["score.weight"], grams[0]["score.weight"])


# --- make and eval end to end through the command line -----------------------------------------------------

def test_make_and_eval_a_narrower_classifier(registered, classifier_dir, tmp_path):
    out = tmp_path / "child"
    summary = run_cli_json(["make", "--parent", classifier_dir, "--out", out, "--layers", 3, "--hidden", 32,
                       "--calib-tokens", 512, "--json"])
    assert summary["shape"]["hidden"] == 32 and summary["shape"]["layers"] == 3
    child = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(child) is LlamaForSequenceClassification
    assert child.config.architectures == ["LlamaForSequenceClassification"]
    assert child.config.hidden_size == 32 and child.config.num_labels == LABELS
    assert child.score.weight.shape == (LABELS, 32)
    calibration = read_manifest(out).calibration
    assert (calibration.data, calibration.tokens) == ("synthetic", 512)
    result = run_cli_json(["eval", "--model", out, "--seq-len", 16, "--tokens", 256, "--json"])
    assert result["task"] == TASK and result["data"] == "synthetic" and result["sequences"] == 16
    assert 0.0 <= result["accuracy"] <= 1.0 and "perplexity" not in result
    with pytest.raises(SubcloneError, match="sequence-classification head has no GGUF layout"):
        export_gguf(out, tmp_path / "child.gguf")


def test_a_full_size_child_reproduces_the_parents_logits(registered, classifier_dir, tmp_path):
    out = tmp_path / "child"
    run_cli_json(["make", "--parent", classifier_dir, "--out", out, "--calib-tokens", 512, "--json"])
    parent = AutoModelForSequenceClassification.from_pretrained(classifier_dir, dtype=torch.float64).eval()
    child = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float64).eval()
    assert Shape.of(child.config) == Shape.of(parent.config)
    residual = read_manifest(out).selection["residual"]
    assert residual != sorted(residual)  # a real permutation of the residual stream, not the identity
    batch = tm.inputs(parent, batch=4, seq=9)
    torch.testing.assert_close(tm.output(child, batch), tm.output(parent, batch), atol=ATOL, rtol=0)
    parent_eval = run_cli_json(["eval", "--model", classifier_dir, "--seq-len", 16, "--tokens", 256, "--json"])
    child_eval = run_cli_json(["eval", "--model", out, "--seq-len", 16, "--tokens", 256, "--json"])
    assert child_eval["accuracy"] == parent_eval["accuracy"]
    assert child_eval["loss"] == pytest.approx(parent_eval["loss"], abs=1e-6)
