"""`rtqa review` end to end (subprocess): --json prints exactly Review.to_json(), exit codes 0 / 2, a stored plan
study by id, --out; and the worker's review function."""

from __future__ import annotations

import json
import subprocess

from conftest import dicom_files, rtqa_command

from rtqa_node.assemble import all_keys, evaluate
from rtqa_node.review import Review, Verdict
from rtqa_node.store import Store
from rtqa_node.worker import REVIEW, run_review

PROTON = "raystation-proton-ramp-aptg"


def _rtqa(*args, env=None):
    return subprocess.run([*rtqa_command(), *map(str, args)], capture_output=True, text=True, check=False, env=env)


def test_review_json_is_exactly_the_review_document(rt_data):
    result = _rtqa("review", rt_data / PROTON, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    expected = run_review(dicom_files(rt_data / PROTON), model="fused").to_json()  # the node's review
    document["metrics"].pop("review_s"), expected["metrics"].pop("review_s")
    assert document == expected
    # a phantom with no head-and-neck organs is outside the models' intended use: rules only, and it says why
    assert document["predictions"] == [] and document["metrics"]["ml"]["status"].startswith("not applicable")
    assert document["verdict"] == "per_protocol" and document["protocol"] is None
    assert all({"code", "severity", "message"} <= set(f) for f in document["findings"])
    assert "Dose_slopes" not in result.stderr and "WTR303030" not in result.stderr  # no PHI in the log


def test_review_table_and_explicit_protocol(rt_data):
    result = _rtqa("review", rt_data / PROTON, "--protocol", "QUANTEC-HN")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("verdict   ") and "QUANTEC-HN" in result.stdout
    assert "protocol.constraint_not_evaluable" in result.stdout


def test_bad_input_exits_2_with_a_clear_message(rt_data, tmp_path):
    missing = _rtqa("review", tmp_path / "nothing-here")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _rtqa("review", empty).returncode == 2
    unknown = _rtqa("review", rt_data / PROTON, "--protocol", "NOPE")
    assert unknown.returncode == 2 and "unknown protocol 'NOPE'" in unknown.stderr
    not_stored = _rtqa("review", "ps-000000000000", "--data-dir", tmp_path / "nodata")
    assert not_stored.returncode == 2 and "no node data" in not_stored.stderr


def test_review_of_a_stored_plan_study_by_id_with_out(rt_data, tmp_path):
    data_dir = tmp_path / "data"
    store = Store(data_dir)
    try:
        for path in dicom_files(rt_data / PROTON):
            store.import_file(path)
        with store.index.transaction() as conn:
            for key in all_keys(conn):
                evaluate(conn, key, stable_age_s=0.0, job_max_attempts=1)
        (ps_id,) = [r[0] for r in store.index.query("SELECT id FROM plan_studies")]
    finally:
        store.close()
    out = tmp_path / "out"
    result = _rtqa("review", ps_id, "--data-dir", data_dir, "--json", "--out", out)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["metrics"]["objects"] == {"CT": 0, "RTSTRUCT": 1, "RTPLAN": 1, "RTDOSE": 3}
    assert json.loads((out / "review.json").read_text()) == document
    assert (out / f"{ps_id}-r1-sr.dcm").exists()  # the node's outputs (rtqa_node.report.outputs)


def test_the_worker_runs_the_real_review(rt_data, tmp_path):
    assert REVIEW is run_review
    review = run_review(dicom_files(rt_data / PROTON))
    assert isinstance(review, Review) and review.verdict is Verdict.PER_PROTOCOL
    assert '"RTDOSE": 3' in json.dumps(review.to_json())  # the job result (jobs.result) counts the objects
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"garbage")
    assert run_review([bad]).verdict is Verdict.NOT_EVALUABLE  # a result, not a crash
    # Settings.review_protocol reaches the review
    assert run_review(dicom_files(rt_data / PROTON), configured_protocol="QUANTEC-HN").protocol == "QUANTEC-HN"


def test_the_plans_clinical_trial_protocol_id_selects_the_protocol(rt_data, tmp_path):
    import pydicom

    from rtqa_node.checks.pipeline import choose_protocol
    from rtqa_node.rt.plan_study import load_folder

    for path in dicom_files(rt_data / PROTON):
        ds = pydicom.dcmread(path)
        if ds.Modality == "RTPLAN":
            ds.ClinicalTrialProtocolID = "RTOG 0522"
            ds.save_as(tmp_path / path.name)
        else:
            (tmp_path / path.name).symlink_to(path)
    selection = choose_protocol(load_folder(tmp_path))
    assert (selection.protocol.id, selection.how) == ("NRG-RTOG-STYLE-HN", "clinical_trial_protocol_id")
    assert choose_protocol(load_folder(tmp_path), explicit="QUANTEC-HN").protocol.id == "QUANTEC-HN"


def test_verdict_exit_code_is_opt_in(rt_data):
    """0 whatever the verdict by contract; --verdict-exit-code maps the verdict for CI gates."""
    incomplete = rt_data / "raystation-proton-beamdose-aptg"  # no RTSTRUCT: not evaluable
    assert _rtqa("review", incomplete).returncode == 0
    assert _rtqa("review", incomplete, "--verdict-exit-code").returncode == 5
    assert _rtqa("review", rt_data / "eclipse-breast-boost-fullct-weasis", "--verdict-exit-code").returncode == 0
