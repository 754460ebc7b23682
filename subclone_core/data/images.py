"""Image data: `fashion-mnist` (Debian's dataset-fashion-mnist), `digits` (scikit-learn's 8x8 digits), or a
folder of class subfolders, preprocessed as the parent's image processor says.

Images are kept as uint8 at their stored size and turned into normalized float tensors one batch at a
time, so even a 224-pixel processor never needs a float copy of the whole set in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from subclone_core.core.errors import SubcloneError
from subclone_core.data.text import SPLITS, row_batches

logger = logging.getLogger(__name__)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_IDS = ("fashion-mnist", "digits")
VALID_IMAGE_IDS = "'fashion-mnist', 'digits', or a folder of class subfolders of images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGITS_VALIDATION = 0.2
FOLDER_VALIDATION = 0.1


class ImageData:
    """Labelled images of one split, preprocessed per batch for a given image processor.

    Attributes:
        data_id: the data id as given.
        split: "train" or "validation" (Fashion-MNIST's validation split is its official test set).
        images: uint8 (N, C, H, W) at the stored size.
        labels: LongTensor (N,).
        label_names: class names, index = label.
    """

    def __init__(
        self,
        processor,
        data_id: str,
        split: str = "train",
        max_images: int | None = None,
        *,
        num_channels: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise SubcloneError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
            raise SubcloneError(f"max_images={max_images!r} must be a positive integer (or None for all)")
        self.data_id, self.split = data_id, split
        self._transform = _Transform(processor, num_channels)
        images, labels, self.label_names = load_images(
            data_id, split, self._transform.channels, max_images, self._transform.size
        )
        self.images = torch.from_numpy(images)  # (N, C, H, W) uint8
        self.labels = torch.from_numpy(labels).long()  # (N,)
        if len(self.labels) == 0:
            raise SubcloneError(f"image data {data_id!r} has no images in its {split} split")

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return self.num_images

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epochs: int | None = 1,
        drop_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield {"pixel_values": float (B, C, H, W), "labels": (B,)}; arguments as TokenData.batches."""
        for rows in row_batches(self.num_images, batch_size, shuffle, seed, epochs, drop_last):
            yield {"pixel_values": self._transform(self.images[rows]), "labels": self.labels[rows]}


class _Transform:
    """Resize, rescale and normalize uint8 (B, C, H, W) batches as an HF image processor would."""

    def __init__(self, processor, num_channels: int | None) -> None:
        mean = getattr(processor, "image_mean", None) or [0.5]
        std = getattr(processor, "image_std", None) or [0.5]
        self.channels = num_channels or len(mean)
        self.size = _processor_size(processor)
        self.do_resize = bool(getattr(processor, "do_resize", True))
        self.rescale = (
            float(getattr(processor, "rescale_factor", 1 / 255))
            if getattr(processor, "do_rescale", True)
            else 1.0
        )
        self.normalize = bool(getattr(processor, "do_normalize", True))
        # A processor's one mean/std value serves every channel; three values need three channels.
        self.mean = torch.tensor(_per_channel(mean, self.channels, "image_mean")).view(1, -1, 1, 1)
        self.std = torch.tensor(_per_channel(std, self.channels, "image_std")).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * self.rescale  # (B, C, H, W)
        if self.do_resize and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std if self.normalize else x


def _processor_size(processor) -> tuple[int, int]:
    size = getattr(processor, "size", None)
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    if get("shortest_edge"):
        return int(get("shortest_edge")), int(get("shortest_edge"))
    raise SubcloneError(
        f"image processor size {size!r} is not supported; expected height/width or shortest_edge"
    )


def _per_channel(values, channels: int, name: str) -> list[float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise SubcloneError(
            f"the image processor's {name} has {len(values)} values but the model has {channels} channels"
        )
    return values


# --- loaders: uint8 (N, C, H, W), int labels (N,), label names --------------------------------------


def load_images(
    data_id: str,
    split: str,
    channels: int,
    max_images: int | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images of one split as uint8 (N, channels, H, W), labels (N,), and the class names.

    Folder images of mixed sizes are stored at `size` (default: the first image's size).
    """
    if data_id == "fashion-mnist":
        (images, labels), names = _fashion_mnist(split), list(FASHION_LABELS)
    elif data_id == "digits":
        (images, labels), names = _digits(split), [str(d) for d in range(10)]
    else:
        folder = Path(data_id).expanduser()
        if not folder.is_dir():
            raise SubcloneError(f"unknown image data {data_id!r}: not a folder; valid: {VALID_IMAGE_IDS}")
        images, labels, names = _folder_images(folder, split, channels, max_images, size)
    images, labels = images[:max_images], labels[:max_images]
    return _to_channels(images, channels), labels.astype(np.int64), names


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W) or (N, C, H, W) grey or colour images to (N, channels, H, W)."""
    if images.ndim == 3:
        images = images[:, None]  # (N, 1, H, W)
    if images.shape[1] == channels:
        return np.ascontiguousarray(images)
    if images.shape[1] == 1:
        return np.ascontiguousarray(np.repeat(images, channels, axis=1))  # grey to colour
    if channels == 1:  # colour to grey, ITU-R 601 luma as PIL's "L" mode
        luma = np.tensordot(np.array([0.299, 0.587, 0.114]), images[:, :3].astype(np.float32), axes=(0, 1))
        return np.clip(luma.round(), 0, 255).astype(np.uint8)[:, None]
    raise SubcloneError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")


def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"  # the official test set is our validation split
    images_file, labels_file = (
        FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz",
        FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz",
    )
    if not (images_file.is_file() and labels_file.is_file()):
        raise SubcloneError(
            f"Fashion-MNIST is not installed (no {images_file}); install the Debian package: "
            "`apt-get install dataset-fashion-mnist` (or `make setup` as root)"
        )
    images = _read_idx(images_file, offset=16).reshape(-1, 28, 28)  # (N, 28, 28)
    labels = _read_idx(labels_file, offset=8)
    return images, labels


def _read_idx(path: Path, offset: int) -> np.ndarray:
    """An IDX file's uint8 payload (the magic number and dimensions take the first `offset` bytes)."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset).copy()  # writable, as torch wants


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # late: scikit-learn is slow to import

    bunch = load_digits()
    images = (
        np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    )  # (1797, 8, 8), 0..16 -> 0..255
    order = np.random.default_rng(0).permutation(len(images))  # fixed, so the split never changes
    n_val = round(len(images) * DIGITS_VALIDATION)
    rows = np.sort(order[:n_val] if split == "validation" else order[n_val:])
    return images[rows], bunch.target[rows]


def _folder_images(folder: Path, split: str, channels: int, max_images: int | None, size):
    """A folder of class subfolders: class names are the sorted subfolder names."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((folder / name).rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise SubcloneError(
            f"image folder {folder} has no images in class subfolders "
            f"(expected {folder}/<class>/<image> with "
            f"{', '.join(IMAGE_SUFFIXES)})"
        )
    keys = [str(path.relative_to(folder)) for path, _ in files]
    chosen = _folder_validation(keys)
    files = [f for i, f in enumerate(files) if (i in chosen) == (split == "validation")][:max_images]
    arrays = [_read_image(path, channels) for path, _ in files]
    size = size or (arrays[0].shape[-2:] if arrays else (1, 1))
    images = (
        np.stack([_resize_to(a, size) for a in arrays]) if arrays else np.zeros((0, channels, 1, 1), np.uint8)
    )
    return images, np.array([label for _, label in files], dtype=np.int64), classes


def _folder_validation(keys: list[str]) -> set[int]:
    """Validation images of a folder, by a hash of their relative path (stable as files are added)."""
    from subclone_core.data.text import validation_indices

    fractions = [
        int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") / 2**64 for k in keys
    ]
    return validation_indices(fractions, FOLDER_VALIDATION)


def _read_image(path: Path, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.array(image.convert("L" if channels == 1 else "RGB"))  # a writable copy
    except (UnidentifiedImageError, OSError) as err:
        raise SubcloneError(f"{path} is not a readable image: {err}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W)


def _resize_to(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bring one (C, H, W) uint8 image to the common stored size."""
    if tuple(array.shape[-2:]) == tuple(size):
        return array
    x = F.interpolate(
        torch.from_numpy(array)[None].float(), size=tuple(size), mode="bilinear", antialias=True
    )
    return x[0].round().clamp(0, 255).to(torch.uint8).numpy()
