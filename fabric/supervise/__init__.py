"""Process supervision: children with log files, bounded readiness waits, stopped as one.

``fabric launch`` and the benchmarks start their processes with this module, so a benchmark runs
what users run, started and stopped the way users' are:

* ``start_process`` starts a command with stdout and stderr in ``<run_dir>/<name>.log`` and UCX
  on loopback unless the environment names devices; with ``own_group`` the child leads a process
  group of its own (a server that forks helpers, such as vLLM's engine core);
* ``wait_ready`` polls a ``Readiness`` (``HealthEndpoints``: each server's ``/health`` answers
  2xx; ``ReadyLine``: a child printed its one JSON line, as ``fabric serve node-cache`` does)
  until it is ready; it gives up after a timeout, when a child exits or when asked to stop;
  given a ``StartupStatus`` it shows what it waits for, for how long, of its bound: one live
  line rewritten in place on a terminal, plain lines (on each change and every
  ``LOG_EVERY_S``) in a log or pipe;
* ``check_alive`` raises ``ChildFailed`` naming the first child that exited, with its log's tail;
* ``stop_processes`` stops children as one: SIGTERM to each, one shared bound, then SIGKILL (to
  the whole group of a group leader); it reports each exit status other than 0 and returns all.
  ``stop_in_stages`` does that stage after stage, each with its own bound (``fabric launch``:
  the workers drain first while the frontend still relays their streams). Given ``hurry`` (a
  second Ctrl-C), once that turns true each child still running gets SIGINT (the "stop at once"
  of a worker, the frontend's uvicorn and the node cache; a second SIGTERM could merge with the
  first while still pending) and each bound shrinks to ``HURRY_S``; given a
  ``StartupStatus``, the wait shows which children it waits for;
* ``private_etcd`` runs an etcd of its own for a ``with`` block, ``sigterm_raises`` turns SIGTERM
  into ``SystemExit`` so that ``finally`` blocks stop the children, ``free_port`` picks a port.

Modules: this one, and ``startup_status`` (``StartupStatus``, importable from here).

Invariants: every wait is bounded; once ``stop_processes`` returns, each child is reaped (with
its whole process group when it leads one) and its log file is closed, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Protocol

from fabric.errors import FabricError
from fabric.supervise.startup_status import LIVE_S, LOG_EVERY_S, StartupStatus
from fabric.transfer.ucx_env import ucx_env_defaults

if TYPE_CHECKING:
    from fabric.discovery.etcd_certs import TlsMaterial
    from fabric.discovery.etcd_users import ServerUsers

__all__ = [
    "HEALTH_TIMEOUT_S",
    "HURRY_S",
    "LIVE_S",
    "LOG_EVERY_S",
    "POLL_S",
    "STOP_TIMEOUT_S",
    "TAIL_LINES",
    "Child",
    "ChildFailed",
    "HealthEndpoints",
    "Progress",
    "ReadyLine",
    "Readiness",
    "StartupStatus",
    "check_alive",
    "child_env",
    "describe_exit",
    "fetch_health",
    "free_port",
    "private_etcd",
    "sigterm_raises",
    "start_process",
    "stop_in_stages",
    "stop_processes",
    "wait_ready",
]

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
"""Default bound between SIGTERM and SIGKILL."""
HURRY_S = 5.0
"""Bound between a hurried stop's SIGINT and SIGKILL."""
POLL_S = 0.2
HEALTH_TIMEOUT_S = 2.0
TAIL_LINES = 25
"""Lines of a child's log quoted when it fails."""

Progress = Callable[[str], None]
"""Receives one line per step worth telling (started, ready, stopped)."""


class ChildFailed(FabricError):
    """A supervised child exited, or did not become ready in time; the message quotes its log."""


@dataclass(slots=True)
class Child:
    """One started process and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    own_group: bool = False
    """The child leads a process group of its own, which is stopped with it."""

    def tail(self, num_lines: int = TAIL_LINES) -> str:
        """The last lines of the child's log ("(no log)" when it cannot be read)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])


