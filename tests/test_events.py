"""Typed training events and manifests: what is written reads back the same, and older files still read."""

from __future__ import annotations

import json
import math

import pytest

from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import CalibrationRecord, Manifest, ParentRecord, TrainingInfo
from subclone_core.io.saving import read_manifest
from subclone_core.tasks import CAUSAL_LM, IMAGE_CLASSIFICATION
from subclone_core.training.events import (
    CancelledEvent,
    CandidatePlan,
    DoneEvent,
    ErrorEvent,
    EvalEvent,
    StartEvent,
    StepEvent,
    curves,
    parse_event,
    read_events,
)
from subclone_core.training.metrics_log import MetricsLog
from subclone_core.training.results import EvalPoint

EVENTS = [
    StartEvent(time=0.0, candidates=[CandidatePlan("subclone", "subclone", 1e-3, 0.1, False)],
               config={"steps": 4}, world_size=1, device="cpu", unit="tokens/s", metric="loss",
               higher_is_better=False),
    StepEvent(candidate="subclone", time=0.5, step=1, loss=3.0, lr=1e-3, grad_norm=1.5, throughput=100.0,
              unit="tokens/s", seen=64),
    StepEvent(candidate="subclone+distill", time=0.6, step=1, loss=3.0, lr=1e-3, grad_norm=1.0, throughput=90.0,
              unit="tokens/s", seen=64, ce=3.5, kl=2.5),
    EvalEvent(candidate="subclone", time=0.7, step=1, seen=64, loss=2.5, perplexity=math.exp(2.5)),
    EvalEvent(candidate="vit", time=0.8, step=1, seen=32, loss=0.7, accuracy=0.75),
    ErrorEvent(candidate="random", time=0.9, step=1, message="non-finite loss"),
    ErrorEvent(time=0.9, message="RuntimeError: boom"),
    CancelledEvent(time=1.0, step=2, message="cancelled before step 2"),
    DoneEvent(candidate="subclone", time=1.1, step=1, status="done", final=EvalPoint(1, 64, 2.5, 12.2),
              saved_to="/runs/subclone"),
]


def test_events_written_by_the_metrics_log_read_back_typed_and_equal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for event in EVENTS:
            log.write(event)
    assert read_events(path) == EVENTS


def test_the_json_keeps_the_file_format():
    step, eval_text, eval_image = EVENTS[1], EVENTS[3], EVENTS[4]
    assert list(step.to_json())[:3] == ["event", "candidate", "time"]
    assert "ce" not in step.to_json() and EVENTS[2].to_json()["kl"] == 2.5  # distillation parts only when set
    assert "accuracy" not in eval_text.to_json() and "perplexity" not in eval_image.to_json()
    assert EVENTS[6].to_json() == {"event": "error", "candidate": None, "time": 0.9, "message": "RuntimeError: boom"}
    assert EVENTS[8].to_json()["final"] == {"step": 1, "seen": 64, "loss": 2.5, "perplexity": 12.2, "accuracy": None}


def test_the_eval_value_is_read_by_the_tasks_metric_and_headline():
    text, image = EVENTS[3], EVENTS[4]
    assert text.value(CAUSAL_LM.metric) == 2.5 and text.value(CAUSAL_LM.headline) == pytest.approx(math.exp(2.5))
    assert image.value(IMAGE_CLASSIFICATION.metric) == 0.75 == image.value(IMAGE_CLASSIFICATION.headline)
    assert text.value(IMAGE_CLASSIFICATION.metric) is None
    assert curves(EVENTS, kind=EvalEvent, key="accuracy") == {"vit": [(1, 0.75)]}
    assert curves(EVENTS, kind=StepEvent, key="kl") == {"subclone+distill": [(1, 2.5)]}


def test_lines_of_an_older_version_still_parse():
    # a start event from before "metric" was recorded, and a step without "seen"
    start = parse_event({"event": "start", "candidate": None, "time": 0.0, "config": {"steps": 5},
                         "candidates": [{"name": "random", "lr": 1e-3}], "world_size": 1, "device": "cpu",
                         "unit": "tokens/s"})
    assert isinstance(start, StartEvent) and start.metric == "loss" and not start.higher_is_better
    assert start.candidates == [CandidatePlan("random", lr=1e-3)]
    step = parse_event({"event": "step", "candidate": "random", "time": 1.0, "step": 1, "loss": 3.0, "lr": 1e-4})
    assert isinstance(step, StepEvent) and step.seen is None and step.loss == 3.0
    newer = parse_event({"event": "eval", "candidate": "a", "step": 0, "loss": 1.0, "a_newer_key": 1})
    assert newer == EvalEvent(candidate="a", step=0, loss=1.0)


