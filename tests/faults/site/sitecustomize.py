"""Run at the start of every Python the test suite starts: tests/conftest.py puts this directory (and the
repository) on PYTHONPATH for the session. Installs the suite's fault injector and error record when the suite asked
for them (tests/faults/). No product contains it (docs/architecture.md, "Fault injection")."""

import os

if os.environ.get("MOBILITY_TEST_FAULTS") or os.environ.get("MOBILITY_TEST_RECORD"):
    try:
        from tests.faults import install_from_environment
    except ImportError:  # a Python of another tree (a chroot's): the suite's plan is not for it
        pass
    else:
        install_from_environment()
