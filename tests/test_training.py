"""The training engine on tiny random models and fake data, on CPU, in seconds."""

from __future__ import annotations

import copy
import json
import math
import threading

import pytest
import torch
from dist_train_script import PatternData, QuadrantImages, tiny_llama, tiny_vit, weights_hash
from transformers import AutoModelForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import Manifest
from subclone_core.training import (
    Candidate,
    TrainConfig,
    default_hparams,
    distillation_loss,
    kl_to_teacher,
    make_scheduler,
    train_candidates,
)
from subclone_core.training.distill import distill_mask
from subclone_core.training.events import ErrorEvent, Event, StepEvent, read_events


def record_training_inputs(model) -> list[list[list[int]]]:
    """Every input_ids batch the model is trained on (validation forwards run in eval mode: skipped)."""
    seen: list = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].tolist()) if m.training else None, with_kwargs=True)
    return seen


def config(**overrides) -> TrainConfig:
    base = {"steps": 30, "batch_size": 8, "eval_every": 10, "eval_batches": 2, "warmup": 0.1, "seed": 5}
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """Two differently initialized candidates trained side by side, with a metrics file and callbacks."""
    tmp = tmp_path_factory.mktemp("pair")
    # Children usually arrive in eval mode: the engine must switch them to training mode.
    models = {"subclone": tiny_llama(1).eval(), "random": tiny_llama(2).eval()}
    seen = {name: record_training_inputs(m) for name, m in models.items()}
    events: list[Event] = []
    data = PatternData(seed=0, pad=3)
    results = train_candidates(
        [Candidate(n, m) for n, m in models.items()], data, PatternData(rows=16, seed=9), config(),
        callbacks=[events.append], metrics_path=tmp / "metrics.jsonl")
    return {"results": results, "seen": seen, "events": events, "data": data, "path": tmp / "metrics.jsonl"}


def test_candidates_see_identical_batches_in_identical_order(pair_run):
    seen = pair_run["seen"]
    assert len(seen["subclone"]) == 30
    assert seen["subclone"] == seen["random"]
    assert len({json.dumps(b) for b in seen["subclone"]}) > 1  # the batches do change from step to step
    train_logs = [log for log in pair_run["data"].log if len(log) >= 30]
    assert len(train_logs) == 2 and train_logs[0] == train_logs[1]  # one iterator each, the same order


def test_loss_goes_down_on_a_learnable_task(pair_run):
    for result in pair_run["results"].values():
        assert result.status == "done" and result.steps_done == 30
        assert [p.step for p in result.evals] == [0, 10, 20, 30]
        assert result.evals[-1].loss < result.evals[0].loss - 0.5
        assert result.evals[-1].perplexity == pytest.approx(math.exp(result.evals[-1].loss))
        assert result.seen == 30 * 8 * (16 - 3)  # real tokens only: 3 padded positions per row
        assert result.throughput > 0 and result.unit == "tokens/s"
        assert not result.model.training


def test_metrics_file_and_callbacks_get_the_same_events(pair_run):
    from_file = read_events(pair_run["path"])
    assert from_file == pair_run["events"]
    kinds = [e.event for e in from_file]
    assert kinds[0] == "start" and kinds.count("step") == 60 and kinds.count("eval") == 8
    assert kinds[-2:] == ["done", "done"]
    steps = [e for e in from_file if isinstance(e, StepEvent) and e.candidate == "random"]
    assert [e.step for e in steps] == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "throughput", "unit", "seen"} <= set(steps[0].to_json())
    assert None not in (steps[0].lr, steps[0].grad_norm, steps[0].throughput, steps[0].unit, steps[0].seen)
    # Interleaved: step events alternate between candidates, so live curves grow together.
    order = [e.candidate for e in from_file if isinstance(e, StepEvent)][:4]
    assert order == ["subclone", "random", "subclone", "random"]


