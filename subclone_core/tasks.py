"""The task registry: everything that differs between a causal language model and an image classifier.

One `TaskSpec` per task holds the auto model class, the preprocessor, the data factory, the loss and its
evaluation, the metric and its unit, the default data and the wording shown to users. A checkpoint's task
is the one whose model class its architecture class names (`LlamaForSequenceClassification` ends like
`AutoModelForSequenceClassification`); a config that names none takes its family's default task from the
architecture table (`subclone_core.core.archs`), which also lays out each task's head. Every other module
asks this registry and never branches on a task name. Adding a task (a sequence classifier, a masked LM) is
one more TaskSpec (`register_task`) plus the family table's head entry for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from subclone_core.core.archs import arch_for
from subclone_core.core.errors import SubcloneError
from subclone_core.data.images import IMAGE_IDS, VALID_IMAGE_IDS, ImageData
from subclone_core.data.text import VALID_TEXT_IDS, TokenData

IGNORE_INDEX = -100  # Hugging Face's label value for positions without a target (padding)

BatchSums = tuple[float, int, int]  # (summed loss, scored units, correct predictions)


def perplexity(loss: float) -> float:
    """exp(loss), or infinity where exp would overflow (past ~709)."""
    return math.exp(loss) if loss < 700 else math.inf


# logits taken into one cross-entropy call at a time (16 MB of float32): its log-probabilities stay in the cache,
# where one call over a batch of 1,024 positions of a 262k-word vocabulary (1 GB) ran 4x slower
CROSS_ENTROPY_ELEMENTS = 1 << 22


def text_batch_sums(model: torch.nn.Module, batch: dict, **extra: Any) -> BatchSums:
    """Summed next-token cross-entropy and the number of scored tokens of one batch.

    The logits at position t predict the label at t + 1; labels equal to IGNORE_INDEX are skipped.
    """
    labels = batch.get("labels", batch["input_ids"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **extra).logits.float()
    # position t predicts token t + 1; the last position has no label. Padding the targets instead of cutting the
    # logits keeps them one contiguous view (a 262k-word vocabulary's cut logits were a 400 MB copy per batch)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    rows = max(1, CROSS_ENTROPY_ELEMENTS // flat.shape[-1])
    loss = sum(F.cross_entropy(flat[i:i + rows], flat_targets[i:i + rows], ignore_index=IGNORE_INDEX,
                               reduction="sum") for i in range(0, flat.shape[0], rows))
    return float(loss), int((targets != IGNORE_INDEX).sum()), 0


def image_batch_sums(model: torch.nn.Module, batch: dict, **extra: Any) -> BatchSums:
    """Summed cross-entropy, images, and correct top-1 predictions of one batch."""
    logits = model(pixel_values=batch["pixel_values"]).logits.float()  # (B, num_labels)
    labels = batch["labels"]
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return float(loss), int(labels.numel()), int((logits.argmax(-1) == labels).sum())


def _text_facts(config) -> dict[str, Any]:
    return {"vocab": config.vocab_size, "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False))}


def _image_facts(config) -> dict[str, Any]:
    return {"num_labels": config.num_labels, "image_size": getattr(config, "image_size", None),
            "patch_size": getattr(config, "patch_size", None), "channels": getattr(config, "num_channels", None)}


def _text_data(parent, data_id: str, split: str, *, seq_len: int, max_tokens: int | None,
               max_images: int | None) -> Any:
    """Token data packed into sequences of ``seq_len``, ``max_tokens`` tokens at most."""
    if data_id in IMAGE_IDS:
        raise SubcloneError(f"data {data_id!r} is image data, but {parent.id!r} is a text model; "
                            f"valid: {VALID_TEXT_IDS}")
    return TokenData(parent.preprocessor, data_id, split, seq_len=seq_len, max_tokens=max_tokens)


def _image_data(parent, data_id: str, split: str, *, seq_len: int, max_tokens: int | None,
                max_images: int | None) -> Any:
    """Images prepared by the parent's image processor, ``max_images`` at most."""
    if data_id == "default" or Path(data_id).expanduser().is_file():
        raise SubcloneError(f"data {data_id!r} is text data, but {parent.id!r} is an image model; "
                            f"valid: {VALID_IMAGE_IDS}")
    config = parent.model.config
    data = ImageData(parent.preprocessor, data_id, split, max_images, num_channels=getattr(config, "num_channels", None))
    if data.num_labels > config.num_labels:
        raise SubcloneError(f"data {data_id!r} has {data.num_labels} classes but {parent.id!r} predicts only "
                            f"{config.num_labels}")
    return data


