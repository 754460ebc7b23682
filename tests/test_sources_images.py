"""Image data (digits, Fashion-MNIST, class folders), preprocessing, and the ViT pretraining recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from subclone_core.core.errors import SubcloneError
from subclone_core.data import images
from subclone_core.data.images import FASHION_DIR, ImageData
from subclone_core.sources import load_parent, make_data, parents, vit_pretrain
from subclone_core.training.evaluate import evaluate

HAS_FASHION = (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file()


def processor(size=8, mean=(0.5,), std=(0.5,)):
    return transformers.ViTImageProcessorPil(
        size={"height": size, "width": size}, image_mean=list(mean), image_std=list(std)
    )


def test_digits_split_is_fixed_and_disjoint():
    train = ImageData(processor(), "digits", "train")
    validation = ImageData(processor(), "digits", "validation")
    assert (train.num_images, validation.num_images) == (1438, 359)  # 1797 digits, 20% validation
    assert train.num_labels == 10 and train.label_names[3] == "3"
    train_rows = {bytes(x.numpy()) for x in train.images}
    assert not train_rows & {bytes(x.numpy()) for x in validation.images} - {
        bytes(np.zeros((1, 8, 8), np.uint8))
    }
    assert torch.equal(validation.images, ImageData(processor(), "digits", "validation").images)


def test_batches_are_normalized_as_the_processor_says():
    data = ImageData(processor(mean=(0.5,), std=(0.5,)), "digits", "validation", max_images=20)
    batch = next(data.batches(8))
    assert batch["pixel_values"].shape == (8, 1, 8, 8) and batch["pixel_values"].dtype == torch.float32
    expected = (data.images[:8].float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(batch["pixel_values"], expected)
    assert torch.equal(batch["labels"], data.labels[:8])
    assert [len(b["labels"]) for b in data.batches(8)] == [8, 8, 4]


def test_resize_and_channels_follow_the_processor_and_model():
    data = ImageData(processor(16, mean=(0.1, 0.2, 0.3), std=(1, 1, 1)), "digits", "train", max_images=4)
    pixels = next(data.batches(4))["pixel_values"]
    assert pixels.shape == (4, 3, 16, 16)  # grey digits repeated to the processor's three channels
    torch.testing.assert_close(pixels[:, 0] - pixels[:, 2], torch.full((4, 16, 16), 0.2))
    three = ImageData(processor(8), "digits", "train", max_images=4, num_channels=3)  # the model's count wins
    assert next(three.batches(4))["pixel_values"].shape == (4, 3, 8, 8)
    with pytest.raises(SubcloneError, match="image_mean has 3 values but the model has 1 channels"):
        ImageData(processor(8, mean=(0.5, 0.5, 0.5)), "digits", "train", num_channels=1)


@pytest.mark.skipif(
    not HAS_FASHION, reason=f"Debian package dataset-fashion-mnist not installed ({FASHION_DIR})"
)
def test_fashion_mnist_validation_is_the_official_test_set():
    data = ImageData(processor(28), "fashion-mnist", "validation")
    assert data.num_images == 10000 and data.images.shape == (10000, 1, 28, 28)
    assert data.label_names[9] == "Ankle boot"
    assert torch.bincount(data.labels).tolist() == [1000] * 10
    assert ImageData(processor(28), "fashion-mnist", "train", max_images=100).num_images == 100


def test_missing_fashion_mnist_gives_the_apt_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "FASHION_DIR", tmp_path)
    with pytest.raises(SubcloneError, match="apt-get install dataset-fashion-mnist"):
        ImageData(processor(28), "fashion-mnist")


def write_class_folder(root, per_class=6):
    """Two classes of solid-colour RGB images of mixed sizes."""
    for name, colour in {"cats": (200, 30, 30), "dogs": (20, 20, 220)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (10 + i, 12), colour).save(root / name / f"{i}.png")
    (root / "cats" / "readme.txt").write_text("not an image")
    return root


def test_class_folder_images_are_labelled_by_subfolder(tmp_path):
    root = write_class_folder(tmp_path / "pets")
    train = ImageData(processor(8), str(root), "train")
    validation = ImageData(processor(8), str(root), "validation")
    assert train.label_names == ["cats", "dogs"]
    assert train.num_images + validation.num_images == 12 and validation.num_images >= 1
    assert train.images.shape[1:] == (1, 8, 8)  # stored at the processor's size, converted to grey
    cat = train.images[train.labels == 0][0]
    assert abs(int(cat.float().mean()) - round(0.299 * 200 + 0.587 * 30 + 0.114 * 30)) <= 1


def test_image_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(SubcloneError, match="unknown image data 'cifar'.*valid: 'fashion-mnist', 'digits'"):
        ImageData(processor(), "cifar")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(SubcloneError, match="has no images in class subfolders"):
        ImageData(processor(), str(tmp_path / "empty"))
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_text("not a png")
    with pytest.raises(SubcloneError, match="x.png is not a readable image"):
        ImageData(processor(), str(tmp_path / "bad"))
    with pytest.raises(SubcloneError, match="unknown split"):
        ImageData(processor(), "digits", "test")


def test_make_data_refuses_more_classes_than_the_model_predicts(tmp_path, tiny_vit_dir):
    vit = load_parent(str(tiny_vit_dir))
    assert make_data(vit, "digits", "validation", max_images=5).num_images == 5
    root = tmp_path / "many"
    for i in range(11):
        (root / f"c{i:02d}").mkdir(parents=True)
        Image.new("L", (8, 8), i).save(root / f"c{i:02d}" / "0.png")
    with pytest.raises(SubcloneError, match="has 11 classes but .* predicts only 10"):
        make_data(vit, str(root), "train")


TINY = {
    "data": "digits",
    "layers": 1,
    "hidden": 16,
    "heads": 2,
    "ffn": 32,
    "patch": 4,
    "epochs": 1.0,
    "batch_size": 64,
    "lr": 3e-3,
}


def test_pretrain_vit_tiny_run_saves_a_loadable_folder(tmp_path):
    events = []
    folder = vit_pretrain.pretrain_vit(tmp_path / "vit", progress=events.append, **TINY)
    info = json.loads((folder / vit_pretrain.INFO_FILE).read_text())
    assert "self-pretrained" in info["description"] and info["steps"] == 1438 // 64
    assert events[-1]["test_accuracy"] == pytest.approx(info["test_accuracy"], abs=1e-4)
    assert info["test_accuracy"] > 0.3  # well above chance (0.1) after 22 steps
    parent = load_parent(str(folder))
    assert parent.task == "image-classification" and parent.model.config.num_channels == 1
    metrics = evaluate(parent.model, make_data(parent, "digits", "validation").batches(100))
    assert metrics["images"] == 359 and metrics["accuracy"] == pytest.approx(info["test_accuracy"], abs=1e-4)
    assert not list(tmp_path.glob(".vit.tmp-*"))


def test_default_vit_is_built_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBCLONE_CACHE", str(tmp_path))
    monkeypatch.setattr(vit_pretrain, "DEFAULT_RECIPE", vit_pretrain.VitRecipe(**{**TINY, "epochs": 0.1}))
    builds = []
    original = vit_pretrain.pretrain_vit
    monkeypatch.setattr(vit_pretrain, "pretrain_vit", lambda out: builds.append(out) or original(out))
    first = load_parent("default-vit")
    second = load_parent("default-vit")
    assert builds == [tmp_path / "default-vit"] and first.source == second.source == tmp_path / "default-vit"
    assert first.label == parents.DEFAULT_VIT_LABEL
    monkeypatch.setattr(vit_pretrain, "DEFAULT_RECIPE", vit_pretrain.VitRecipe(**{**TINY, "epochs": 0.2}))
    load_parent("default-vit")  # a changed recipe makes the cached ViT stale
    assert len(builds) == 2


def test_unknown_pretraining_setting_is_an_error():
    with pytest.raises(SubcloneError, match="unknown ViT pretraining setting \\['depth'\\]"):
        vit_pretrain.recipe_with(depth=3)
