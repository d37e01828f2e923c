"""Two narrow replacements in pynetdicom's per-message path: the C-STORE response encoder and the socket read.

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
"""

from __future__ import annotations

import struct

from pynetdicom import evt
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
    """Wrap ``DIMSEServiceProvider.send_msg`` and replace ``AssociationSocket.recv`` (idempotent)."""
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
