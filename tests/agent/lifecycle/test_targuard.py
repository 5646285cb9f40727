"""The tar guard: in step with tarfile on real archives of every format, and each bound refused from the header."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable

import pytest

from agent.lifecycle.targuard import GuardedStream, TarGuard, TarLimits
from agent.shared.errors import BundleRefused

CHUNKS = (1, 7, 511, 512, 513, 10240, 1 << 20)


def _hdr(name: str, kind: bytes, size: int = 0, linkname: str = "", fmt: int = tarfile.GNU_FORMAT) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mtime = kind, size, linkname, 1_700_000_000
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _record(keyword: bytes, value: bytes) -> bytes:
    rest = len(keyword) + len(value) + 3  # ' ', '=', '\n'
    digits = len(str(rest))
    while len(str(rest + digits)) != digits:
        digits += 1
    return b"%d %s=%s\n" % (rest + digits, keyword, value)


def _extended(kind: bytes, data: bytes) -> bytes:
    return _hdr("././@LongLink" if kind in b"LK" else "pax", kind, len(data)) + _pad(data)


def _pax(*records: tuple[bytes, bytes], kind: bytes = b"x") -> bytes:
    return _extended(kind, b"".join(_record(k, v) for k, v in records))


def _member(name: str = "f", data: bytes = b"") -> bytes:
    return _hdr(name, tarfile.REGTYPE, len(data)) + _pad(data)


END = b"\0" * 1024


def _with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)
    return bytes(block)


def _patched(header: bytes, offset: int, raw: bytes) -> bytes:
    block = bytearray(header)
    block[offset : offset + len(raw)] = raw
    return _with_checksum(block)


def _tarfile_sees(raw: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        return list(tar)


def _fed(data: bytes, chunk: int = 512, limits: TarLimits | None = None) -> TarGuard:
    guard = TarGuard(limits)
    for i in range(0, len(data), chunk):
        guard.feed(data[i : i + chunk])
    return guard


def _refused(data: bytes, limits: TarLimits | None = None) -> str:
    for chunk in CHUNKS:  # the verdict does not depend on how the stream is cut
        with pytest.raises(BundleRefused) as e:
            _fed(data, chunk, limits)
    assert e.value.code == "BUNDLE-REFUSED"
    return e.value.message


# In step with tarfile ----------------------------------------------------------------------------------------


def _archive(fmt: int, fill: Callable[[tarfile.TarFile], None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        fill(tar)
    return out.getvalue()


def _everything(tar: tarfile.TarFile) -> None:
    def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.linkname = kind, len(data), linkname
        tar.addfile(info, io.BytesIO(data) if data else None)

    add("./bundle.json", data=b"{}")
    add("empty")
    add("block", data=b"b" * 512)
    add("block-and-one", data=b"c" * 513)
    add("lib", tarfile.DIRTYPE)
    add("lib/" + "long-name-" * 30, data=b"long")  # > 100 bytes: GNU 'L' or pax path
    add("usr/" + "p" * 120 + "/" + "short", data=b"split")  # ustar can split this into prefix + name
    add("link", tarfile.SYMTYPE, linkname="lib/" + "long-link-" * 30)  # 'K' or pax linkpath
    add("hard", tarfile.LNKTYPE, linkname="block")
    add("naïve-ünïcode-名前", data=b"u")
    add("fifo", tarfile.FIFOTYPE)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_guard_agrees_with_tarfile_on_real_archives(fmt: int) -> None:
    fill = _everything
    if fmt == tarfile.USTAR_FORMAT:  # ustar has no long names or non-ASCII: only what it can hold

        def fill(tar: tarfile.TarFile) -> None:
            for name in ("a", "usr/" + "p" * 120 + "/" + "short", "b" * 100):
                info = tarfile.TarInfo(name)
                info.size = 600
                tar.addfile(info, io.BytesIO(b"z" * 600))

    raw = _archive(fmt, fill)
    expected = [(m.name, m.type, m.size) for m in _tarfile_sees(raw)]
    for chunk in CHUNKS:
        guard = TarGuard()
        stream = GuardedStream(_Chunked(raw, chunk), guard)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            got = [(m.name, m.type, m.size) for m in tar]
        assert got == expected
        assert guard.members == len(expected)


class _Chunked:
    """A source that returns at most ``chunk`` bytes a read, as a decompressor may."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.pos = data, chunk, 0

    def read(self, size: int = -1, /) -> bytes:
        n = self.chunk if size < 0 else min(size, self.chunk)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def test_data_follows_only_where_tarfile_reads_it() -> None:
    # A symlink, a directory and a V7 directory ('\0' type, name ending in '/') with a size field: tarfile reads no
    # data for them, so the next header follows at once; the guard must not skip it as data.
    raw = (
        _hdr("sym", tarfile.SYMTYPE, 4096, linkname="f")
        + _hdr("dir", tarfile.DIRTYPE, 4096)
        + _hdr("old/", tarfile.AREGTYPE, 4096)
        + _member("f", b"data")
        + END
    )
    names = [m.name for m in _tarfile_sees(raw)]
    assert names == ["sym", "dir", "old", "f"]
    assert _fed(raw).members == 4


