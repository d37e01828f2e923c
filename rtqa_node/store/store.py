"""Durable ingest: a received Part 10 file becomes a published file plus an index row, or a clear refusal.

The guarantee the receive stage builds on: when :meth:`Store.ingest` returns, the object is on stable storage
and indexed: after a crash of the process or a power loss it is present, intact and (at the latest after
:meth:`Store.recover` at the next start) indexed. When it raises :class:`StoreRefused`, nothing of the object
is visible. Order:

1. checks that need no disk writes: size limit, free space, encoding walk, identity, SOP class consistency;
2. the arrival (calling/called AE, peer address and port, received time) attached to the temporary file as an
   extended attribute, then fsync of the file (data, size and attribute);
3. under the store's lock: duplicate lookup, atomic rename to a path made of hashes (never raw UIDs), directory
   fsync, then a short transaction: row insert, COMMIT.

The COMMIT does not fsync the WAL (``synchronous=NORMAL``) when the file system keeps extended attributes:
a committed row then survives a crash of the process, and a power loss can only roll back the last rows, each
of which belongs to a published, fsync'd file that carries everything its row holds (the bytes give identity,
references, encoding and content digest; the attribute gives the arrival). :meth:`Store.recover` rebuilds
such rows at start-up in arrival order. Without extended attributes every COMMIT is ``synchronous=FULL``.

A crash between rename and COMMIT leaves a complete, validated file without a row; recovery indexes it too.
A crash before the rename leaves only a temporary file, which recovery deletes.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import functools
import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian

from rtqa_node.errors import RtqaError
from rtqa_node.log import uid_ref
from rtqa_node.store import files
from rtqa_node.store.describe import (
    IMAGE_TAGS,
    REFERENCE_PATHS,
    DescriptionError,
    ObjectDescription,
    describe,
    describe_image,
    describe_walked,
    expected_modalities,
)
from rtqa_node.store.encoding import EncodingError, Walk, read_part10_header, walk_dataset
from rtqa_node.store.index import Index

log = logging.getLogger(__name__)

_CAPTURE = frozenset(IMAGE_TAGS.values())


class Refusal(enum.Enum):
    """Why an object was not stored. Each maps to one DICOM status in ``rtqa_node.dicom.statuses``."""

    TOO_LARGE = "too_large"
    NO_SPACE = "no_space"
    UNWRITABLE = "unwritable"
    UNPARSEABLE = "unparseable"
    SOP_CLASS_MISMATCH = "sop_class_mismatch"
    MISSING_ATTRIBUTE = "missing_attribute"
    INVALID_UID = "invalid_uid"


class StoreRefused(RtqaError):
    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Outcome(enum.Enum):
    STORED = "stored"
    #: same SOP Instance UID and same data set bytes as an object already stored: nothing new written
    DUPLICATE = "duplicate"
    #: same SOP Instance UID, different content: kept beside the earlier version(s)
    NEW_VERSION = "new_version"


@dataclass(frozen=True, slots=True)
class Arrival:
    """Where an object came from. The Affected UIDs are those of the C-STORE request, when there is one."""

    calling_ae: str = ""
    called_ae: str = ""
    peer_address: str = ""
    peer_port: int = 0
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None


@dataclass(frozen=True, slots=True)
class IngestResult:
    outcome: Outcome
    instance_id: int
    version: int
    path: Path
    description: ObjectDescription


@dataclass(frozen=True, slots=True)
class _Encoded:
    """How one received object is encoded on disk."""

    transfer_syntax_uid: str
    dataset_offset: int
    size_bytes: int
    #: SHA-256 of the content independent of its encoding (identity and integrity: see store.encoding).
    #: One digest, not two: hashing every CT slice twice cost a sixth of the ingest time.
    content_sha256: str


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    temp_files_removed: int
    orphans_indexed: int
    orphans_removed: int


@functools.lru_cache(maxsize=4096)
def _hash_name(value: str, length: int) -> str:
    return hashlib.sha256(value.encode("ascii")).hexdigest()[:length]


def _is_no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class Store:
    """The object store below ``data_dir``: ``objects/`` (published files), ``tmp/`` (incoming), the index."""

    def __init__(
        self,
        data_dir: Path,
        *,
        max_object_bytes: int = 2 * 1024**3,
        min_free_bytes: int = 0,
        index: Index | None = None,
        on_stored: Callable[[IngestResult], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.objects_dir = self.data_dir / "objects"
        self.tmp_dir = self.data_dir / "tmp"
        for directory in (self.data_dir, self.objects_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.index = index or Index(self.data_dir / "index.sqlite")
        self.max_object_bytes = max_object_bytes
        self.min_free_bytes = min_free_bytes
        #: called after each successful ingest (the object is durable by then), e.g. to assemble plan studies;
        #: it must be quick (queue the work) and its failure never turns a stored object into a refusal
        self.on_stored = on_stored
        # Real exports carry invalid values in attributes the node does not interpret (e.g. a referenced UID
        # with a leading zero); warnings about them would flood the log without helping anyone.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        #: files carry their arrival (xattr), so an instance row can be rebuilt and its COMMIT need not fsync
        self.rows_rebuildable = files.xattrs_supported(self.tmp_dir)
        #: serialises lookup -> rename -> insert of this store's ingests (the index's lock is held only for
        #: the short transactions, so that other connections' commits never wait for our fsyncs and vice versa)
        self._publish_lock = threading.Lock()
        self._data_dir_str = os.fspath(self.data_dir)
        #: object directories created (durably) by this store: no stat per ingest
        self._known_dirs: set[str] = set()
        #: fsyncs received files while the ingesting thread walks them
        self._syncer = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-fsync")

    def close(self) -> None:
        self._syncer.shutdown(wait=True)
        self.index.close()

    # -- ingest ------------------------------------------------------------------------------------------

    def ingest(self, temp_path: Path, arrival: Arrival) -> IngestResult:
        """Store the Part 10 file at ``temp_path`` (consumed: moved into the store or deleted).

        Raises:
            StoreRefused: the object was not stored; the reason says why.
        """
        temp_path = Path(temp_path)
        try:
            result = self._ingest(temp_path, arrival)
        finally:
            try:
                os.unlink(temp_path)
            except FileNotFoundError:
                pass
            except OSError:
                log.warning("temp_file_not_removed", extra={"file": temp_path.name})
        if self.on_stored is not None:
            try:
                self.on_stored(result)
            except Exception:
                log.exception("on_stored_hook_failed", extra={"instance_id": result.instance_id})
        return result

    def _ingest(self, temp_path: Path, arrival: Arrival) -> IngestResult:
        size_bytes = temp_path.stat().st_size
        if size_bytes > self.max_object_bytes:
            raise StoreRefused(
                Refusal.TOO_LARGE,
                f"object of {size_bytes} bytes exceeds the configured limit of {self.max_object_bytes} bytes",
            )
        self._check_free_space(size_bytes)
        received_at_s = time.time()
        try:
            if self.rows_rebuildable:
                files.set_arrival(temp_path, _arrival_record(arrival, received_at_s))
        except OSError as exc:
            raise self._write_refusal(exc) from exc
        # The fsync waits for the disk, the walk for the CPU (SHA-256 releases the GIL): both at once. Whatever
        # the walk finds, the fsync has finished before anything is published or refused.
        synced = self._syncer.submit(files.fsync_file, temp_path)
        try:
            offset, transfer_syntax, walk = self._check_encoding(temp_path)
            description = self._describe(temp_path, arrival, walk)
        except BaseException:
            futures.wait([synced])
            raise
        try:
            synced.result()
        except OSError as exc:
            raise self._write_refusal(exc) from exc
        stored = _Encoded(transfer_syntax, offset, size_bytes, walk.content_sha256)
        return self._publish(temp_path, arrival, description, stored, received_at_s)

    def _check_free_space(self, size_bytes: int) -> None:
        available = files.free_bytes(self.objects_dir)
        if available - size_bytes < self.min_free_bytes:
            raise StoreRefused(
                Refusal.NO_SPACE,
                f"storage nearly full: {available} bytes free, {self.min_free_bytes} must stay free",
            )

    def _check_encoding(self, temp_path: Path) -> tuple[int, str, Walk]:
        with open(temp_path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise StoreRefused(Refusal.UNPARSEABLE, "empty data set")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                try:
                    header = read_part10_header(buf)
                    walk = walk_dataset(buf, header.dataset_offset, header.transfer_syntax_uid, capture=_CAPTURE,
                                        nested=REFERENCE_PATHS)
                except EncodingError as exc:
                    message = str(exc) if str(exc).startswith("truncated") else f"malformed data set: {exc}"
                    raise StoreRefused(Refusal.UNPARSEABLE, message) from exc
        return header.dataset_offset, header.transfer_syntax_uid, walk

    def _describe(self, temp_path: Path, arrival: Arrival, walk: Walk) -> ObjectDescription:
        try:
            # From the values the encoding walk captured; pydicom only where the walk could not see everything
            description = describe_image(walk.values)
            if description is None and not walk.incomplete:
                description = describe_walked(walk.values, walk.nested)
            if description is None:
                description = describe(pydicom.dcmread(temp_path, stop_before_pixels=True))
        except DescriptionError as exc:
            reason = Refusal.INVALID_UID if exc.kind == "invalid" else Refusal.MISSING_ATTRIBUTE
            raise StoreRefused(reason, str(exc)) from exc
        except Exception as exc:  # pydicom raises many types on malformed values
            raise StoreRefused(Refusal.UNPARSEABLE, f"data set cannot be decoded: {type(exc).__name__}") from exc
        if arrival.affected_sop_class_uid and arrival.affected_sop_class_uid != description.sop_class_uid:
            raise StoreRefused(
                Refusal.SOP_CLASS_MISMATCH,
                f"data set SOP Class UID {description.sop_class_uid} differs from the request's "
                f"Affected SOP Class UID {arrival.affected_sop_class_uid}",
            )
        if arrival.affected_sop_instance_uid and arrival.affected_sop_instance_uid != description.sop_instance_uid:
            raise StoreRefused(
                Refusal.SOP_CLASS_MISMATCH, "data set SOP Instance UID differs from the request's Affected one"
            )
        allowed = expected_modalities(description.sop_class_uid)
        if allowed is not None and description.modality not in allowed:
            raise StoreRefused(
                Refusal.SOP_CLASS_MISMATCH,
                f"Modality {description.modality!r} does not fit SOP class {description.sop_class_uid}",
            )
        return description

    def _write_refusal(self, exc: OSError) -> StoreRefused:
        if _is_no_space(exc):
            return StoreRefused(Refusal.NO_SPACE, "storage full")
        return StoreRefused(Refusal.UNWRITABLE, f"storage not writable: {exc.strerror or exc}")

    _FIND = "SELECT id, version, path FROM instances WHERE sop_instance_uid = ? AND content_sha256 = ?"
    _LATEST = "SELECT MAX(version) FROM instances WHERE sop_instance_uid = ?"

    def _publish(
        self, temp_path: Path, arrival: Arrival, description: ObjectDescription, stored: _Encoded,
        received_at_s: float,
    ) -> IngestResult:
        sop_uid = description.sop_instance_uid
        key = (sop_uid, stored.content_sha256)
        durable = not self.rows_rebuildable
        with self._publish_lock:
            existing = self.index.query(self._FIND, key)
            rel_path = self.relative_path(description, stored.content_sha256)
            final_path = os.path.join(self._data_dir_str, rel_path)
            if not existing:
                # The rename and the directory fsync happen outside any SQLite transaction: the assembler's and
                # the workers' connections never wait for them. Same content gives the same path, so a racing
                # writer in another process can only replace the file with identical bytes.
                try:
                    files.publish(temp_path, final_path, root=self.objects_dir, known_dirs=self._known_dirs)
                except OSError as exc:
                    raise self._write_refusal(exc) from exc
            with self.index.transaction(durable=durable) as conn:
                found = conn.execute(self._FIND, key).fetchone()
                if found is not None:
                    conn.execute("UPDATE instances SET receive_count = receive_count + 1 WHERE id = ?", (found[0],))
                    outcome = Outcome.DUPLICATE
                    instance_id, version, rel_path = found
                else:
                    (latest,) = conn.execute(self._LATEST, (sop_uid,)).fetchone()
                    version = (latest or 0) + 1
                    outcome = Outcome.STORED if version == 1 else Outcome.NEW_VERSION
                    if existing:  # the row seen before the transaction is gone: publish under the lock
                        try:
                            files.publish(temp_path, final_path, root=self.objects_dir, known_dirs=self._known_dirs)
                        except OSError as exc:
                            raise self._write_refusal(exc) from exc
                    try:
                        instance_id = self._insert(conn, description, arrival, stored, version, rel_path,
                                                   received_at_s)
                    except BaseException:
                        _unlink_quietly(final_path)
                        raise
        self._log_ingest(outcome, description, arrival, version, stored.size_bytes)
        return IngestResult(outcome, instance_id, version, self.data_dir / rel_path, description)

    def relative_path(self, description: ObjectDescription, content_sha256: str) -> str:
        """``objects/<study hash[:2]>/<study hash>/<instance hash>-<content hash>.dcm``: no UID text reaches
        the file system, and different content under one SOP Instance UID gets a different name."""
        study = _hash_name(description.study_instance_uid, 20)
        instance = _hash_name(description.sop_instance_uid, 20)
        return f"objects/{study[:2]}/{study}/{instance}-{content_sha256[:16]}.dcm"

    @staticmethod
    def _insert(conn, d: ObjectDescription, a: Arrival, e: _Encoded, version: int, rel_path: str,
                received_at_s: float) -> int:
        cursor = conn.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, modality, patient_id, study_instance_uid,"
            " series_instance_uid, frame_of_reference_uid, instance_number, transfer_syntax_uid, version,"
            " calling_ae, called_ae, peer_address, peer_port, received_at_s, path, size_bytes,"
            " dataset_offset_bytes, content_sha256) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                d.sop_instance_uid, d.sop_class_uid, d.modality, d.patient_id, d.study_instance_uid,
                d.series_instance_uid, d.frame_of_reference_uid, d.instance_number, e.transfer_syntax_uid,
                version, a.calling_ae, a.called_ae, a.peer_address, a.peer_port, received_at_s, rel_path,
                e.size_bytes, e.dataset_offset, e.content_sha256,
            ),
        )
        instance_id = cursor.lastrowid
        conn.executemany(
            "INSERT OR IGNORE INTO refs (instance_id, kind, uid) VALUES (?, ?, ?)",
            [(instance_id, kind, uid) for kind, uid in d.references],
        )
        return instance_id

    @staticmethod
    def _log_ingest(outcome: Outcome, d: ObjectDescription, a: Arrival, version: int, size: int) -> None:
        level = logging.WARNING if outcome is Outcome.NEW_VERSION else logging.INFO
        if not log.isEnabledFor(level):
            return
        log.log(
            level,
            f"instance_{outcome.value}",
            extra={
                "sop_instance": uid_ref(d.sop_instance_uid),
                "study": uid_ref(d.study_instance_uid),
                "modality": d.modality,
                "version": version,
                "size_bytes": size,
                "calling_ae": a.calling_ae,
            },
        )

    # -- files from disk ---------------------------------------------------------------------------------

    def import_file(self, path: Path, arrival: Arrival | None = None) -> IngestResult:
        """Ingest a file from disk without consuming it. Files without a file meta group (older exports
        write the bare data set) get one, as a network receive would.

        Raises:
            StoreRefused: as :meth:`ingest`.
        """
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".dcm")
        os.close(fd)
        temp = Path(name)
        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            shutil.copyfile(path, temp)
        else:
            try:
                ds = pydicom.dcmread(path, force=True)
                ds.file_meta = FileMetaDataset()
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
                ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
                ds.save_as(temp, enforce_file_format=True)
            except Exception as exc:
                temp.unlink(missing_ok=True)
                raise StoreRefused(Refusal.UNPARSEABLE, f"not a readable DICOM file: {type(exc).__name__}") from exc
        return self.ingest(temp, arrival or Arrival(calling_ae="IMPORT"))

    # -- restart -----------------------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """At start-up: delete incoming temporary files; index published files that have no row: a crash between
        rename and COMMIT (never acknowledged), or a row committed without a WAL fsync and rolled back by a power
        loss (acknowledged: the file carries its arrival). Rows are rebuilt in arrival order, so versions of one
        SOP instance are numbered as they were received."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            if entry.is_file():
                entry.unlink()
                removed += 1
        known = {row[0] for row in self.index.query("SELECT path FROM instances")}
        dropped = 0
        orphans = []
        for path in sorted(self.objects_dir.rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(self.data_dir).as_posix()
            if rel in known:
                continue
            if path.name.endswith(".partial"):
                path.unlink()
                dropped += 1
                continue
            arrival, received_at_s = _read_arrival(path)
            orphans.append((received_at_s, rel, path, arrival))
        indexed = 0
        for received_at_s, rel, path, arrival in sorted(orphans, key=lambda o: (o[0], o[1])):
            if self._index_orphan(path, rel, arrival, received_at_s):
                indexed += 1
            else:
                dropped += 1
        report = RecoveryReport(removed, indexed, dropped)
        if removed or indexed or dropped:
            log.warning("store_recovered", extra=dataclasses.asdict(report))
        return report

    def _index_orphan(self, path: Path, rel: str, arrival: Arrival, received_at_s: float) -> bool:
        """A published file without a row: it passed every check before its rename; check it again."""
        try:
            offset, transfer_syntax, walk = self._check_encoding(path)
            description = self._describe(path, Arrival(), walk)
            content_sha256 = walk.content_sha256
        except StoreRefused:
            path.unlink()
            return False
        if rel != self.relative_path(description, content_sha256):
            path.unlink()
            return False
        stored = _Encoded(transfer_syntax, offset, path.stat().st_size, content_sha256)
        with self.index.transaction() as conn:
            if conn.execute(self._FIND, (description.sop_instance_uid, content_sha256)).fetchone():
                path.unlink()
                return False
            (latest,) = conn.execute(self._LATEST, (description.sop_instance_uid,)).fetchone()
            self._insert(conn, description, arrival, stored, (latest or 0) + 1, rel, received_at_s)
        return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _arrival_record(arrival: Arrival, received_at_s: float) -> bytes:
    """What a file carries (xattr ``files.ARRIVAL_XATTR``) so that its index row can be rebuilt."""
    return json.dumps({
        "v": 1, "calling_ae": arrival.calling_ae, "called_ae": arrival.called_ae,
        "peer_address": arrival.peer_address, "peer_port": arrival.peer_port, "received_at_s": received_at_s,
    }, separators=(",", ":")).encode()


def _read_arrival(path: Path) -> tuple[Arrival, float]:
    """The arrival a published file carries; files without one (stored before arrivals were attached, or on a
    file system without extended attributes) are recovered as ``RECOVERED`` at their modification time."""
    raw = files.get_arrival(path)
    if raw:
        try:
            record = json.loads(raw)
            arrival = Arrival(
                calling_ae=str(record["calling_ae"]), called_ae=str(record["called_ae"]),
                peer_address=str(record["peer_address"]), peer_port=int(record["peer_port"]),
            )
            return arrival, float(record["received_at_s"])
        except (ValueError, KeyError, TypeError):
            log.warning("arrival_unreadable", extra={"file": path.name})
    return Arrival(calling_ae="RECOVERED"), path.stat().st_mtime
