"""A guard between a decompressed tar stream and ``tarfile`` that bounds what tarfile holds in memory.

Checks on the members tarfile returns come too late for the costly part. tarfile reads an extended
header (a GNU long name or long link, types 'L'/'K'; a pax header, 'x'/'g') whole into memory before it
returns the member it belongs to, however large the header's size field is: a 255 KiB gzip carrying a
256 MiB long name costs over half a GiB before any check can look at the name. The pax parser of
CPython before 3.11.10 is also quadratic in runs of digits (CVE-2024-6232), global pax records are
copied into every later member, and stream mode keeps every member it has returned.

So the guard sits in front of ``tarfile.open(fileobj=GuardedStream(...), mode="r|")`` and sees every
byte, in order, before tarfile does. It follows the archive's structure as tarfile does (a 512-byte
header; then data, rounded up to 512 bytes, only for regular files and extended headers), parses each
header itself and raises ``BundleRefused`` before handing over the bytes of anything out of bounds:
oversized or too many extended headers, long names and link targets, too many members, too many name
bytes in all, too much data. It must never disagree with tarfile about where the next header starts, so
it refuses whatever tarfile could read differently: a bad checksum, a size that is not plain octal or
positive base-256, a pax record that is not well formed, a pax ``size`` override, GNU sparse files,
multivolume and other types a bundle never has.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from typing import Protocol

from agent.shared.errors import BundleRefused
from agent.shared.textsafe import shown

BLOCK = 512

# Types tarfile gives data blocks (it treats '\0' with a name ending in '/' as a directory: no data).
_REGULAR = frozenset({b"0", b"\0", b"7"})
# Every other type a member may have; tarfile reads no data for these whatever their size field says.
_NO_DATA = frozenset({b"1", b"2", b"3", b"4", b"5", b"6"})
_EXTENDED = {b"L": "GNU long name", b"K": "GNU long link", b"x": "pax header", b"g": "pax global header"}
_OCTAL = re.compile(rb"[0-7]*")
_DIGITS = re.compile(rb"[0-9]+")
_NAME_KEYS = frozenset({b"path", b"linkpath"})


@dataclass(frozen=True)
class TarLimits:
    """What an archive may hold; far above a real bundle (a few hundred files, names under 200 bytes)."""

    members: int = 20_000
    name_bytes: int = 1024  # one member name or link target
    names_total: int = 4 << 20  # every name and link target together: bounds the bookkeeping of the members
    unpacked_bytes: int = 4 << 30  # a bundle is tens of MiB; this only stops decompression bombs
    extended_bytes: int = 64 << 10  # one extended header
    extended_total: int = 4 << 20  # all extended headers: tarfile keeps their records with the members
    extended_chain: int = 4  # extended headers before one member (pax global, pax, long link, long name)
    pax_records: int = 64  # in one pax header
    pax_records_total: int = 100_000
    global_records: int = 16  # pax global records are copied into every member that follows
    digit_run: int = 64  # tarfile's pax parser is quadratic in runs of digits


class TarGuard:
    """Follows a tar stream fed to it in order and raises BundleRefused at the first header out of bounds."""

    def __init__(self, limits: TarLimits | None = None) -> None:
        self.limits = limits or TarLimits()
        self.members = 0
        self.offset = 0  # of the next byte fed
        self.ended = False  # an end-of-archive block was seen; tarfile reads no further headers
        self._header = bytearray()
        self._skip = 0  # data or padding bytes to pass before the next header
        self._ext: bytearray | None = None  # the data of the extended header being collected
        self._ext_need = 0
        self._ext_size = 0
        self._ext_type = b""
        self._ext_at = 0
        self._chain = 0
        self._pending_names = 0  # name bytes from extended headers, charged to the member they belong to
        self._names_total = 0
        self._unpacked = 0
        self._ext_total = 0
        self._records_total = 0
        self._global_records = 0

    def feed(self, data: bytes) -> None:
        """Account for the next ``data`` of the stream; BundleRefused before tarfile would see a bad header whole."""
        view = memoryview(data)
        pos = 0
        while pos < len(view) and not self.ended:
            if self._skip:
                n = min(self._skip, len(view) - pos)
                self._skip -= n
            elif self._ext is not None:
                n = min(self._ext_need, len(view) - pos)
                self._ext += view[pos : pos + n]
                self._ext_need -= n
            else:
                n = min(BLOCK - len(self._header), len(view) - pos)
                self._header += view[pos : pos + n]
            pos += n
            self.offset += n
            if self._ext is not None and not self._ext_need:
                ext, self._ext = self._ext, None
                self._extended_done(bytes(ext))
            elif len(self._header) == BLOCK:
                block = bytes(self._header)
                self._header.clear()
                self._header_done(block, self.offset - BLOCK)
        self.offset += len(view) - pos

    def _refuse(self, at: int, what: str) -> BundleRefused:
        return BundleRefused(f"tar header at byte {at}: {what}")

    def _header_done(self, block: bytes, at: int) -> None:
        if block.count(0) == BLOCK:
            self.ended = True  # tarfile stops at the first zero block (it is opened without ignore_zeros)
            return
        checksum = _number(block[148:156])
        if checksum is None or checksum not in _checksums(block):
            raise self._refuse(at, "damaged (bad checksum); not a tar archive, or a corrupt one")
        size = _number(block[124:136])
        kind = block[156:157]
        if size is None:
            raise self._refuse(at, "the size is not an octal or positive base-256 number")
        limits = self.limits
        if kind in _EXTENDED:
            what = _EXTENDED[kind]
            self._chain += 1
            if self._chain > limits.extended_chain:
                raise self._refuse(at, f"more than {limits.extended_chain} extended headers in a row")
            if size > limits.extended_bytes:
                raise self._refuse(at, f"{what} of {size} bytes, more than {limits.extended_bytes}")
            self._ext_total += size
            if self._ext_total > limits.extended_total:
                raise self._refuse(at, f"extended headers of more than {limits.extended_total} bytes in all")
            # Collected with its padding: tarfile parses the padding too (a long name runs to the first NUL,
            # pax records are read until one does not parse), so the padding must be NULs.
            self._ext, self._ext_need, self._ext_size = bytearray(), _padded(size), size
            self._ext_type, self._ext_at = kind, at
            if size == 0:
                self._ext = None
                self._extended_done(b"")
            return
        if kind not in _REGULAR and kind not in _NO_DATA:
            raise self._refuse(at, f"member type {shown(kind.decode('latin-1'))} (GNU sparse, multivolume, ...)")
        self.members += 1
        if self.members > limits.members:
            raise self._refuse(at, f"more than {limits.members} members")
        name, link, prefix = _field(block[0:100]), _field(block[157:257]), _field(block[345:500])
        self._names_total += len(name) + len(link) + len(prefix) + self._pending_names
        if self._names_total > limits.names_total:
            raise self._refuse(at, f"member names of more than {limits.names_total} bytes in all")
        self._chain = 0
        self._pending_names = 0
        if kind in _REGULAR and not (kind == b"\0" and name.endswith(b"/")):
            self._unpacked += size
            if self._unpacked > limits.unpacked_bytes:
                raise self._refuse(at, f"the archive unpacks to more than {limits.unpacked_bytes} bytes")
            self._skip = _padded(size)

    def _extended_done(self, raw: bytes) -> None:
        data, padding = raw[: self._ext_size], raw[self._ext_size :]
        kind, at = self._ext_type, self._ext_at
        if padding.count(0) != len(padding):
            raise self._refuse(at, f"{_EXTENDED[kind]} padded with something else than NUL bytes")
        if kind in (b"L", b"K"):
            end = data.find(b"\0")
            self._name(at, _EXTENDED[kind], len(data) if end < 0 else end)
            return
        records = _pax_records(data)
        if records is None:
            raise self._refuse(at, "malformed pax header (records must be 'LENGTH KEYWORD=VALUE\\n')")
        limits = self.limits
        if len(records) > limits.pax_records:
            raise self._refuse(at, f"pax header with more than {limits.pax_records} records")
        self._records_total += len(records)
        if self._records_total > limits.pax_records_total:
            raise self._refuse(at, f"more than {limits.pax_records_total} pax records in all")
        if kind == b"g":
            self._global_records += len(records)
            if self._global_records > limits.global_records:
                raise self._refuse(at, f"pax global headers with more than {limits.global_records} records")
        run = re.search(rb"[0-9]{%d}" % (limits.digit_run + 1), data)
        if run is not None:
            raise self._refuse(at, f"pax header with a run of more than {limits.digit_run} digits")
        for keyword, value in records:
            if keyword == b"size":
                raise self._refuse(at, "pax header overrides a member's size")
            if keyword.startswith(b"GNU.sparse."):
                raise self._refuse(at, "GNU sparse file")
            if keyword in _NAME_KEYS:
                self._name(at, f"pax {keyword.decode()}", len(value))

    def _name(self, at: int, what: str, length: int) -> None:
        if length > self.limits.name_bytes:
            raise self._refuse(at, f"{what} of {length} bytes, more than {self.limits.name_bytes}")
        self._pending_names += length


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class GuardedStream:
    """A read-only stream of ``source``'s bytes that passes each through ``guard`` before returning it."""

    def __init__(self, source: _Readable, guard: TarGuard, chunk: int = 64 << 10) -> None:
        self._source = source
        self.guard = guard
        self._chunk = chunk

    def read(self, size: int = -1, /) -> bytes:
        # Never the rest of the stream at once: that is the decompression bomb this is here to stop.
        data = self._source.read(self._chunk if size < 0 else min(size, self._chunk))
        self.guard.feed(data)
        return data

    def tell(self) -> int:
        return self.guard.offset

    def seek(self, pos: int, whence: int = 0, /) -> int:
        raise io.UnsupportedOperation("a guarded tar stream only reads forwards")

    def write(self, b: bytes, /) -> int:
        raise io.UnsupportedOperation("a guarded tar stream is read-only")

    def close(self) -> None:
        pass  # the caller closes the source


