"""Shared fixtures: tiny random models saved as Hugging Face folders, and the real default parent (slow)."""

from __future__ import annotations

import types

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode

EOS = "<|endoftext|>"


REAL_PARENT_FIXTURES = ("default_parent", "gemma_parent")  # each marks its tests with a marker of its name
TIERS = ("integration", "slow", "browser")  # a test with none of these is `unit`
TIERS_BY_COST = ("browser", "slow", "integration")
# A test whose own code, a helper or a fixture it uses names one of these runs another process or the whole
# app: `subprocess` (the CLI, torchrun, a fresh interpreter) and Streamlit's `AppTest`.
INTEGRATION_NAMES = frozenset({"subprocess", "AppTest"})


def pytest_collection_modifyitems(items):
    """Give every test its tiers from what it uses, so `pytest -m unit` is the fast loop: a real embedded
    parent (fixture or marker) -> slow, a subprocess or AppTest anywhere in its calls -> integration, none
    of the tiers -> unit. Tiers written on a test add to these (`slow` on a long in-process test);
    `@pytest.mark.unit` keeps a test that starts a trivial process in the unit tier."""
    for item in items:
        for name in REAL_PARENT_FIXTURES:
            if name in _fixtures_used(item):
                item.add_marker(getattr(pytest.mark, name))
        if item.get_closest_marker("unit"):
            continue
        for tier in _found_tiers(item) - {mark.name for mark in item.iter_markers()}:
            item.add_marker(getattr(pytest.mark, tier))
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.unit)
    items[:] = longest_files_first(items)


def longest_files_first(items: list) -> list:
    """The test files in order of their costliest tier (browser, slow, integration, unit), each file's tests kept
    together and in order: `make test` hands whole files to its workers (pytest-xdist --dist loadfile), and the
    long files started first keep both workers busy to the end instead of leaving one alone with a long file."""
    cost = {}
    for item in items:
        rank = next((i for i, tier in enumerate(TIERS_BY_COST) if item.get_closest_marker(tier)), len(TIERS_BY_COST))
        cost[item.path] = min(cost.get(item.path, rank), rank)
    return sorted(items, key=lambda item: cost[item.path])  # stable: files and their tests keep their order


def _fixtures_used(item) -> set[str]:
    """Fixture names a test requests, and those a parameter names for `request.getfixturevalue`."""
    callspec = getattr(item, "callspec", None)
    named = {value for value in (callspec.params.values() if callspec else ()) if isinstance(value, str)}
    return set(getattr(item, "fixturenames", ())) | named


def _found_tiers(item) -> set[str]:
    """The tiers a test's markers, fixtures and calls show: `slow` for a real parent, `integration`."""
    tiers = {"slow"} if any(item.get_closest_marker(name) for name in REAL_PARENT_FIXTURES) else set()
    fixtures = getattr(item, "_fixtureinfo", None)
    funcs = [getattr(item, "function", None)]
    funcs += [defs[-1].func for defs in (fixtures.name2fixturedefs.values() if fixtures else ()) if defs]
    seen: set = set()
    if any(_reaches_integration(func, seen) for func in funcs if func is not None):
        tiers.add("integration")
    return tiers


def _code_names(code) -> set[str]:
    """Global and attribute names a code object uses, its nested functions and comprehensions included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


def _is_test_code(obj) -> bool:
    module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
    return module.split(".")[-1].startswith(("test_", "tiny_models", "dist_train", "conftest"))


def _reaches_integration(func, seen: set) -> bool:
    """Whether func, or a helper of the test suite it calls (followed through modules like `tm.helper`),
    names subprocess or AppTest. Library and bench code is not followed (it would drag most tests along
    through imports); a test whose process starts there carries `@pytest.mark.integration` itself."""
    func = getattr(func, "__wrapped__", func)
    code = getattr(func, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = _code_names(code)
    if names & INTEGRATION_NAMES:
        return True
    scope = getattr(func, "__globals__", {})
    modules = [value for value in scope.values() if isinstance(value, types.ModuleType) and _is_test_code(value)]
    callees = [scope.get(name) for name in names] + [getattr(m, name, None) for m in modules for name in names]
    return any(_reaches_integration(c, seen) for c in callees if callable(c) and _is_test_code(c))


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
