"""``fabric serve frontend``: the OpenAI-compatible frontend as a command (add_arguments / run).

Follows ``fabric.demo``'s pattern so ``fabric.cli`` can register it as a subcommand;
``python -m fabric.frontend`` runs it on its own.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from fabric.discovery.registry import DEFAULT_NAMESPACE
from fabric.errors import FabricError
from fabric.frontend.generation import FrontendSettings
from fabric.frontend.server import run_frontend

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--etcd",
        default="http://127.0.0.1:2379",
        help="etcd endpoint(s) where workers register, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (%(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (%(default)s)")
    parser.add_argument(
        "--model",
        default="tiny",
        help="model directory holding tokenizer.json, or a preset (tiny, small; made offline "
        "on first use); its name must equal the workers' layout['model'] (%(default)s)",
    )
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="discovery namespace (%(default)s)"
    )
    defaults = FrontendSettings()
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=defaults.idle_timeout_s,
        help="seconds without a token before a request fails with 504 (%(default)s)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=defaults.request_timeout_s,
        help="deadline of a whole request in seconds (%(default)s)",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=defaults.default_max_tokens,
        help="max_tokens of requests that give none (%(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per vLLM request
    if args.idle_timeout <= 0 or args.request_timeout <= 0 or args.default_max_tokens < 1:
        raise FabricError("--idle-timeout, --request-timeout and --default-max-tokens must be > 0")
    _exit_zero_on_stop_signals()
    run_frontend(
        etcd=args.etcd,
        model=args.model,
        host=args.host,
        port=args.port,
        namespace=args.namespace,
        settings=FrontendSettings(
            idle_timeout_s=args.idle_timeout,
            request_timeout_s=args.request_timeout,
            default_max_tokens=args.default_max_tokens,
        ),
    )
    return 0


def _exit_zero_on_stop_signals() -> None:
    """From now on, SIGINT / SIGTERM end this process with status 0 (after ``run_frontend``'s
    cleanup: it closes its router and registry on every way out).

    uvicorn serves with signal handlers of its own; once it has shut down it restores the ones it
    found and raises the signal it got again (uvicorn 0.29+). With Python's defaults that second
    SIGTERM killed the process (status -15) and a SIGINT became a KeyboardInterrupt traceback,
    after an orderly stop. Here it is ``SystemExit(0)``; so is a signal before uvicorn serves
    (ends start-up) or after it returned (a supervisor's SIGTERM following a terminal's Ctrl-C).
    """

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("%s received: exiting", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fabric.frontend",
        description="OpenAI-compatible frontend of KV Fabric, routing to workers found in etcd.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(args)
    except FabricError as exc:
        print(f"fabric frontend: error: {exc}", file=sys.stderr)
        return 2