def test_the_end_of_the_archive_ends_the_checks() -> None:
    # tarfile stops at the first zero block and reads nothing after it: neither does the guard
    guard = _fed(_member() + END + _hdr("x", b"L", 1 << 30))
    assert guard.ended and guard.members == 1


def test_a_stream_read_is_bounded() -> None:
    stream = GuardedStream(io.BytesIO(bytes(5 << 20)), TarGuard())
    assert len(stream.read()) == 64 << 10
    assert len(stream.read(10)) == 10
    assert stream.tell() == (64 << 10) + 10


# Refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "what"),
    [(b"L", "GNU long name"), (b"K", "GNU long link"), (b"x", "pax header"), (b"g", "pax global header")],
)
def test_oversized_extended_headers_are_refused_from_the_header_alone(kind: bytes, what: str) -> None:
    header = _hdr("././@LongLink", kind, 256 << 20)
    assert _refused(header) == f"tar header at byte 0: {what} of 268435456 bytes, more than 65536"
    assert f"{what} of 65537 bytes" in _refused(_hdr("x", kind, 65537))


@pytest.mark.parametrize("kind", [b"L", b"K"])
def test_long_names_and_links_are_bounded(kind: bytes) -> None:
    _fed(_extended(kind, b"n" * 1024 + b"\0") + _member() + END)
    assert "of 1025 bytes, more than 1024" in _refused(_extended(kind, b"n" * 1025 + b"\0") + _member())
    # without a NUL the name runs to the end of the data
    assert "of 1500 bytes, more than 1024" in _refused(_extended(kind, b"n" * 1500))


@pytest.mark.parametrize("keyword", [b"path", b"linkpath"])
def test_pax_names_are_bounded(keyword: bytes) -> None:
    _fed(_pax((keyword, b"p" * 1024)) + _member() + END)
    message = _refused(_pax((keyword, b"p" * 1025)) + _member())
    assert message == f"tar header at byte 0: pax {keyword.decode()} of 1025 bytes, more than 1024"


