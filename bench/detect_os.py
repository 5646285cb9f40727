"""bench/detect_os: how long OS detection takes, in process and as a command (part of the boot no-op path).

Prints medians over repeated runs; machines here are noisy, so compare medians and ratios.
    .venv/bin/python bench/detect_os.py [--runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.host.distros import detect_os  # noqa: E402
from agent.host.paths import Paths  # noqa: E402
from agent.shared.errors import MobilityError  # noqa: E402

TREES = sorted(p for p in (REPO / "tests" / "resources" / "distros").iterdir() if p.is_dir())


def per_tree_seconds() -> float:
    start = time.perf_counter()
    for tree in TREES:
        with contextlib.suppress(MobilityError):
            detect_os(Paths.checked(tree))
    return (time.perf_counter() - start) / len(TREES)


def command_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "agent", "detect-os"], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    in_process = [per_tree_seconds() for _ in range(args.runs)]
    command = [command_seconds() for _ in range(args.runs)]
    print(
        f"detect_os in process, {len(TREES)} real trees: median {statistics.median(in_process) * 1e3:.2f} ms/tree "
        f"(min {min(in_process) * 1e3:.2f}, max {max(in_process) * 1e3:.2f})"
    )
    print(
        f"`python -m agent detect-os` on this machine: median {statistics.median(command) * 1e3:.0f} ms "
        f"(min {min(command) * 1e3:.0f}, max {max(command) * 1e3:.0f}); interpreter start-up included"
    )


if __name__ == "__main__":
    main()
