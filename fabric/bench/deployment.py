"""A local deployment for the serving benchmarks (``prefix``, ``node-cache``, ``serve``,
``load``, ``chaos``).

Owns the start and measure mechanics those benchmarks share, the way ``fabric launch`` starts a
deployment (``fabric.launch``'s commands, supervised by ``fabric.supervise``): a worker or the
OpenAI frontend started into the caller's ``children`` (a worker also returned, for a caller
that keeps its processes by name), the bounded wait until the frontend sees its workers,
``deployed`` (a private etcd and one deployment on it, every process stopped on exit), one
streamed request under the benchmarks' request timeout, seeded random prompts, the wait until
the shared-disk (G4) directory holds a number of blocks, the p50 of a worker-reported figure, a
report's per-kind figures and its ``machine`` block.

Invariants: every wait is bounded (``STARTUP_S``, ``REQUEST_TIMEOUT_S``, ``STORE_WAIT_S``), and
the same seed key always gives the same token ids.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fabric.errors import FabricError
from fabric.frontend.client import StreamedCompletion, served_model, stream_completion
from fabric.launch.processes import frontend_command, wait_deployment_ready, worker_command
from fabric.supervise import (
    Child,
    Progress,
    check_alive,
    free_port,
    private_etcd,
    sigterm_raises,
    start_process,
    stop_processes,
)

STARTUP_S = 240.0
REQUEST_TIMEOUT_S = 600.0
STORE_WAIT_S = 60.0
FIRST_TOKEN_ID = 2
"""Ids 0 and 1 are the presets' BOS / EOS; prompts draw from ``[2, vocab)``."""


G4_DIR = "g4"
"""The shared-disk (G4) directory a benchmark gives its workers, under its run directory."""


@dataclass(frozen=True, slots=True)
class Deployment:
    """A running deployment requests are sent to: its frontend, the vocabulary prompts draw
    from, the G4 directory its workers share, and its processes (checked alive per request)."""

    url: str
    model: str
    vocab: int
    store_dir: Path
    children: list[Child]

    def send(
        self, prompt: Sequence[int], max_tokens: int, routing: dict[str, str] | None = None
    ) -> StreamedCompletion:
        """One streamed request (``request``), once every process is checked alive."""
        check_alive(self.children)
        return request(self.url, self.model, prompt, max_tokens, routing)

    def wait_for_store(self, expected: int) -> None:
        """Until G4 holds ``expected`` block files (write-through to G4 is asynchronous);
        bounded, and failing at once if a process died."""
        deadline = time.monotonic() + STORE_WAIT_S
        while sum(1 for _ in self.store_dir.rglob("*.kvb")) < expected:
            check_alive(self.children)
            if time.monotonic() > deadline:
                raise FabricError(
                    f"G4 in {self.store_dir} holds fewer than {expected} blocks after "
                    f"{STORE_WAIT_S:.0f} s: the write-through stalled (see the logs)"
                )
            time.sleep(0.05)


@contextmanager
def deployed(
    run_dir: Path,
    vocab: int,
    num_workers: int,
    start: Callable[[str, list[Child]], str],
    progress: Progress,
) -> Iterator[Deployment]:
    """A private etcd under ``run_dir`` and the deployment ``start(etcd, children)`` starts on
    it (its workers and frontend appended to ``children``; it returns the frontend's URL), once
    the frontend sees ``num_workers`` workers. Every process is stopped on leaving, also on an
    error or SIGTERM."""
    children: list[Child] = []
    with sigterm_raises(), private_etcd(run_dir) as etcd:
        try:
            url = start(etcd, children)
            model = wait_serving(url, children, num_workers, progress)
            yield Deployment(url, model, vocab, run_dir / G4_DIR, children)
        finally:
            stop_processes(children, progress=progress)


def apply_quick(args: argparse.Namespace, quick: Mapping[str, object]) -> None:
    """With ``--quick``, the benchmark's quick values replace the flags'."""
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)


def needs_two_cpus(what: str) -> None:
    """Refuse a machine of one CPU: the benchmarks pin their ``what`` to cores 0 and 1."""
    if (os.cpu_count() or 1) < 2:
        raise FabricError(f"this benchmark pins its {what} to cores 0 and 1: it needs 2 CPUs")


def make_run_dir(run_dir: Path | None, prefix: str, progress: Progress) -> Path:
    """``--run-dir`` (created), or a new temporary directory named ``prefix...``."""
    path = run_dir or Path(tempfile.mkdtemp(prefix=prefix))
    path.mkdir(parents=True, exist_ok=True)
    progress(f"logs in {path}")
    return path


