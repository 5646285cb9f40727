"""Bundle names, bundle.json and the refusals of inspect_bundle, against real tarballs."""

from __future__ import annotations

import datetime
import gzip
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from agent.host.distros.matrix import BY_TAG, Init
from agent.lifecycle.bundles import (
    BundleName,
    Manifest,
    bundle_file_name,
    inspect_bundle,
    parse_bundle_name,
    parse_manifest,
)
from agent.shared.errors import BundleRefused
from tests.bundle_factory import DEFAULT_FILES, add_member, add_special, make_bundle, manifest_for


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "Mobility_UA_0.1.0_UBUNTU-20.04-64_GA_26Nov2026_release.tar.gz",
            BundleName("0.1.0", "UBUNTU-20.04", datetime.date(2026, 11, 26)),
        ),
        (
            "Mobility_UA_0.1.0_RHEL7-64_GA_05Jan2027_release.tar.gz",
            BundleName("0.1.0", "RHEL7", datetime.date(2027, 1, 5)),
        ),
        (
            "Mobility_UA_9.52.0.1_SLES11-SP3-64_GA_29Feb2024_release.tar.gz",
            BundleName("9.52.0.1", "SLES11-SP3", datetime.date(2024, 2, 29)),
        ),
    ],
)
def test_parse_bundle_name(name: str, expected: BundleName) -> None:
    parsed = parse_bundle_name(name)
    assert parsed == expected
    assert bundle_file_name(parsed.version, parsed.os_tag, parsed.date) == name


def test_every_matrix_tag_round_trips() -> None:
    for tag in BY_TAG:
        name = bundle_file_name("1.2.3", tag, datetime.date(2026, 3, 1))
        assert parse_bundle_name(name).os_tag == tag


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("Mobility_UA_0.1.0_UBUNTU-20.04-64_GA_26Nov2026_release.tar", "is not a bundle name"),
        ("mobility.tar.gz", "is not a bundle name"),
        ("Mobility_UA_0.1_beta_UBUNTU-20.04-64_GA_26Nov2026_release.tar.gz", "is not a bundle name"),
        ("Mobility_UA_1_UBUNTU-20.04-64_GA_26Nov2026_release.tar.gz", "is not a bundle name"),
        ("../Mobility_UA_0.1.0_UBUNTU-20.04-64_GA_26Nov2026_release.tar.gz", "is not a bundle name"),
        ("Mobility_UA_0.1.0_UBUNTU-19.10-64_GA_26Nov2026_release.tar.gz", "OS tag 'UBUNTU-19.10' is not in"),
        ("Mobility_UA_0.1.0_WINDOWS2016-64_GA_26Nov2026_release.tar.gz", "is not in the support matrix"),
        ("Mobility_UA_0.1.0_RHEL7-64_GA_30Feb2026_release.tar.gz", "is not a real date"),
        ("Mobility_UA_0.1.0_RHEL7-64_GA_05Jnu2027_release.tar.gz", "month 'Jnu' is not one of"),
        ("Mobility_UA_0.1.0_RHEL7-64_GA_05JAN2027_release.tar.gz", "month 'JAN'"),
    ],
)
def test_bad_names_are_refused_with_the_reason(name: str, says: str) -> None:
    with pytest.raises(BundleRefused) as e:
        parse_bundle_name(name)
    assert e.value.code == "BUNDLE-REFUSED"
    assert int(e.value.exit_code) == 1
    assert says in e.value.message


def test_parse_manifest() -> None:
    doc = manifest_for("RHEL6", "0.2.0", DEFAULT_FILES)
    m = parse_manifest(json.dumps(doc).encode())
    assert m == Manifest("RHEL6", "0.2.0", "x86_64", Init.SYSV, "3.2", "2.36", doc["files"])
    assert m.state_format == 1  # a bundle from before state formats were recorded
    m = parse_manifest(json.dumps({**doc, "state_format": 7}).encode())
    assert m.state_format == 7


