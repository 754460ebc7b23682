"""Options shared by several subcommands, so each flag means the same everywhere."""

from __future__ import annotations

import argparse
import json
import math
import sys

from subclone_core.core.calibration import RESIDUAL_SCORES
from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import json_safe
from subclone_core.core.selection import BLOCK_POLICIES
from subclone_core.core.strategies import STRATEGIES
from subclone_core.io.placement import DTYPES, Placement, parse_size

SHAPE_FLAGS = {"layers": "blocks", "hidden": "hidden (residual) size", "heads": "attention heads",
               "kv_heads": "key/value heads", "ffn": "FFN hidden size"}


def add_parent_args(parser: argparse.ArgumentParser, *, required: bool = True, device: bool = True) -> None:
    """--parent, the safety switches, and where the parent lives: --device, --dtype, --max-memory.

    Args:
        parser: the subcommand's parser.
        required: whether --parent must be given.
        device: add --device here (a command whose training flags already have one passes False; that one
            then places the parent too).
    """
    parser.add_argument("--parent", required=required,
                        help="'default', 'gemma3-270m', 'default-vit', a local model folder, a .gguf file or a Hub id")
    add_placement_args(parser, device=device)
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading pickled .bin weights (they can run code: trusted files only)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run model code shipped with a Hub model (off by default)")


def add_placement_args(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """--device, --dtype and --max-memory: how a parent is placed (checked by placement.Placement.validate)."""
    if device:
        parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                            help="auto: spread the parent over every visible GPU (accelerate's device_map), "
                                 "else the CPU (default auto)")
    parser.add_argument("--dtype", default="auto", metavar="auto|" + "|".join(list(DTYPES)[1:]),
                        help="the parent's dtype; auto keeps the checkpoint's own (float32 for a GGUF); a child "
                             "keeps the parent's (default auto)")
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="the most memory the parent may hold, e.g. 12GiB or cuda:0=20GiB,cpu=30GiB; what "
                             "does not fit is offloaded to disk (slow, but a parent larger than memory works)")


def placement_kwargs(args: argparse.Namespace) -> dict:
    """load_parent's device, dtype and max_memory from the flags, validated before any loading."""
    kwargs = {"device": getattr(args, "device", None) or "auto", "dtype": args.dtype, "max_memory": args.max_memory}
    Placement(**kwargs).validate()
    return kwargs


def add_data_args(parser: argparse.ArgumentParser, *, tokens_flag: str = "--calib-tokens",
                  tokens_default: int = 4096, sequential: bool = False) -> None:
    parser.add_argument("--data", default=None,
                        help="'default' (Wikipedia text), a .txt/.md/.jsonl file or folder; for images "
                             "'fashion-mnist' (the default), 'digits' or a folder of class folders")
    parser.add_argument(tokens_flag, type=int, default=tokens_default, dest="tokens",
                        help=f"token positions to measure (default {tokens_default})")
    if sequential:
        parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                            help="calibrate one block at a time from the parent's safetensors files, each weight "
                                 "read once (for parents larger than memory); default: only when --max-memory "
                                 "did not hold the parent (part of it offloaded to disk)")
        parser.add_argument("--activation-memory", type=activation_size, default=None, metavar="SIZE",
                            help="in a sequential pass, the most memory the stored hidden states may take, e.g. "
                                 "4GiB; the rest go to disk under the cache (default: half of the free RAM)")


def activation_size(text: str) -> int:
    """--activation-memory in bytes: one size (the stored hidden states live in RAM, so there is no per-device
    form, unlike --max-memory's)."""
    try:
        return parse_size(text, "--activation-memory")
    except SubcloneError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size; use one size like 4GiB or 500MB") from None


def sequential_args(args: argparse.Namespace) -> dict:
    """measure_importance's sequential and activation_memory (bytes, parsed by activation_size) from the flags."""
    return {"sequential": args.sequential, "activation_memory": args.activation_memory}


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """--layers, --hidden, --heads, --kv-heads, --ffn: positive integers, refused at parse time (before torch
    builds anything of size zero)."""
    for role, what in SHAPE_FLAGS.items():
        parser.add_argument(f"--{role.replace('_', '-')}", type=positive_size, dest=role,
                            help=f"child {what} (default: the parent's)")


