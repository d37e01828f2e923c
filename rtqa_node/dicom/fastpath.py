"""Narrow replacements in pynetdicom's per-message path: the C-STORE response encoder, the socket read and the
File Meta Information written at the head of each received data set.

**The C-STORE response**, the one message the node sends for every object it receives.

pynetdicom sends a response by converting the primitive to a DIMSE message whose command set is a pydicom
Dataset, encoding that Dataset once to compute the Command Group Length and again to send it, and firing
``EVT_DIMSE_SENT``: about a sixth of the association thread's CPU while a CT series arrives
(``benchmarks/ingest.py --profile``). A C-STORE-RSP command set is six fixed elements (PS3.7 9.3.1.2), so
:func:`install` wraps ``DIMSEServiceProvider.send_msg`` to encode exactly those bytes for a C-STORE response
that carries nothing else (no Offending Element, no Error Comment) when no handler is bound to
``EVT_DIMSE_SENT``, and hands the P-DATA primitive to the DUL as pynetdicom does. Any other message, a failure
response with a comment, or a bound handler goes through pynetdicom unchanged. ``tests/test_scp.py`` checks the
bytes against pynetdicom's own encoding.

**The socket read.** ``AssociationSocket.recv(n)`` reads a PDU in 4096-byte ``socket.recv`` calls, each one a
new bytes object appended to a bytearray: 32 calls for each 128 KiB P-DATA-TF PDU, about 160 for a CT slice,
in the DUL thread that every message waits for. :func:`install` replaces it with ``recv_into`` a buffer of the
requested size, which returns as much as the socket holds in one call; the contract is pynetdicom's: block until
``n`` bytes are read, return fewer only when the peer closed the connection, let socket errors propagate.

**The File Meta Information.** For each C-STORE-RQ, pynetdicom builds a pydicom ``FileMetaDataset``
(``create_file_meta``) and encodes it with ``write_file_meta_info`` before the first data PDU is written to the
temporary file: about 0.3 ms of the DUL thread per object. :func:`install` replaces the two names in
``pynetdicom.dimse_messages`` (their only caller) with :func:`create_file_meta`, which keeps the values, and
:func:`write_file_meta_info`, which writes exactly the bytes pydicom writes for them (explicit VR little endian,
group length first) and hands anything else to pydicom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom import filewriter
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, dimse_messages, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101


def _ui(tag_element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"  # UI values are padded with a NULL to an even length (PS3.5 9.1)
    return struct.pack("<HHI", 0x0000, tag_element, len(raw)) + raw


def _us(tag_element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, tag_element, 2, value)


def encode_c_store_rsp(primitive: C_STORE) -> bytes | None:
    """The implicit VR little endian command set of a C-STORE-RSP, or None when it needs pynetdicom's encoder
    (elements beyond the fixed six, or a value missing)."""
    if primitive.OffendingElement is not None or primitive.ErrorComment is not None:
        return None
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
    if sop_class is None or sop_instance is None or message_id is None or status is None:
        return None
    body = b"".join((
        _ui(0x0002, str(sop_class)),
        _us(0x0100, _C_STORE_RSP),
        _us(0x0120, int(message_id)),
        _us(0x0800, _NO_DATA_SET),
        _us(0x0900, int(status)),
        _ui(0x1000, str(sop_instance)),
    ))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


@dataclass(frozen=True, slots=True)
class FileMeta:
    """The values of pynetdicom's ``create_file_meta`` for a received data set."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION


def create_file_meta(*, sop_class_uid, sop_instance_uid, transfer_syntax,
                     implementation_uid=PYNETDICOM_IMPLEMENTATION_UID,
                     implementation_version=PYNETDICOM_IMPLEMENTATION_VERSION) -> FileMeta:
    return FileMeta(str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax), str(implementation_uid),
                    str(implementation_version))


def _explicit(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(meta: FileMeta) -> bytes:
    """Group 0002 as pydicom's ``write_file_meta_info`` writes it for these values (PS3.10 7.1)."""
    body = b"".join((
        _explicit(0x0001, b"OB", b"\x00\x01", b"\x00"),
        _explicit(0x0002, b"UI", meta.sop_class_uid.encode("ascii"), b"\x00"),
        _explicit(0x0003, b"UI", meta.sop_instance_uid.encode("ascii"), b"\x00"),
        _explicit(0x0010, b"UI", meta.transfer_syntax.encode("ascii"), b"\x00"),
        _explicit(0x0012, b"UI", meta.implementation_uid.encode("ascii"), b"\x00"),
        _explicit(0x0013, b"SH", meta.implementation_version.encode("ascii"), b" "),
    ))
    return _explicit(0x0000, b"UL", struct.pack("<I", len(body)), b"") + body


def write_file_meta_info(fp, file_meta, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, FileMeta) and enforce_standard:
        try:
            fp.write(encode_file_meta(file_meta))
            return
        except UnicodeEncodeError:  # not ASCII: let pydicom encode (or refuse) it
            file_meta = _as_dataset(file_meta)
    filewriter.write_file_meta_info(fp, file_meta, enforce_standard)


def _as_dataset(meta: FileMeta):
    from pynetdicom.dsutils import create_file_meta as pynetdicom_create_file_meta

    return pynetdicom_create_file_meta(
        sop_class_uid=meta.sop_class_uid, sop_instance_uid=meta.sop_instance_uid,
        transfer_syntax=meta.transfer_syntax, implementation_uid=meta.implementation_uid,
        implementation_version=meta.implementation_version,
    )


def recv(self, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` reading into one buffer (see the module docstring)."""
    bytestream = bytearray(nr_bytes)
    view = memoryview(bytestream)
    nr_read = 0
    sock = self.socket
    with view:
        while nr_read < nr_bytes:
            received = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not received:  # the connection was closed: return what was read, as pynetdicom does
                break
            nr_read += received
    if nr_read < nr_bytes:
        del bytestream[nr_read:]
    return bytestream


def install() -> None:
    """Wrap ``DIMSEServiceProvider.send_msg``, replace ``AssociationSocket.recv`` and the File Meta writer used
    for received data sets (idempotent)."""
    dimse_messages.create_file_meta = create_file_meta
    dimse_messages.write_file_meta_info = write_file_meta_info
    if not getattr(AssociationSocket.recv, "_rtqa_fastpath", False):
        recv._rtqa_fastpath = True
        recv.__wrapped__ = AssociationSocket.recv
        AssociationSocket.recv = recv
    if getattr(DIMSEServiceProvider.send_msg, "_rtqa_fastpath", False):
        return
    original = DIMSEServiceProvider.send_msg

    def send_msg(self, primitive, context_id: int) -> None:
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command_set = encode_c_store_rsp(primitive)
            if command_set is not None and len(command_set) + 6 <= (self.maximum_pdu_size or 1 << 32):
                pdata = P_DATA()
                # one PDV: message control header 0x03 = command, last fragment (PS3.8 E.2)
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command_set))
                self.dul.send_pdu(pdata)
                return
        original(self, primitive, context_id)

    send_msg._rtqa_fastpath = True
    send_msg.__wrapped__ = original
    DIMSEServiceProvider.send_msg = send_msg