def _edited(**changes: Any) -> bytes:
    doc = manifest_for("UBUNTU-20.04", "0.1.0", DEFAULT_FILES)
    for key, value in changes.items():
        if value is ...:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
        (_edited(arch=...), "lacks arch"),
        (_edited(colour="blue"), "unknown fields 'colour'"),
        (_edited(os_tag="UBUNTU-19.10"), "os_tag 'UBUNTU-19.10' is not in the support matrix"),
        (_edited(version=1), "'version' must be a non-empty string"),
        (_edited(version="1.0-rc1"), "version '1.0-rc1' is not dotted numbers"),
        (_edited(arch="aarch64"), "arch 'aarch64' is not one of x86_64"),
        (_edited(init="upstart"), "init 'upstart' is not one of"),
        (_edited(init="sysv"), "init 'sysv' is wrong for UBUNTU-20.04"),
        (_edited(kernel_floor="3"), "kernel_floor '3'"),
        (_edited(kernel_floor="3.2-rc1"), "kernel_floor '3.2-rc1'"),
        (_edited(runtime_glibc="new"), "runtime_glibc 'new'"),
        (_edited(glibc_floor="2.35"), "unknown fields 'glibc_floor'"),  # a bundle from before the bundled runtime
        (_edited(state_format=0), "state_format '0'"),
        (_edited(state_format="2"), "state_format '2'"),
        (_edited(state_format=True), "state_format 'True'"),
        (_edited(state_format=10**12), "state_format '1000000000000'"),
        (_edited(files=[]), "files must be an object"),
        (_edited(files={"../x": "0" * 64}), "has '..' in its path"),
        (_edited(files={"/etc/x": "0" * 64}), "is an absolute path"),
        (_edited(files={"x": "ABC"}), "hash of 'x' is not 64 lower-case hex digits"),
        (_edited(files={"bundle.json": "0" * 64}), "cannot be listed"),
        (_edited(files={"./x": "0" * 64, "x": "0" * 64}), "listed twice"),
    ],
)
def test_bad_manifests_are_refused(data: bytes, says: str) -> None:
    with pytest.raises(BundleRefused) as e:
        parse_manifest(data)
    assert says in e.value.message


def test_inspect_good_bundle(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, "RHEL7", "0.3.1", datetime.date(2027, 1, 5))
    name, manifest = inspect_bundle(path)
    assert name == BundleName("0.3.1", "RHEL7", datetime.date(2027, 1, 5))
    assert manifest.files.keys() == DEFAULT_FILES.keys()


def test_inspect_accepts_members_without_dot_prefix_and_inner_links(tmp_path: Path) -> None:
    def extra(tar: tarfile.TarFile) -> None:
        add_special("lib/current", tarfile.SYMTYPE, "mobility")(tar)
        add_special("bin/mobility", tarfile.SYMTYPE, "../lib/mobility/agent.py")(tar)
        add_special("install2", tarfile.LNKTYPE, "install")(tar)

    files = dict(DEFAULT_FILES)
    path = make_bundle(
        tmp_path,
        prefix="",
        files=files,
        edit_manifest=lambda d: d["files"].update(install2=d["files"]["install"]),
        extra=extra,
    )
    inspect_bundle(path)


def test_inspect_uses_the_given_name_for_a_temporary_copy(tmp_path: Path) -> None:
    path = make_bundle(tmp_path)
    copy = tmp_path / ".incoming.tmp"
    copy.write_bytes(path.read_bytes())
    assert inspect_bundle(copy, name=path.name)[0].os_tag == "UBUNTU-20.04"
    with pytest.raises(BundleRefused, match="is not a bundle name"):
        inspect_bundle(copy)


def _refused(path: Path) -> str:
    with pytest.raises(BundleRefused) as e:
        inspect_bundle(path)
    assert e.value.code == "BUNDLE-REFUSED"
    assert e.value.message.startswith(path.name + ": ")
    return e.value.message


def test_refuses_path_traversal(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, extra=add_member("../../etc/cron.d/evil"))
    assert "member '../../etc/cron.d/evil' has '..' in its path" in _refused(path)


