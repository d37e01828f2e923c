"""The storage SCU: sends result objects back to a destination (C-STORE, pynetdicom). Thin: no queue logic.

Failures are classified for the dispatch stage (STYLE.md, "Errors"): an unreachable peer, a rejected or
aborted association, no response, or "Refused: Out of Resources" (0xA7xx) may go away -> RetryableError;
any other failure status will not change by sending the same object again -> PermanentError.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from rtqa_node.config import Destination
from rtqa_node.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)

#: Success and the Storage warnings (PS3.4 B.2.3): coercion, elements discarded, data set does not match.
_OK_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True, slots=True)
class SendTimeouts:
    connect_s: float = 5.0
    acse_s: float = 30.0
    dimse_s: float = 60.0
    network_s: float = 60.0


def send_files(destination: Destination, paths: Sequence[Path], *, calling_ae: str,
               timeouts: SendTimeouts = SendTimeouts()) -> list[int]:
    """C-STORE every Part 10 file in ``paths`` over one association; returns their statuses.

    Raises:
        RetryableError: the peer is unreachable, refused or aborted the association, did not answer, or
            answered 0xA7xx (out of resources).
        PermanentError: the peer answered another failure status.
    """
    classes: dict[Path, tuple[str, str]] = {}
    for path in paths:
        meta = pydicom.filereader.read_file_meta_info(path)
        classes[path] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeouts.connect_s
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    for sop_class, syntax in sorted(set(classes.values())):
        syntaxes = [syntax] + [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != syntax]
        ae.add_requested_context(sop_class, syntaxes)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise RetryableError(f"association with {where} {how}")
    statuses: list[int] = []
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            if "Status" not in status:
                raise RetryableError(f"no C-STORE response from {where} (connection lost or timed out)")
            code = int(status.Status)
            statuses.append(code)
            if code in _OK_STATUSES:
                continue
            message = f"{where} answered C-STORE with status 0x{code:04X}"
            if comment := status.get("ErrorComment"):
                message += f" ({comment})"
            if 0xA700 <= code <= 0xA7FF:
                raise RetryableError(message)
            raise PermanentError(message)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses
