"""Shared fixtures: tiny random models saved as Hugging Face folders, and the real default parent (slow)."""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode

EOS = "<|endoftext|>"


REAL_PARENT_FIXTURES = ("default_parent", "gemma_parent")  # each marks its tests with a marker of its name


def pytest_collection_modifyitems(items):
    """Mark every test that uses a real embedded parent, so `-m "not default_parent"` (or `gemma_parent`)
    skips them all."""
    for item in items:
        for name in REAL_PARENT_FIXTURES:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, name))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine idle OpenMP threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def counting_text_file(tmp_path_factory):
    """A learnable corpus over tiny_models' word tokenizer: each paragraph counts up from its own start."""
    from tests.tiny_models import VOCAB

    span = VOCAB - 3
    paragraphs = [" ".join(f"w{3 + (start + i) % span}" for i in range(120)) for start in range(0, 4 * span, 3)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


@pytest.fixture(scope="session")
def default_parent():
    """The embedded SmolLM2-135M parent, loaded once per session (converted on first use, ~20 s)."""
    from subclone_core.sources import load_parent

    return load_parent("default")


@pytest.fixture(scope="session")
def gemma_parent():
    """The embedded Gemma 3 270M parent, loaded once per session (joined from its four packages and
    converted to a ~1 GB float32 folder in the user cache on first use: 1-2 min; then a few seconds)."""
    from subclone_core.sources import load_parent

    return load_parent("gemma3-270m")


def make_tiny_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A byte-level tokenizer without merges: id 0 is EOS, ids 1..256 are the 256 bytes."""
    spelling = bytes_to_unicode()  # byte -> the printable character byte-level BPE writes it as
    vocab = {EOS: 0, **{spelling[byte]: byte + 1 for byte in range(256)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-block Llama (GQA 4 heads / 2 KV heads, hidden 32) with the byte tokenizer, saved as safetensors."""
    config = transformers.LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def save_tiny_vit(folder, layers: int = 2):
    """Save a ViT for 8x8 grey images (patch 4, hidden 16, 10 labels) with its image processor; returns folder."""
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=10,
    )
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessorPil(
        size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5]
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A 2-block tiny ViT folder (see save_tiny_vit)."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """The tiny Llama of tests/tiny_models.py (word-level tokenizer over w3..w60) saved as a parent folder:
    the parent of the command-line tests. Read-only: a test that damages a folder copies it first."""
    from tests import tiny_models as tm

    path = tmp_path_factory.mktemp("parents") / "llama"
    tm.save_parent_folder("llama", path)
    return path
