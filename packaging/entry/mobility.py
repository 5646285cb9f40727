"""PyInstaller entry point of the frozen agent (`mobility`)."""

import contextlib
import sys

from agent.cli import main

# The launcher started this process through the bundled loader, whose file name the kernel gave it as the process
# name: name it for what it is (ps, top, pidof, the journal).
with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
    comm.write("mobility")

sys.exit(main())