def test_refuses_absolute_member(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, extra=add_member("/etc/passwd"))
    assert "member '/etc/passwd' is an absolute path" in _refused(path)


@pytest.mark.parametrize(
    ("links", "bad"),
    [
        ([("evil", "/etc")], "symlink 'evil' -> '/etc' points outside"),
        ([("lib/evil", "../../etc")], "symlink 'lib/evil' -> '../../etc' points outside"),
        # each link alone stays inside, together they climb out of the root
        ([("a/b", ".."), ("c", "a/b/..")], "symlink 'c' -> 'a/b/..' points outside"),
        ([("loop1", "loop2"), ("loop2", "loop1/x")], "points outside"),
    ],
)
def test_refuses_links_outside(tmp_path: Path, links: list[tuple[str, str]], bad: str) -> None:
    def extra(tar: tarfile.TarFile) -> None:
        for name, target in links:
            add_special(name, tarfile.SYMTYPE, target)(tar)

    assert bad in _refused(make_bundle(tmp_path, extra=extra))


def test_refuses_member_under_a_symlink(tmp_path: Path) -> None:
    def extra(tar: tarfile.TarFile) -> None:
        add_special("etc", tarfile.SYMTYPE, "lib")(tar)
        add_member("etc/x")(tar)

    assert "member 'etc/x' lies under symlink 'etc'" in _refused(make_bundle(tmp_path, extra=extra))


def test_refuses_hard_link_outside(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, extra=add_special("h", tarfile.LNKTYPE, "/etc/shadow"))
    assert "is an absolute path" in _refused(path)


@pytest.mark.parametrize(
    ("kind", "what"), [(tarfile.CHRTYPE, "device file"), (tarfile.BLKTYPE, "device file"), (tarfile.FIFOTYPE, "FIFO")]
)
def test_refuses_device_files(tmp_path: Path, kind: bytes, what: str) -> None:
    path = make_bundle(tmp_path, extra=add_special("dev/sda", kind))
    assert f"member 'dev/sda' is a {what}" in _refused(path)


def test_refuses_duplicate_member(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, extra=add_member("./install", b"rm -rf /"))
    assert "member 'install' appears twice" in _refused(path)


def test_refuses_hash_mismatch(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, edit_manifest=lambda d: d["files"].update(install="0" * 64))
    assert "'install' has sha256" in _refused(path)
    assert "bundle.json says " + "0" * 64 in _refused(path)


def test_refuses_extra_file(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, extra=add_member("lib/backdoor.so"))
    assert "'lib/backdoor.so' is in the archive but not listed in bundle.json" in _refused(path)


def test_refuses_missing_file(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, edit_manifest=lambda d: d["files"].update({"lib/needed.so": "1" * 64}))
    assert "'lib/needed.so' is listed in bundle.json but missing from the archive" in _refused(path)


def test_refuses_missing_manifest(tmp_path: Path) -> None:
    path = tmp_path / bundle_file_name("0.1.0", "RHEL8", datetime.date(2026, 1, 1))
    with tarfile.open(path, "w:gz") as tar:
        add_member("install")(tar)
    assert "no bundle.json at the top level" in _refused(path)


def test_refuses_oversized_manifest(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, manifest=b" " * (2 << 20))
    assert "bundle.json is 2097152 bytes, more than 1048576" in _refused(path)


def test_refuses_manifest_disagreeing_with_name(tmp_path: Path) -> None:
    path = make_bundle(
        tmp_path,
        name=bundle_file_name("0.1.0", "UBUNTU-22.04", datetime.date(2026, 11, 26)),
        edit_manifest=lambda d: d.update(version="0.2.0"),
    )
    message = _refused(path)
    assert "bundle.json says os_tag UBUNTU-20.04 but the name says UBUNTU-22.04" in message
    assert "bundle.json says version 0.2.0 but the name says 0.1.0" in message


def test_refuses_bad_manifest_inside_bundle(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, edit_manifest=lambda d: d.update(arch="ppc64le"))
    assert "arch 'ppc64le'" in _refused(path)