def test_unknown_kinds_and_malformed_events_are_refused_and_skipped_by_the_reader(tmp_path):
    with pytest.raises(ValueError, match="unknown event kind 'progress'; known: start, step, eval"):
        parse_event({"event": "progress", "done": 1})
    with pytest.raises(ValueError, match="malformed eval event"):
        parse_event({"event": "eval", "candidate": "a"})  # no step, no loss
    with pytest.raises(TypeError, match="JSON object"):
        parse_event(["eval"])
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(EVENTS[1].to_json()), '{"event": "a-future-kind"}', "[1, 2]", json.dumps(EVENTS[3].to_json()),
             '{"event": "step", "cand']  # the last line is still being written
    path.write_text("\n".join(lines))
    assert read_events(path) == [EVENTS[1], EVENTS[3]]
    assert read_events(tmp_path / "missing.jsonl") == []


def test_non_finite_values_are_written_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write(EvalEvent(candidate="a", step=0, loss=math.inf, perplexity=math.inf))
    assert json.loads(path.read_text())["loss"] is None
    assert read_events(path) == [EvalEvent(candidate="a", step=0, loss=None)]


# --- manifests -----------------------------------------------------------------------------------------------

CHILD = Manifest(
    format="subclone-manifest/1", library_version="0.1.0", created="2025-01-01T00:00:00+00:00",
    parent=ParentRecord(shape={"layers": 4, "hidden": 64}, id="default", label="SmolLM2", model_type="llama",
                        weights_sha256="ab" * 32, licence=None),
    child_shape={"layers": 2, "hidden": 32}, strategy="random", order=None, drop=None, scale=False,
    untie_head=False, seed=0, residual_score=None, refit=False, refit_ridge=None, kept_blocks=[0, 1],
    removed_blocks=[], selection=None, calibration=None,
)


def saved(tmp_path, data: dict):
    (tmp_path / "subclone.json").write_text(json.dumps(data))
    return read_manifest(tmp_path)


def test_a_manifest_round_trips_through_its_json(tmp_path):
    trained = Manifest(**{**CHILD.__dict__, "calibration": CalibrationRecord("default", 512),
                          "training": TrainingInfo(strategy="random", lr=1e-3, steps_done=4, evals=[{"step": 0}])})
    for manifest in (CHILD, trained, Manifest(note="trained from elsewhere")):
        assert saved(tmp_path, manifest.to_json()) == manifest


def test_a_childs_record_names_every_choice_and_other_manifests_only_what_is_known():
    data = CHILD.to_json()
    assert data["child"] == {"shape": {"layers": 2, "hidden": 32}} and data["parent"]["id"] == "default"
    assert {"order", "drop", "selection", "calibration", "refit_ridge"} <= set(data) and data["drop"] is None
    assert "training" not in data and "licence" not in data["parent"]
    assert Manifest(note="trained from x").to_json() == {"note": "trained from x"}


def test_older_and_foreign_manifests_still_read(tmp_path):
    old = saved(tmp_path, {"parent": {"id": "tiny", "sha256": "cd" * 32}, "strategy": "subclone", "n": 1})
    assert old.parent.weights_sha256 == "cd" * 32 and old.strategy == "subclone" and not old.is_child
    assert old.to_json()["n"] == 1  # a key this version does not know is written back
    assert saved(tmp_path, {"parent": "tiny"}).parent == ParentRecord(id="tiny")
    assert saved(tmp_path, {"parent": None, "note": "trained from x"}).note == "trained from x"
    assert read_manifest(tmp_path / "nowhere") is None


@pytest.mark.parametrize("text, match", [("{not json", "not valid JSON"), ('["a list"]', "JSON object"),
                                         ('{"calibration": 3}', "not a subclone manifest")])
def test_a_malformed_manifest_is_named(tmp_path, text, match):
    (tmp_path / "subclone.json").write_text(text)
    with pytest.raises(SubcloneError, match=match):
        read_manifest(tmp_path)
