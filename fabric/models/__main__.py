"""``python -m fabric.models [tiny|small] [--path DIR]``: create a preset, print its path."""

from __future__ import annotations

import argparse
from pathlib import Path

from fabric.models.presets import Preset, ensure_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fabric.models",
        description="Create an embedded model preset offline (deterministic; reused if present).",
    )
    parser.add_argument("preset", nargs="?", default="tiny", choices=[p.value for p in Preset])
    parser.add_argument(
        "--path", type=Path, default=None, help="model directory (default: the cache directory)"
    )
    args = parser.parse_args(argv)
    print(ensure_model(args.preset, args.path))


if __name__ == "__main__":
    main()
