"""Helpers of the serving tests: worker processes, a signal-level frontend, metrics scrapes.

``WorkerProcess`` is one ``python -m fabric.worker ROLE`` child with its log file; ``stop`` sends
SIGTERM and waits (bounded), then SIGKILLs. ``Frontend`` plays the frontend of the protocol: one
``SignalClient`` per worker (identity: the frontend's id), ``GenerateRequest`` sent one-way,
``TokenChunk``s collected per request id until the finished one. ``prompt_of`` makes a seeded
prompt; ``blocks_in_use`` scrapes a worker's ``fabric_kvbm_blocks_in_use{tier="G1"}``.
``serving_fleet`` runs a private etcd, the given workers on the tiny model and a ``Frontend``,
and stops all of them on exit; ``ServingFleet`` is what a test module keeps of it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from harness_probes import scrape as scrape_url

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.records import WorkerRecord
from fabric.discovery.registration import WorkerDirectory
from fabric.models.presets import ensure_model
from fabric.signal.client import SignalClient
from fabric.signal.messages import Abort, GenerateRequest, TokenChunk

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_S = 15.0
REPLY_S = 30.0
STARTUP_S = 60.0


@dataclass
class WorkerProcess:
    """A running worker child (its stderr and stdout go to ``log_path``)."""

    worker_id: str
    role: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, num_lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_S)

    def stop(self) -> None:
        """SIGTERM (the worker revokes its record and releases everything); SIGKILL if stuck."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                self.kill()


def spawn_worker(
    role: str,
    worker_id: str,
    *,
    etcd: str,
    namespace: str,
    model_dir: Path,
    log_dir: Path,
    extra: Sequence[str] = (),
) -> WorkerProcess:
    log_path = log_dir / f"{worker_id}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fabric.worker",
                role,
                f"--etcd={etcd}",
                f"--namespace={namespace}",
                f"--model={model_dir}",
                f"--worker-id={worker_id}",
                "--threads=1",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=dict(os.environ, UCX_NET_DEVICES="lo"),
        )
    return WorkerProcess(worker_id, role, proc, log_path)


@dataclass
class Result:
    """Everything streamed for one request."""

    tokens: list[int]
    chunks: list[TokenChunk]

    @property
    def final(self) -> TokenChunk:
        return self.chunks[-1]

    @property
    def stats(self) -> dict[str, float | int | str | bool]:
        return dict(self.final.stats)


@dataclass
class Frontend:
    """The frontend side of the protocol, over one client per worker."""

    directory: WorkerDirectory
    identity: str = field(default_factory=lambda: f"test-frontend-{uuid.uuid4().hex[:8]}")
    _clients: dict[str, SignalClient] = field(default_factory=dict)
    _chunks: dict[str, list[TokenChunk]] = field(default_factory=dict)

    def record(self, worker_id: str) -> WorkerRecord:
        record = self.directory.get(worker_id)
        assert record is not None, f"{worker_id} is not registered"
        return record

    def client(self, worker_id: str) -> SignalClient:
        if worker_id not in self._clients:
            record = self.record(worker_id)
            assert record.endpoints.signal is not None, f"{worker_id} has no signal endpoint"
            self._clients[worker_id] = SignalClient(
                record.endpoints.signal, identity=self.identity, compat_hash=record.compat_hash
            )
        return self._clients[worker_id]

    def send(
        self,
        worker_id: str,
        prompt: list[int],
        max_tokens: int,
        *,
        prefill_worker: str = "",
        ignore_eos: bool = True,
        deadline_ms: int = 0,
    ) -> str:
        """Send a ``GenerateRequest`` one-way; returns its request id."""
        request_id = f"req-{uuid.uuid4().hex[:10]}"
        sampling: dict[str, float | int | str | bool] = {"ignore_eos": ignore_eos}
        self._chunks[request_id] = []
        self.client(worker_id).send(
            GenerateRequest(request_id, prompt, max_tokens, prefill_worker, sampling, deadline_ms)
        )
        return request_id

    def abort(self, worker_id: str, request_id: str) -> None:
        self.client(worker_id).send(Abort(request_id, "test abort"))

    def wait_chunks(
        self, worker_id: str, request_id: str, predicate: Callable[[list[TokenChunk]], bool]
    ) -> list[TokenChunk]:
        """Receive from ``worker_id`` until ``predicate(chunks of request_id)`` holds."""
        deadline = time.monotonic() + REPLY_S
        chunks = self._chunks[request_id]
        while not predicate(chunks):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{request_id}: only {len(chunks)} chunks in {REPLY_S} s"
            message = self.client(worker_id).receive(min(remaining, 1.0))
            if isinstance(message, TokenChunk):
                self._chunks[message.request_id].append(message)
        return chunks

    def result(self, worker_id: str, request_id: str) -> Result:
        chunks = self.wait_chunks(worker_id, request_id, lambda c: bool(c) and c[-1].finished)
        assert all(not c.finished for c in chunks[:-1])
        return Result([t for c in chunks for t in c.token_ids], list(chunks))

    def generate(
        self, worker_id: str, prompt: list[int], max_tokens: int, *, prefill_worker: str = ""
    ) -> Result:
        request_id = self.send(worker_id, prompt, max_tokens, prefill_worker=prefill_worker)
        return self.result(worker_id, request_id)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


