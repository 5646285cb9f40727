"""PyInstaller entry point of the frozen agent (`mobility`)."""

import sys

from agent.cli import main

sys.exit(main())