@pytest.mark.parametrize(
    ("records", "says"),
    [
        (((b"size", b"1099511627776"),), "pax header overrides a member's size"),
        (((b"GNU.sparse.map", b"0,10"),), "GNU sparse file"),
        (((b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")), "GNU sparse file"),
        (((b"comment", b"1" * 65),), "pax header with a run of more than 64 digits"),
        (tuple((b"k%d" % i, b"v") for i in range(65)), "pax header with more than 64 records"),
    ],
)
def test_pax_records_that_tarfile_would_misread_or_choke_on(
    records: tuple[tuple[bytes, bytes], ...], says: str
) -> None:
    assert says in _refused(_pax(*records) + _member())


def test_pax_records_within_bounds_are_accepted() -> None:
    records = [(b"comment", b"1" * 64), (b"mtime", b"1700000000.123456789"), (b"path", b"a=b\nc")]
    guard = _fed(_pax(*records) + _pax((b"comment", b"git"), kind=b"g") + _member() + END)
    assert guard.members == 1


@pytest.mark.parametrize(
    "data",
    [
        b"6 a=b\n\0",  # something after the last record
        b"7 a=b\n",  # the length runs past the data
        b"5 a=b\n",  # the length stops short of the newline
        b"6 ab\n\n",  # no '='
        b"6 =ab\n",  # no keyword
        b"x a=b\n",  # no length
        b"00000000006 a=b\n",  # a length of 11 digits
        b"6 a=b",  # no newline
    ],
)
def test_malformed_pax_headers_are_refused(data: bytes) -> None:
    assert "malformed pax header" in _refused(_extended(b"x", data) + _member())


def test_extended_header_padding_must_be_nul() -> None:
    header = _extended(b"L", b"name\0")
    dirty = header[:-1] + b"x"
    assert "GNU long name padded with something else than NUL bytes" in _refused(dirty + _member())


def test_chains_of_extended_headers_are_bounded() -> None:
    four = _pax((b"comment", b"a"), kind=b"g") + _pax((b"uname", b"u")) + _extended(b"K", b"t\0")
    _fed(four + _extended(b"L", b"n\0") + _hdr("sym", tarfile.SYMTYPE) + END)
    assert "more than 4 extended headers in a row" in _refused(four + _pax((b"gname", b"g")) + _pax((b"a", b"b")))


def test_global_records_are_bounded() -> None:
    many = _pax(*((b"k%d" % i, b"v") for i in range(9)), kind=b"g")
    assert _fed(many + _member() + END).members == 1
    assert "pax global headers with more than 16 records" in _refused(many + _member() + many)


@pytest.mark.parametrize("kind", [b"S", b"M", b"V", b"X", b"D", b"N", b"Z"])
def test_types_a_bundle_never_has_are_refused(kind: bytes) -> None:
    assert "member type" in _refused(_hdr("x", kind, 10) + _pad(b"x" * 10))


def test_counts_are_bounded() -> None:
    limits = TarLimits(members=3, names_total=40, unpacked_bytes=1000, pax_records_total=3, extended_total=2048)
    three = _member("a") + _member("b") + _member("c")
    assert _fed(three + END, limits=limits).members == 3
    assert _refused(three + _member("d"), limits) == "tar header at byte 1536: more than 3 members"
    assert "member names of more than 40 bytes in all" in _refused(_member("n" * 41), limits)
    long_name = _extended(b"L", b"n" * 30 + b"\0") + _member("m" * 11)
    assert "member names of more than 40 bytes in all" in _refused(long_name, limits)
    # the size alone decides: the data need not follow
    too_big = _member("a", b"x" * 600) + _hdr("b", tarfile.REGTYPE, 401)
    assert "unpacks to more than 1000 bytes" in _refused(too_big, limits)
    records = _pax((b"a", b"1"), (b"b", b"2")) + _member() + _pax((b"c", b"3"), (b"d", b"4"))
    assert "more than 3 pax records in all" in _refused(records, limits)
    big = _pax((b"comment", b"c" * 1500))
    assert "extended headers of more than 2048 bytes in all" in _refused(big + _member() + big, limits)


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("size", b"0o17\0"),  # int(text, 8) takes it; tarfile would read 15
        ("size", b"+17\0"),
        ("size", b"1_0\0"),
        ("size", b"\xff" + b"\xff" * 11),  # negative base-256
        ("checksum", b"1234567\0"),
    ],
)
def test_header_numbers_tarfile_could_read_otherwise_are_refused(field: str, raw: bytes) -> None:
    header = _member("f", b"x" * 15)
    if field == "size":
        bad = _patched(header[:512], 124, raw.ljust(12, b"\0"))
        assert "the size is not an octal or positive base-256 number" in _refused(bad)
    else:
        bad = header[:148] + raw + header[156:512]
        assert "damaged (bad checksum)" in _refused(bad)


def test_base_256_sizes_are_read_as_tarfile_reads_them() -> None:
    header = _patched(_hdr("f", tarfile.REGTYPE, 0), 124, b"\x80" + (600).to_bytes(11, "big"))
    raw = header + _pad(b"y" * 600) + END
    assert [m.size for m in _tarfile_sees(raw)] == [600]
    assert _fed(raw).members == 1
