"""OS detection against real release files of real distributions (tests/resources/distros, see ORIGIN.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.errors import OsKernelTooOld, OsUnknown, OsUnsupported, ReleaseFilesConflict, ReleaseFileUnreadable
from agent.host.distros import SUPPORT_MATRIX, detect_os, require_supported
from agent.host.paths import Paths
from agent.shared.errors import Exit
from tests.conftest import DISTROS

SUPPORTED = {
    "rhel5": "RHEL5",
    "centos5": "RHEL5",
    "rhel6": "RHEL6",
    "rhel67": "RHEL6",
    "centos6": "RHEL6",
    "rhel7": "RHEL7",
    "centos7": "RHEL7",
    "rhel8": "RHEL8",
    "centos8": "RHEL8",
    "centosstream8": "RHEL8",
    "rocky": "RHEL8",
    "rocky8": "RHEL8",
    "almalinux8": "RHEL8",
    "rhel9": "RHEL9",
    "rocky9": "RHEL9",
    "almalinux9": "RHEL9",
    "oracle6": "OL6",
    "oracle7": "OL7",
    "oracle8": "OL8",
    "oracle9": "OL9",
    "sles11sp3": "SLES11-SP3",
    "sles11sp4": "SLES11-SP4",
    "sles12": "SLES12",
    "sles4sap12sp3": "SLES12",
    "sles15": "SLES15",
    "sles15sp3": "SLES15",
    "ubuntu14": "UBUNTU-14.04",
    "ubuntu16": "UBUNTU-16.04",
    "ubuntu18": "UBUNTU-18.04",
    "ubuntu20": "UBUNTU-20.04",
    "ubuntu22": "UBUNTU-22.04",
    "ubuntu24": "UBUNTU-24.04",
    "debian7": "DEBIAN7",
    "debian8": "DEBIAN8",
    "debian9": "DEBIAN9",
    "debian10": "DEBIAN10",
    "debian11": "DEBIAN11",
    "debian12": "DEBIAN12",
    "bttcb1": "DEBIAN11",  # a single-board computer's image that is Debian 11 (os-release says so)
}
UNSUPPORTED = {
    "altlinux10",
    "amazon2",
    "amazon2014",
    "amazon2016",
    "arch",
    "buildroot",
    "cloudlinux5",
    "cloudlinux6",
    "cloudlinux7",
    "coreos",
    "debiantesting",
    "exherbo",
    "fedora19",
    "fedora23",
    "fedora30",
    "gentoo",
    "guix",
    "kali",
    "kvmibm1",
    "linuxmint17",
    "mageia5",
    "mandriva2011",
    "manjaro1512",
    "openelec6",
    "opensuse15",
    "opensuse42",
    "opensusetumbleweed",
    "raspbian7",
    "raspbian8",
    "scientific6",
    "scientific7",
    "slackware14",
    "sles12sp0",  # SLES 12 GA: the matrix starts at SP1
}


def test_every_tree_is_classified_and_every_tag_has_a_real_case() -> None:
    trees = {p.name for p in DISTROS.iterdir() if p.is_dir()}
    assert trees == set(SUPPORTED) | UNSUPPORTED
    assert {row.tag for row in SUPPORT_MATRIX} == set(SUPPORTED.values())


@pytest.mark.parametrize("tree", sorted(SUPPORTED))
def test_supported_tree_maps_to_its_tag(tree: str) -> None:
    info = detect_os(Paths.checked(DISTROS / tree))
    assert info.os_tag == SUPPORTED[tree]
    assert info.pretty_name and info.id and info.version


@pytest.mark.parametrize("tree", sorted(UNSUPPORTED))
def test_other_systems_are_refused_with_what_was_found(tree: str) -> None:
    with pytest.raises((OsUnsupported, OsUnknown, ReleaseFilesConflict)) as exc:
        detect_os(Paths.checked(DISTROS / tree))
    assert exc.value.exit_code == Exit.UNSUPPORTED


def test_unsupported_message_names_the_system_and_lists_the_matrix() -> None:
    with pytest.raises(OsUnsupported) as exc:
        detect_os(Paths.checked(DISTROS / "fedora30"))
    assert "Fedora 30" in exc.value.message
    for row in SUPPORT_MATRIX:
        assert row.tag in exc.value.message


def test_the_listing_says_which_tags_are_supported_and_which_refused() -> None:
    with pytest.raises(OsUnsupported) as exc:
        detect_os(Paths.checked(DISTROS / "fedora30"))
    supported, refused = exc.value.message.split("Detected but refused", 1)
    assert {row.tag for row in SUPPORT_MATRIX if not row.supported} == {
        "RHEL5",
        "RHEL6",
        "OL6",
        "SLES11-SP3",
        "SLES11-SP4",
    }
    for row in SUPPORT_MATRIX:
        assert f"  {row.tag} " in (supported if row.supported else refused), row.tag
    assert "RHEL6         Red Hat Enterprise Linux 6, CentOS 6 (Linux 2.6.32)" in refused


@pytest.mark.parametrize("tree", ["rhel5", "centos6", "oracle6", "sles11sp3", "sles11sp4"])
def test_refused_tags_are_detected_then_refused(tree: str) -> None:
    info = detect_os(Paths.checked(DISTROS / tree))
    assert info.os_tag == SUPPORTED[tree] and not info.supported
    with pytest.raises(OsKernelTooOld) as exc:
        require_supported(info)
    assert exc.value.exit_code == Exit.UNSUPPORTED
    assert f"is {info.os_tag}, which is detected but refused: its oldest release runs Linux " in exc.value.message


def test_supported_tags_pass() -> None:
    for tree in ("centos7", "debian7", "ubuntu14", "sles12", "oracle7"):
        info = detect_os(Paths.checked(DISTROS / tree))
        assert require_supported(info) is info and info.supported


def test_rebuild_with_borrowed_rhel_id_is_named_for_what_it_is() -> None:
    with pytest.raises(OsUnsupported, match=r"Scientific Linux 7\.2"):
        detect_os(Paths.checked(DISTROS / "scientific7"))


def test_legacy_suse_release_patchlevel() -> None:
    info = detect_os(Paths.checked(DISTROS / "sles11sp3"))
    assert (info.os_tag, info.version, info.source) == ("SLES11-SP3", "11.3", "/etc/SuSE-release")


def test_legacy_redhat_release_without_os_release() -> None:
    info = detect_os(Paths.checked(DISTROS / "centos5"))
    assert info.source == "/etc/centos-release"
    assert info.init == "sysv"


# Bad input: real trees copied and damaged -------------------------------------------------------


def _copy(tree: str, tmp_path: Path) -> Path:
    dst = tmp_path / tree
    shutil.copytree(DISTROS / tree, dst, symlinks=True)
    return dst


def test_empty_release_file_is_unknown(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text("")
    with pytest.raises(OsUnknown, match="no release file"):
        detect_os(Paths.checked(root))


def test_truncated_os_release(tmp_path: Path) -> None:
    root = _copy("ubuntu20", tmp_path)
    osr = root / "etc" / "os-release"
    text = osr.read_text()
    osr.write_text(text[: text.index("ID=")])  # cut before ID: nothing identifies the system
    with pytest.raises(OsUnknown):
        detect_os(Paths.checked(root))
    osr.write_text(text[: text.index("VERSION_ID=") + 14])  # cut inside VERSION_ID's quotes
    with pytest.raises(OsUnsupported, match="no version"):
        detect_os(Paths.checked(root))


def test_binary_os_release(tmp_path: Path) -> None:
    root = _copy("ubuntu22", tmp_path)
    (root / "etc" / "os-release").write_bytes(b"\x7fELF\x02\x01\x01\0\0\0garbage")
    with pytest.raises(ReleaseFileUnreadable, match="binary"):
        detect_os(Paths.checked(root))


def test_binary_legacy_release_file(tmp_path: Path) -> None:
    root = _copy("centos5", tmp_path)
    (root / "etc" / "centos-release").write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(ReleaseFileUnreadable):
        detect_os(Paths.checked(root))


def test_release_file_that_is_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "etc" / "os-release").mkdir(parents=True)
    with pytest.raises(ReleaseFileUnreadable, match="not a regular file"):
        detect_os(Paths.checked(root))


def test_contradictory_release_files(tmp_path: Path) -> None:
    root = _copy("debian12", tmp_path)
    (root / "etc" / "debian_version").write_text("11.7\n")
    with pytest.raises(ReleaseFilesConflict, match=r"debian_version says 11\.7"):
        detect_os(Paths.checked(root))


def test_derivative_that_kept_ubuntus_os_release() -> None:
    with pytest.raises(ReleaseFilesConflict, match=r"Linux Mint 17\.3"):
        detect_os(Paths.checked(DISTROS / "linuxmint17"))


def test_missing_version_id_falls_back_to_debian_version(tmp_path: Path) -> None:
    root = _copy("debian12", tmp_path)
    osr = root / "usr" / "lib" / "os-release"
    osr.write_text("".join(line for line in osr.read_text().splitlines(True) if not line.startswith("VERSION_ID")))
    info = detect_os(Paths.checked(root))
    assert info.os_tag == "DEBIAN12"
    assert "debian_version" in info.source


def test_windows_root_is_named_and_refused(tmp_path: Path) -> None:
    (tmp_path / "Windows" / "System32").mkdir(parents=True)
    with pytest.raises(OsUnsupported, match="Windows"):
        detect_os(Paths.checked(tmp_path))
