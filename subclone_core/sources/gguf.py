"""GGUF parents: the embedded ones (table in sources.embedded) and any other GGUF causal LM, converted once
into a cache folder."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import transformers

from subclone_core.core.building import check_loading_info
from subclone_core.core.errors import SubcloneError
from subclone_core.io.atomic import building, fault_point, remove_stale_in
from subclone_core.io.gguf_export import hidden_gguf_bar
from subclone_core.sources.cache import cache_dir, cache_is_valid, write_marker
from subclone_core.sources.checks import check_gguf_header
from subclone_core.sources.embedded import (
    EMBEDDED,
    EmbeddedParent,
    joined_gguf,
    locate_pieces,
    verified_cache,
)
from subclone_core.sources.folders import first_line
from subclone_core.tasks import task_of_config

logger = logging.getLogger(__name__)


def embedded_folder(entry: EmbeddedParent) -> Path:
    """An embedded parent as a safetensors folder, converted on first use from its packaged GGUF.

    Its packages must be installed (a missing one is an error with the pip command, even with a
    conversion in the cache); the GGUF is joined and hash-checked only when a conversion is needed.
    """
    pieces = locate_pieces(entry)
    target = cache_dir() / "parents" / entry.id
    # identified by packages and size, not path: every virtual environment shares one conversion
    source = {"kind": "gguf", "package": entry.install, "file": entry.file, "size": entry.size}
    if verified_cache(target, source):
        return target
    with joined_gguf(entry, pieces, target) as gguf:
        return gguf_folder(gguf, target, source=source)


def default_folder() -> Path:
    """The default parent (embedded SmolLM2-135M-Instruct) as a safetensors folder."""
    return embedded_folder(EMBEDDED["default"])


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
    if target.parent.is_dir():  # what killed conversions left: their temporaries, a stale folder moved aside
        remove_stale_in(target.parent)
    if cache_is_valid(target, source):
        return target
    check_gguf_header(gguf)  # before transformers builds a model of the header's sizes
    start = time.perf_counter()
    with building(target, keep_theirs=True, step="gguf-cache") as tmp:
        _convert_gguf(gguf, tmp, target)
        fault_point("gguf-cache.after-convert")
        write_marker(tmp, source, {"seconds": round(time.perf_counter() - start, 1)})
    return target


def _convert_gguf(gguf: Path, out: Path, target: Path) -> None:
    """Dequantize a GGUF causal LM (and its tokenizer) into a Hugging Face folder (``out``, renamed to ``target``
    once complete); the conversion is announced only once its header was read (a bad file gets its error alone)."""
    kwargs = {"gguf_file": gguf.name}
    try:
        config = transformers.AutoConfig.from_pretrained(gguf.parent, **kwargs)
    except Exception as err:  # noqa: BLE001 - the GGUF reader raises many types for a bad file
        raise SubcloneError(f"{gguf} is not a readable GGUF model: {first_line(err)}") from None
    task = task_of_config(config)
    if not task.sequences:
        raise SubcloneError(f"{gguf}: GGUF parents must be causal LMs, got model_type={config.model_type!r}")
    logger.warning("converting %s to float32 safetensors in %s (20 s to 2 min, once)", gguf.name, target)
    with hidden_gguf_bar():
        model, info = task.auto_model().from_pretrained(gguf.parent, dtype=torch.float32, output_loading_info=True,
                                                        ignore_mismatched_sizes=True, **kwargs)
    check_loading_info(info, gguf)  # a tensor the header promises but the file lacks is an error, not random
    tokenizer = task.auto_preprocessor().from_pretrained(gguf.parent, **kwargs)
    # transformers 5.x refuses to save a model it believes is quantized; the weights are float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else reloads (and children) inherit a GGUF quant config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