@dataclass
class ServingFleet:
    """A running ``serving_fleet``: its frontend and its workers by id."""

    frontend: Frontend
    workers: dict[str, WorkerProcess]

    def logs(self, *worker_ids: str) -> str:
        """The log tails of ``worker_ids`` (every worker's without any)."""
        return "\n\n".join(
            f"== {w.worker_id}\n{w.log_tail()}"
            for w in self.workers.values()
            if not worker_ids or w.worker_id in worker_ids
        )

    def in_use(self, worker_id: str) -> float:
        """The worker's G1 blocks in use."""
        return blocks_in_use(self.frontend.record(worker_id))

    def in_use_live(self) -> dict[str, float]:
        """G1 blocks in use on every live worker."""
        return {
            worker_id: self.in_use(worker_id)
            for worker_id, worker in self.workers.items()
            if worker.proc.poll() is None
        }


def check_equal(result: Result, reference: Result) -> None:
    """``result`` generated the tokens of ``reference`` and both ended on their length."""
    assert result.tokens == reference.tokens
    assert result.final.finish_reason == reference.final.finish_reason == "length"


def scrape(record: WorkerRecord) -> str:
    """The worker's metrics, from the endpoint its record names."""
    assert record.endpoints.metrics is not None, f"{record.worker_id} has no metrics endpoint"
    return scrape_url(record.endpoints.metrics)


def metric(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels, e.g. ``x{tier="G1"}``) in ``text``."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the scrape")


def prompt_of(length: int, seed: int) -> list[int]:
    """``length`` token ids of the tiny vocabulary from ``seed``, never BOS (0) or EOS (1)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, 1024, (length,), generator=generator).tolist()


def blocks_in_use(record: WorkerRecord) -> float:
    return metric(scrape(record), 'fabric_kvbm_blocks_in_use{tier="G1"}')


def stop_all(workers: Sequence[WorkerProcess]) -> None:
    """Stop workers in parallel (SIGTERM to all, then wait for each)."""
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.proc.wait(timeout=STOP_S)
        worker.kill()


@contextlib.contextmanager
def serving_fleet(
    tmp: Path, workers: Mapping[str, tuple[str, Sequence[str]]], extra: Sequence[str]
) -> Iterator[tuple[Frontend, dict[str, WorkerProcess]]]:
    """A private etcd, ``workers`` (id -> (role, flags), each also given ``extra``) on the tiny
    model in one fresh namespace, all registered (within ``STARTUP_S``), and a ``Frontend``;
    every process is stopped on exit."""
    model_dir = ensure_model("tiny", tmp / "tiny", progress=lambda _: None)
    namespace = f"serving-{uuid.uuid4().hex[:8]}"
    with EtcdServer(name=f"fabric-{tmp.name}-etcd") as etcd:
        started: dict[str, WorkerProcess] = {}
        registry = EtcdRegistry(etcd.endpoint, timeout_s=2.0)
        directory = WorkerDirectory(registry, namespace=namespace).start()
        frontend = Frontend(directory)
        try:
            for worker_id, (role, flags) in workers.items():
                started[worker_id] = spawn_worker(
                    role,
                    worker_id,
                    etcd=etcd.endpoint,
                    namespace=namespace,
                    model_dir=model_dir,
                    log_dir=tmp,
                    extra=[*extra, *flags],
                )
            if not directory.wait_for(lambda w: set(w) == set(workers), STARTUP_S):
                logs = "\n\n".join(f"== {w.worker_id}\n{w.log_tail()}" for w in started.values())
                pytest.fail(f"workers did not register within {STARTUP_S} s:\n{logs}")
            yield frontend, started
        finally:
            frontend.close()
            stop_all(list(started.values()))
            directory.close()
            registry.close()