class Readiness(Protocol):
    """What ``wait_ready`` polls until the children are ready to serve."""

    def poll(self) -> bool:
        """True once ready; may report progress."""
        ...

    def waiting_for(self) -> str:
        """What is not ready yet, for the message of a timeout."""
        ...


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, UCX on loopback unless set, then ``extra``.

    UCX also gets the modules NIXL's wheel can load safely (``fabric.transfer.ucx_env``), for
    children that load NIXL without ``load_nixl`` (vLLM's own NIXL connector).
    """
    ucx = os.environ.get("UCX_NET_DEVICES", "lo")
    env = {**os.environ, "UCX_NET_DEVICES": ucx, **(extra or {})}
    return {**env, **ucx_env_defaults(env)}


def start_process(
    name: str,
    cmd: Sequence[str],
    run_dir: Path,
    *,
    progress: Progress,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    own_group: bool = False,
) -> Child:
    """Start ``cmd`` with its output in ``run_dir/<name>.log``.

    Args:
        env: variables set on top of ``child_env()``.
        cwd: the child's working directory (default: this process's).
        own_group: start the child as the leader of a new session and process group.
    """
    log_path = run_dir / f"{name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        list(cmd),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=child_env(env),
        cwd=cwd,
        start_new_session=own_group,
    )
    progress(f"started {name} (pid {process.pid}), log {log_path}")
    return Child(name, process, log_path, log_file, own_group)


def check_alive(children: Sequence[Child]) -> None:
    """Raise ``ChildFailed`` naming the first child that exited, with the tail of its log."""
    for child in children:
        code = child.process.poll()
        if code is not None:
            raise ChildFailed(
                f"{child.name} {describe_exit(code)}; last lines of {child.log_path}:\n"
                f"{child.tail()}"
            )


def fetch_health(url: str) -> bytes | None:
    """The body of ``GET <url>/health`` when it answers 2xx within a bound, else ``None``."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=HEALTH_TIMEOUT_S) as response:
            return bytes(response.read())
    except (urllib.error.URLError, OSError):
        return None


class HealthEndpoints:
    """Ready once every server's ``/health`` has answered 2xx (each is reported as it does)."""

    def __init__(self, name_to_url: Mapping[str, str], progress: Progress) -> None:
        self._pending = dict(name_to_url)
        self._progress = progress

    def poll(self) -> bool:
        for name, url in list(self._pending.items()):
            if fetch_health(url) is not None:
                del self._pending[name]
                self._progress(f"{name} ready")
        return not self._pending

    def waiting_for(self) -> str:
        return f"no answer from /health of {', '.join(self._pending)}"


class ReadyLine:
    """Ready once ``child``'s log holds a line that is a JSON object (a server printing one
    when it serves, as the node cache does); ``line`` is that object then."""

    def __init__(self, child: Child, progress: Progress) -> None:
        self._child = child
        self._progress = progress
        self.line: dict[str, object] | None = None

    def poll(self) -> bool:
        try:
            text = self._child.log_path.read_text(errors="replace")
        except OSError:
            return False
        for raw in text.splitlines():
            if raw.startswith("{"):
                with contextlib.suppress(ValueError):
                    parsed = json.loads(raw)
                    if isinstance(parsed, dict):
                        self.line = parsed
                        self._progress(f"{self._child.name} ready")
                        return True
        return False

    def waiting_for(self) -> str:
        return f"{self._child.name} has not printed its ready line"


def wait_ready(
    children: Sequence[Child],
    readiness: Readiness,
    timeout_s: float,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    status: StartupStatus | None = None,
) -> None:
    """Poll ``readiness`` until it is ready, showing the wait on ``status`` when given.

    Raises:
        ChildFailed: a child exited, or ``timeout_s`` passed first.
        FabricError: ``should_stop()`` turned true (Ctrl-C during start-up).
    """
    start = time.monotonic()
    deadline = start + timeout_s
    try:
        while (now := time.monotonic()) < deadline:
            if should_stop():
                raise FabricError("interrupted during start-up")
            check_alive(children)
            if readiness.poll():
                return
            if status is not None:
                status.waiting(readiness.waiting_for(), now - start, timeout_s)
            time.sleep(POLL_S)
    finally:
        if status is not None:
            status.done()
    raise ChildFailed(f"not ready within {timeout_s:.0f} s ({readiness.waiting_for()})")


