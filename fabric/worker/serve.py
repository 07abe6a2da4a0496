"""``fabric serve prefill|decode|aggregated``: run one worker process until SIGINT or SIGTERM.

``fabric.cli`` gives each role its own sub-command (``args.role`` is set by it).

Flags override the ``FABRIC_*`` environment (``fabric.config``), which overrides the defaults.
The process registers in etcd once it is ready (the signal for launchers and tests) and stops::

    SERVING ──SIGTERM──▶ DRAINING ──nothing in flight──────────────▶ CLOSING ──▶ exit 0
       │                   │ (record draining, new requests          ▲
       │                   │  refused, the rest finishing)           │
       │                   ├──--drain-timeout passed────────────────┤ (what is left ends
       │                   └──SIGTERM again, or SIGINT───────────────┤  with an error chunk)
       └──SIGINT (or SIGTERM with --drain-timeout 0)────────────────┘

CLOSING revokes the record, ends what is left with an error chunk and releases every block and
hold. The exit status is 0 however the stop came, and 1 when the scheduler thread died. Once
CLOSING ends, SIGTERM and SIGINT are ignored: the interpreter's shutdown restores the default
action of signals that have a Python handler, so a late signal would otherwise kill the process
(status -15) at random.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from enum import Enum
from types import FrameType
from typing import TYPE_CHECKING

from pydantic import AliasChoices

from fabric.config import load_config, setting_field
from fabric.discovery.registry import Role

if TYPE_CHECKING:
    from fabric.worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

_ROLES = {
    "prefill": Role.PREFILL,
    "decode": Role.DECODE,
    "aggregated": Role.AGGREGATED,
}
_FLAGS: tuple[tuple[str, str, type, str, str], ...] = (  # flag, field, type, metavar, help
    ("--etcd", "etcd_endpoint", str, "URL", "etcd client URL(s), comma-separated"),
    (
        "--bind-host",
        "bind_host",
        str,
        "ADDR",
        "interface the signal, metrics and KV event servers listen on (0.0.0.0: all)",
    ),
    (
        "--advertise-host",
        "advertise_host",
        str,
        "ADDR",
        "address peers are told to reach this worker at (default: the bind address, or with "
        "0.0.0.0 the local address of the route to etcd)",
    ),
    ("--namespace", "namespace", str, "NAME", "discovery namespace shared by one deployment"),
    (
        "--model",
        "model",
        str,
        "MODEL",
        "tiny or small (made offline on first use, cached in ~/.cache/kv-fabric) or a "
        "Hugging Face-style Llama directory",
    ),
    ("--worker-id", "worker_id", str, "ID", "unique id in the namespace (default <role>-<random>)"),
    ("--device-blocks", "device_blocks", int, "N", "KV blocks in the device pool"),
    ("--host-blocks", "cpu_cache_blocks", int, "N", "KV blocks in the host (CPU) pool; 0: none"),
    ("--disk-blocks", "disk_cache_blocks", int, "N", "KV blocks in the disk pool; 0: none"),
    ("--disk-dir", "disk_cache_dir", str, "DIR", "directory of the disk pool (must exist)"),
    (
        "--shared-disk-dir",
        "shared_disk_dir",
        str,
        "DIR",
        "G4: a directory of KV blocks shared by every instance pointing at it, kept across "
        "restarts (created if missing; needs --shared-disk-blocks)",
    ),
    (
        "--shared-disk-blocks",
        "shared_disk_blocks",
        int,
        "N",
        "KV blocks this instance keeps in the shared directory",
    ),
    (
        "--node-cache",
        "node_cache",
        str,
        "ENDPOINT|etcd",
        "store every full block in this host's node KV cache (fabric serve node-cache) and "
        "load prefixes from it: its signal endpoint, or etcd to find the one registered for "
        "--node-name",
    ),
    ("--node-name", "node_name", str, "NAME", "this host's name as node caches know it"),
    ("--block-size", "block_size", int, "TOKENS", "tokens per KV block (all workers must agree)"),
    ("--threads", "threads", int, "N", "torch compute threads"),
    ("--cpu", "cpus", str, "CPUS", "pin the process to these CPUs, e.g. 1 or 0,2-3"),
    (
        "--prefill-fallback",
        "prefill_fallback",
        str,
        "MODE",
        "decode: when the prefill worker fails, recompute the prompt here or answer an error",
    ),
    (
        "--kv-handoff",
        "kv_handoff",
        str,
        "MODE",
        "prefill, decode: the prompt's KV layer by layer while it is computed (both sides must "
        "allow it), or whole once computed",
    ),
    (
        "--max-waiting",
        "max_waiting",
        int,
        "N",
        "requests that may wait for blocks; more are refused",
    ),
    (
        "--max-num-batched-tokens",
        "max_num_batched_tokens",
        int,
        "N",
        "decode, aggregated: new tokens per engine step, decodes first, prompt chunks fill the "
        "rest (chunked prefill); 0: each prompt whole in one step, stalling decodes",
    ),
    (
        "--prefill-timeout",
        "prefill_timeout_s",
        float,
        "SECONDS",
        "decode: longest wait for a prefill (s)",
    ),
    ("--transfer-timeout", "transfer_timeout_s", float, "SECONDS", "decode: longest KV read (s)"),
    (
        "--hold-timeout",
        "hold_timeout_s",
        float,
        "SECONDS",
        "prefill: release blocks unread after (s)",
    ),
    (
        "--drain-timeout",
        "drain_timeout_s",
        float,
        "SECONDS",
        "on SIGTERM, finish the requests in flight (taking no new ones) for at most this long, "
        "then stop; 0: stop at once (a second SIGTERM or SIGINT always does)",
    ),
    ("--registration-ttl", "registration_ttl_s", float, "SECONDS", "etcd lease TTL (s)"),
    (
        "--metrics-port",
        "metrics_port",
        int,
        "PORT",
        "port of /metrics, /health/live and /health/ready (0: any free one)",
    ),
)
_HEALTH_CHECK_S = 0.5
_DRAIN_POLL_S = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Start one worker: prefill (computes prompts for decode workers and hands their KV over "
        "NIXL), decode (asks the prefill worker each request names, reads the KV it lacks and "
        "generates; computes the prompt itself when none is named) or aggregated (computes and "
        "generates, and serves its cached prefixes to peers). It registers in etcd once "
        "ready; clients send GenerateRequests to its signal endpoint. Flags override FABRIC_* "
        "variables, which override defaults."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at DEBUG"
    )
    for flag, field, kind, metavar, text in _FLAGS:
        info = setting_field(field)
        alias = info.validation_alias
        env = alias.choices[0] if isinstance(alias, AliasChoices) else field.upper()
        default = info.default.value if isinstance(info.default, Enum) else info.default
        choices = [f.value for f in type(info.default)] if isinstance(info.default, Enum) else None
        suffix = f" [env {env}" + ("]" if default is None else f"; default {default}]")
        parser.add_argument(
            flag,
            dest=field,
            type=kind,
            choices=choices,
            metavar=None if choices else metavar,
            help=text + suffix,
        )


def run(args: argparse.Namespace) -> int:
    from fabric.worker.runtime import build_worker  # torch, NIXL: only when serving

    overrides = {
        field: getattr(args, field) for _, field, *_ in _FLAGS if getattr(args, field) is not None
    }
    config = load_config(**overrides)
    signals = _Signals(drain=config.serve.drain_timeout_s > 0)
    signals.install()
    try:
        with build_worker(_ROLES[args.role], config) as worker:
            status = _serve(worker, signals, config.serve.drain_timeout_s)
            logger.info("worker %s stopping", worker.worker_id)
        logger.info("worker %s stopped", worker.worker_id)
        return status
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):  # see the module docstring
            signal.signal(signum, signal.SIG_IGN)


class _Signals:
    """What SIGTERM and SIGINT asked for: a drain (the first SIGTERM, when ``drain``) or a stop."""

    def __init__(self, *, drain: bool) -> None:
        self.drain = threading.Event()
        self.stop = threading.Event()
        self.woken = threading.Event()
        self._drain_on_sigterm = drain

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM and self._drain_on_sigterm and not self.drain.is_set():
            logger.info("%s received: draining (again, or SIGINT: stop at once)", name)
            self.drain.set()
        else:
            logger.info("%s received: stopping", name)
            self.stop.set()
        self.woken.set()


def _serve(worker: WorkerRuntime, signals: _Signals, drain_timeout_s: float) -> int:
    """Serve until a signal says stop or a drain ends (module docstring); the exit status."""
    drain_deadline: float | None = None
    while not signals.stop.is_set():
        if not worker.healthy:
            logger.error("worker %s: the scheduler thread died; exiting", worker.worker_id)
            return 1
        if drain_deadline is None and signals.drain.is_set():
            drain_deadline = time.monotonic() + drain_timeout_s
            worker.drain()
        if drain_deadline is not None:
            if worker.scheduler.wait_drained(0):
                logger.info("worker %s drained", worker.worker_id)
                break
            if time.monotonic() >= drain_deadline:
                logger.warning(
                    "worker %s: drain not done within %.1f s (--drain-timeout); ending what is "
                    "left with an error",
                    worker.worker_id,
                    drain_timeout_s,
                )
                break
        signals.woken.wait(_HEALTH_CHECK_S if drain_deadline is None else _DRAIN_POLL_S)
        signals.woken.clear()
    return 0
