"""The store without a socket: durable ingest, identity, duplicates and versions, refusals, recovery."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from conftest import dicom_files
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from rtqa_node.store import Arrival, Outcome, Refusal, Store, StoreRefused
from rtqa_node.store.describe import (
    IMAGE_TAGS,
    REFERENCE_PATHS,
    DescriptionError,
    RefKind,
    describe,
    describe_image,
    describe_walked,
)
from rtqa_node.store.encoding import EncodingError, check_dataset_encoding, read_part10_header, walk_dataset


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data")
    yield s
    s.close()


def dataset_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return data[read_part10_header(data).dataset_offset :]


def test_every_public_file_is_stored_intact_or_refused_with_a_reason(store, rt_data):
    refused = {}
    for path in dicom_files(rt_data):
        try:
            result = store.import_file(path)
        except StoreRefused as exc:
            refused[path.relative_to(rt_data).as_posix()] = exc.reason
            continue
        stored = result.path.read_bytes()
        original = path.read_bytes()
        if original[128:132] == b"DICM":
            # Part 10 files are kept byte for byte: the same data set under the same transfer syntax.
            assert dataset_bytes(result.path) == dataset_bytes(path) or result.outcome is Outcome.DUPLICATE
        header = read_part10_header(stored)
        assert check_dataset_encoding(stored, header.dataset_offset, header.transfer_syntax_uid) == \
            store.index.query("SELECT content_sha256 FROM instances WHERE id = ?", (result.instance_id,))[0][0]
    # Exactly the two malformed files of the collection are refused, each for what is wrong with it.
    assert refused == {
        "pydicom-rt-testfiles/rtplan_truncated.dcm": Refusal.UNPARSEABLE,
        "reg-malformed-onkodicom/spatial_reg.dcm": Refusal.UNPARSEABLE,
    }
    rows = store.index.query("SELECT COUNT(*), COUNT(DISTINCT sop_instance_uid) FROM instances")[0]
    assert rows[0] > rows[1]  # the collection's duplicate SOP Instance UIDs with other content became versions


def test_index_records_identity_and_rt_references(store, rt_data):
    chain = rt_data / "eclipse-breast-boost-dicompyler"
    results = {p.name: store.import_file(p) for p in dicom_files(chain)}
    rows = {r["modality"]: r for r in store.index.query("SELECT * FROM instances")}
    assert set(rows) == {"CT", "RTSTRUCT", "RTPLAN", "RTDOSE"}
    assert {r["frame_of_reference_uid"] for r in rows.values()} == {"2.16.840.1.113662.2.12.0.3057.1241703565.36"}
    refs = {(r["kind"], r["uid"]) for r in store.index.query(
        "SELECT kind, uid FROM refs WHERE instance_id = ?", (results["rtdose.dcm"].instance_id,))}
    assert refs == {
        ("rtplan", "1.2.246.352.71.5.320687012.24189.20090603083342"),
        ("rtstruct", "1.2.246.352.71.4.320687012.3190.20090511122144"),
    }
    images = store.index.query(
        "SELECT COUNT(*) FROM refs WHERE instance_id = ? AND kind = 'image'", (results["rtss.dcm"].instance_id,))
    assert images[0][0] == 98
    # No UID text in any stored path.
    for row in store.index.query("SELECT path, sop_instance_uid, study_instance_uid FROM instances"):
        assert row["sop_instance_uid"] not in row["path"] and row["study_instance_uid"] not in row["path"]


def test_same_object_twice_is_idempotent(store, rt_data):
    path = rt_data / "eclipse-breast-boost-dicompyler" / "rtplan.dcm"
    first = store.import_file(path)
    second = store.import_file(path)
    assert (first.outcome, second.outcome) == (Outcome.STORED, Outcome.DUPLICATE)
    assert second.instance_id == first.instance_id
    assert store.index.query("SELECT COUNT(*), MAX(receive_count) FROM instances")[0][:] == (1, 2)
    assert len(list(store.objects_dir.rglob("*.dcm"))) == 1


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_same_content_in_another_uncompressed_encoding_is_a_duplicate(store, rt_data, tmp_path, transfer_syntax):
    original = rt_data / "eclipse-breast-boost-dicompyler" / "rtss.dcm"  # implicit VR, undefined lengths
    ds = pydicom.dcmread(original)
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    recoded = tmp_path / "recoded.dcm"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(recoded, enforce_file_format=True)
    assert dataset_bytes(recoded) != dataset_bytes(original)
    assert store.import_file(original).outcome is Outcome.STORED
    assert store.import_file(recoded).outcome is Outcome.DUPLICATE


def test_different_content_under_a_known_uid_is_kept_as_a_new_version(store, rt_data):
    uncompressed = rt_data / "eclipse-breast-boost-dicompyler" / "ct.0.dcm"
    lossy = rt_data / "eclipse-breast-boost-fullct-weasis" / "2.16.840.1.113662.2.12.0.3057.1241703565.44"
    first, second = store.import_file(uncompressed), store.import_file(lossy)
    assert (first.outcome, second.outcome) == (Outcome.STORED, Outcome.NEW_VERSION)
    assert (first.version, second.version) == (1, 2)
    assert first.path != second.path and first.path.exists() and second.path.exists()
    assert dataset_bytes(first.path) == dataset_bytes(uncompressed)
    assert dataset_bytes(second.path) == dataset_bytes(lossy)


def test_truncated_plan_is_refused_and_leaves_nothing(store, rt_data):
    with pytest.raises(StoreRefused) as info:
        store.import_file(rt_data / "pydicom-rt-testfiles" / "rtplan_truncated.dcm")
    assert info.value.reason is Refusal.UNPARSEABLE
    assert "truncated" in str(info.value)
    assert list(store.objects_dir.rglob("*")) == [] and list(store.tmp_dir.iterdir()) == []
    assert store.index.counts()["instances"] == 0


@pytest.mark.parametrize("cut", [200, 1000, 4000, -1])
def test_truncation_anywhere_is_detected(rt_data, cut):
    data = (rt_data / "eclipse-breast-boost-dicompyler" / "rtplan.dcm").read_bytes()
    header = read_part10_header(data)
    check_dataset_encoding(data, header.dataset_offset, header.transfer_syntax_uid)
    with pytest.raises(EncodingError):
        check_dataset_encoding(data[: header.dataset_offset + cut] if cut > 0 else data[:-1],
                               header.dataset_offset, header.transfer_syntax_uid)


def test_object_over_the_size_limit_is_refused(tmp_path, rt_data):
    store = Store(tmp_path / "data", max_object_bytes=1_000_000)
    with pytest.raises(StoreRefused) as info:
        store.import_file(rt_data / "eclipse-breast-boost-dicompyler" / "rtdose.dcm")
    assert info.value.reason is Refusal.TOO_LARGE
    assert store.import_file(rt_data / "eclipse-breast-boost-dicompyler" / "rtplan.dcm").outcome is Outcome.STORED


def test_storage_below_the_free_space_floor_refuses(tmp_path, rt_data):
    store = Store(tmp_path / "data", min_free_bytes=2**62)
    with pytest.raises(StoreRefused) as info:
        store.import_file(rt_data / "eclipse-breast-boost-dicompyler" / "rtplan.dcm")
    assert info.value.reason is Refusal.NO_SPACE
    assert store.index.counts()["instances"] == 0


def test_unwritable_storage_refuses_and_acknowledges_nothing(tmp_path, rt_data):
    # Root ignores permission bits, so make the storage unwritable in a way that holds for everyone: the
    # directory the object must go to cannot be created because a file stands where it belongs.
    store = Store(tmp_path / "data")
    path = rt_data / "eclipse-breast-boost-dicompyler" / "rtplan.dcm"
    probe = Store(tmp_path / "probe").import_file(path)
    blocked = store.data_dir / Path(probe.path.relative_to(tmp_path / "probe")).parts[0] / \
        Path(probe.path.relative_to(tmp_path / "probe")).parts[1]
    blocked.write_bytes(b"not a directory")
    with pytest.raises(StoreRefused) as info:
        store.import_file(path)
    assert info.value.reason is Refusal.UNWRITABLE
    assert store.index.counts()["instances"] == 0 and list(store.tmp_dir.iterdir()) == []


def test_recover_removes_temp_files_and_indexes_published_orphans(tmp_path, rt_data):
    store = Store(tmp_path / "data")
    result = store.import_file(rt_data / "eclipse-breast-boost-dicompyler" / "rtplan.dcm")
    # Simulate a crash after rename but before COMMIT: the file is published, its row is not there.
    store.index.conn.execute("DELETE FROM refs")
    store.index.conn.execute("DELETE FROM instances")
    (store.tmp_dir / "half-received.dcm").write_bytes(b"\0" * 100)
    partial = result.path.with_name(result.path.name + ".partial")
    partial.write_bytes(b"x")
    report = store.recover()
    assert (report.temp_files_removed, report.orphans_indexed, report.orphans_removed) == (1, 1, 1)
    row = store.index.query("SELECT path, calling_ae FROM instances")[0]
    # the file carries its arrival (extended attribute): the rebuilt row names the real sender
    assert (store.data_dir / row["path"]) == result.path and row["calling_ae"] == "IMPORT"
    assert not partial.exists()
    assert store.recover().orphans_indexed == 0


ROW_COLUMNS = ("sop_instance_uid, sop_class_uid, modality, patient_id, study_instance_uid, series_instance_uid,"
               " frame_of_reference_uid, instance_number, transfer_syntax_uid, version, calling_ae, called_ae,"
               " peer_address, peer_port, received_at_s, path, size_bytes, dataset_offset_bytes, content_sha256")


def _rows(store):
    rows = store.index.query(f"SELECT {ROW_COLUMNS} FROM instances ORDER BY received_at_s")
    refs = store.index.query("SELECT i.sop_instance_uid, i.version, r.kind, r.uid FROM refs r"
                             " JOIN instances i ON i.id = r.instance_id ORDER BY 1, 2, 3, 4")
    return [tuple(r) for r in rows], [tuple(r) for r in refs]


def test_rows_lost_to_a_power_loss_are_rebuilt_from_the_files(tmp_path, rt_data):
    """Instance rows are committed without a WAL fsync (synchronous=NORMAL): a power loss may roll back the last
    ones although their objects were acknowledged. Each published file is fsync'd with its arrival attached, so
    recovery rebuilds exactly the rows that were lost, versions in arrival order included."""
    store = Store(tmp_path / "data")
    assert store.rows_rebuildable, "this test needs a file system with user extended attributes (/tmp: ext4)"
    chain = rt_data / "eclipse-breast-boost-dicompyler"
    sources = dicom_files(chain)
    for number, path in enumerate(sources):
        store.import_file(path, Arrival(calling_ae=f"TPS{number}", called_ae="RTQA", peer_address="10.1.2.3",
                                        peer_port=40000 + number))
    # a second version of the plan (different content under the same SOP Instance UID), received last
    ds = pydicom.dcmread(chain / "rtplan.dcm")
    ds.RTPlanLabel = "changed"
    changed = tmp_path / "rtplan-v2.dcm"
    ds.save_as(changed)
    assert store.import_file(changed, Arrival(calling_ae="TPS-V2")).outcome is Outcome.NEW_VERSION
    before = _rows(store)
    assert len(before[0]) == len(sources) + 1 and before[1]
    # The power loss: the WAL loses its tail, i.e. the last rows, the plan's two versions among them.
    lost = [r["id"] for r in store.index.query("SELECT id FROM instances ORDER BY id DESC LIMIT 3")]
    with store.index.transaction() as conn:
        conn.execute(f"DELETE FROM refs WHERE instance_id IN ({','.join('?' * len(lost))})", lost)
        conn.execute(f"DELETE FROM instances WHERE id IN ({','.join('?' * len(lost))})", lost)
    store.close()
    reopened = Store(tmp_path / "data")
    report = reopened.recover()
    assert (report.orphans_indexed, report.orphans_removed) == (3, 0)
    assert _rows(reopened) == before
    assert reopened.recover().orphans_indexed == 0
    reopened.close()


def test_an_instance_row_is_committed_without_a_wal_fsync_only_when_files_carry_their_arrival(tmp_path, rt_data,
                                                                                              monkeypatch):
    from rtqa_node.store import files
    from rtqa_node.store.index import Index

    modes = []
    original = Index.transaction

    def spy(self, *, durable=True):
        modes.append(durable)
        return original(self, durable=durable)

    monkeypatch.setattr(Index, "transaction", spy)
    plan = rt_data / "eclipse-breast-boost-dicompyler" / "rtplan.dcm"
    store = Store(tmp_path / "with")
    store.import_file(plan)
    assert modes == [False] and files.get_arrival(store.import_file(plan).path)
    store.close()
    monkeypatch.setattr(files, "xattrs_supported", lambda directory: False)
    modes.clear()
    store = Store(tmp_path / "without")
    result = store.import_file(plan)
    assert modes == [True] and files.get_arrival(result.path) is None
    store.close()


def test_a_file_without_file_meta_is_stored_with_one(store, rt_data):
    result = store.import_file(rt_data / "monaco-plans-pymedphys" / "06MV_plan.dcm")
    ds = pydicom.dcmread(result.path)
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_store_survives_reopen(tmp_path, rt_data):
    store = Store(tmp_path / "data")
    for path in dicom_files(rt_data / "raystation-proton-ramp-aptg"):
        store.import_file(path)
    store.close()
    reopened = Store(tmp_path / "data")
    assert reopened.index.counts()["instances"] == 5
    assert reopened.import_file(rt_data / "raystation-proton-ramp-aptg" / "ramped_2Gy_ver2_full.dcm").outcome \
        is Outcome.DUPLICATE
    shutil.rmtree(tmp_path / "data")


def test_images_described_from_raw_values_match_pydicom(rt_data):
    """The fast path (no pydicom parse for CT/MR/PET) must describe every image exactly as pydicom does."""
    compared = 0
    for path in dicom_files(rt_data):
        data = path.read_bytes()
        if data[128:132] != b"DICM":
            continue
        try:
            header = read_part10_header(data)
            walk = walk_dataset(data, header.dataset_offset, header.transfer_syntax_uid,
                                capture=frozenset(IMAGE_TAGS.values()))
        except EncodingError:
            continue
        fast = describe_image(walk.values)
        if fast is None:
            continue
        assert fast == describe(pydicom.dcmread(path, stop_before_pixels=True)), path
        compared += 1
    assert compared >= 100  # the CT slices of the collection


def test_every_object_described_from_the_walk_matches_pydicom(rt_data):
    """RTSTRUCT, RTPLAN, RTDOSE, ...: identity, frame of reference and every RT reference edge from the values the
    encoding walk collects (REFERENCE_PATHS) equal what describe() reads with pydicom, failures included."""
    compared = set()
    for path in dicom_files(rt_data):
        data = path.read_bytes()
        if data[128:132] != b"DICM":
            continue
        try:
            header = read_part10_header(data)
            walk = walk_dataset(data, header.dataset_offset, header.transfer_syntax_uid,
                                capture=frozenset(IMAGE_TAGS.values()), nested=REFERENCE_PATHS)
        except EncodingError:
            continue
        if walk.incomplete:  # a wanted sequence encoded as UN (rtdose_rle.dcm): the store reads it with pydicom
            continue
        try:
            expected = describe(pydicom.dcmread(path, stop_before_pixels=True))
        except DescriptionError as exc:
            with pytest.raises(DescriptionError) as raised:
                describe_walked(walk.values, walk.nested)
            assert raised.value.kind == exc.kind, path
            continue
        assert describe_walked(walk.values, walk.nested) == expected, path
        compared.add(expected.modality)
    assert {"RTSTRUCT", "RTPLAN", "RTDOSE", "CT"} <= compared


def test_a_reference_sequence_encoded_as_un_falls_back_to_pydicom(tmp_path, rt_data, monkeypatch):
    ds = pydicom.dcmread(rt_data / "eclipse-breast-boost-dicompyler" / "rtplan.dcm")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # what a node without the tag in its dictionary forwards: the sequence as UN, implicit VR little endian inside
    only = pydicom.Dataset()
    only.ReferencedStructureSetSequence = ds.ReferencedStructureSetSequence
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(buffer, only)
    referenced = str(ds.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID)
    del ds[0x300C0060]
    monkeypatch.setattr(pydicom.config, "replace_un_with_known_vr", False)
    ds.add_new(0x300C0060, "UN", buffer.getvalue()[8:])
    ds.save_as(tmp_path / "un.dcm", enforce_file_format=True)
    monkeypatch.undo()  # pydicom reads a UN with a known tag as its dictionary VR again
    data = (tmp_path / "un.dcm").read_bytes()
    header = read_part10_header(data)
    walk = walk_dataset(data, header.dataset_offset, header.transfer_syntax_uid, nested=REFERENCE_PATHS)
    assert walk.incomplete
    store = Store(tmp_path / "data")
    result = store.import_file(tmp_path / "un.dcm")
    assert (RefKind.RTSTRUCT, referenced) in result.description.references
    store.close()


def test_a_transaction_waits_for_another_connection_holding_the_write_lock(tmp_path):
    import sqlite3
    import threading
    import time

    from rtqa_node.store.index import Index

    index = Index(tmp_path / "index.sqlite")
    other = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    releaser = threading.Timer(0.05, lambda: other.execute("COMMIT"))
    releaser.start()
    start = time.monotonic()
    with index.transaction(durable=False) as conn:
        conn.execute("PRAGMA user_version")
    waited = time.monotonic() - start
    releaser.join()
    assert 0.04 < waited < 1.0
    assert index.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    other.close()
    index.close()


def test_an_object_directory_removed_behind_the_store_is_made_again(tmp_path, rt_data):
    store = Store(tmp_path / "data")
    first, second = dicom_files(rt_data / "eclipse-breast-boost-dicompyler")[:2]
    stored = store.import_file(first)
    shutil.rmtree(stored.path.parent)
    again = store.import_file(second)
    assert again.path.parent == stored.path.parent and again.path.exists()
    store.close()


def test_an_object_whose_duplicate_row_vanished_before_the_transaction_is_still_published(tmp_path, rt_data,
                                                                                        monkeypatch):
    store = Store(tmp_path / "data")
    original = store.index.query
    # the lookup outside the transaction sees a row that the check inside the transaction no longer finds
    monkeypatch.setattr(store.index, "query",
                        lambda sql, params=(): [(1, 1, "gone")] if sql == Store._FIND else original(sql, params))
    result = store.import_file(rt_data / "eclipse-breast-boost-dicompyler" / "rtplan.dcm")
    assert result.outcome is Outcome.STORED and result.path.exists()
    assert original("SELECT path FROM instances")[0][0] == result.path.relative_to(store.data_dir).as_posix()
    store.close()
