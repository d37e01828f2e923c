"""The worker produces the report objects for each job and dispatch sends each destination the outputs it is
configured for; DCMTK storescp accepts every kind over C-STORE; a new revision's SR names the earlier one."""

from __future__ import annotations

import time

import pydicom
import pytest
from conftest import dicom_files
from pipeline_helpers import new_plan_revision, start_receiver
from report_helpers import dciodvfy_errors, hn_review, synth_plan_study

from rtqa_node.assemble import all_keys, evaluate
from rtqa_node.config import Destination, load_settings
from rtqa_node.dispatch import dispatch_revision
from rtqa_node.report.outputs import result_uid
from rtqa_node.store import Store
from rtqa_node.store.store import Arrival
from rtqa_node.worker import Worker

SOP_CLASSES = {"sr": "1.2.840.10008.5.1.4.1.1.88.34", "riskmap_rtdose": "1.2.840.10008.5.1.4.1.1.481.2",
               "parametric_map": "1.2.840.10008.5.1.4.1.1.30", "pdf": "1.2.840.10008.5.1.4.1.1.104.1"}


def _import(store: Store, files) -> list[str]:
    for path in files:
        store.import_file(path, Arrival(calling_ae="TPS_A"))
    with store.index.transaction() as conn:
        for key in all_keys(conn):
            evaluate(conn, key, stable_age_s=0.0, job_max_attempts=2)
    return [r[0] for r in store.index.query("SELECT id FROM plan_studies ORDER BY id")]


