"""Checks on a model's files before they are trusted: sizes against the weights before anything is built,
every tensor loaded by name, every weight finite.

A config (or a GGUF header) is only a claim about the weights. Its sizes are checked against sane bounds
and against how many values the weight files hold before transformers allocates the model: a header that
says a million blocks would otherwise grow memory until the machine gives out. After loading, a tensor
that the config expects but the files lack (or the reverse, or a shape that differs) is an error, not a
randomly initialized block.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from subclone_core.core.archs import arch_for
from subclone_core.core.errors import SubcloneError

# Far above every published transformer (126 blocks, hidden 16,384, vocabulary 262,144), far below what
# would exhaust a machine: a value outside is a damaged or hostile header, not a model.
BOUNDS: dict[str, int] = {"layers": 4096, "hidden": 1 << 18, "heads": 1 << 14, "kv_heads": 1 << 14,
                          "head_dim": 1 << 14, "ffn": 1 << 22, "vocab": 1 << 24}

# How many parameters one stored element may hold: packed integer tensors (GPTQ, AWQ, bitsandbytes) carry
# up to 8 one-bit values per byte; a float element is one value.
_PACKED_PER_BYTE = 8
_INT_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}
_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8}

NONFINITE_FLAG = "--allow-nonfinite"


# ---- sizes before allocating ---------------------------------------------------------------------------


def min_parameters(dims: dict[str, int]) -> int:
    """A lower bound on the parameters a transformer of these sizes has (a size not given counts as 0).

    Every supported family has at least: token embeddings (vocab x hidden); per block, query and output
    projections (hidden x heads x head_dim each), key and value projections (hidden x kv_heads x head_dim
    each) and two FFN matrices (hidden x ffn each). Norms, biases, gates and an untied head only add.
    """
    hidden, heads = dims.get("hidden", 0), dims.get("heads", 0)
    head_dim = dims.get("head_dim") or (hidden // heads if heads else 0)
    kv_heads = dims.get("kv_heads") or heads
    per_block = 2 * hidden * head_dim * (heads + kv_heads) + 2 * hidden * dims.get("ffn", 0)
    return dims.get("layers", 0) * per_block + dims.get("vocab", 0) * hidden


def check_sizes(dims: dict[str, int], names: dict[str, str], capacity: int, where: str,
                weights: str = "the weight files") -> None:
    """Refuse sizes outside sane bounds, or more parameters than the weight files can hold.

    Args:
        dims: sizes by role ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab").
        names: the key each role has in the file (for the message), e.g. "num_hidden_layers".
        capacity: the most parameters the weight files can hold.
        where: the file the sizes come from, e.g. "model/config.json".
        weights: what holds the weights, for the message, e.g. "model.safetensors".

    Raises:
        SubcloneError: one line naming the value and what would be valid.
    """
    _check_range(dims, names, where, top=False)
    need, fit = min_parameters(dims), _blocks_that_fit(dims, capacity)
    if need > capacity and fit >= 1:  # before the bounds: this message says what the weights would allow
        raise SubcloneError(f"{where}: {_sizes_text(dims, names)} need at least {need:,} parameters, but "
                            f"{weights} hold at most {capacity:,}; valid: {names.get('layers', 'layers')}<={fit} "
                            "with these widths (or weights that match the header)")
    _check_range(dims, names, where, top=True)
    if need > capacity:
        raise SubcloneError(f"{where}: {_sizes_text(dims, names)} need at least {need:,} parameters, but "
                            f"{weights} hold at most {capacity:,}, too few for one block of these widths; "
                            "valid: sizes that match the weights (the header or the files are damaged, or do not "
                            "belong together)")


def _check_range(dims: dict[str, int], names: dict[str, str], where: str, *, top: bool) -> None:
    """Refuse a size that is not a positive integer or (``top``) that exceeds its bound."""
    for role, value in dims.items():
        plain = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if not plain or (top and value > BOUNDS[role]):
            raise SubcloneError(f"{where}: {names[role]}={value!r} is not a plausible size; "
                                f"valid: an integer from 1 to {BOUNDS[role]:,}")


def _sizes_text(dims: dict[str, int], names: dict[str, str]) -> str:
    return ", ".join(f"{names[role]}={value}" for role, value in dims.items())


def _blocks_that_fit(dims: dict[str, int], capacity: int) -> int:
    """The most blocks ``capacity`` parameters can hold at the other sizes (0 when not even one)."""
    per_block = min_parameters({**dims, "vocab": 0, "layers": 1})
    if not per_block:
        return 0
    return max(0, (capacity - min_parameters({**dims, "layers": 0})) // per_block)


def config_dims(config) -> tuple[dict[str, int], dict[str, str]]:
    """(sizes by role, config key by role) of a transformers config, read through its architecture table."""
    arch = arch_for(config.model_type)
    names = {role: key for role, key in arch.config_keys.items()}
    dims = {role: getattr(config, key, None) for role, key in names.items()}
    dims = {role: value for role, value in dims.items() if value is not None}
    if getattr(config, "vocab_size", None) is not None:  # image models have none
        dims["vocab"], names["vocab"] = config.vocab_size, "vocab_size"
    return dims, names


def check_config_fits_weights(folder: Path, config, files: list[Path]) -> None:
    """Refuse a config whose sizes are implausible or need more parameters than ``files`` hold.

    Raises:
        SubcloneError: a size out of bounds, more parameters than the files hold, or an unreadable header.
    """
    dims, names = config_dims(config)
    weights = f"the weight files ({', '.join(p.name for p in files)})"
    check_sizes(dims, names, weights_capacity(files), f"{Path(folder) / 'config.json'}", weights)


def weights_capacity(files: list[Path]) -> int:
    """The most parameters the weight files can hold: counted from safetensors headers, or from file sizes
    for pickles (at most 8 values per byte, the densest packing there is)."""
    total = 0
    for path in files:
        if path.suffix == ".safetensors":
            total += sum(_capacity(meta) for name, meta in safetensors_header(path).items() if name != "__metadata__")
        else:
            total += path.stat().st_size * _PACKED_PER_BYTE
    return total


def _capacity(meta: dict) -> int:
    count = 1
    for n in meta.get("shape", []):
        count *= int(n)
    dtype = meta.get("dtype", "")
    return count * _BYTES[dtype] * _PACKED_PER_BYTE if dtype in _INT_DTYPES else count


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), read without the data.

    Raises:
        SubcloneError: the header is missing, longer than the file, or not JSON.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length:,} bytes in a file of {size:,}")
            header = json.loads(f.read(length))
    except (ValueError, struct.error) as err:
        header = f"{err}"
    if not isinstance(header, dict):
        raise SubcloneError(f"{path} is not a readable safetensors file ({header or 'no header'}); the file may "
                            "be damaged or incomplete: copy or save it again")
    return header


# GGUF metadata keys by role (llama.cpp's names, from the gguf package); "{arch}" is general.architecture
_GGUF_ROLES = {"layers": "{arch}.block_count", "hidden": "{arch}.embedding_length",
               "ffn": "{arch}.feed_forward_length", "heads": "{arch}.attention.head_count",
               "kv_heads": "{arch}.attention.head_count_kv", "head_dim": "{arch}.attention.key_length"}


def check_gguf_header(path: Path) -> None:
    """Refuse a GGUF whose header sizes are implausible or need more parameters than its tensors hold.

    Reads the header and tensor table only (the gguf package maps the file; no tensor data is read).

    Raises:
        SubcloneError: an unreadable header, a size out of bounds, or more parameters than the tensors hold.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        arch = str(reader.fields["general.architecture"].contents())
    except Exception as err:  # noqa: BLE001 - a damaged header fails in many ways (ValueError, KeyError...)
        raise SubcloneError(f"{path} is not a readable GGUF model: {str(err).strip() or type(err).__name__}") from None
    names = {role: key.format(arch=arch) for role, key in _GGUF_ROLES.items()}
    dims = {role: _gguf_int(reader, key) for role, key in names.items()}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        dims["vocab"], names["vocab"] = len(tokens.data), "tokenizer.ggml.tokens (count)"
    dims = {role: value for role, value in dims.items() if value is not None}
    check_sizes(dims, names, sum(int(t.n_elements) for t in reader.tensors), str(path), "its tensors")


def _gguf_int(reader, key: str):
    """A size from the header: its value, the smallest of a per-block list, or None when absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    if isinstance(value, list):  # some architectures give the FFN width per block
        value = min(value, default=None)
    return value


# ---- every tensor by name ------------------------------------------------------------------------------


# ---- finite weights ------------------------------------------------------------------------------------


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            return name
    return None


def file_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from safetensors files, one tensor in memory at a time, in file and name order."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                yield name, f.get_tensor(name)


def nonfinite_in_folder(files: list[Path], model: torch.nn.Module | None = None) -> str | None:
    """The first non-finite tensor of a model: read from its safetensors files, else from the loaded model."""
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    if safetensors:
        return first_nonfinite(file_tensors(safetensors))
    return first_nonfinite(model.state_dict().items()) if model is not None else None


def refuse_nonfinite(what: str, name: str | None) -> None:
    """Refuse non-finite weights in one line naming the first bad tensor and the switch that allows them.

    Raises:
        SubcloneError: ``name`` is not None.
    """
    if name is not None:
        raise SubcloneError(f"{what} has NaN or infinite weights (first in {name}); a model built or exported "
                            f"from them is broken; pass {NONFINITE_FLAG} (allow_nonfinite=True) to go on anyway")
