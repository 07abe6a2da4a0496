"""``python -m fabric.worker ROLE [flags]``: the same as ``fabric serve ROLE [flags]``."""

from __future__ import annotations

import sys

from fabric.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
