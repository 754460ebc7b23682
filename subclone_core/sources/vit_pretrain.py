"""Pretrain the `default-vit` parent: a ViT image classifier trained from scratch on Fashion-MNIST.

No pretrained ViT is reachable offline, so the image path's parent is one we train ourselves, on CPU, in
a few minutes. It is labelled "self-pretrained" wherever it is shown.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import transformers

from subclone_core.core.errors import SubcloneError
from subclone_core.core.rng import seeded
from subclone_core.data.images import FASHION_LABELS, ImageData, load_images
from subclone_core.io.atomic import building
from subclone_core.io.devices import resolve_device
from subclone_core.sources.cache import cache_dir, write_marker
from subclone_core.training import Candidate, RunResult, TrainConfig, train_candidates
from subclone_core.training.events import Event, StepEvent

logger = logging.getLogger(__name__)

RECIPE_VERSION = 2  # bump when the training code changes what a recipe produces (2: the shared engine)
INFO_FILE = "pretrain.json"
PROGRESS_EVERY = 20  # steps between progress events


@dataclass(frozen=True)
class VitRecipe:
    """Model shape and training schedule of the pretrained ViT.

    The default (8 blocks x 256, 8 heads of 32, FFN 1024, 7x7 patches on 28x28 grey images) is big enough
    to be worth subcloning and trains to over 85% Fashion-MNIST test accuracy in minutes on 2 CPU cores.
    4x4 patches would mean 49 tokens per image instead of 16 and three times the training time.
    """

    data: str = "fashion-mnist"
    layers: int = 8
    hidden: int = 256
    heads: int = 8
    ffn: int = 1024
    patch: int = 7
    epochs: float = 2.0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps
    seed: int = 0
    max_train_images: int | None = None  # caps for quick test runs
    max_test_images: int | None = None


DEFAULT_RECIPE = VitRecipe()


def source_of(recipe: VitRecipe) -> dict:
    """The cache-marker source of a ViT built with `recipe`: a cached folder is reused only if it matches."""
    return {"kind": "vit-pretrain", "version": RECIPE_VERSION, "recipe": asdict(recipe)}


def default_source() -> dict:
    """What the cached default-vit must have been built from; anything else is rebuilt."""
    return source_of(DEFAULT_RECIPE)


def recipe_with(**overrides) -> VitRecipe:
    """The default recipe with some fields replaced (None keeps the default); unknown names are an error."""
    names = {f.name for f in fields(VitRecipe)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise SubcloneError(f"unknown ViT pretraining setting {unknown}; valid: {', '.join(sorted(names))}")
    return replace(DEFAULT_RECIPE, **{k: v for k, v in overrides.items() if v is not None})


def pretrain_vit(out_dir: Path | str | None = None, *, recipe: VitRecipe | None = None,
                 progress: Callable[[dict], None] | None = None, device: str | None = None,
                 cancel: threading.Event | None = None, **overrides) -> Path:
    """Train a ViT on Fashion-MNIST and save it as a Hugging Face folder (safetensors + image processor).

    It trains on the same engine as every child (subclone_core.training: AdamW with decay on matrices,
    linear warmup, cosine to zero, clipping at 1, bf16 autocast on a GPU), and is scored by the same
    evaluation. The folder is written to a temp sibling and moved into place when complete, with
    `pretrain.json` (recipe, test accuracy, steps, seconds) and the cache completion marker.

    Args:
        out_dir: where to save; default `cache_dir()/"default-vit"`.
        recipe: the recipe; default DEFAULT_RECIPE with `overrides` applied (e.g. epochs=0.1, layers=2).
        progress: called with {"step", "steps", "loss", "lr", "seconds"} every few steps and with
            {"step", "steps", "test_accuracy", "seconds"} at the end.
        device: "auto" (default: CUDA if available, else CPU), "cpu" or "cuda".
        cancel: set it (from another thread) to stop after the current step; nothing is saved.

    Returns:
        The saved folder.
    """
    recipe = recipe or recipe_with(**overrides)
    check_recipe(recipe)
    target = Path(out_dir) if out_dir is not None else cache_dir() / "default-vit"
    processor = _processor(recipe)
    train = ImageData(processor, recipe.data, "train", recipe.max_train_images)
    test = ImageData(processor, recipe.data, "validation", recipe.max_test_images)
    model = _build(recipe, image_size=train.images.shape[-1])
    config = _train_config(recipe, len(train), len(test), device)
    start = time.perf_counter()
    result = train_candidates([Candidate("vit", model, lr=recipe.lr, weight_decay=recipe.weight_decay)], train,
                              test, config, callbacks=[_progress_events(progress, config.steps, start)],
                              cancel=cancel)["vit"]
    if result.status != "done":
        raise SubcloneError(f"ViT pretraining {result.status}: {result.message}")
    info = _info(recipe, result, len(test), time.perf_counter() - start, config.device)
    if progress:
        progress({"step": config.steps, "steps": config.steps, "test_accuracy": info["test_accuracy"],
                  "seconds": info["seconds"]})
    logger.info("pretrained ViT: test accuracy %.4f after %d steps in %.0f s", info["test_accuracy"],
                config.steps, info["seconds"])
    with building(target, keep_theirs=True) as tmp:
        _save(result.model.cpu(), processor, tmp, info)
        write_marker(tmp, source_of(recipe), info)
    return target


def check_recipe(recipe: VitRecipe) -> None:
    """Refuse settings that cannot train, naming the bad value."""
    positive = {
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "layers": recipe.layers,
        "hidden": recipe.hidden,
        "heads": recipe.heads,
        "ffn": recipe.ffn,
        "patch": recipe.patch,
    }
    for name, value in positive.items():
        if not value > 0:
            raise SubcloneError(f"{name}={value} must be positive")
    if recipe.hidden % recipe.heads:
        raise SubcloneError(f"hidden={recipe.hidden} must be a multiple of heads={recipe.heads}")


def _build(recipe: VitRecipe, image_size: int) -> transformers.ViTForImageClassification:
    if image_size % recipe.patch:
        raise SubcloneError(f"patch={recipe.patch} does not divide the image size {image_size}")
    names = FASHION_LABELS if recipe.data == "fashion-mnist" else [str(i) for i in range(10)]
    config = transformers.ViTConfig(
        image_size=image_size,
        patch_size=recipe.patch,
        num_channels=1,
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        intermediate_size=recipe.ffn,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    with seeded(recipe.seed):
        return transformers.ViTForImageClassification(config)


def _processor(recipe: VitRecipe) -> transformers.ViTImageProcessorPil:
    """An image processor that normalizes by the training images' own mean and std (one grey channel)."""
    images, _, _ = load_images(recipe.data, "train", 1, recipe.max_train_images)
    pixels = torch.from_numpy(images).float() / 255  # (N, 1, H, W)
    size = images.shape[-1]
    return transformers.ViTImageProcessorPil(size={"height": size, "width": size}, do_resize=True,
                                             image_mean=[pixels.mean().item()], image_std=[pixels.std().item()])


