"""PyInstaller entry point of the frozen bootstrapper (`mobility-bootstrap`)."""

import contextlib
import sys

from agent.cli import bootstrap_main

# Started through the bundled loader (see packaging/entry/mobility.py); 15 characters is all a process name holds.
with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
    comm.write("mobility-boot")

sys.exit(bootstrap_main())