@dataclass(frozen=True)
class TaskSpec:
    """What generic code needs to know about one task.

    Attributes:
        name: the task's id, as named by the architecture tables.
        model_class: the transformers auto class that loads such a model.
        preprocessor_class: the transformers auto class of its preprocessor.
        preprocessor_name: what users call the preprocessor ("tokenizer").
        preprocessor_files: files whose presence says a folder has the preprocessor.
        unit_name: what one example's units are counted in ("tokens", "images").
        metric: the validation value compared across candidates ("loss" or "accuracy").
        headline: the value shown beside the loss ("perplexity" or "accuracy").
        default_data: the data id used when none is given.
        data_choices: built-in data ids and their labels.
        local_data_label: how a user's own data of this task is described.
        sequences: inputs are token sequences (a sequence length applies; models generate text).
        batch_sums: (model, batch, **forward kwargs) -> (summed loss, units scored, correct).
        make_data: (parent, data_id, split, seq_len=, max_tokens=, max_images=) -> a data object with
            `batches(...)` (each task reads the budget in its own unit).
        config_facts: config -> the task's facts shown by `info` (vocabulary, classes...).
    """

    name: str
    model_class: str
    preprocessor_class: str
    preprocessor_name: str
    preprocessor_files: tuple[str, ...]
    unit_name: str
    metric: str
    headline: str
    default_data: str
    data_choices: dict[str, str]
    local_data_label: str
    sequences: bool
    batch_sums: Callable[..., BatchSums] = field(repr=False)
    make_data: Callable[..., Any] = field(repr=False)
    config_facts: Callable[[Any], dict[str, Any]] = field(repr=False)

    @property
    def class_suffix(self) -> str:
        """How the names of this task's model classes end: AutoModelForCausalLM -> "ForCausalLM"."""
        return self.model_class.removeprefix("AutoModel")

    @property
    def unit(self) -> str:
        """Throughput unit, e.g. "tokens/s"."""
        return f"{self.unit_name}/s"

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def headline_text(self, result: dict[str, Any], *, precise: bool = False) -> str:
        """The headline value of an evaluation result as shown to users (more digits when precise)."""
        value = result[self.headline]
        if self.headline == "accuracy":
            return f"{value:.2%}" if precise else f"{value:.1%}"
        return f"{value:.3f}" if precise else f"{value:,.1f}"

    def scored_text(self, result: dict[str, Any]) -> str:
        """How much an evaluation scored, e.g. "2,048 tokens"."""
        return f"{result[self.unit_name]:,} {self.unit_name}"

    def auto_model(self) -> type:
        return getattr(transformers, self.model_class)

    def auto_preprocessor(self) -> type:
        return getattr(transformers, self.preprocessor_class)

    def count_units(self, batch: dict[str, Any]) -> int:
        """Real tokens (padding excluded) of a text batch, or images of an image batch."""
        if not self.sequences:
            return int(batch["labels"].shape[0])
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    def correct(self, result: dict[str, Any]) -> float:
        """The correct predictions behind an evaluation result (0 for a task scored by its loss alone)."""
        return result["accuracy"] * result[self.unit_name] if self.metric == "accuracy" else 0.0

    def ablation_summary(self, base: dict[str, Any], removed: list[dict[str, Any]]) -> dict[str, Any]:
        """Block ablation's record from the intact model's evaluation and each removed block's: {"base",
        "losses"}, and where the task is compared by accuracy also {"base_accuracy", "accuracies"}."""
        out: dict[str, Any] = {"base": base["loss"], "losses": [r["loss"] for r in removed]}
        if self.metric == "accuracy":
            out.update(base_accuracy=base["accuracy"], accuracies=[r["accuracy"] for r in removed])
        return out

    def score(self, model: torch.nn.Module, batches: Iterable[dict], **extra: Any) -> dict[str, float]:
        """The evaluation dict of a model over batches already on its device: each batch scored by batch_sums,
        the sums over all batches turned into ``result``.

        Raises:
            SubcloneError: the batches scored nothing.
        """
        sums = [0.0, 0, 0]  # loss sum, units scored, correct
        for batch in batches:
            sums = [a + b for a, b in zip(sums, self.batch_sums(model, batch, **extra))]
        if sums[1] == 0:
            raise SubcloneError("nothing to evaluate: the data gave no batches (or no labelled tokens)")
        return self.result(*sums)

    def result(self, loss_sum: float, count: int, correct: int) -> dict[str, float]:
        """The evaluation dict: {"loss", "perplexity", "tokens"} or {"loss", "accuracy", "images"}."""
        loss = loss_sum / count
        if self.metric == "accuracy":
            return {"loss": loss, "accuracy": correct / count, self.unit_name: count}
        return {"loss": loss, "perplexity": perplexity(loss), self.unit_name: count}


