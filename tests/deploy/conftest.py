"""tests/deploy imports the multi-host suite's lab (``tests/multihost/netns_harness``) by bare
name, as that suite does: its directory goes on ``sys.path``."""

from __future__ import annotations

import sys
from pathlib import Path

MULTIHOST = str(Path(__file__).resolve().parents[1] / "multihost")
if MULTIHOST not in sys.path:
    sys.path.append(MULTIHOST)
