"""The worker in-process: review -> result in the outbox -> dispatch job; bad plans; deterministic result UIDs."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pydicom
import pytest
from conftest import dicom_files, rtqa_command

from rtqa_node import assemble
from rtqa_node.assemble import all_keys, evaluate
from rtqa_node.config import load_settings
from rtqa_node.errors import PermanentError
from rtqa_node.store import Store
from rtqa_node.worker import Worker, result_uid, review_plan_study


def _ready(store: Store, folders) -> list[str]:
    for folder in folders:
        for path in dicom_files(folder):
            store.import_file(path)
    with store.index.transaction() as conn:
        for key in all_keys(conn):
            evaluate(conn, key, stable_age_s=0.0, job_max_attempts=2)
    return [r[0] for r in store.index.query("SELECT id FROM plan_studies ORDER BY id")]


@pytest.fixture
def data(tmp_path):
    store = Store(tmp_path / "data")
    yield tmp_path / "data", store
    store.close()


def _drain(worker: Worker) -> None:
    for _ in range(50):
        if worker.run_once() is None:
            return


def test_review_writes_a_result_with_a_deterministic_uid_and_queues_its_dispatch(data, rt_data):
    data_dir, store = data
    (ps_id,) = _ready(store, [rt_data / "eclipse-breast-boost-fullct-weasis"])
    worker = Worker(load_settings(None, data_dir=data_dir, shadow_mode=True))
    try:
        _drain(worker)
    finally:
        worker.close()
    jobs = {r["kind"]: dict(r) for r in store.index.query("SELECT * FROM jobs")}
    assert jobs["review"]["state"] == "done" and jobs["dispatch"]["state"] == "done"
    assert '"CT": 98' in jobs["review"]["result"]
    # its delivery is queued at the plan's risk: the rule verdict here, since a breast plan is outside the
    # (head-and-neck) models' intended use and gets no predictions
    result = json.loads(jobs["review"]["result"])
    assert result["predictions"] == [] and result["metrics"]["ml"]["status"].startswith("not applicable")
    verdict = result["verdict"]
    assert jobs["dispatch"]["priority"] == {"per_protocol": 100, "minor": 150, "major": 200,
                                            "not_evaluable": 175}[verdict]
    (outbox,) = store.index.query("SELECT * FROM outbox")
    assert outbox["sop_instance_uid"] == result_uid(ps_id, 1, "review")
    sr = pydicom.dcmread(data_dir / outbox["path"])
    assert sr.SOPInstanceUID == outbox["sop_instance_uid"]
    assert sr.StudyInstanceUID == "2.16.840.1.113662.2.12.0.3057.1241703565.35"  # the plan's study
    assert result_uid(ps_id, 1, "review") != result_uid(ps_id, 2, "review")
    validated = subprocess.run(["dciodvfy", str(data_dir / outbox["path"])], capture_output=True, text=True,
                               check=False)
    assert not [line for line in validated.stderr.splitlines() if line.startswith("Error")]


def test_one_bad_plan_never_stops_the_worker(data, rt_data, monkeypatch):
    data_dir, store = data
    monkeypatch.setattr(assemble, "REVIEW_RETRY_BASE_S", 0.01)
    studies = _ready(store, [rt_data / "raystation-proton-beamdose-aptg", rt_data / "raystation-proton-ramp-aptg"])
    bad_plan_files = {r[0] for r in store.index.query(
        "SELECT i.path FROM plan_study_members m JOIN instances i ON i.id = m.instance_id WHERE m.plan_study_id = ?",
        (studies[0],))}

    def review(files):
        if {str(f.relative_to(data_dir)) for f in files} == bad_plan_files:
            raise RuntimeError("simulated crash in the review")
        return review_plan_study(files)

    worker = Worker(load_settings(None, data_dir=data_dir, shadow_mode=True), review=review)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and store.index.query(
                "SELECT COUNT(*) FROM jobs WHERE state NOT IN ('done', 'dead')")[0][0]:
            worker.run_once()
    finally:
        worker.close()
    states = {(r[0], r[1]): (r[2], r[3], r[4]) for r in store.index.query(
        "SELECT plan_study_id, kind, state, attempts, last_error FROM jobs")}
    assert states[(studies[0], "review")][:2] == ("dead", 2)
    assert "simulated crash" in states[(studies[0], "review")][2]
    assert states[(studies[1], "review")][0] == "done"
    # a dead review still answers: "analysis not performed", dispatched like any result
    assert states[(studies[0], "dispatch")][0] == "done"
    (path,) = [r[0] for r in store.index.query("SELECT path FROM outbox WHERE plan_study_id = ?", (studies[0],))]
    sr = pydicom.dcmread(data_dir / path)
    texts = [item.TextValue for item in _content_items(sr) if item.ValueType == "TEXT"
             and item.ConceptNameCodeSequence[0].CodeMeaning == "Comment"]
    assert len(texts) == 1 and texts[0].startswith("Analysis not performed: RuntimeError: simulated crash")
    verdicts = [item.ConceptCodeSequence[0].CodeMeaning for item in _content_items(sr) if item.ValueType == "CODE"
                and item.ConceptNameCodeSequence[0].CodeMeaning == "Plan review verdict"]
    assert verdicts == ["Not Evaluated"]


def _content_items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_unreadable_member_is_a_permanent_error(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    with pytest.raises(PermanentError):
        review_plan_study([bad])


def test_rtqa_worker_command_runs_until_terminated(data, rt_data):
    data_dir, store = data
    _ready(store, [rt_data / "raystation-proton-beamdose-aptg"])
    process = subprocess.Popen([*rtqa_command(), "worker", "--data-dir", str(data_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={"RTQA_SHADOW_MODE": "true", **os.environ})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and store.index.query(
                "SELECT COUNT(*) FROM jobs WHERE state = 'done'")[0][0] < 2:
            time.sleep(0.05)
    finally:
        process.terminate()
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert out == ""  # logs go to stderr
    assert store.index.query("SELECT COUNT(*) FROM jobs WHERE state = 'done'")[0][0] == 2
    assert '"event": "job_done"' in err and "Small water phantom" not in err