def _drain(worker: Worker, store: Store, timeout_s: float = 60.0) -> None:
    """Run jobs until every job is done or dead (a retried dispatch included), or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and store.index.query(
            "SELECT COUNT(*) FROM jobs WHERE state NOT IN ('done', 'dead')")[0][0]:
        if worker.run_once() is None:
            time.sleep(0.05)
    states = [dict(r) for r in store.index.query("SELECT kind, state, last_error FROM jobs")]
    assert all(r["state"] == "done" for r in states), states


@pytest.fixture
def node(tmp_path):
    folder = synth_plan_study(tmp_path / "synth")
    store = Store(tmp_path / "data")
    yield folder, tmp_path / "data", store
    store.close()


def test_each_destination_gets_the_outputs_it_is_configured_for_and_storescp_accepts_them(node, tmp_path):
    folder, data_dir, store = node
    tps, pacs = start_receiver(tmp_path / "tps"), start_receiver(tmp_path / "pacs")
    try:
        (ps_id,) = _import(store, dicom_files(folder))
        every_output = ("sr", "riskmap_rtdose", "parametric_map", "pdf")
        tps_dest = Destination(host="127.0.0.1", port=tps.port, ae_title="TPS", outputs=every_output)
        pacs_dest = Destination(host="127.0.0.1", port=pacs.port, ae_title="TPS", outputs=("sr", "parametric_map",
                                                                                             "pdf"))
        settings = load_settings(None, data_dir=data_dir, destinations={"TPS_A": tps_dest},
                                 default_destination=pacs_dest, dispatch_retry_base_s=0.2)
        worker = Worker(settings, review=lambda files: hn_review())
        try:
            _drain(worker, store)
        finally:
            worker.close()
        outbox = {r["sop_class_uid"]: r for r in store.index.query("SELECT * FROM outbox")}
        assert set(outbox) == set(SOP_CLASSES.values())  # the union of what the destinations want
        for kind, sop_class in SOP_CLASSES.items():
            uid = result_uid(ps_id, 1, "review" if kind == "sr" else kind)
            assert outbox[sop_class]["sop_instance_uid"] == uid
            assert dciodvfy_errors(data_dir / outbox[sop_class]["path"]) == [], kind
        assert (data_dir / "outbox" / ps_id / "r1-summary.pdf").read_bytes().startswith(b"%PDF")
        # the plan came from TPS_A: its destination got all four kinds over C-STORE (DCMTK storescp)
        received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in tps.out_dir.iterdir()}
        assert received == set(SOP_CLASSES.values())
        # the same revision dispatched to the PACS-style destination: SR, Parametric Map and PDF only
        as_pacs = load_settings(None, data_dir=data_dir, default_destination=pacs_dest)
        outcome = dispatch_revision(as_pacs, store.index, ps_id, 1)
        assert outcome.objects == 3
        received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in pacs.out_dir.iterdir()}
        assert received == {SOP_CLASSES[k] for k in ("sr", "parametric_map", "pdf")}
    finally:
        tps.stop()
        pacs.stop()


def test_a_new_revision_sr_references_the_sr_it_supersedes(node, tmp_path):
    folder, data_dir, store = node
    settings = load_settings(None, data_dir=data_dir, shadow_mode=True)
    (ps_id,) = _import(store, dicom_files(folder))
    worker = Worker(settings, review=lambda files: hn_review())
    try:
        _drain(worker, store)
        new_plan_revision(folder / "RP.dcm", tmp_path / "rp2.dcm")
        assert _import(store, [tmp_path / "rp2.dcm"]) == [ps_id]
        _drain(worker, store)
    finally:
        worker.close()
    rows = store.index.query("SELECT revision, path FROM outbox WHERE sop_class_uid = ? ORDER BY revision",
                             (SOP_CLASSES["sr"],))
    assert [r["revision"] for r in rows] == [1, 2]
    second = pydicom.dcmread(data_dir / rows[1]["path"])
    (pre,) = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert pre.ReferencedSOPInstanceUID == result_uid(ps_id, 1, "review")
    assert second.SOPInstanceUID == result_uid(ps_id, 2, "review")
    assert dciodvfy_errors(data_dir / rows[1]["path"]) == []


def test_the_default_worker_adds_the_models_predictions_attention_risk_map_and_queues_by_predicted_risk(node):
    """Settings.review_model defaults to the shipped fused model: the worker's real review (rules, then the
    model, loaded once per process) puts four predictions into the SR and the PDF, sends the xerostomia
    attention as the risk map, and queues the delivery at the predicted risk; review_model None: rules only."""
    import json
    import subprocess

    import numpy as np

    from rtqa_node.dispatch import DISPATCH_PRIORITY, review_risk
    from rtqa_node.ml.inference import load_model
    from rtqa_node.review import Prediction, Review
    from rtqa_node.rt.plan_study import load_folder

    folder, data_dir, store = node
    (ps_id,) = _import(store, dicom_files(folder))
    outputs = ("sr", "riskmap_rtdose", "pdf")
    settings = load_settings(None, data_dir=data_dir, shadow_mode=True,
                             default_destination=Destination(host="127.0.0.1", port=1, ae_title="X", outputs=outputs))
    assert settings.review_model == "fused"
    load_model.cache_clear()
    worker = Worker(settings)
    try:
        _drain(worker, store, timeout_s=120.0)
    finally:
        worker.close()
    job = {r["kind"]: dict(r) for r in store.index.query("SELECT * FROM jobs")}
    result = json.loads(job["review"]["result"])
    assert result["metrics"]["ml"]["status"] == "ok", result["metrics"]["ml"]
    predictions = [Prediction(p["target"], p["probability"], p["model"], p["model_version"]) for p in result["predictions"]]
    assert [p.target for p in predictions] == ["qa_major", "xerostomia_severe", "dysphagia_severe", "local_control"]
    assert {p.model for p in predictions} == {"fused"}
    assert all(p["top_instances"] for p in result["predictions"])
    # the organs behind each prediction: tabular instances, then the spatial side's regions; the shipped
    # xerostomia branch attends the parotids only
    xerostomia_top = next(p["top_instances"] for p in result["predictions"] if p["target"] == "xerostomia_severe")
    regions = [t["name"] for t in xerostomia_top if t["name"].endswith(" (CT+dose region)")]
    assert regions and all(r.startswith("Parotid_") for r in regions), xerostomia_top
    risk = review_risk(Review((), None, predictions=tuple(predictions)))
    assert job["dispatch"]["priority"] == DISPATCH_PRIORITY + round(100 * risk)
    assert load_model.cache_info().misses == 1

    rows = {r["sop_class_uid"]: r for r in store.index.query("SELECT * FROM outbox")}
    text = subprocess.run(["dsrdump", str(data_dir / rows[SOP_CLASSES["sr"]]["path"])], capture_output=True,
                          text=True, check=True).stdout
    assert text.count('(,,"Probability")') == 4 and '"Algorithm Name")="fused"' in text
    assert "(CT+dose region)" in text
    assert dciodvfy_errors(data_dir / rows[SOP_CLASSES["sr"]]["path"]) == []
    rtdose = pydicom.dcmread(data_dir / rows[SOP_CLASSES["riskmap_rtdose"]]["path"])
    assert "attention of fused" in rtdose.ImageComments
    values = rtdose.pixel_array * float(rtdose.DoseGridScaling)
    assert values.max() == pytest.approx(1.0, abs=1e-3)
    # the shipped xerostomia branch is focused on a sub-region of the parotids: the map lies on the glands
    from scipy.ndimage import binary_dilation

    from rtqa_node.rt.geometry import rasterise_to_grid
    from rtqa_node.rt.plan_study import plan_dose

    study = load_folder(folder)
    dose = plan_dose(study)
    glands = np.zeros(dose.geometry.shape, dtype=bool)
    for s in study.structure_set_for(dose).structures:
        if s.name.startswith("Parotid"):
            glands |= rasterise_to_grid(s, dose.geometry) > 0
    near = binary_dilation(glands, iterations=2)
    assert values[near].sum() > 0.9 * values.sum() > 0
    assert dciodvfy_errors(data_dir / rows[SOP_CLASSES["riskmap_rtdose"]]["path"]) == []
    summary = data_dir / "outbox" / ps_id / "r1-summary.pdf"
    text = subprocess.run(["pdftotext", "-layout", str(summary), "-"], capture_output=True, text=True,
                          check=True).stdout
    xerostomia = next(p for p in predictions if p.target == "xerostomia_severe")
    assert f"severe xerostomia {100 * xerostomia.probability:.0f} %" in text

    # the same plan study with the model off: the rule-based review, the interim OAR-excess map
    rules_only = load_settings(None, data_dir=data_dir, review_model="none")
    assert rules_only.review_model is None
    from rtqa_node.worker import build_results, run_review

    review = run_review(dicom_files(folder), model=rules_only.review_model)
    assert review.predictions == () and review.attention is None
    objects = build_results(dicom_files(folder), review, plan_study_id=ps_id, revision=1,
                            kinds=("sr", "riskmap_rtdose"), predecessor=None).objects
    (riskmap_obj,) = [o for o in objects if o.kind == "riskmap_rtdose"]
    assert "attention" not in riskmap_obj.dataset.ImageComments
