"""Structural check of a DICOM data set's encoding, without decoding values.

pydicom reads lazily and forgives a lot: a file cut in the middle of an undefined-length sequence reads
"successfully" with the tail missing (``pydicom-rt-testfiles/rtplan_truncated.dcm`` keeps 1 of its control
points). A node that acknowledges such an object has lost data without telling anyone. This module walks the
element stream (PS3.5 section 7) and checks that every length fits, every undefined-length sequence and item
is closed by its delimiter, and the data set ends exactly at an element boundary. Values are skipped, not
parsed, so the walk costs little more than reading the bytes.
"""

from __future__ import annotations

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
    buf: bytes | memoryview, offset: int, transfer_syntax_uid: str, *, capture: frozenset[int] = frozenset()
) -> Walk:
    """Walk the data set in ``buf[offset:]`` encoded with ``transfer_syntax_uid``; raise if it is malformed.

    ``capture``: top-level tags whose raw values to return, so that a caller needing a few attributes of an
    image need not parse it again with pydicom (that parse was the largest CPU cost of ingesting a CT slice).

    Returns:
        The content digest: SHA-256 over every element's tag and value bytes, with sequence and item
        boundaries marked, but not over VRs, length encodings or deflation. The same data set sent as implicit
        or explicit VR little endian, with defined or undefined sequence lengths, or deflated, has the same
        digest; different values (or big endian byte order) give a different one.

    Raises:
        EncodingError: with the tag and byte offset of the first problem.
    """
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(bytes(buf[offset:])) + inflater.flush()
        except zlib.error as exc:
            raise EncodingError(f"deflated data set does not inflate: {exc}") from exc
        if not inflater.eof:
            raise EncodingError("truncated: deflate stream not terminated")
        walker = _Walker(data, explicit=True, little=True, capture=capture)
        walker.dataset(0, len(data), depth=0)
        return Walk(walker.digest.hexdigest(), walker.values)
    explicit = transfer_syntax_uid != ImplicitVRLittleEndian
    little = transfer_syntax_uid != ExplicitVRBigEndian
    walker = _Walker(buf, explicit=explicit, little=little, capture=capture)
    walker.dataset(offset, len(buf), depth=0)
    return Walk(walker.digest.hexdigest(), walker.values)