@pytest.mark.parametrize("content", [b"", b"not a tarball at all", b"\x1f\x8b\x08\x00garbage"])
def test_refuses_files_that_are_not_tar_gz(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / bundle_file_name("0.1.0", "RHEL8", datetime.date(2026, 1, 1))
    path.write_bytes(content)
    assert "not a readable gzip-compressed tar archive" in _refused(path)


def test_refuses_truncated_archive(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, files={"big": bytes(range(256)) * 4096})
    path.write_bytes(path.read_bytes()[:-200])
    assert "not a readable gzip-compressed tar archive" in _refused(path)


def test_refuses_missing_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / bundle_file_name("0.1.0", "RHEL8", datetime.date(2026, 1, 1))
    assert "No such file" in _refused(path)


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_inspect_accepts_long_names_and_links_as_packaging_writes_them(tmp_path: Path, tar_format: int) -> None:
    # packaging/build writes GNU format: names over 100 bytes become 'L' headers, long link targets 'K'
    deep = "lib/mobility/_internal/" + "/".join(f"package{i}" for i in range(30)) + "/module.so"
    assert 200 < len(deep.encode()) < 1024
    files = {**DEFAULT_FILES, deep: b"\x7fELF", "lib/naïve/ünïcode.py": b"u = 1\n"}
    link = add_special("lib/" + "l" * 150, tarfile.SYMTYPE, "../" + deep)
    assert inspect_bundle(make_bundle(tmp_path, files=files, extra=link, tar_format=tar_format))[1].files.keys() == (
        files.keys()
    )


def test_messages_that_echo_the_archive_are_short_and_escaped(tmp_path: Path) -> None:
    name = "\x1b[2J" + "n" * 900
    message = _refused(make_bundle(tmp_path, extra=add_member(name)))
    assert "\x1b" not in message and "\\x1b[2J" in message
    assert len(message) < 400 and "(904 characters)" in message
    absolute = _refused(make_bundle(tmp_path / "b", extra=add_member("/" + "a" * 1000)))
    assert len(absolute) < 400 and "is an absolute path" in absolute


@pytest.mark.parametrize(
    "data",
    [
        _edited(version="1" * 500_000),
        _edited(os_tag="\x1b]0;x\x07" * 10_000),
        _edited(**{f"key{i}" * 100: 1 for i in range(1000)}),
        _edited(files={"/" + "x" * 100_000: "0" * 64}),
        _edited(files={"x" * 100_000: "Z"}),
        _edited(glibc_floor=["2"] * 100_000),
    ],
)
def test_manifest_messages_are_bounded(data: bytes) -> None:
    with pytest.raises(BundleRefused) as e:
        parse_manifest(data)
    assert len(e.value.message) < 700 and e.value.message.isprintable()


def test_refuses_corrupt_compressed_data(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, files={"big": bytes(range(256)) * 4096})
    good = path.read_bytes()
    refused = 0
    for i in range(10, len(good) - 8, 37):  # bad deflate data (zlib.error), bad CRCs, wrong bytes: never a traceback
        data = bytearray(good)
        data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            inspect_bundle(path)  # a flipped byte in the gzip header's file name changes nothing
        except BundleRefused as e:
            readable = "not a readable gzip-compressed tar archive" in e.message
            assert readable or "damaged (bad checksum)" in e.message, e.message  # deflate may yield wrong bytes
            refused += 1
    assert refused > 100


def test_refuses_an_archive_behind_a_tar_header_bomb(tmp_path: Path) -> None:
    # The header alone claims a 1 GiB long name: refused before a byte of it is read (the data is not even there).
    path = tmp_path / bundle_file_name("0.1.0", "RHEL8", datetime.date(2026, 1, 1))
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 1 << 30
    with gzip.open(path, "wb") as gz:
        gz.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    assert _refused(path) == f"{path.name}: tar header at byte 0: GNU long name of 1073741824 bytes, more than 65536"