CAUSAL_LM = TaskSpec(
    name="causal-lm", model_class="AutoModelForCausalLM", preprocessor_class="AutoTokenizer",
    preprocessor_name="tokenizer",
    preprocessor_files=("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"),
    unit_name="tokens", metric="loss", headline="perplexity", default_data="default",
    data_choices={"default": "Embedded Wikipedia text"}, local_data_label="Local text file or folder",
    sequences=True, batch_sums=text_batch_sums, make_data=_text_data, config_facts=_text_facts,
)
IMAGE_CLASSIFICATION = TaskSpec(
    name="image-classification", model_class="AutoModelForImageClassification",
    preprocessor_class="AutoImageProcessor", preprocessor_name="image processor",
    preprocessor_files=("preprocessor_config.json",), unit_name="images", metric="accuracy",
    headline="accuracy", default_data="fashion-mnist",
    data_choices={"fashion-mnist": "Fashion-MNIST", "digits": "scikit-learn digits (8x8)"},
    local_data_label="Local folder of class subfolders", sequences=False, batch_sums=image_batch_sums,
    make_data=_image_data, config_facts=_image_facts,
)
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (CAUSAL_LM, IMAGE_CLASSIFICATION)}


def register_task(spec: TaskSpec) -> None:
    """Add a task to the registry: models whose class ends like its model class are then loaded, fed, scored
    and shown as it says (their family's table needs a head entry for it, ArchSpec.task_heads).

    Raises:
        SubcloneError: a task of that name, or of that model class, is already registered.
    """
    if spec.name in TASKS:
        raise SubcloneError(f"task {spec.name!r} is already registered; registered: {', '.join(TASKS)}")
    same_class = [t.name for t in TASKS.values() if t.model_class == spec.model_class]
    if same_class:
        raise SubcloneError(f"task {same_class[0]!r} already loads {spec.model_class}; "
                            f"one task per model class (task {spec.name!r})")
    TASKS[spec.name] = spec


def task_spec(name: str) -> TaskSpec:
    """The spec of a task by name, or an error listing the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise SubcloneError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def task_of_class(class_name: str) -> TaskSpec | None:
    """The registered task whose model classes end like ``class_name`` (LlamaForCausalLM: causal LM), or None."""
    matches = [spec for spec in TASKS.values() if class_name.endswith(spec.class_suffix)]
    return max(matches, key=lambda spec: len(spec.class_suffix), default=None)


def task_of_config(config) -> TaskSpec:
    """The task of a model config: the one its architecture class (``architectures[0]``) names, else (none named,
    or a bare backbone such as LlamaModel) its family's default task from the architecture table.

    Raises:
        SubcloneError: the class names a task head no registered task loads (LlamaForTokenClassification):
            loading it as the family's default task would replace that head with a random one.
    """
    default = arch_for(config.model_type).task  # an unsupported family is refused first, by name
    names = getattr(config, "architectures", None) or []
    task = task_of_class(names[0]) if names else None
    if task is None and names and "For" in names[0]:
        known = ", ".join(f"{spec.class_suffix} ({spec.name})" for spec in TASKS.values())
        raise SubcloneError(f"architecture {names[0]!r} is a task no registered task handles; known: {known} "
                            "(register one with subclone_core.tasks.register_task)")
    return task or task_spec(default)


def task_of_model(model: torch.nn.Module) -> TaskSpec:
    """The task of a loaded model: the one its class names, else its config's (DDP, FSDP and compiled wrappers
    are looked through; FSDP2 names a sharded model's class FSDP<class>)."""
    inner = unwrapped(model)
    return task_of_class(type(inner).__name__.removeprefix("FSDP")) or task_of_config(inner.config)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / FSDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    for attribute in ("_orig_mod", "module"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, torch.nn.Module):
            return unwrapped(inner)
    return model
