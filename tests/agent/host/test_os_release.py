from agent.host.os_release import parse_os_release, read_os_release
from agent.host.paths import Paths
from tests.conftest import DISTROS


def test_real_ubuntu_file_unquoted_and_quoted_values() -> None:
    info = parse_os_release((DISTROS / "ubuntu20" / "etc" / "os-release").read_text())
    assert info["ID"] == "ubuntu"
    assert info["VERSION_ID"] == "20.04"
    assert info["PRETTY_NAME"].startswith("Ubuntu 20.04")


def test_shell_quoting_escapes_and_comments() -> None:
    text = (
        "# comment line\n"
        "NAME='Single Quoted'\n"
        'PRETTY_NAME="Dbl \\"quoted\\" \\$x"\n'
        "ID=plain # trailing comment\n"
        '  VERSION_ID = "12"  \n'
        "=novalue\n"
        "not a pair\n"
        "1BAD=x\n"
    )
    info = parse_os_release(text)
    assert info == {
        "NAME": "Single Quoted",
        "PRETTY_NAME": 'Dbl "quoted" $x',
        "ID": "plain",
        "VERSION_ID": "12",
    }


def test_crlf_line_endings() -> None:
    assert parse_os_release('ID=debian\r\nVERSION_ID="11"\r\n') == {"ID": "debian", "VERSION_ID": "11"}


def test_truncated_file_keeps_complete_lines() -> None:
    # A file cut in the middle of a quoted value: the broken line is dropped, the rest is kept.
    assert parse_os_release('ID=ubuntu\nVERSION_ID="20.04"\nPRETTY_NAME="Ubu') == {
        "ID": "ubuntu",
        "VERSION_ID": "20.04",
    }


def test_empty_and_missing_version_id() -> None:
    assert parse_os_release("") == {}
    assert "VERSION_ID" not in parse_os_release((DISTROS / "arch" / "etc" / "os-release").read_text())


def test_falls_back_to_usr_lib(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "os-release").write_text("ID=debian\nVERSION_ID=12\n")
    assert read_os_release(Paths(tmp_path)) == ("/usr/lib/os-release", {"ID": "debian", "VERSION_ID": "12"})
    # An empty /etc/os-release does not hide the vendor copy.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "os-release").write_text("")
    assert read_os_release(Paths(tmp_path)) == ("/usr/lib/os-release", {"ID": "debian", "VERSION_ID": "12"})


def test_absolute_symlink_resolves_inside_root(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "os-release").write_text("ID=rhel\nVERSION_ID=9.4\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "os-release").symlink_to("/usr/lib/os-release")  # absolute: must not read the host's
    assert read_os_release(Paths(tmp_path)) == ("/etc/os-release", {"ID": "rhel", "VERSION_ID": "9.4"})
