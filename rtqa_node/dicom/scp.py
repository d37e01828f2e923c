"""The storage SCP: the node's network edge. Thin handlers that check, hand over to the store, map to a status.

The data set of each C-STORE is streamed by pynetdicom to a temporary file (``STORE_RECV_CHUNKED_DATASET``)
in the store's ``tmp/`` directory, so a large RTDOSE never sits in memory and the store can publish it with a
rename on the same file system. The success status is sent only after :meth:`Store.ingest` returned, i.e.
after the file and its index row are durable.
"""

from __future__ import annotations

import ipaddress
import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification

from rtqa_node.config import Settings
from rtqa_node.dicom import fastpath, wakeup
from rtqa_node.dicom.statuses import Status, status_dataset, status_for
from rtqa_node.dicom.tls import server_context
from rtqa_node.log import uid_ref
from rtqa_node.store import Arrival, Store, StoreRefused

log = logging.getLogger(__name__)

#: Storage SOP classes accepted (PS3.4 B.5). Everything a TPS or PACS sends with a plan study, plus what is
#: kept for context (images of other modalities, registrations, treatment records, PDF reports).
STORAGE_SOP_CLASSES: dict[str, str] = {
    "CT Image Storage": "1.2.840.10008.5.1.4.1.1.2",
    "Enhanced CT Image Storage": "1.2.840.10008.5.1.4.1.1.2.1",
    "MR Image Storage": "1.2.840.10008.5.1.4.1.1.4",
    "Enhanced MR Image Storage": "1.2.840.10008.5.1.4.1.1.4.1",
    "Positron Emission Tomography Image Storage": "1.2.840.10008.5.1.4.1.1.128",
    "Enhanced PET Image Storage": "1.2.840.10008.5.1.4.1.1.130",
    "RT Image Storage": "1.2.840.10008.5.1.4.1.1.481.1",
    "RT Dose Storage": "1.2.840.10008.5.1.4.1.1.481.2",
    "RT Structure Set Storage": "1.2.840.10008.5.1.4.1.1.481.3",
    "RT Beams Treatment Record Storage": "1.2.840.10008.5.1.4.1.1.481.4",
    "RT Plan Storage": "1.2.840.10008.5.1.4.1.1.481.5",
    "RT Brachy Treatment Record Storage": "1.2.840.10008.5.1.4.1.1.481.6",
    "RT Treatment Summary Record Storage": "1.2.840.10008.5.1.4.1.1.481.7",
    "RT Ion Plan Storage": "1.2.840.10008.5.1.4.1.1.481.8",
    "RT Ion Beams Treatment Record Storage": "1.2.840.10008.5.1.4.1.1.481.9",
    "Spatial Registration Storage": "1.2.840.10008.5.1.4.1.1.66.1",
    "Deformable Spatial Registration Storage": "1.2.840.10008.5.1.4.1.1.66.3",
    "Encapsulated PDF Storage": "1.2.840.10008.5.1.4.1.1.104.1",
    "Comprehensive 3D SR Storage": "1.2.840.10008.5.1.4.1.1.88.34",
}

#: Accepted and stored as received; compressed pixel data is never decoded on ingest.
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    allowed_calling_aes: frozenset[str]
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        return cls(
            frozenset(settings.allowed_calling_aes),
            tuple(ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks),
        )

    def refusal(self, calling_ae: str, address: str) -> str | None:
        """Why an association from ``calling_ae`` at ``address`` is refused, or None if it is allowed."""
        if self.allowed_networks:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return f"peer address {address!r} is not an IP address"
            if not any(ip in network for network in self.allowed_networks):
                return f"peer address {address} is not in allowed_networks"
        if self.allowed_calling_aes and calling_ae not in self.allowed_calling_aes:
            return f"calling AE title {calling_ae!r} is not in allowed_calling_aes"
        return None


