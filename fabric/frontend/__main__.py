"""``python -m fabric.frontend``: run the frontend (see ``fabric.frontend.cli``)."""

from __future__ import annotations

import sys

from fabric.frontend.cli import main

if __name__ == "__main__":
    sys.exit(main())
