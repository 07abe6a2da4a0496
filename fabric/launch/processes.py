"""The processes of a deployment on this host: their command lines, the node cache's start,
and the wait until the frontend counts every worker.

``fabric launch`` starts its deployment with these, and so do the serving benchmarks
(``fabric.bench.deployment``) and the multi-host lab, so they run what users run. A worker is
``fabric serve <role>``, the frontend ``fabric serve frontend``, the node cache ``fabric serve
node-cache``, each ``python -m fabric.cli`` of this interpreter.

Invariants: every wait is bounded and ends early when a child exits (``fabric.supervise``'s
``wait_ready``); readiness is read from the frontend's ``/health``, the way an orchestrator
reads it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fabric.supervise import (
    Child,
    Progress,
    ReadyLine,
    StartupStatus,
    fetch_health,
    start_process,
    wait_ready,
)


def print_progress(message: str) -> None:
    print(f"[launch] {message}", flush=True)


def worker_command(
    role: str,
    *,
    etcd: str,
    model: str,
    worker_id: str,
    namespace: str | None = None,
    cpus: str | None = None,
    threads: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of one ``fabric serve <role>`` worker process (``extra``: more flags)."""
    cmd = [sys.executable, "-m", "fabric.cli", "serve", role, "--etcd", etcd]
    cmd += ["--model", model, "--worker-id", worker_id]
    if namespace is not None:
        cmd += ["--namespace", namespace]
    if cpus is not None:
        cmd += ["--cpu", cpus]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return [*cmd, *extra]


def node_cache_command(
    *, etcd: str, model: str, shm_gb: float, namespace: str | None = None
) -> list[str]:
    """The command line of the ``fabric serve node-cache`` process (registered in ``etcd``)."""
    cmd = [sys.executable, "-m", "fabric.cli", "serve", "node-cache", "--etcd", etcd]
    cmd += ["--model", model, "--shm-gb", str(shm_gb)]
    if namespace is not None:
        cmd += ["--namespace", namespace]
    return cmd


def start_node_cache(
    children: list[Child],
    *,
    etcd: str,
    model: str,
    shm_gb: float,
    run_dir: Path,
    env: dict[str, str],
    timeout_s: float,
    should_stop: Callable[[], bool] = lambda: False,
    namespace: str | None = None,
    progress: Progress = print_progress,
    status: StartupStatus | None = None,
    own_group: bool = False,
) -> list[str]:
    """Start the node cache, add it to ``children`` and wait until it serves (shown on
    ``status``); the flags that attach a worker to it. ``own_group``: in a process group of its
    own (``start_process``)."""
    cmd = node_cache_command(etcd=etcd, model=model, shm_gb=shm_gb, namespace=namespace)
    child = start_process(
        "node-cache", cmd, run_dir, progress=progress, env=env, own_group=own_group
    )
    children.append(child)
    ready = ReadyLine(child, progress)
    wait_ready(children, ready, timeout_s, should_stop=should_stop, status=status)
    assert ready.line is not None
    progress(
        f"node cache: {ready.line.get('num_blocks')} blocks in /dev/shm/{ready.line.get('segment')}"
    )
    return ["--node-cache", "etcd"]


def frontend_command(
    *,
    etcd: str,
    model: str,
    port: int,
    namespace: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of the ``fabric serve frontend`` process."""
    cmd = [sys.executable, "-m", "fabric.cli", "serve", "frontend", "--etcd", etcd]
    cmd += ["--model", model, "--port", str(port)]
    if namespace is not None:
        cmd += ["--namespace", namespace]
    return [*cmd, *extra]


class WorkersRegistered:
    """Readiness of a deployment: its frontend's ``/health`` counts every worker it started."""

    def __init__(self, url: str, num_workers: int, progress: Progress) -> None:
        self._url = url
        self._num_workers = num_workers
        self._progress = progress
        self._last = ""
        self._registered: int | None = None  # None: the frontend has not answered

    def poll(self) -> bool:
        registered = self._registered = registered_workers(self._url)
        if registered is None:
            return False
        if registered >= self._num_workers:
            return True
        status = f"{registered}/{self._num_workers} workers registered"
        if status != self._last:
            self._progress(status)
            self._last = status
        return False

    def waiting_for(self) -> str:
        if self._registered is None:
            return "the frontend's /health to answer"
        return f"workers registered with the frontend: {self._registered}/{self._num_workers}"


def wait_deployment_ready(
    url: str,
    children: Sequence[Child],
    num_workers: int,
    timeout_s: float,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Progress,
    status: StartupStatus | None = None,
) -> None:
    """Until the frontend at ``url`` reports every worker; bounded, aborted by a child's death
    or by ``should_stop()`` (Ctrl-C); the wait shown on ``status`` when given."""
    readiness = WorkersRegistered(url, num_workers, progress)
    wait_ready(children, readiness, timeout_s, should_stop=should_stop, status=status)


def registered_workers(url: str) -> int | None:
    """How many workers the frontend at ``url`` counts in its ``/health`` (None: no answer)."""
    body = fetch_health(url)
    try:
        health = json.loads(body) if body is not None else None
    except ValueError:
        return None
    if not isinstance(health, dict):
        return None
    workers = health.get("workers", {})
    return sum(int(n) for n in workers.values()) if isinstance(workers, dict) else 0
