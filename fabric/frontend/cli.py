"""``fabric serve frontend``: the OpenAI-compatible frontend as a command (add_arguments / run).

Follows ``fabric.demo``'s pattern so ``fabric.cli`` can register it as a subcommand;
``python -m fabric.frontend`` runs it on its own. Every ``FrontendSettings`` field is a flag
(its docstring says what each bounds); an out-of-range value exits with status 2 and the
field's name. ``--api-key-file`` names a file (a key on the command line would be visible to
every local user); without it, ``FABRIC_API_KEY_FILE`` (``api_key``).
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
    parser.add_argument(
        "--api-key-file",
        help="file holding the API key clients must send as 'Authorization: Bearer <key>' on "
        "/v1/* and /metrics (default: $FABRIC_API_KEY_FILE; unset: no key)",
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
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        help="largest request body; larger ones get 413 before they are read (%(default)s)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=defaults.max_prompt_tokens,
        help="longest prompt in tokens, 413 beyond it (default: the model's context)",
    )
    parser.add_argument(
        "--max-in-flight-per-worker",
        type=int,
        default=defaults.max_in_flight_per_worker,
        help="requests this frontend keeps in flight on one decode or aggregated worker; "
        "more wait in its queue (%(default)s)",
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        default=defaults.max_queued,
        help="requests waiting in this frontend (tokenizing or for a worker with room); "
        "beyond it 429 at once (%(default)s)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=defaults.queue_timeout_s,
        help="seconds a request may wait for a worker with room, then 429 with Retry-After "
        "(%(default)s)",
    )
    parser.add_argument(
        "--tokenizer-threads",
        type=int,
        default=defaults.tokenizer_threads,
        help="threads tokenizing prompts off the event loop (%(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per vLLM request
    settings = FrontendSettings(
        idle_timeout_s=args.idle_timeout,
        request_timeout_s=args.request_timeout,
        default_max_tokens=args.default_max_tokens,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_in_flight_per_worker=args.max_in_flight_per_worker,
        max_queued=args.max_queued,
        queue_timeout_s=args.queue_timeout,
        tokenizer_threads=args.tokenizer_threads,
    )
    _exit_zero_on_stop_signals()
    run_frontend(
        etcd=args.etcd,
        model=args.model,
        host=args.host,
        port=args.port,
        namespace=args.namespace,
        settings=settings,
        api_key_file=args.api_key_file,
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
