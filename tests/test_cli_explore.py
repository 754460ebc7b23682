"""`subclone explore` on a tiny local parent: the JSON contract, the text table, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tests import tiny_models as tm
from tests.cli_runner import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A corpus of tiny-vocabulary words (w3..w60) the tiny tokenizer knows."""
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(3, tm.VOCAB, (6000,), generator=gen).tolist()
    paragraphs = [" ".join(f"w{w}" for w in words[i:i + 300]) for i in range(0, len(words), 300)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


def test_explore_prints_one_json_object_with_the_grid(llama_dir, text_file):
    code, out, err = run_cli(["explore", "--parent", llama_dir, "--params", "20k", "--data", text_file,
                              "--calib-tokens", 256, "--eval-tokens", 128, "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["budget"] == 20_000 and result["shapes"]
    assert result["refit_tokens"] == 256  # the default 1,024, at most the calibration's tokens
    assert result["refit_pass"] == "recorded"  # the Llama table refits on the child's inputs
    assert {"layers", "hidden", "heads", "kv_heads", "ffn", "params", "loss", "pareto"} <= set(result["shapes"][0])
    assert result["random"]["loss"] > 0  # the front holds only shapes that start below random init (a tiny
    # random parent may have none)
    assert all(s["loss"] < result["random"]["loss"] for s in result["shapes"] if s["pareto"])


def test_explore_prints_a_table(llama_dir, text_file):
    code, out, err = run_cli(["explore", "--parent", llama_dir, "--params", "20000", "--data", text_file,
                              "--calib-tokens", 256, "--eval-tokens", 128])
    assert code == 0, err
    assert "step-0 loss" in out and "random init" in out and " *" in out
    assert "(one pass over the parent, recorded for every shape's own refit)" in out


@pytest.mark.parametrize("flags,message", [
    (["--params", "lots"], "is not a number like 30M"),
    (["--params", "5T"], "is not a number like 30M"),
    (["--params", "1B"], "shapes range from"),
    (["--params", "20k", "--eval-tokens", 0], "--eval-tokens=0 must be a positive integer"),
    (["--params", "20k", "--refit-tokens", 0], "--refit-tokens=0 must be a positive integer"),
])
def test_bad_input_exits_2_with_one_line(llama_dir, text_file, flags, message):
    code, out, err = run_cli(["explore", "--parent", llama_dir, "--data", text_file, "--calib-tokens", 128,
                              *flags])
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1
