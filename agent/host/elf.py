"""What an ELF file says about how it is loaded: its interpreter, the libraries it needs and, for a C library, the
oldest kernel it runs on (its GNU ABI note). Pure: takes the file's bytes.

The build uses it to bundle the C runtime closure of the frozen programs (packaging/build.py); the agent uses it to
tell the kernel floor of the C library it runs on (`PRQ-KERNEL`)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_NOTE = 1, 2, 3, 4
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 14, 15, 29
NT_GNU_ABI_TAG = 1
ABI_LINUX = 0


class ElfError(ValueError):
    """Not an ELF file, or one whose headers point outside it."""


@dataclass(frozen=True)
class ElfFile:
    interp: str | None  # PT_INTERP: the loader that runs it, None for a library or a static program
    needed: tuple[str, ...]  # DT_NEEDED, in order
    soname: str | None
    runpath: tuple[str, ...]  # DT_RUNPATH, else DT_RPATH
    abi_kernel: tuple[int, int, int] | None  # NT_GNU_ABI_TAG: the oldest Linux it runs on


@dataclass(frozen=True)
class _Segment:
    kind: int
    offset: int
    vaddr: int
    filesz: int


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def parse_elf(data: bytes) -> ElfFile:
    """Read the loading facts of an ELF file (32 or 64 bit, either byte order); ElfError if it is not one."""
    if not is_elf(data) or len(data) < 52:
        raise ElfError("not an ELF file")
    wide = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    try:
        if wide:
            phoff, phentsize, phnum = (
                struct.unpack_from(end + "Q", data, 32)[0],
                *struct.unpack_from(end + "HH", data, 54),
            )
            segments = [
                _Segment(kind, offset, vaddr, filesz)
                for kind, _flags, offset, vaddr, _paddr, filesz, *_ in (
                    struct.unpack_from(end + "IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)
                )
            ]
        else:
            phoff, phentsize, phnum = (
                struct.unpack_from(end + "I", data, 28)[0],
                *struct.unpack_from(end + "HH", data, 42),
            )
            segments = [
                _Segment(kind, offset, vaddr, filesz)
                for kind, offset, vaddr, _paddr, filesz, *_ in (
                    struct.unpack_from(end + "IIIIIIII", data, phoff + i * phentsize) for i in range(phnum)
                )
            ]
    except struct.error as e:
        raise ElfError(f"program headers outside the file: {e}") from e
    interp = next((_cstring(data, s.offset) for s in segments if s.kind == PT_INTERP), None)
    abi = next((tag for s in segments if s.kind == PT_NOTE and (tag := _abi_tag(data, s, end)) is not None), None)
    dynamic = next((s for s in segments if s.kind == PT_DYNAMIC), None)
    if dynamic is None:
        return ElfFile(interp, (), None, (), abi)
    entries = _dynamic_entries(data, dynamic, end, wide)
    strtab_vaddr = next((v for tag, v in entries if tag == DT_STRTAB), None)
    if strtab_vaddr is None:
        raise ElfError("a dynamic section without a string table")
    strtab = _file_offset(segments, strtab_vaddr)

    def text(offset: int) -> str:
        return _cstring(data, strtab + offset)

    needed = tuple(text(v) for tag, v in entries if tag == DT_NEEDED)
    soname = next((text(v) for tag, v in entries if tag == DT_SONAME), None)
    path = next((text(v) for tag, v in entries if tag == DT_RUNPATH), None)
    if path is None:
        path = next((text(v) for tag, v in entries if tag == DT_RPATH), None)
    return ElfFile(interp, needed, soname, tuple(p for p in (path or "").split(":") if p), abi)


def _dynamic_entries(data: bytes, seg: _Segment, end: str, wide: bool) -> list[tuple[int, int]]:
    fmt, size = (end + "qQ", 16) if wide else (end + "iI", 8)
    entries = []
    for offset in range(seg.offset, seg.offset + seg.filesz, size):
        try:
            tag, value = struct.unpack_from(fmt, data, offset)
        except struct.error as e:
            raise ElfError(f"dynamic section outside the file: {e}") from e
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    return entries


def _file_offset(segments: list[_Segment], vaddr: int) -> int:
    for s in segments:
        if s.kind == PT_LOAD and s.vaddr <= vaddr < s.vaddr + s.filesz:
            return vaddr - s.vaddr + s.offset
    raise ElfError(f"address {vaddr:#x} is in no loaded segment")


def _cstring(data: bytes, offset: int) -> str:
    stop = data.find(b"\0", offset)
    if offset >= len(data) or stop < 0:
        raise ElfError(f"string at {offset:#x} runs past the end of the file")
    return data[offset:stop].decode("utf-8", "replace")


def _abi_tag(data: bytes, seg: _Segment, end: str) -> tuple[int, int, int] | None:
    """The GNU ABI tag note of a PT_NOTE segment: (major, minor, patch) of the oldest Linux, if it has one."""
    pos, stop = seg.offset, min(seg.offset + seg.filesz, len(data))
    while pos + 12 <= stop:
        namesz, descsz, kind = struct.unpack_from(end + "III", data, pos)
        name_at = pos + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        if kind == NT_GNU_ABI_TAG and data[name_at : name_at + namesz] == b"GNU\0" and descsz >= 16:
            os_, major, minor, patch = struct.unpack_from(end + "IIII", data, desc_at)
            return (major, minor, patch) if os_ == ABI_LINUX else None
        pos = desc_at + (descsz + 3) // 4 * 4
    return None
