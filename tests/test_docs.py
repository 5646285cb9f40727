"""The docs that mirror code stay in step with it."""

from __future__ import annotations

from agent.host.distros import SUPPORT_MATRIX
from tests.conftest import REPO


def test_support_matrix_page_lists_every_row() -> None:
    text = (REPO / "docs" / "support-matrix.md").read_text()
    for row in SUPPORT_MATRIX:
        cells = f"| `{row.tag}` | {row.systems} | {row.init.value} | {row.oldest_kernel} | "
        assert cells in text, row.tag
        bundle = text.split(cells, 1)[1].split("\n", 1)[0]
        # Plainly per row: refused, or which bundle there is; never a supported-looking row for a refused tag.
        if not row.supported:
            assert bundle.startswith(f"**refused**: Linux {row.oldest_kernel} is older than "), row.tag
        else:
            assert bundle.startswith("yes, "), row.tag
            assert ("default repository" in bundle) == row.default_repo, row.tag


def test_readme_quick_start_is_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    block = quick.split("```", 2)[1]
    commands = [line for line in block.splitlines()[1:] if line.strip() and not line.startswith("#")]
    assert commands == ["./demo", "./run-tests"]
    assert "./run-tests" in (REPO / ".ci" / "run").read_text()


def test_configuration_page_lists_every_setting() -> None:
    from dataclasses import fields

    from agent.daemon.config import AgentConfig

    text = (REPO / "docs" / "configuration.md").read_text()
    for f in fields(AgentConfig):
        assert f"| `{f.name}` |" in text, f.name


def test_the_architecture_names_every_package() -> None:
    """docs/architecture.md covers the whole system: every package of agent/ and server/ is named there (its owns
    table, its step lists), so a newcomer finds where each capability lives."""
    text = (REPO / "docs" / "architecture.md").read_text()
    packages = {
        path.parent.relative_to(REPO).as_posix()
        for top in ("agent", "server")
        for path in (REPO / top).rglob("*.py")
        if path.parent != REPO / top and path.parent.name != "versions"  # a migration's scripts, not a package
    }
    missing = sorted(p for p in packages if f"`{p}/`" not in text and f"`{p}/" not in text)
    assert not missing, f"docs/architecture.md does not name {missing}"
