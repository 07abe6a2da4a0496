"""The ``fabric`` command: one subcommand per job, each a module with add_arguments / run.

``fabric serve ROLE`` has one sub-command per process kind: the three worker roles
(``fabric.worker.serve``), the frontend (``fabric.frontend.cli``) and the node KV cache
(``fabric.node.__main__``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib import metadata

from fabric.errors import FabricError

_COMMANDS = {
    "demo": ("fabric.demo", "walk one worker's KV blocks through the device, host and disk tiers"),
    "launch": ("fabric.launch", "start etcd, prefill/decode workers and the frontend together"),
    "status": ("fabric.status", "the cluster in a table: workers, roles, load, tiers, hit rates"),
}
_SERVE_ROLES = {
    "prefill": ("fabric.worker.serve", "a prefill worker: computes prompts, hands KV to decode"),
    "decode": ("fabric.worker.serve", "a decode worker: reads KV from prefill, generates"),
    "aggregated": ("fabric.worker.serve", "an aggregated worker: computes and generates alone"),
    "frontend": ("fabric.frontend.cli", "the OpenAI-compatible HTTP frontend and router"),
    "node-cache": ("fabric.node.__main__", "the node KV cache: one shared-memory host tier"),
}
_LOUD = {"serve", "launch"}  # servers say what they do at INFO; one-shot commands stay quiet


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: every flag after "bench" is the benchmark's
        return _run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose
        else logging.INFO
        if args.command in _LOUD
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args))
    except FabricError as exc:
        print(f"fabric {args.command}: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``fabric`` parser with every subcommand (``bench``'s flags are its own parser's);
    deployment manifests are checked against it (``tests/deploy``)."""
    parser = argparse.ArgumentParser(
        prog="fabric",
        description="KV Fabric: disaggregated prefill/decode KV-cache transfer fabric.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in _COMMANDS.items():
        _add(sub, name, module_name, help_text)
    bench = sub.add_parser(
        "bench",
        help="run a benchmark and print its JSON (fabric bench --help lists them)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    serve = sub.add_parser("serve", help="run one process of a deployment (worker or frontend)")
    roles = serve.add_subparsers(dest="role", required=True, metavar="ROLE")
    for role, (module_name, help_text) in _SERVE_ROLES.items():
        _add(roles, role, module_name, help_text)
    return parser


def _version() -> str:
    """The installed kv-fabric distribution's version (what ``pip show kv-fabric`` says)."""
    try:
        return metadata.version("kv-fabric")
    except metadata.PackageNotFoundError:
        return "(kv-fabric is not installed: run from a source tree)"


def _run_bench(argv: list[str]) -> int:
    from fabric.bench.__main__ import main as bench_main

    bench_main(argv)
    return 0


def _add(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    module_name: str,
    help_text: str,
) -> None:
    module = importlib.import_module(module_name)
    command = subparsers.add_parser(name, help=help_text, description=help_text)
    module.add_arguments(command)
    command.set_defaults(run=module.run)


if __name__ == "__main__":
    sys.exit(main())
