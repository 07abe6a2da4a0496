"""The ``fabric`` command: one subcommand per job, each a module with add_arguments / run."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fabric.errors import FabricError

_COMMANDS = {
    "demo": ("fabric.demo", "walk one worker's KV blocks through the device, host and disk tiers"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fabric",
        description="KV Fabric: disaggregated prefill/decode KV-cache transfer fabric.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in _COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args))
    except FabricError as exc:
        print(f"fabric {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