def _train_config(recipe: VitRecipe, train_images: int, test_images: int, device: str | None) -> TrainConfig:
    """Whole epochs of full batches; validation on the whole test set at step 0 and at the end only."""
    per_epoch = max(1, train_images // recipe.batch_size)
    steps = max(1, round(recipe.epochs * per_epoch))
    config = TrainConfig(steps=steps, batch_size=recipe.batch_size, warmup=recipe.warmup, eval_every=steps,
                         eval_batches=math.ceil(test_images / recipe.batch_size), min_lr_ratio=0.0,
                         max_grad_norm=1.0, seed=recipe.seed, log_every=PROGRESS_EVERY,
                         device=resolve_device(device or "auto").type)
    config.validate()
    return config


def _progress_events(progress: Callable[[dict], None] | None, steps: int, start: float) -> Callable[[Event], None]:
    """The engine's step events as this module's progress dicts."""
    def forward(event: Event) -> None:
        if progress is not None and isinstance(event, StepEvent):
            progress({"step": event.step, "steps": steps, "loss": event.loss, "lr": event.lr,
                      "seconds": time.perf_counter() - start})
    return forward


def _info(recipe: VitRecipe, result: RunResult, test_images: int, seconds: float, device: str) -> dict:
    """What pretrain.json records: the recipe and how the run went."""
    final = result.evals[-1]
    return {
        "description": f"ViT self-pretrained on {recipe.data} by subclone (not a published checkpoint)",
        "test_accuracy": round(final.accuracy, 4),
        "test_images": test_images,
        "steps": result.steps_done,
        "seconds": round(seconds, 1),
        "device": device,
        "recipe": asdict(recipe),
    }


def _save(model, processor, folder: Path, info: dict) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1))
