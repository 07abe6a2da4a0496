"""``python -m fabric.bench <subcommand> [flags]``: run one benchmark, print one JSON object.

A subcommand is a module of this package with two functions:

* ``add_arguments(parser: argparse.ArgumentParser) -> None``: its flags;
* ``run(args: argparse.Namespace) -> dict``: measure, return JSON-serialisable figures.

Its docstring's first line is its help. Never name a module here after a standard-library
module (``copy``, ``json``...): ``vllm_pool_mix.py`` runs as a script from this directory, so
such a module would shadow the stdlib one in the vLLM process. Add one with a row in
``SUBCOMMANDS``. Every module is imported to build ``--help``, so a module keeps heavy or
optional imports (NIXL, vLLM) inside ``run``. Progress and diagnostics go to stderr; stdout
carries only the JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, cast

from fabric.errors import FabricError

SUBCOMMANDS: dict[str, str] = {
    "kvbm": "fabric.bench.kvbm",
    "copy": "fabric.bench.block_copy",
    "transfer": "fabric.bench.transfer",
    "serve": "fabric.bench.serve",
    "prefix": "fabric.bench.prefix",
    "vllm": "fabric.bench.vs_vllm",
    "vllm-offload": "fabric.bench.vllm_offload",
    "load": "fabric.bench.load",
    "chaos": "fabric.bench.chaos",
    "router-scale": "fabric.bench.router_scale",
    "node-cache": "fabric.bench.node_cache",
    "tiers-vs-peers": "fabric.bench.tiers_vs_peers",
}
"""Subcommand name -> module implementing it."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per row of ``SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="python -m fabric.bench",
        description="Run one KV Fabric benchmark and print its figures as one JSON object.",
        epilog="Figures are noisy on small machines: compare ratios within one run.",
    )
    subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module: ModuleType = importlib.import_module(module_name)
        summary = (module.__doc__ or name).strip().splitlines()[0]
        sub = subparsers.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv``, run the chosen subcommand, print its result as JSON."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = cast(Callable[[argparse.Namespace], dict[str, Any]], args.run)
    try:
        result = run(args)
    except FabricError as exc:  # a setup problem with a message that says what to do
        parser.exit(1, f"fabric.bench {args.subcommand}: {exc}\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