def test_interleaving_changes_nothing_even_with_dropout():
    data, val = PatternData(seed=0), PatternData(rows=16, seed=9)
    base = tiny_llama(3, dropout=0.3)
    twin, other = copy.deepcopy(base), tiny_llama(4, dropout=0.3)
    together = train_candidates([Candidate("subclone", base), Candidate("random", other),
                                 Candidate("twin", twin, lr=1e-3, weight_decay=1e-3)], data, val, config(steps=6))
    alone_model = copy.deepcopy(tiny_llama(3, dropout=0.3))
    alone = train_candidates([Candidate("subclone", alone_model)], data, val, config(steps=6))
    assert together["subclone"].train_loss == together["twin"].train_loss
    assert together["subclone"].train_loss == alone["subclone"].train_loss
    assert weights_hash(base) == weights_hash(twin) == weights_hash(alone_model)


def test_runs_in_concurrent_threads_keep_their_own_dropout_streams():
    """Two app sessions may train at once in one process: each run must match the same run alone."""
    data, val = PatternData(seed=0), PatternData(rows=16, seed=9)
    alone = train_candidates([Candidate("random", tiny_llama(3, dropout=0.3))], data, val, config(steps=12))["random"]
    models = [tiny_llama(3, dropout=0.3) for _ in range(2)]  # built here: initialization draws from the RNG too
    results: dict[int, list] = {}

    def run(i: int) -> None:
        done = train_candidates([Candidate("random", models[i])], data, val, config(steps=12))
        results[i] = done["random"].train_loss

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == alone.train_loss