def start_worker(
    children: list[Child],
    worker_id: str,
    role: str,
    *,
    etcd: str,
    model: str,
    namespace: str,
    cpus: str | None,
    threads: int | None,
    run_dir: Path,
    progress: Progress,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str | None = None,
) -> Child:
    """Start one worker (``serve ROLE``) into ``children`` and return it; ``name`` (default: its
    id) names the process and its log ``run_dir/NAME.log``; ``cpus`` / ``threads`` None: the
    worker's defaults (unpinned, its own thread count)."""
    cmd = worker_command(
        role,
        etcd=etcd,
        model=model,
        worker_id=worker_id,
        namespace=namespace,
        cpus=cpus,
        threads=threads,
        extra=extra,
    )
    child = start_process(name or worker_id, cmd, run_dir, progress=progress, env=env)
    children.append(child)
    return child


def start_frontend(
    children: list[Child],
    *,
    etcd: str,
    model: str,
    namespace: str,
    run_dir: Path,
    progress: Progress,
    name: str = "frontend",
    request_timeout_s: float | None = REQUEST_TIMEOUT_S,
    extra: Sequence[str] = (),
) -> str:
    """Start the OpenAI frontend of ``namespace`` on a free port into ``children``; its URL.

    Args:
        request_timeout_s: its ``--request-timeout`` (None: the frontend's default).
        extra: more flags.
    """
    port = free_port()
    timeout = [] if request_timeout_s is None else ["--request-timeout", str(request_timeout_s)]
    cmd = frontend_command(
        etcd=etcd, model=model, port=port, namespace=namespace, extra=[*timeout, *extra]
    )
    children.append(start_process(name, cmd, run_dir, progress=progress))
    return f"http://127.0.0.1:{port}"


def wait_serving(
    url: str,
    children: Sequence[Child],
    num_workers: int,
    progress: Progress,
    *,
    timeout_s: float = STARTUP_S,
) -> str:
    """Until the frontend at ``url`` sees ``num_workers`` workers (within ``timeout_s``, failing
    at once when one of ``children`` exits); its model id."""
    wait_deployment_ready(url, children, num_workers, timeout_s, progress=progress)
    return served_model(url)


def request(
    url: str,
    model: str,
    prompt: Sequence[int],
    max_tokens: int,
    routing: dict[str, str] | None = None,
) -> StreamedCompletion:
    """One streamed ``/v1/completions`` of token ids, ``routing`` as its ``fabric`` field."""
    return stream_completion(url, model, prompt, max_tokens, REQUEST_TIMEOUT_S, fabric=routing)


def seeded_tokens(vocab: int, num_tokens: int, key: tuple[str, object]) -> list[int]:
    """``num_tokens`` token ids drawn from a seed made of ``key`` (the same key, the same ids)."""
    seed = [num_tokens, *(ord(c) for c in str(key))]
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(FIRST_TOKEN_ID, vocab, num_tokens)]


def stat_p50(fabrics: Iterable[dict[str, Any]], name: str) -> float | None:
    """The p50 of a worker-reported figure over responses' ``fabric`` fields (None: absent)."""
    values = [float(fabric[name]) for fabric in fabrics if name in fabric]
    return round(statistics.median(values), 3) if values else None


class Timed(Protocol):
    """A measured request: its client TTFT and the response's ``fabric`` field."""

    @property
    def ttft_ms(self) -> float: ...

    @property
    def fabric(self) -> dict[str, Any]: ...


def kind_figures(by_kind: Mapping[str, Sequence[Timed]]) -> dict[str, dict[str, Any]]:
    """Per kind of request: ``ttft_ms`` (p50), ``cached_tokens`` and ``kv_sources`` (the
    distinct values the responses reported) and ``ttft_ms_all``, each keyed by kind."""
    return {
        "ttft_ms": {
            k: round(statistics.median(m.ttft_ms for m in ms), 3) for k, ms in by_kind.items()
        },
        "cached_tokens": {
            k: sorted({int(m.fabric.get("cached_tokens", 0)) for m in ms})
            for k, ms in by_kind.items()
        },
        "kv_sources": {
            k: sorted({str(m.fabric.get("prefill_worker", "")) for m in ms})
            for k, ms in by_kind.items()
        },
        "ttft_ms_all": {k: [round(m.ttft_ms, 1) for m in ms] for k, ms in by_kind.items()},
    }


def machine(load_before: tuple[float, ...]) -> dict[str, Any]:
    """A report's ``machine`` block: CPUs, platform, load averages before and now."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
