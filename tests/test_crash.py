"""kill -9 the node while storescu sends a CT series, 20+ times: nothing acknowledged is ever lost."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from conftest import dicom_files, peer_env, start_node
from dicom_peers import storescu_results
from rtqa_node.store.encoding import check_dataset_encoding, read_part10_header

ROUNDS = 24


@pytest.fixture(scope="module")
def ct_series(rt_data, tmp_path_factory) -> dict[str, str]:
    """The Weasis CT series (98 slices) decoded to explicit VR little endian, so that storescu sends the bytes
    unchanged and the stored content digest can be compared with the source file's. {path: content digest}"""
    out = tmp_path_factory.mktemp("ct")
    series = {}
    for path in dicom_files(rt_data / "eclipse-breast-boost-fullct-weasis"):
        ds = pydicom.dcmread(path)
        if ds.Modality != "CT":
            continue
        ds.decompress()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        target = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target, enforce_file_format=True)
        data = target.read_bytes()
        header = read_part10_header(data)
        series[str(target)] = check_dataset_encoding(data, header.dataset_offset, header.transfer_syntax_uid)
    assert len(series) == 98
    return series


def _published_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "objects").rglob("*") if p.is_file()]


def _complete(path: Path) -> bool:
    data = path.read_bytes()
    try:
        header = read_part10_header(data)
        check_dataset_encoding(data, header.dataset_offset, header.transfer_syntax_uid)
    except Exception:
        return False
    return True


@pytest.mark.slow
def test_sigkill_during_ingest_never_loses_an_acknowledged_object(ct_series, tmp_path):
    rng = random.Random(20261125)
    data_dir = tmp_path / "node"
    acknowledged: dict[str, str] = {}  # source path -> content digest, for every success storescu saw
    killed_mid_transfer = 0
    files = sorted(ct_series)
    for round_number in range(ROUNDS):
        node = start_node(data_dir)
        rng.shuffle(files)
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", "RTQA", "-nh", "127.0.0.1", str(node.port), *files],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=peer_env(),
        )
        # the node stores ~200 slices/s: a kill within 0.3 s lands while the 98 slices are still being sent
        time.sleep(rng.uniform(0.0, 0.3))
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(10)
        output, _ = sender.communicate(timeout=60)
        results = storescu_results(output)
        successes = [name for name, result in results.items() if result == "Success"]
        killed_mid_transfer += len(successes) < len(files)
        acknowledged.update({name: ct_series[name] for name in successes})
        # What a crash leaves visible in the store is only ever complete objects (temporaries live in tmp/).
        assert all(_complete(p) for p in _published_files(data_dir)), f"partial file after round {round_number}"

    # Restart once more: recovery runs, then everything acknowledged must be there, intact and indexed.
    node = start_node(data_dir)
    node.stop()
    conn = sqlite3.connect(data_dir / "index.sqlite")
    rows = conn.execute("SELECT path, content_sha256 FROM instances").fetchall()
    conn.close()
    print(f"rounds interrupted mid-transfer: {killed_mid_transfer}/{ROUNDS}; acknowledged objects: {len(acknowledged)}; "
          f"rows after recovery: {len(rows)}")
    assert killed_mid_transfer >= 20, "the kills did not interrupt transfers; the test proves nothing"
    assert len(acknowledged) > 0
    stored_content = {content for _, content in rows}
    lost = [name for name, digest in acknowledged.items() if digest not in stored_content]
    assert lost == []
    for rel, content_sha256 in rows:
        data = (data_dir / rel).read_bytes()
        header = read_part10_header(data)
        assert check_dataset_encoding(data, header.dataset_offset, header.transfer_syntax_uid) == content_sha256
    indexed = {data_dir / rel for rel, _ in rows}
    assert set(_published_files(data_dir)) == indexed, "a published file is not indexed after recovery"
    assert list((data_dir / "tmp").iterdir()) == []