def scheduled_lrs(total: int, warmup: int, min_ratio: float = 0.0, peak: float = 1.0) -> list[float]:
    """The lr of each of ``total`` optimizer steps under make_scheduler."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched, lrs = make_scheduler(opt, total=total, warmup=warmup, min_ratio=min_ratio), []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine():
    total, warm = 100, 10
    f = [lr / 2e-3 for lr in scheduled_lrs(total, warm, min_ratio=0.1, peak=2e-3)]
    assert f[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)])  # no step at lr 0
    assert all(a >= b for a, b in zip(f[warm - 1:], f[warm:]))
    assert f[-1] == pytest.approx(0.1)
    assert f[(warm - 1 + total - 1) // 2] == pytest.approx(0.55)  # halfway from the peak to the last step
    assert scheduled_lrs(6, 0, min_ratio=0.1)[0] == 1.0  # no warmup: the first step at the peak


@pytest.mark.parametrize("total, warmup", [(100, 10), (30, 3), (30, 0), (6, 1)])
def test_lr_schedule_is_transformers_cosine_with_min_lr(total, warmup):
    """make_scheduler is transformers' schedule, one step in when there is a warmup (its first is at lr 0)."""
    start = 1 if warmup else 0
    library = get_cosine_with_min_lr_schedule_with_warmup(
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0), num_warmup_steps=warmup,
        num_training_steps=total - 1 + start, min_lr_rate=0.1).lr_lambdas[0]
    ours = scheduled_lrs(total, warmup, min_ratio=0.1)
    for step in {0, warmup // 2, warmup, total // 2, total - 1}:
        assert ours[step] == pytest.approx(library(step + start)), step


def test_the_logged_lr_follows_the_schedule(pair_run):
    lrs = [e.lr for e in pair_run["events"] if isinstance(e, StepEvent) and e.candidate == "subclone"]
    assert lrs == pytest.approx(scheduled_lrs(30, 3, peak=1e-3))


def test_non_finite_loss_stops_that_candidate_and_the_others_go_on(tmp_path):
    nan_model = tiny_llama(2)
    with torch.no_grad():
        nan_model.model.norm.weight.fill_(float("nan"))
    cands = [Candidate("subclone", tiny_llama(1)), Candidate("random", tiny_llama(2), lr=1e30),
             Candidate("first-k", nan_model)]
    events: list[Event] = []
    results = train_candidates(cands, PatternData(), PatternData(rows=16, seed=9), config(steps=8, eval_every=4),
                               callbacks=[events.append], save_dir=tmp_path / "models")
    assert results["subclone"].status == "done" and results["subclone"].steps_done == 8
    for name in ("random", "first-k"):
        assert results[name].status == "stopped"
        assert "non-finite" in results[name].message and "lower the learning rate" in results[name].message
        assert results[name].steps_done < 8 and results[name].saved_to is None
    assert results["first-k"].steps_done == 0
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert {e.candidate for e in errors} == {"random", "first-k"}
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["subclone"]


def test_cancel_keeps_the_metrics_and_saves_nothing(tmp_path):
    cancel = threading.Event()

    def cancel_at_step_3(event):
        if isinstance(event, StepEvent) and event.step == 3 and event.candidate == "random":
            cancel.set()

    path = tmp_path / "metrics.jsonl"
    results = train_candidates([Candidate("subclone", tiny_llama(1)), Candidate("random", tiny_llama(2))],
                               PatternData(), PatternData(rows=16, seed=9), config(steps=20),
                               callbacks=[cancel_at_step_3], metrics_path=path, cancel=cancel,
                               save_dir=tmp_path / "models")
    assert {r.status for r in results.values()} == {"cancelled"}
    assert all(r.steps_done == 3 and r.saved_to is None for r in results.values())
    events = read_events(path)
    assert [e.step for e in events if isinstance(e, StepEvent)] == [1, 1, 2, 2, 3, 3]
    assert [e.event for e in events][-3:] == ["cancelled", "done", "done"]
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_saved_children_are_complete_model_folders_with_training_info(tmp_path):
    model = tiny_llama(1)
    results = train_candidates([Candidate("subclone", model)], PatternData(), PatternData(rows=16, seed=9),
                               config(steps=4, eval_every=2), save_dir=tmp_path,
                               manifest_for=lambda name: Manifest(strategy=name, note="tiny"))
    folder = results["subclone"].saved_to
    assert folder == tmp_path / "subclone"
    manifest = json.loads((folder / "subclone.json").read_text())
    assert manifest["note"] == "tiny" and manifest["training"]["steps_done"] == 4
    assert [p["step"] for p in manifest["training"]["evals"]] == [0, 2, 4]
    assert manifest["training"]["lr"] == default_hparams("subclone")["lr"]
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert weights_hash(loaded) == weights_hash(model)


def test_kl_is_exactly_zero_when_the_student_is_a_copy_of_the_teacher():
    teacher = tiny_llama(1).eval()
    student = copy.deepcopy(teacher)
    batch = next(PatternData(pad=4).batches(4))
    s_logits, t_logits = student(**batch).logits, teacher(**batch).logits
    mask = distill_mask(s_logits, batch["labels"])
    assert kl_to_teacher(s_logits, t_logits, mask, 2.0).item() == 0.0
    ce = student(**batch).loss
    loss, kl = distillation_loss(ce, s_logits, t_logits, batch["labels"], alpha=0.25, temperature=2.0)
    assert kl.item() == 0.0 and loss.item() == pytest.approx(0.75 * ce.item())
    other = tiny_llama(2).eval()(**batch).logits
    assert kl_to_teacher(other, t_logits, mask, 2.0).item() > 0


def test_distillation_ignores_padding_and_the_last_position():
    batch = next(PatternData(pad=4).batches(2))
    logits = torch.randn(2, 16, 64)
    mask = distill_mask(logits, batch["labels"])
    assert mask.sum() == 2 * (16 - 4 - 1)  # 12 real tokens per row; the last real one has no target
    teacher = logits.clone()
    teacher[~mask] = torch.randn_like(teacher[~mask])  # change only rows that do not count
    assert kl_to_teacher(logits, teacher, mask, 1.0).item() == 0.0
    with pytest.raises(SubcloneError, match="same vocabulary"):
        kl_to_teacher(logits, torch.randn(2, 16, 65), mask, 1.0)


def test_training_with_distillation_runs_and_leaves_the_teacher_alone():
    teacher = tiny_llama(7).train()
    before = weights_hash(teacher)
    cand = Candidate("subclone+distill", tiny_llama(1), teacher=teacher, distill_alpha=0.5, distill_temperature=2.0)
    events: list[Event] = []
    result = train_candidates([cand], PatternData(), PatternData(rows=16, seed=9), config(steps=10, eval_every=5),
                              callbacks=[events.append])["subclone+distill"]
    assert result.status == "done" and result.evals[-1].loss < result.evals[0].loss
    step = next(e for e in events if isinstance(e, StepEvent))
    assert step.loss == pytest.approx(0.5 * step.ce + 0.5 * step.kl, rel=1e-5) and step.kl > 0
    assert weights_hash(teacher) == before and teacher.training  # copied, not put in eval mode in place


def test_image_candidates_report_accuracy():
    results = train_candidates([Candidate("random", tiny_vit(1), lr=3e-3)], QuadrantImages(),
                               QuadrantImages(rows=32, seed=5), config(steps=40, eval_every=20, batch_size=16))
    result = results["random"]
    assert result.unit == "images/s" and result.seen == 40 * 16
    assert all(p.accuracy is not None and p.perplexity is None for p in result.evals)
    assert result.evals[-1].loss < result.evals[0].loss
    assert result.evals[-1].accuracy > 0.5  # 4 classes: chance is 0.25


def test_gradient_accumulation_counts_every_micro_batch():
    result = train_candidates([Candidate("random", tiny_llama(1))], PatternData(), PatternData(rows=16, seed=9),
                              config(steps=3, grad_accum=2, batch_size=4))["random"]
    assert result.status == "done" and result.seen == 3 * 2 * 4 * 16


@pytest.mark.parametrize("bad, match", [
    ({"steps": 0}, "steps"),
    ({"warmup": 50}, "warmup"),
    ({"device": "tpu"}, "device"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"eval_at": (0, 3)}, "eval_at"),
    ({"eval_at": (31,)}, "eval_at"),
])
def test_bad_settings_are_user_errors(bad, match):
    with pytest.raises(SubcloneError, match=match):
        train_candidates([Candidate("random", tiny_llama(1))], PatternData(), PatternData(), config(**bad))


