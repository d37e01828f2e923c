"""Assembly of plan studies from the public chains, in shuffled order, in-process (Store.import_file)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pydicom
import pytest
from conftest import dicom_files, wait_until
from pipeline_helpers import new_plan_revision

from rtqa_node.assemble import Assembler, all_keys, evaluate
from rtqa_node.store import Store

STABLE_AGE_S = 60.0


def _import(store: Store, folders: list[Path], seed: int = 0) -> None:
    files = [f for folder in folders for f in dicom_files(folder)]
    random.Random(seed).shuffle(files)
    for path in files:
        store.import_file(path)


def _evaluate_all(store: Store, *, now_s: float | None = None) -> dict:
    with store.index.transaction() as conn:
        decisions = [evaluate(conn, key, stable_age_s=STABLE_AGE_S, job_max_attempts=3, now_s=now_s)
                     for key in sorted(all_keys(conn))]
    return {d.plan_study_id: d for d in decisions if d is not None}


def _plan_studies(store: Store) -> dict[str, dict]:
    return {r["id"]: dict(r) for r in store.index.query("SELECT * FROM plan_studies")}


def _members(store: Store, ps_id: str, revision: int) -> dict[str, int]:
    return {r[0]: r[1] for r in store.index.query(
        "SELECT role, COUNT(*) FROM plan_study_members WHERE plan_study_id = ? AND revision = ? GROUP BY role",
        (ps_id, revision))}


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data")
    yield s
    s.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_complete_chain_in_any_order_is_ready_once_with_no_reason(store, rt_data, seed):
    _import(store, [rt_data / "eclipse-breast-boost-fullct-weasis"], seed)
    decisions = _evaluate_all(store)
    assert len(decisions) == 1
    (ps,) = _plan_studies(store).values()
    assert ps["state"] == "ready" and ps["reason"] == "" and ps["revision"] == 1
    assert _members(store, ps["id"], 1) == {"dose": 1, "image": 98, "plan": 1, "rtstruct": 1}
    assert store.index.query("SELECT trigger FROM plan_study_revisions")[0][0] == "complete"
    # evaluating again (an identical re-send, a restart) creates nothing new
    _evaluate_all(store)
    store.import_file(rt_data / "eclipse-breast-boost-fullct-weasis" / "1.2.246.352.71.5.320687012.24189.20090603083342")
    _evaluate_all(store)
    assert store.index.query("SELECT COUNT(*) FROM jobs")[0][0] == 1


def test_incomplete_ct_waits_then_stable_age_makes_it_ready_with_the_reason(store, rt_data):
    _import(store, [rt_data / "eclipse-breast-boost-dicompyler"])
    _evaluate_all(store)
    (ps,) = _plan_studies(store).values()
    assert ps["state"] == "waiting"
    assert ps["reason"] == "CT series has 1 of 98 slices"
    assert store.index.query("SELECT COUNT(*) FROM jobs")[0][0] == 0
    _evaluate_all(store, now_s=ps["last_object_at_s"] + STABLE_AGE_S + 1)
    (ps,) = _plan_studies(store).values()
    assert ps["state"] == "ready" and ps["reason"] == "CT series has 1 of 98 slices"
    revision = store.index.query("SELECT trigger, reason FROM plan_study_revisions")[0]
    assert tuple(revision) == ("stable_age", "CT series has 1 of 98 slices")
    assert store.index.query("SELECT kind, state FROM jobs")[0][:] == ("review", "queued")


def test_grouping_follows_references_not_patient_id(store, rt_data):
    """RayStation: plan and RS/RD carry different PatientIDs; one plan study with 3 doses, CT missing."""
    _import(store, [rt_data / "raystation-proton-ramp-aptg"], seed=3)
    _evaluate_all(store)
    (ps,) = _plan_studies(store).values()
    assert ps["reason"] == "CT series has 0 of 61 slices"
    _evaluate_all(store, now_s=ps["last_object_at_s"] + STABLE_AGE_S + 1)
    assert _members(store, ps["id"], 1) == {"dose": 3, "plan": 1, "rtstruct": 1}


def test_sets_sharing_only_a_patient_are_not_merged_and_beam_dose_counts(store, rt_data):
    _import(store, [rt_data / "raystation-proton-beamdose-aptg", rt_data / "eclipse-proton-plans-aptg"], seed=4)
    _evaluate_all(store)
    studies = _plan_studies(store)
    assert len(studies) == 5  # 1 RayStation plan + 4 Eclipse/ARIA plans, all apart
    by_plan = {ps["plan_sop_instance_uid"]: ps for ps in studies.values()}
    beam = by_plan["1.2.752.243.1.1.20260105182345801.4870.23686"]
    # its only dose is a BEAM dose: no "waiting for RTDOSE", only the missing structure set
    assert beam["reason"] == "RTSTRUCT 1.2.752.243.1.1.20260105182345799.4860.55357 not received"
    for uid, ps in by_plan.items():
        if ps is not beam:
            assert ps["state"] == "waiting"
            assert "not received" in ps["reason"] and "RTSTRUCT" in ps["reason"]
            assert f"waiting for RTDOSE referencing plan …{'.'.join(uid.split('.')[-2:])}" in ps["reason"]


def test_loose_structure_sets_and_doses_without_plans_make_no_plan_study(store, rt_data):
    """dvh-analytic: shared series UIDs and duplicate SOP UIDs, doses referencing an absent plan."""
    assembler = Assembler(store.index.path, stable_age_s=STABLE_AGE_S, job_max_attempts=3)
    store.on_stored = assembler.notify
    assembler.start()
    try:
        _import(store, [rt_data / "dvh-analytic"])
        assert assembler.wait_idle(30)
    finally:
        assembler.stop()
    assert _plan_studies(store) == {}
    assert store.index.query("SELECT COUNT(*) FROM jobs")[0][0] == 0


def test_new_plan_instance_or_changed_object_is_a_new_revision_that_supersedes(store, rt_data, tmp_path):
    _import(store, [rt_data / "eclipse-breast-boost-fullct-weasis"])
    _evaluate_all(store)
    (ps_id,) = _plan_studies(store)
    # a new plan SOP instance on the same structure set, same label: revision 2 (no dose references it yet,
    # so it waits; the stable age makes it ready)
    new_uid = new_plan_revision(rt_data / "eclipse-breast-boost-fullct-weasis" /
                                "1.2.246.352.71.5.320687012.24189.20090603083342", tmp_path / "rp2.dcm")
    store.import_file(tmp_path / "rp2.dcm")
    _evaluate_all(store)
    ps = _plan_studies(store)[ps_id]
    assert (ps["state"], ps["plan_sop_instance_uid"]) == ("waiting", new_uid)
    _evaluate_all(store, now_s=ps["last_object_at_s"] + STABLE_AGE_S + 1)
    jobs = store.index.query("SELECT id, revision, supersedes FROM jobs ORDER BY id")
    assert [tuple(j) for j in jobs] == [(1, 1, None), (2, 2, 1)]
    # a changed structure set (same SOP Instance UID, other content: stored as version 2) -> revision 3
    rs = pydicom.dcmread(rt_data / "eclipse-breast-boost-fullct-weasis" /
                         "1.2.246.352.71.4.320687012.3190.20090511122144")
    rs.StructureSetLabel = "CT_1 edited"
    rs.save_as(tmp_path / "rs2.dcm", enforce_file_format=True)
    store.import_file(tmp_path / "rs2.dcm")
    _evaluate_all(store, now_s=time.time() + STABLE_AGE_S + 1)
    jobs = store.index.query("SELECT id, revision, supersedes FROM jobs ORDER BY id")
    assert [tuple(j) for j in jobs][-1] == (3, 3, 2)


def test_stable_age_timer_fires_and_is_rearmed_after_restart(store, rt_data):
    """apscheduler fires the fallback; a new Assembler on the same index (a restart) catches up."""
    assembler = Assembler(store.index.path, stable_age_s=0.4, job_max_attempts=3)
    store.on_stored = assembler.notify
    assembler.start()
    try:
        _import(store, [rt_data / "eclipse-breast-boost-dicompyler"])
        assert assembler.wait_idle(10)
        (ps,) = _plan_studies(store).values()
        assert ps["state"] == "waiting"
        wait_until(lambda: _plan_studies(store)[ps["id"]]["state"] == "ready", timeout_s=10, what="timer")
    finally:
        assembler.stop()
    # a second chain arrives while no assembler runs (a node killed after acknowledging it)
    store.on_stored = None
    _import(store, [rt_data / "raystation-proton-beamdose-aptg"])
    assert len(_plan_studies(store)) == 1
    restarted = Assembler(store.index.path, stable_age_s=0.4, job_max_attempts=3)
    restarted.start()
    try:
        wait_until(lambda: len(_plan_studies(store)) == 2 and all(
            p["state"] == "ready" for p in _plan_studies(store).values()), timeout_s=10, what="rebuilt timers")
    finally:
        restarted.stop()
    assert store.index.query("SELECT COUNT(*) FROM jobs")[0][0] == 2


def test_plan_label_inside_a_read_snapshot_survives_a_commit_by_another_connection(store, rt_data):
    """The assembler reads plan labels inside a read snapshot while ingests commit; the label cache's write
    must not fail the read (it failed a whole assembly batch: CI, test_dispatch, 'database is locked')."""
    import sqlite3

    from rtqa_node.assemble import plan_label

    _import(store, [rt_data / "eclipse-breast-boost-fullct-weasis"])
    (plan_id,) = [r[0] for r in store.index.query("SELECT id FROM instances WHERE modality = 'RTPLAN'")]
    (db_file,) = [r["file"] for r in store.index.query("PRAGMA database_list") if r["name"] == "main"]
    other = sqlite3.connect(db_file, isolation_level=None)
    try:
        with store.index.snapshot() as conn:
            conn.execute("SELECT COUNT(*) FROM instances").fetchone()  # the snapshot starts here
            other.execute("INSERT OR REPLACE INTO plan_labels (instance_id, rt_plan_label) "
                          "SELECT id, 'other' FROM instances WHERE modality = 'CT' LIMIT 1")
            label = plan_label(conn, plan_id)
            assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] > 0  # the snapshot still reads
    finally:
        other.close()
    assert label == pydicom.dcmread(next(f for f in dicom_files(rt_data / "eclipse-breast-boost-fullct-weasis")
                                         if pydicom.dcmread(f, stop_before_pixels=True).Modality == "RTPLAN"),
                                    stop_before_pixels=True).get("RTPlanLabel", "").strip()
    # outside the snapshot the label is cached as usual
    with store.index.transaction() as conn:
        assert plan_label(conn, plan_id) == label
    assert store.index.query("SELECT rt_plan_label FROM plan_labels WHERE instance_id = ?", (plan_id,))[0][0] == label


def test_a_failed_evaluation_is_retried_not_dropped(store, rt_data, monkeypatch, caplog):
    """An evaluation that fails (here: twice, as a transient 'database is locked') is retried after a delay; the
    plan study becomes ready without any other object arriving."""
    import sqlite3

    from rtqa_node import assemble

    real, calls = assemble.evaluate, []

    def flaky(conn, key, **kwargs):
        calls.append(key)
        if len(calls) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return real(conn, key, **kwargs)

    monkeypatch.setattr(assemble, "evaluate", flaky)
    monkeypatch.setattr(Assembler, "RETRY_S", (0.2, 1.0))
    _import(store, [rt_data / "eclipse-breast-boost-fullct-weasis"])  # stored before the assembler starts
    assembler = Assembler(store.index.path, stable_age_s=STABLE_AGE_S, job_max_attempts=3)
    assembler.start()  # its first batch is the start-up rescan: it fails, then its retry fails
    try:
        wait_until(lambda: [p["state"] for p in _plan_studies(store).values()] == ["ready"], timeout_s=10,
                   what="the retried evaluation")
    finally:
        assembler.stop()
    assert len(calls) == 3 and len(set(calls)) == 1
    retries = [r for r in caplog.records if r.getMessage() == "assembly_retry"]
    assert [r.in_s for r in retries] == [0.2, 0.4]  # doubled after the second consecutive failure
    assert store.index.query("SELECT COUNT(*) FROM jobs")[0][0] == 1
