"""PyInstaller entry point of the frozen bootstrapper (`mobility-bootstrap`)."""

import sys

from agent.cli import bootstrap_main

sys.exit(bootstrap_main())