class _Walker:
    def __init__(self, buf: bytes | memoryview, *, explicit: bool, little: bool, digest=None,
                 capture: frozenset[int] = frozenset()) -> None:
        self.buf = buf
        self.explicit = explicit
        self.endian = "<" if little else ">"
        self.digest = digest if digest is not None else hashlib.sha256()
        self.capture = capture
        self.values: dict[int, bytes] = {}

    def _tag(self, pos: int, end: int) -> int:
        if pos + 8 > end:
            raise EncodingError(f"truncated: data ends inside an element header at byte {pos}")
        group, element = struct.unpack_from(self.endian + "HH", self.buf, pos)
        return (group << 16) | element

    def dataset(self, pos: int, end: int, *, depth: int, in_item: bool = False) -> int:
        """Walk elements from ``pos``; stop at ``end`` or, inside an undefined-length item, its delimiter."""
        if depth > _MAX_DEPTH:
            raise EncodingError("sequences nested deeper than 64 levels")
        while pos < end:
            tag = self._tag(pos, end)
            if tag == ITEM_DELIMITER:
                if not in_item:
                    raise EncodingError(f"item delimiter outside an item at byte {pos}")
                return pos + 8
            if tag in (ITEM, SEQUENCE_DELIMITER):
                raise EncodingError(f"unexpected item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos}")
            pos = self._element(tag, pos, end, depth)
        if in_item:
            raise EncodingError("truncated: data ends inside an undefined-length item")
        if pos != end:
            raise EncodingError("last element runs past the end of the data")
        return pos

    def _element(self, tag: int, pos: int, end: int, depth: int) -> int:
        buf, endian = self.buf, self.endian
        if self.explicit:
            vr = bytes(buf[pos + 4 : pos + 6])
            if len(vr) < 2 or not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise EncodingError(f"invalid VR {vr!r} for ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos}")
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise EncodingError(f"truncated: data ends inside an element header at byte {pos}")
                (length,) = struct.unpack_from(endian + "I", buf, pos + 8)
                value = pos + 12
            else:
                (length,) = struct.unpack_from(endian + "H", buf, pos + 6)
                value = pos + 8
        else:
            (length,) = struct.unpack_from(endian + "I", buf, pos + 4)
            value = pos + 8
            vr = _implicit_vr(tag, length)
        name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if tag & 0xFFFF == 0 and length != UNDEFINED and value + length <= end:
            return value + length  # group lengths depend on the encoding, not the content: not digested
        self.digest.update(struct.pack("<I", tag))
        if length == UNDEFINED:
            if vr == b"SQ" or vr == b"UN":
                # An undefined-length UN is a sequence encoded implicit VR little endian (PS3.5 6.2.2).
                walker = self if vr == b"SQ" else _Walker(buf, explicit=False, little=True, digest=self.digest)
                return walker.sequence(value, end, depth=depth + 1, name=name)
            if vr in (b"OB", b"OW") and tag == 0x7FE00010:
                return self.fragments(value, end, name=name)
            raise EncodingError(f"undefined length on {name} with VR {vr.decode(errors='replace')}")
        if value + length > end:
            raise EncodingError(
                f"truncated: {name} declares {length} bytes, {max(end - value, 0)} remain"
            )
        if vr == b"SQ":
            self.sequence(value, value + length, depth=depth + 1, name=name, defined=True)
        else:
            self.digest.update(b"V" + struct.pack("<I", length))
            self.digest.update(buf[value : value + length])
            if depth == 0 and tag in self.capture:
                self.values[tag] = bytes(buf[value : value + length])
        return value + length

    def sequence(self, pos: int, end: int, *, depth: int, name: str, defined: bool = False) -> int:
        self.digest.update(b"S")
        while pos < end:
            tag = self._tag(pos, end)
            (length,) = struct.unpack_from(self.endian + "I", self.buf, pos + 4)
            if tag == SEQUENCE_DELIMITER:
                if defined:
                    raise EncodingError(f"sequence delimiter inside defined-length sequence {name}")
                self.digest.update(b"E")
                return pos + 8
            if tag != ITEM:
                raise EncodingError(f"sequence {name} holds a non-item tag at byte {pos}")
            self.digest.update(b"I")
            if length == UNDEFINED:
                pos = self.dataset(pos + 8, end, depth=depth, in_item=True)
            else:
                if pos + 8 + length > end:
                    raise EncodingError(f"truncated: item of {name} declares {length} bytes beyond the data")
                self.dataset(pos + 8, pos + 8 + length, depth=depth)
                pos += 8 + length
        if not defined:
            raise EncodingError(f"truncated: data ends inside sequence {name} (no delimiter)")
        self.digest.update(b"E")
        return pos

    def fragments(self, pos: int, end: int, *, name: str) -> int:
        """Encapsulated pixel data: items of raw bytes closed by a sequence delimiter (PS3.5 A.4)."""
        while pos < end:
            tag = self._tag(pos, end)
            (length,) = struct.unpack_from(self.endian + "I", self.buf, pos + 4)
            if tag == SEQUENCE_DELIMITER:
                return pos + 8
            if tag != ITEM or length == UNDEFINED:
                raise EncodingError(f"encapsulated {name} holds a malformed fragment at byte {pos}")
            if pos + 8 + length > end:
                raise EncodingError(f"truncated: fragment of {name} declares {length} bytes beyond the data")
            self.digest.update(b"F" + struct.pack("<I", length))
            self.digest.update(self.buf[pos + 8 : pos + 8 + length])
            pos += 8 + length
        raise EncodingError(f"truncated: data ends inside encapsulated {name} (no delimiter)")


def _implicit_vr(tag: int, length: int) -> bytes:
    """The VR an implicit-VR element must have, as far as the walk needs it (only SQ matters)."""
    if length == UNDEFINED:
        return b"SQ"  # only sequences may have undefined length in implicit VR (PS3.5 7.1.3)
    if tag & 0xFFFF == 0 or (tag >> 16) & 1:
        return b"UN"  # group lengths and private elements: skip their values
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return b"UN"
    return b"SQ" if vr == "SQ" else b"UN"