def describe_exit(returncode: int) -> str:
    """How a process ended, to follow its name: ``exited with status 2``, ``exited with status
    139 (128+SIGSEGV)``, ``was killed by SIGKILL``."""
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode)}"
    if returncode > 128:
        return f"exited with status {returncode} (128+{_signal_name(returncode - 128)})"
    return f"exited with status {returncode}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def stop_processes(
    children: Sequence[Child],
    *,
    progress: Progress,
    timeout_s: float = STOP_TIMEOUT_S,
    hurry: Callable[[], bool] | None = None,
    status: StartupStatus | None = None,
) -> dict[str, int]:
    """SIGTERM every child, then SIGKILL whatever is left after ``timeout_s`` (one bound for all).

    A group leader counts as running until its whole group has exited (its helpers shut down
    after it), and is SIGKILLed as a group. Each child that did not exit with status 0 is
    reported to ``progress`` with its status and log.

    Args:
        hurry: polled while waiting; once it returns true, every child still running gets
            SIGINT and whatever is left after ``HURRY_S`` more is SIGKILLed.
        status: shows the wait: which children are still running, seconds waited, the bound.

    Returns:
        Each child's exit status by name (``Popen.returncode``: negative when a signal ended it).
    """
    return stop_in_stages([(children, timeout_s)], progress=progress, hurry=hurry, status=status)


def stop_in_stages(
    stages: Sequence[tuple[Sequence[Child], float]],
    *,
    progress: Progress,
    hurry: Callable[[], bool] | None = None,
    status: StartupStatus | None = None,
) -> dict[str, int]:
    """``stop_processes`` for each ``(children, timeout_s)`` of ``stages`` in turn: a stage is
    signalled only once every process of the one before has exited or been killed."""
    statuses: dict[str, int] = {}
    for children, timeout_s in stages:
        statuses.update(_stop_stage(children, timeout_s, progress, hurry, status))
    if statuses:
        progress("stopped every process")
    return statuses


def _stop_stage(
    children: Sequence[Child],
    timeout_s: float,
    progress: Progress,
    hurry: Callable[[], bool] | None,
    status: StartupStatus | None,
) -> dict[str, int]:
    for child in reversed(children):
        if child.process.poll() is None:
            child.process.terminate()
    start = time.monotonic()
    deadline = start + timeout_s
    hurried = False
    try:
        while (left := [c for c in children if _running(c)]) and (
            now := time.monotonic()
        ) < deadline:
            if hurry is not None and not hurried and hurry():
                hurried = True
                deadline = min(deadline, now + HURRY_S)
                progress(f"stopping at once: {_names(left)}")
                for child in left:
                    if child.process.poll() is None:
                        child.process.send_signal(signal.SIGINT)
            if status is not None:
                status.waiting(f"{_names(left)} to exit", now - start, deadline - start)
            time.sleep(POLL_S)
    finally:
        if status is not None:
            status.done()
    statuses: dict[str, int] = {}
    for child in children:
        if _running(child):
            logger.warning(
                "%s did not stop within %.0f s: killing it", child.name, time.monotonic() - start
            )
            if child.own_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
            else:
                child.process.kill()
        code = child.process.wait()
        child.log_file.close()
        statuses[child.name] = code
        if code != 0:
            progress(f"{child.name} {describe_exit(code)} (log {child.log_path})")
    return statuses


def _running(child: Child) -> bool:
    """The child (or, for a group leader, any process of its group) has not exited."""
    if child.process.poll() is None:
        return True
    return child.own_group and _group_alive(child.process.pid)


def _names(children: Sequence[Child]) -> str:
    return ", ".join(child.name for child in children)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit meanwhile, so ``finally`` blocks stop the children."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def private_etcd(
    run_dir: Path, *, tls: TlsMaterial | None = None, users: ServerUsers | None = None
) -> Iterator[str]:
    """An etcd of its own (data under ``run_dir``), stopped on exit; yields its endpoint.

    ``tls`` serves it over https with that material; ``users`` turns authentication on."""
    from fabric.discovery.etcd_server import EtcdServer

    server = EtcdServer(data_dir=run_dir / "etcd-data", tls=tls, users=users)
    server.start()
    try:
        yield server.endpoint
    finally:
        server.close()


def free_port() -> int:
    """A port free on 127.0.0.1 right now (a race is possible but harmless on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
