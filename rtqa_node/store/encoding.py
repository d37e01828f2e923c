"""Structural check of a DICOM data set's encoding, without decoding values.

pydicom reads lazily and forgives a lot: a file cut in the middle of an undefined-length sequence reads
"successfully" with the tail missing (``pydicom-rt-testfiles/rtplan_truncated.dcm`` keeps 1 of its control
points). A node that acknowledges such an object has lost data without telling anyone. This module walks the
element stream (PS3.5 section 7) and checks that every length fits, every undefined-length sequence and item
is closed by its delimiter, and the data set ends exactly at an element boundary. Values are skipped, not
parsed, so the walk costs little more than reading the bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from rtqa_node.errors import RtqaError

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_MAX_DEPTH = 64


class EncodingError(RtqaError):
    """The bytes are not a well-formed DICOM data set (truncated, bad length, missing delimiter)."""


@dataclass(frozen=True, slots=True)
class Walk:
    """What a walk over a data set found."""

    #: see :func:`check_dataset_encoding`
    content_sha256: str
    #: raw value bytes of the top-level elements asked for (``capture``), by tag
    values: dict[int, bytes]
    #: raw values found inside sequences (``nested``), by label, in data set order
    nested: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)
    #: a sequence asked for in ``nested`` was encoded as UN and not searched: read the object with pydicom
    incomplete: bool = False


@dataclass(frozen=True, slots=True)
class Part10Header:
    """Where the data set of a DICOM Part 10 file starts, and how it is encoded."""

    dataset_offset: int
    transfer_syntax_uid: str


def read_part10_header(buf: bytes | memoryview) -> Part10Header:
    """Locate the data set after the 128-byte preamble, ``DICM`` and the File Meta group (always explicit LE).

    Raises:
        EncodingError: no ``DICM`` prefix, a malformed meta group, or no Transfer Syntax UID in it.
    """
    if len(buf) < 132 or bytes(buf[128:132]) != b"DICM":
        raise EncodingError("not a DICOM Part 10 file (no DICM prefix after the 128-byte preamble)")
    pos, end = 132, len(buf)
    transfer_syntax = None
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise EncodingError("file meta element header truncated")
            (length,) = struct.unpack_from("<I", buf, pos + 8)
            header = 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            header = 8
        if length == UNDEFINED or pos + header + length > end:
            raise EncodingError(f"file meta element (0002,{element:04X}) has a length beyond the data")
        if element == 0x0010:
            transfer_syntax = bytes(buf[pos + header : pos + header + length]).rstrip(b"\x00 ").decode("ascii")
        pos += header + length
    if not transfer_syntax:
        raise EncodingError("file meta information has no Transfer Syntax UID (0002,0010)")
    return Part10Header(dataset_offset=pos, transfer_syntax_uid=transfer_syntax)


def check_dataset_encoding(buf: bytes | memoryview, offset: int, transfer_syntax_uid: str) -> str:
    """Walk the data set in ``buf[offset:]`` encoded with ``transfer_syntax_uid``; raise if it is malformed.

    Returns:
        The content digest, as :attr:`Walk.content_sha256` of :func:`walk_dataset`.

    Raises:
        EncodingError: with the tag and byte offset of the first problem.
    """
    return walk_dataset(buf, offset, transfer_syntax_uid).content_sha256


def walk_dataset(
    buf: bytes | memoryview, offset: int, transfer_syntax_uid: str, *, capture: frozenset[int] = frozenset(),
    nested: dict | None = None,
) -> Walk:
    """Walk the data set in ``buf[offset:]`` encoded with ``transfer_syntax_uid``; raise if it is malformed.

    ``capture``: top-level tags whose raw values to return, so that a caller needing a few attributes of an
    image need not parse it again with pydicom (that parse was the largest CPU cost of ingesting a CT slice).
    ``nested``: values to collect inside sequences, as a tree ``{tag: label or {tag: ...}}``: a label collects
    the raw value of every element with that tag at that level into ``Walk.nested[label]`` (in data set order),
    a dict descends into every item of the sequence with that tag (e.g. the RT references: ``describe.py``).

    Returns:
        The content digest: SHA-256 over every element's tag and value bytes, with sequence and item
        boundaries marked, but not over VRs, length encodings or deflation. The same data set sent as implicit
        or explicit VR little endian, with defined or undefined sequence lengths, or deflated, has the same
        digest; different values (or big endian byte order) give a different one.

    Raises:
        EncodingError: with the tag and byte offset of the first problem.
    """
    if isinstance(buf, memoryview):
        buf = buf.tobytes()
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(bytes(buf[offset:])) + inflater.flush()
        except zlib.error as exc:
            raise EncodingError(f"deflated data set does not inflate: {exc}") from exc
        if not inflater.eof:
            raise EncodingError("truncated: deflate stream not terminated")
        buf, offset, explicit, little = data, 0, True, True
    else:
        explicit = transfer_syntax_uid != ImplicitVRLittleEndian
        little = transfer_syntax_uid != ExplicitVRBigEndian
    walker = _Walker(buf, explicit=explicit, little=little, capture=capture)
    try:
        walker.dataset(offset, len(buf), depth=0, node=nested)
        walker.flush()
    finally:
        walker.view.release()  # an mmap cannot be closed while a view on it exists
    return Walk(walker.digest.hexdigest(), walker.values, walker.nested, walker.incomplete)


_STRUCTS = {
    True: (struct.Struct("<HH"), struct.Struct("<H"), struct.Struct("<I")),
    False: (struct.Struct(">HH"), struct.Struct(">H"), struct.Struct(">I")),
}
#: what the digest records for a value: tag (little endian whatever the encoding), "V", length
_TAG_V_LENGTH = struct.Struct("<IBI")
_TAG = struct.Struct("<I")
_F_LENGTH = struct.Struct("<BI")
_V, _F = ord("V"), ord("F")
#: values smaller than this are gathered and hashed in one call; larger ones are hashed from the buffer itself
_GATHER_BYTES = 1 << 14


def _name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    def __init__(self, buf: bytes | memoryview, *, explicit: bool, little: bool, parent: _Walker | None = None,
                 capture: frozenset[int] = frozenset()) -> None:
        self.buf = buf
        self.explicit = explicit
        self.tag_struct, self.short_struct, self.long_struct = _STRUCTS[little]
        if parent is None:
            self.view = memoryview(buf)
            self.digest = hashlib.sha256()
            self.pending = bytearray()  # digest input not hashed yet: small values are hashed in one call
            self.nested: dict[str, list[bytes]] = {}
        else:  # an undefined-length UN: same buffer, digest and findings, other encoding
            self.view, self.digest, self.pending, self.nested = parent.view, parent.digest, parent.pending, parent.nested
        self.capture = capture
        self.values: dict[int, bytes] = {}
        #: a sequence asked for in ``nested`` could not be searched (encoded as UN): findings may be missing
        self.incomplete = False

    def flush(self) -> None:
        self.digest.update(self.pending)
        self.pending.clear()

    def _feed(self, start: int, length: int) -> None:
        if length < _GATHER_BYTES:
            self.pending += self.view[start : start + length]
        else:
            self.digest.update(self.pending)
            self.pending.clear()
            self.digest.update(self.view[start : start + length])

    def dataset(self, pos: int, end: int, *, depth: int, in_item: bool = False, node: dict | None = None) -> int:
        """Walk elements from ``pos``; stop at ``end`` or, inside an undefined-length item, its delimiter."""
        if depth > _MAX_DEPTH:
            raise EncodingError("sequences nested deeper than 64 levels")
        unpack_tag = self.tag_struct.unpack_from
        buf = self.buf
        element = self._element
        while pos < end:
            if pos + 8 > end:
                raise EncodingError(f"truncated: data ends inside an element header at byte {pos}")
            group, elem = unpack_tag(buf, pos)
            tag = (group << 16) | elem
            if group == 0xFFFE:
                if tag == ITEM_DELIMITER:
                    if not in_item:
                        raise EncodingError(f"item delimiter outside an item at byte {pos}")
                    return pos + 8
                if tag == ITEM or tag == SEQUENCE_DELIMITER:
                    raise EncodingError(f"unexpected item tag {_name(tag)} at byte {pos}")
            pos = element(tag, pos, end, depth, node)
        if in_item:
            raise EncodingError("truncated: data ends inside an undefined-length item")
        if pos != end:
            raise EncodingError("last element runs past the end of the data")
        return pos

    def _element(self, tag: int, pos: int, end: int, depth: int, node: dict | None) -> int:
        buf = self.buf
        if self.explicit:
            vr = buf[pos + 4 : pos + 6]
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise EncodingError(f"invalid VR {vr!r} for {_name(tag)} at byte {pos}")
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise EncodingError(f"truncated: data ends inside an element header at byte {pos}")
                (length,) = self.long_struct.unpack_from(buf, pos + 8)
                value = pos + 12
            else:
                (length,) = self.short_struct.unpack_from(buf, pos + 6)
                value = pos + 8
        else:
            (length,) = self.long_struct.unpack_from(buf, pos + 4)
            value = pos + 8
            vr = _implicit_vr(tag, length)
        if tag & 0xFFFF == 0 and length != UNDEFINED and value + length <= end:
            return value + length  # group lengths depend on the encoding, not the content: not digested
        wanted = node.get(tag) if node is not None else None
        if length == UNDEFINED:
            self.pending += _TAG.pack(tag)
            if vr == b"SQ":
                return self.sequence(value, end, depth=depth + 1, tag=tag,
                                     node=wanted if type(wanted) is dict else None)
            if vr == b"UN":
                # An undefined-length UN is a sequence encoded implicit VR little endian (PS3.5 6.2.2).
                self.incomplete |= wanted is not None
                return _Walker(buf, explicit=False, little=True, parent=self).sequence(
                    value, end, depth=depth + 1, tag=tag)
            if (vr == b"OB" or vr == b"OW") and tag == 0x7FE00010:
                return self.fragments(value, end, tag=tag)
            raise EncodingError(f"undefined length on {_name(tag)} with VR {vr.decode(errors='replace')}")
        if value + length > end:
            raise EncodingError(
                f"truncated: {_name(tag)} declares {length} bytes, {max(end - value, 0)} remain"
            )
        if vr == b"SQ":
            self.pending += _TAG.pack(tag)
            self.sequence(value, value + length, depth=depth + 1, tag=tag, defined=True,
                          node=wanted if type(wanted) is dict else None)
        else:
            self.pending += _TAG_V_LENGTH.pack(tag, _V, length)
            self._feed(value, length)
            if wanted is not None:
                if type(wanted) is dict:
                    self.incomplete = True  # a sequence asked for, encoded as UN with a defined length
                else:
                    self.nested.setdefault(wanted, []).append(bytes(buf[value : value + length]))
            if depth == 0 and tag in self.capture:
                self.values[tag] = bytes(buf[value : value + length])
        return value + length

    def sequence(self, pos: int, end: int, *, depth: int, tag: int, defined: bool = False,
                 node: dict | None = None) -> int:
        pending = self.pending
        pending += b"S"
        unpack_tag, unpack_long = self.tag_struct.unpack_from, self.long_struct.unpack_from
        buf = self.buf
        while pos < end:
            if pos + 8 > end:
                raise EncodingError(f"truncated: data ends inside an element header at byte {pos}")
            group, elem = unpack_tag(buf, pos)
            item_tag = (group << 16) | elem
            (length,) = unpack_long(buf, pos + 4)
            if item_tag == SEQUENCE_DELIMITER:
                if defined:
                    raise EncodingError(f"sequence delimiter inside defined-length sequence {_name(tag)}")
                pending += b"E"
                return pos + 8
            if item_tag != ITEM:
                raise EncodingError(f"sequence {_name(tag)} holds a non-item tag at byte {pos}")
            pending += b"I"
            if length == UNDEFINED:
                pos = self.dataset(pos + 8, end, depth=depth, in_item=True, node=node)
            else:
                if pos + 8 + length > end:
                    raise EncodingError(f"truncated: item of {_name(tag)} declares {length} bytes beyond the data")
                self.dataset(pos + 8, pos + 8 + length, depth=depth, node=node)
                pos += 8 + length
        if not defined:
            raise EncodingError(f"truncated: data ends inside sequence {_name(tag)} (no delimiter)")
        pending += b"E"
        return pos

    def fragments(self, pos: int, end: int, *, tag: int) -> int:
        """Encapsulated pixel data: items of raw bytes closed by a sequence delimiter (PS3.5 A.4)."""
        unpack_tag, unpack_long = self.tag_struct.unpack_from, self.long_struct.unpack_from
        buf = self.buf
        while pos < end:
            if pos + 8 > end:
                raise EncodingError(f"truncated: data ends inside an element header at byte {pos}")
            group, elem = unpack_tag(buf, pos)
            item_tag = (group << 16) | elem
            (length,) = unpack_long(buf, pos + 4)
            if item_tag == SEQUENCE_DELIMITER:
                return pos + 8
            if item_tag != ITEM or length == UNDEFINED:
                raise EncodingError(f"encapsulated {_name(tag)} holds a malformed fragment at byte {pos}")
            if pos + 8 + length > end:
                raise EncodingError(f"truncated: fragment of {_name(tag)} declares {length} bytes beyond the data")
            self.pending += _F_LENGTH.pack(_F, length)
            self._feed(pos + 8, length)
            pos += 8 + length
        raise EncodingError(f"truncated: data ends inside encapsulated {_name(tag)} (no delimiter)")


_IMPLICIT_VRS: dict[int, bytes] = {}


def _implicit_vr(tag: int, length: int) -> bytes:
    """The VR an implicit-VR element must have, as far as the walk needs it (only SQ matters)."""
    if length == UNDEFINED:
        return b"SQ"  # only sequences may have undefined length in implicit VR (PS3.5 7.1.3)
    vr = _IMPLICIT_VRS.get(tag)
    if vr is None:
        vr = _IMPLICIT_VRS[tag] = _dictionary_vr(tag)
    return vr


def _dictionary_vr(tag: int) -> bytes:
    if tag & 0xFFFF == 0 or (tag >> 16) & 1:
        return b"UN"  # group lengths and private elements: skip their values
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return b"UN"
    return b"SQ" if vr == "SQ" else b"UN"