def positive_size(text: str) -> int:
    """A child size: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (omit the flag to keep the parent's)")
    return value


def add_child_args(parser: argparse.ArgumentParser, *, strategy: bool = True) -> None:
    """Flags that say how a child is built; `strategy=False` for commands that take several strategies."""
    if strategy:
        parser.add_argument("--strategy", default="subclone", choices=list(STRATEGIES),
                            help="how to build the child (default: subclone)")
    parser.add_argument("--drop", type=parse_drop, default=None,
                        help="blocks to remove: 'middle', 'magnitude', 'influence' (lowest 1 - cos, "
                             "ShortGPT's), 'first' or a list I,J,...")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--scale", dest="scale", action="store_true", default=None,
                       help="scale sliced weights by sqrt(parent fan-in / child fan-in)")
    scale.add_argument("--no-scale", dest="scale", action="store_false", help="do not scale weights")
    parser.add_argument("--untie-head", action="store_true",
                        help="give a tied parent's child its own scaled LM head")
    parser.add_argument("--residual-score", choices=list(RESIDUAL_SCORES), default=None,
                        help="rank the residual stream by what reads it (after the pre-norms) or by what is "
                             "written to it (the paper's); default: the family's, by measurement")
    refit = parser.add_mutually_exclusive_group()
    refit.add_argument("--refit", dest="refit", action="store_true", default=None,
                       help="refit weights whose inputs shrank by least squares on the calibration data "
                            "(the family's default, at every parent size: block by block inside the memory budget)")
    refit.add_argument("--no-refit", dest="refit", action="store_false", help="slice weights only")
    add_refit_dtype(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed for random choices (default 0)")


def add_refit_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refit-dtype", choices=list(DTYPES), default=None,
                        help="the dtype the refit runs the blocks in; auto (the default): bfloat16 on a CPU with "
                             "bfloat16 matrix instructions (AVX512-BF16, AMX), float32 on other CPUs, the "
                             "parent's on a GPU")


def shape_sizes(args: argparse.Namespace) -> dict[str, int | None]:
    return {role: getattr(args, role) for role in SHAPE_FLAGS}


def child_sizes(args: argparse.Namespace, parent_layers: int) -> dict[str, int | None]:
    """Shape flags, with --layers following an explicit --drop list when not given."""
    sizes = shape_sizes(args)
    if isinstance(args.drop, list) and sizes["layers"] is None:
        sizes["layers"] = parent_layers - len(args.drop)
    return sizes


def parse_drop(value: str) -> str | list[int]:
    """A block policy (selection.BLOCK_POLICIES), or a comma-separated list of block indices."""
    if value in BLOCK_POLICIES:
        return value
    try:
        blocks = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        blocks = None
    if not blocks:  # not a list of numbers, or one that names no block at all (e.g. ",")
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a block policy; use {', '.join(BLOCK_POLICIES)} or indices like 3,4,5")
    return blocks


def print_json(obj: dict) -> None:
    """One strict JSON object on stdout: a non-finite number becomes null (NaN is not JSON)."""
    json.dump(json_safe(obj), sys.stdout, allow_nan=False)
    sys.stdout.write("\n")


def require_positive(name: str, value: int | None) -> None:
    """Refuse a count that must be positive, naming the flag."""
    if value is not None and value <= 0:
        raise SubcloneError(f"{name}={value} must be a positive integer")


def require_finite(name: str, value: float | None, *, minimum: float | None = None,
                   maximum: float | None = None) -> None:
    """Refuse a number that is NaN, infinite or out of range, naming the flag and the valid range."""
    if value is None:
        return
    low = "" if minimum is None else f" >= {minimum:g}"
    high = "" if maximum is None else f" <= {maximum:g}"
    if not math.isfinite(value) or (minimum is not None and value < minimum) or \
            (maximum is not None and value > maximum):
        joint = " and" if low and high else ""
        raise SubcloneError(f"{name}={value!r} must be a finite number{low}{joint}{high}")


def check_shape_flags(args: argparse.Namespace) -> None:
    """Refuse a shape flag that is zero or negative, naming that flag (not a size derived from it)."""
    for role in SHAPE_FLAGS:
        value = getattr(args, role, None)
        if value is not None and value <= 0:
            flag = f"--{role.replace('_', '-')}"
            raise SubcloneError(f"{flag}: {role}={value} must be a positive integer (omit it to keep the parent's)")


def check_calib_tokens(parent, tokens: int, flag: str = "--calib-tokens") -> None:
    """Refuse a text calibration budget smaller than one calibration sequence, naming the flag."""
    from subclone_core.workflow.children import CALIB_SEQ_LEN  # late: keeps this module light for --help

    if parent.task_spec.sequences and tokens < CALIB_SEQ_LEN:
        raise SubcloneError(f"{flag}={tokens} is less than one calibration sequence; "
                            f"use at least {CALIB_SEQ_LEN} (default 4096)")