class StorageScp:
    """The node's DICOM listener. ``start()`` returns once it listens; ``stop()`` shuts it down."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.policy = AccessPolicy.from_settings(settings)
        self._server = None
        self._lock = threading.Lock()
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.require_called_aet = s.require_called_ae
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_bytes
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.add_supported_context(Verification)
        for uid in STORAGE_SOP_CLASSES.values():
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("SCP not started")
        return self._server.server_address[1]

    def start(self) -> None:
        s = self.settings
        # Stream data sets to files in the store's tmp/ (same file system: publish is a rename). pynetdicom
        # creates them with tempfile.NamedTemporaryFile, which honours tempfile.tempdir.
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_REQUEST_IDENTIFIERS = False
        # pynetdicom's "standard" handlers format a debug line for every PDU and DIMSE message; its logger is
        # at WARNING here, so they only cost time (EVT_PDU_RECV fires five times per CT slice).
        _config.LOG_HANDLER_LEVEL = "none"
        fastpath.install()
        tempfile.tempdir = str(self.store.tmp_dir)
        if s.network_wakeups:
            wakeup.install(s.network_poll_s)
        else:
            wakeup.install_polling(s.network_poll_s)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        ssl_context = server_context(s.tls) if s.tls.enabled else None
        self._server = self.ae.start_server(
            (s.bind_address, s.port), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
        log.info(
            "scp_listening",
            extra={"ae_title": s.ae_title, "address": s.bind_address, "port": self.port, "tls": s.tls.enabled},
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- handlers --------------------------------------------------------------------------------------

    def _on_connection(self, event) -> None:
        if self.settings.network_wakeups:
            wakeup.attach(event.assoc)
        else:
            event.assoc.dul._run_loop_delay = self.settings.network_poll_s

    def _on_connection_closed(self, event) -> None:
        wakeup.detach(event.assoc)

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        calling_ae = assoc.requestor.primitive.calling_ae_title.strip()
        address = assoc.requestor.address
        reason = self.policy.refusal(calling_ae, address)
        if reason is None:
            return
        log.warning("association_refused", extra={"calling_ae": calling_ae, "peer": address, "reason": reason})
        # rejected-permanent, service-user, diagnostic "calling AE title not recognised" (PS3.8 9.3.4)
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        # As pynetdicom's own rejection does: wait until the DUL has sent the A-ASSOCIATE-RJ and closed, so the
        # peer reads the rejection rather than a dropped connection.
        assoc.kill()

    def _on_echo(self, event) -> int:
        return Status.SUCCESS

    def _on_store(self, event):
        request = event.request
        assoc = event.assoc
        arrival = Arrival(
            calling_ae=assoc.requestor.ae_title.strip(),
            called_ae=assoc.acceptor.ae_title.strip(),
            peer_address=assoc.requestor.address,
            peer_port=assoc.requestor.port,
            affected_sop_class_uid=str(request.AffectedSOPClassUID),
            affected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
        )
        # pynetdicom closes its write handle on the temporary file after this handler returns; on ext4 that close
        # drops the file's block preallocation, a journalled change that can wait for a commit in progress
        # (7 % of the association thread's wall time). Closed here, it joins the store's own fsync instead.
        received = getattr(request, "_dataset_file", None)
        if received is not None:
            received.close()
        try:
            self.store.ingest(Path(event.dataset_path), arrival)
        except StoreRefused as exc:
            status = status_for(exc.reason)
            log.warning(
                "store_refused",
                extra={
                    "status": f"0x{status:04X}",
                    "reason": exc.reason.value,
                    "detail": str(exc),
                    "sop_instance": uid_ref(arrival.affected_sop_instance_uid),
                    "calling_ae": arrival.calling_ae,
                },
            )
            return status_dataset(status, str(exc))
        except Exception:
            log.exception(
                "store_failed",
                extra={"sop_instance": uid_ref(arrival.affected_sop_instance_uid), "calling_ae": arrival.calling_ae},
            )
            return status_dataset(Status.PROCESSING_FAILURE, "internal error in the node; see its log")
        return Status.SUCCESS