def _field(raw: bytes) -> bytes:
    """A NUL-terminated header field, as tarfile's nts() cuts it."""
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _number(raw: bytes) -> int | None:
    """A numeric header field as tarfile's nti() reads it, or None where tarfile could read it otherwise."""
    if raw[0] == 0o200:
        return int.from_bytes(raw[1:], "big")
    if raw[0] == 0o377:
        return None  # negative
    text = _field(raw).strip()
    # tarfile accepts what int(text, 8) accepts ('0o7', '+7', '1_0', Unicode spaces): only plain octal here.
    return int(text or b"0", 8) if _OCTAL.fullmatch(text) else None


def _checksums(block: bytes) -> tuple[int, int]:
    """The unsigned and signed header sums tarfile accepts (the checksum field counts as spaces)."""
    unsigned = 256 + sum(struct.unpack_from("148B8x356B", block))
    signed = 256 + sum(struct.unpack_from("148b8x356b", block))
    return unsigned, signed


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _pax_records(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """The records of a pax header if every byte belongs to a well-formed 'LENGTH KEYWORD=VALUE\\n', else None.

    On such data tarfile's own parser finds the same records; on anything else it could find others.
    """
    records = []
    pos = 0
    while pos < len(data):
        m = _DIGITS.match(data, pos, min(len(data), pos + 10))
        if m is None or m.end() >= len(data) or data[m.end()] != 0x20:
            return None
        end = pos + int(m.group())
        equals = data.find(b"=", m.end() + 1, end)
        if end > len(data) or equals <= m.end() + 1 or data[end - 1] != 0x0A:
            return None
        records.append((data[m.end() + 1 : equals], data[equals + 1 : end - 1]))
        pos = end
    return records
