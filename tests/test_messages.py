"""Issue 30: one error boundary, one-line messages, strict JSON, plain text without autolinks.

Each test reproduces a reported defect: a full disk that was "internal error ... (a bug)", NaN printed as
JSON, e-mail and www addresses linked in the app, usage dumps, advice naming flags a command does not have.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import re
import shutil

import pytest
import torch
import transformers
import transformers.modeling_utils
from safetensors import SafetensorError

from subclone_core.analysis.explore import candidate_shapes
from subclone_core.cli.main import build_parser, describe_error, for_command, quiet_transformers
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import parameter_count
from subclone_core.training.events import StepEvent
from subclone_core.training.metrics_log import MetricsLog
from tests import tiny_models as tm
from tests.cli_runner import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--steps", 1, "--eval-every", 1, "--batch-size", 2, "--seq-len", 16, "--eval-tokens", 64, "--quiet"]
FULL = 'Error while serializing: I/O error: No space left on device (os error 28) at path "{}/.tmpXYZ"'


def one_error_line(args) -> str:
    """The CLI refuses ``args`` with exit status 2 and exactly one line on stderr (warnings aside)."""
    code, _, err = run_cli(args)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Warning")]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    return lines[0]


# --- 1. a full disk is one line, exit status 2 -------------------------------------------------------------


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def safetensors_full(tensors, filename, *args, **kwargs):
    raise SafetensorError(FULL.format(filename.rsplit("/", 1)[0]))


@pytest.mark.parametrize("patch", [
    (transformers.PreTrainedModel, "save_pretrained", enospc),
    (transformers.modeling_utils, "safe_save_file", safetensors_full),
], ids=["oserror", "safetensor-error"])
def test_a_full_disk_in_make_is_one_line_naming_the_path(llama_dir, tmp_path, monkeypatch, patch):
    monkeypatch.setattr(*patch)
    out = tmp_path / "child"
    line = one_error_line(["make", "--parent", llama_dir, "--strategy", "random", "--out", out])
    assert "No space left on device" in line and str(tmp_path) in line and "bug" not in line, line
    assert not out.exists()


def test_a_full_disk_in_train_is_one_line(llama_dir, counting_text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", safetensors_full)
    line = one_error_line(["train", "--model", llama_dir, "--data", counting_text_file, "--out", tmp_path / "run",
                           *[a for a in FAST if a not in ("--eval-tokens", 64)]])
    assert "No space left on device" in line and "bug" not in line, line


@pytest.mark.parametrize("code, needle", [(errno.EROFS, "read-only"), (errno.EACCES, "permissions"),
                                          (errno.EDQUOT, "quota"), (errno.ENOSPC, "free some space")])
def test_file_system_errors_name_the_path_the_cause_and_what_to_do(code, needle):
    status, line = describe_error(OSError(code, "cause", "/data/child/model.safetensors"))
    assert status == 2 and "/data/child/model.safetensors: cause" in line and needle in line, line


def test_an_oserror_raised_from_is_the_cause_but_one_met_while_handling_a_bug_is_not():
    try:
        raise RuntimeError("writing failed") from OSError(errno.ENOSPC, "No space left on device", "/x")
    except RuntimeError as err:
        assert describe_error(err)[0] == 2
    try:
        try:
            raise OSError(errno.ENOENT, "gone")
        except OSError:
            raise KeyError("a bug while handling it") from None
    except KeyError as err:
        assert describe_error(err)[0] == 1


# --- 2. strict JSON ----------------------------------------------------------------------------------------


def strict(text: str):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_eval_json_of_a_non_finite_loss_is_strict_json(llama_dir, counting_text_file, monkeypatch):
    nan = {"loss": math.nan, "perplexity": math.inf, "tokens": 64}
    monkeypatch.setattr("subclone_core.cli.commands.eval.evaluate", lambda *a, **k: dict(nan))
    code, out, err = run_cli(["eval", "--model", llama_dir, "--data", counting_text_file, "--tokens", 64,
                              "--seq-len", 16, "--json"])
    assert code == 0, err
    result = strict(out)
    assert result["loss"] is None and result["perplexity"] is None


def test_metrics_jsonl_is_strict_json(tmp_path):
    with MetricsLog(tmp_path / "metrics.jsonl") as log:
        log.write(StepEvent(candidate="c", step=1, loss=math.nan, lr=math.inf))
    line = strict((tmp_path / "metrics.jsonl").read_text())
    assert line["loss"] is None and line["lr"] is None


# --- 3. plain text: no GitHub autolinks --------------------------------------------------------------------

# what GitHub-flavoured Markdown links without any Markdown punctuation, once backslash escapes are resolved
# (remark-gfm finds them in the parsed text: www.host, name@host.tld, scheme://)
AUTOLINKS = re.compile(r"(?i)(?:^|[\s*_~(])www\.[-\w]|[-.\w+]+@[-\w]+\.[-\w]|\b(?:https?|ftp)://|(?:mailto|xmpp):\w")


@pytest.mark.parametrize("text", ["write to evil@example.com now", "www.example.com", "see WWW.evil.example/x",
                                  "http://evil.example", "https://evil.example/a?b", "ftp://files.example",
                                  "mailto:evil@example.com", "(www.example.com)", "_www.example.com_"])
def test_plain_leaves_no_autolink(text):
    from subclone_core.app.ui import plain

    shown = plain(text)
    parsed = re.sub(r"\\(.)", r"\1", shown)  # what Markdown's parser leaves of the escapes
    assert not AUTOLINKS.search(parsed), repr(shown)
    assert parsed.replace("\u200b", "") == text  # only invisible breaks were added


def test_plain_addresses_render_as_no_link_in_commonmark():
    markdown_it = pytest.importorskip("markdown_it")
    from subclone_core.app.ui import plain

    html = markdown_it.MarkdownIt("commonmark").render(  # its <...> autolinks; GitHub's are tested above
        plain("<evil@example.com> <http://x.example> www.x.example"))
    assert "<a " not in html, html


# --- 4. messages -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["make", "--parent", "p", "--out", "o", "--layers", "x"],
                                  ["make", "--parent", "p"], ["nonsense"],
                                  ["make", "--parent", "p", "--out", "o", "--strategy", "best"]])
def test_a_bad_value_is_one_line_pointing_at_help_not_a_usage_dump(args):
    line = one_error_line(args)
    assert line.startswith("subclone") and "--help" in line and "usage" not in line, line


@pytest.mark.parametrize("flag", ["--hidden", "--layers", "--heads", "--kv-heads", "--ffn"])
def test_a_zero_size_is_refused_while_parsing_before_any_work(flag, recwarn):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["make", "--parent", "p", "--out", "o", flag, "0"])
    assert stop.value.code == 2 and flag in err.getvalue() and "positive integer" in err.getvalue()
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_accelerates_meta_device_notice_is_silenced_unless_verbose(caplog, monkeypatch):
    notice = "Some parameters are on the meta device because they were offloaded to the cpu and disk."
    log = logging.getLogger("accelerate.big_modeling")
    monkeypatch.setattr(log, "propagate", True)  # whatever earlier tests' library setup did to this logger
    monkeypatch.setattr(log, "disabled", False)
    with caplog.at_level(logging.WARNING, logger="accelerate.big_modeling"):
        quiet_transformers(False)
        quiet_transformers(False)
        log.warning(notice)
        assert notice not in caplog.text
        quiet_transformers(True)
        log.warning(notice)
        assert notice in caplog.text
    quiet_transformers(False)


@pytest.mark.parametrize("family, budget", [("mistral", 10_401), ("gemma3", 7_000), ("gpt2", 5_253)])
def test_a_budget_inside_the_range_is_explored_not_refused(family, budget):
    model = tm.make(family, dtype=torch.float32)
    found = candidate_shapes(model, budget)
    sizes = [params for _, params in found]
    assert min(sizes) <= budget <= max(sizes) or any(budget / 1.5 <= p <= budget * 1.5 for p in sizes)


def test_a_refused_budget_names_the_whole_range_of_shapes():
    model = tm.make("llama", dtype=torch.float32)
    largest = parameter_count(model, Shape.of(model.config))
    with pytest.raises(Exception, match=f"to {largest:,};"):
        candidate_shapes(model, 10**12)


def test_advice_naming_a_flag_the_command_lacks_is_dropped():
    message = "error: text data 'x' has 64 tokens, but seq_len 128 needs at least 128: give more text or a smaller --seq-len"
    assert for_command(message, {"--data", "--calib-tokens"}).endswith("give more text")
    assert for_command(message, {"--seq-len"}) == message


def test_explore_does_not_advise_a_seq_len_it_does_not_have(llama_dir, counting_text_file):
    line = one_error_line(["explore", "--parent", llama_dir, "--params", "20k", "--data", counting_text_file,
                           "--calib-tokens", 256, "--eval-tokens", 64])
    assert "--seq-len" not in line, line


def test_activation_memory_advice_is_a_form_it_accepts():
    line = one_error_line(["make", "--parent", "p", "--out", "o", "--activation-memory", "cuda:0=1GiB"])
    assert "per device" not in line and "cuda:0=" not in line.split("use", 1)[-1] and "4GiB" in line, line


def test_make_checks_its_flags_before_claiming_the_output(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("subclone_core.cli.commands.make.claim_output",
                        lambda *a, **k: pytest.fail("claimed --out before checking the flags"))
    line = one_error_line(["make", "--parent", llama_dir, "--out", tmp_path / "child", "--max-memory", "lots"])
    assert "--max-memory" in line


def test_transformers_pointer_to_a_hidden_report_becomes_our_own_line(llama_dir, tmp_path):
    folder = tmp_path / "mismatched"
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    line = one_error_line(["export", "--model", folder, "--to", tmp_path / "x.gguf"])
    assert "above report" not in line and "bug" not in line and "config.json" in line, line
