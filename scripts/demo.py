"""The main job on embedded defaults, as far as it exists: OS detection and prerequisite checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.distros import detect_os
from agent.errors import MobilityError
from agent.paths import Paths

REPO = Path(__file__).resolve().parent.parent
TREES = REPO / "tests" / "resources" / "distros"


def mobility(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, check=False, timeout=120
    )


def main() -> int:
    print("== this machine: mobility detect-os")
    r = mobility("detect-os", "--json")
    print(r.stdout or r.stderr, end="")
    print("\n== this machine: mobility prereq")
    r = mobility("prereq")
    print(r.stdout, end="")
    print(r.stderr or "prerequisites: all passed\n", end="")
    print("\n== OS tags of the real release files in tests/resources/distros (as `detect-os --root`)")
    for tree in sorted(p for p in TREES.iterdir() if p.is_dir()):
        try:
            result, code = detect_os(Paths.checked(tree)).os_tag, 0
        except MobilityError as e:
            result, code = f"error {e.code}", int(e.exit_code)
        print(f"  {tree.name:<20} exit {code}  {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