def test_extra_evaluation_steps_join_the_regular_grid():
    result = train_candidates([Candidate("random", tiny_llama(1))], PatternData(), PatternData(rows=8),
                              config(steps=6, eval_every=5, eval_at=(1, 2, 5)))["random"]
    assert [step for step, _ in result.curve("loss")] == [0, 1, 2, 5, 6]


def test_an_occupied_save_folder_fails_before_training(tmp_path):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "keep.txt").write_text("user data")
    events: list[Event] = []
    with pytest.raises(SubcloneError, match="not empty"):
        train_candidates([Candidate("random", tiny_llama(1))], PatternData(), PatternData(), config(),
                         save_dir=tmp_path, callbacks=[events.append])
    assert events == []


def test_too_little_training_data_is_a_user_error():
    with pytest.raises(SubcloneError, match="at least batch_size"):
        train_candidates([Candidate("random", tiny_llama(1))], PatternData(rows=4), PatternData(), config())


def test_bad_candidates_are_user_errors():
    model = tiny_llama(1)
    data = PatternData()
    with pytest.raises(SubcloneError, match="used twice"):
        train_candidates([Candidate("random", model), Candidate("random", tiny_llama(2))], data, data, config())
    with pytest.raises(SubcloneError, match="share one model"):
        train_candidates([Candidate("random", model), Candidate("subclone", model)], data, data, config())
    with pytest.raises(SubcloneError, match="no default learning rate.*known: subclone, .*random"):
        train_candidates([Candidate("mine", model)], data, data, config())
    with pytest.raises(SubcloneError, match="name"):
        train_candidates([Candidate("a/b", model, lr=1e-3, weight_decay=0.0)], data, data, config())
