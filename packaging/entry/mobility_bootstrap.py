"""PyInstaller entry point of the frozen bootstrapper (`mobility-bootstrap`).

It runs at every boot and must be done in well under 0.3 s when there is nothing to do (bench/bootstrap.py), so
start-up is kept lean: no garbage collection while the modules load (nothing they create is garbage), and no
interpreter tear-down at the end (the process is exiting: the kernel frees its memory faster than Python would)."""

import contextlib
import gc
import os
import sys

# Started through the bundled loader, whose file name the kernel gave this process: name it for what it is.
with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
    comm.write("mobility-boot")

gc.disable()
from agent.cli import bootstrap_main  # noqa: E402

gc.enable()
try:
    code = bootstrap_main()
except SystemExit as e:  # --help, --version
    if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
    code = e.code if isinstance(e.code, int) else int(e.code is not None)
for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more to say
        stream.flush()
os._exit(code)
