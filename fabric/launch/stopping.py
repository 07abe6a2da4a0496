"""How ``fabric launch`` stops its deployment: the workers drain first, a second signal
stops everything at once.

``StopSignals`` counts Ctrl-C, SIGTERM and SIGHUP to the command: the first asks for a
graceful stop, one received once the stop has begun (or a second before it) for a stop at once.
``stop_deployment`` stops in two stages (``fabric.supervise.stop_in_stages``):

1. the workers, with SIGTERM: each drains (takes no new request and finishes those in flight)
   for at most its ``--drain-timeout``, while the frontend still relays their streams; one left
   after the drain plus ``DRAIN_MARGIN_S`` is SIGKILLed;
2. the frontend and the node cache, SIGTERM and ``fabric.supervise.STOP_TIMEOUT_S``.

It says what it waits for. Once ``hurry`` turns true, every process still running gets SIGINT
(a worker's stop-at-once: what is left ends with an error chunk; uvicorn's forced exit; the
node cache's stop) and SIGKILL after ``fabric.supervise.HURRY_S``.

Invariants: every child has exited (or was SIGKILLed and reaped) when ``stop_deployment``
returns; its whole wait is bounded by the drain plus ``DRAIN_MARGIN_S`` plus ``STOP_TIMEOUT_S``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from types import FrameType

from fabric.errors import FabricError
from fabric.supervise import STOP_TIMEOUT_S, Child, StartupStatus, stop_in_stages

DRAIN_MARGIN_S = STOP_TIMEOUT_S
"""What a worker may take beyond its drain to close (record revoked, blocks released, NIXL
shut down) before it is SIGKILLed."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DRAIN_ENV = "FABRIC_DRAIN_TIMEOUT_S"
WORKER_DRAIN_S = 30.0
"""The workers' own default drain (``fabric.config.ServeConfig.drain_timeout_s``)."""


class StopSignals:
    """Ctrl-C, SIGTERM and SIGHUP to ``fabric launch``: the first asks for a graceful stop; one
    received once the stop has begun (or a second before it) asks to stop at once."""

    def __init__(self) -> None:
        self._count = 0
        self._count_at_stop: int | None = None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._count += 1

    def stopping(self) -> bool:
        """A stop was asked for."""
        return self._count > 0

    def stop_begins(self) -> None:
        self._count_at_stop = self._count

    def hurry(self) -> bool:
        """Stop at once: a second signal, or one since the stop began."""
        since_stop = self._count_at_stop is not None and self._count > self._count_at_stop
        return self._count >= 2 or since_stop


def stop_deployment(
    children: Sequence[Child],
    workers: Sequence[Child],
    drain_s: float,
    signals: StopSignals,
    status: StartupStatus,
) -> dict[str, int]:
    """Stop the workers (each drains for up to ``drain_s``), then the other children; each
    child's exit status by name (the module docstring says how)."""
    signals.stop_begins()
    others = [child for child in children if child not in workers]
    live = [child.name for child in workers if child.process.poll() is None]
    if live and not signals.hurry():
        status.line(
            f"stopping: {', '.join(live)} finish their requests (drain up to {drain_s:.0f} s, "
            f"killed after {drain_s + DRAIN_MARGIN_S:.0f} s), then "
            f"{', '.join(child.name for child in reversed(others)) or 'nothing else'}; "
            "Ctrl-C again stops everything at once"
        )
    stages = [(list(workers), drain_s + DRAIN_MARGIN_S), (others, STOP_TIMEOUT_S)]
    return stop_in_stages(stages, progress=status.line, hurry=signals.hurry, status=status)


def drain_timeout(flag: float | None) -> float:
    """``--drain-timeout``, else ``FABRIC_DRAIN_TIMEOUT_S``, else the workers' default.

    Read here rather than through ``fabric.config.ServeConfig``, whose import loads torch
    (seconds before anything starts); a test checks that the defaults agree.

    Raises:
        FabricError: the value is not a number >= 0 (naming the flag or the variable).
    """
    if flag is not None:
        what, value = "--drain-timeout", str(flag)
    else:
        what, value = DRAIN_ENV, os.environ.get(DRAIN_ENV, str(WORKER_DRAIN_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise FabricError(f"{what} must be a number of seconds >= 0, not {value!r}")
    return seconds
