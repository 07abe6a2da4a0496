"""Helpers of the end-to-end tests: deployments of real processes, the OpenAI client, scrapes.

Imported by bare name (pytest puts this directory on ``sys.path``); the name is unique across the
test tree.

A ``Deployment`` is one discovery namespace on a shared etcd: worker processes
(``python -m fabric.cli serve prefill|decode|aggregated``) and one frontend process
(``fabric serve frontend``) on an ephemeral port, each with its own log file. Every process it
started is stopped by ``close`` (SIGCONT for a paused one, SIGTERM, then SIGKILL after
``STOP_S``); every wait is bounded. Worker metrics endpoints are read from the workers' etcd
records, the way an operator would find them.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from harness_probes import frontend_health, metric, scrape, wait_until, worker_records

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.records import WorkerRecord
from fabric.supervise import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"  # the served name: the model directory's name
STARTUP_S = 90.0
STOP_S = 15.0
REQUEST_S = 30.0
DEVICE_BLOCKS = 256
BLOCK_SIZE = 16


def prompt_ids(length: int, seed: int) -> list[int]:
    """``length`` token ids of the tiny vocabulary, never BOS (0) or EOS (1)."""
    rng = random.Random(seed)
    return [rng.randrange(2, 1024) for _ in range(length)]


def num_blocks(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


# -- Prometheus text -------------------------------------------------------------------------


def scrape_worker(record: WorkerRecord) -> str:
    """The worker's metrics, from the endpoint its record names."""
    assert record.endpoints.metrics is not None, f"{record.worker_id} has no metrics endpoint"
    return scrape(record.endpoints.metrics)


# -- OpenAI responses ------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What a completion returned; ``fabric`` is the response's non-OpenAI routing field."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    fabric: dict[str, Any]

    def same_output(self, other: Answer) -> bool:
        return (self.text, self.finish_reason, self.completion_tokens) == (
            other.text,
            other.finish_reason,
            other.completion_tokens,
        )


def complete(client: openai.OpenAI, prompt: str | list[int], max_tokens: int) -> Answer:
    """One non-streaming ``/v1/completions``."""
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens)
    assert response.usage is not None
    choice = response.choices[0]
    return Answer(
        choice.text,
        choice.finish_reason,
        response.usage.completion_tokens,
        dict((response.model_extra or {})["fabric"]),
    )


def complete_streamed(client: openai.OpenAI, prompt: str | list[int], max_tokens: int) -> Answer:
    """One streaming ``/v1/completions``, joined (usage from the ``include_usage`` chunk)."""
    stream = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish: str | None = None
    usage_tokens = -1
    fabric: dict[str, Any] = {}
    with stream:
        for chunk in stream:
            fabric = dict((chunk.model_extra or {}).get("fabric") or fabric)
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                pieces.append(choice.text)
                finish = choice.finish_reason or finish
    return Answer("".join(pieces), finish, usage_tokens, fabric)


def chat(client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int) -> Answer:
    """One non-streaming ``/v1/chat/completions``."""
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=max_tokens,
    )
    assert response.usage is not None
    choice = response.choices[0]
    return Answer(
        choice.message.content or "",
        choice.finish_reason,
        response.usage.completion_tokens,
        dict((response.model_extra or {})["fabric"]),
    )


def chat_streamed(
    client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int
) -> tuple[Answer, int]:
    """One streaming chat completion, joined; also returns the number of content chunks."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish: str | None = None
    usage_tokens = -1
    fabric: dict[str, Any] = {}
    with stream:
        for chunk in stream:
            fabric = dict((chunk.model_extra or {}).get("fabric") or fabric)
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
    return Answer("".join(pieces), finish, usage_tokens, fabric), len(pieces)


# -- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    """A started child process and its log (stdout and stderr)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    paused: bool = False

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, num_lines: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (its lease stops too)."""
        self.popen.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused and self.alive:
            self.popen.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        if self.alive:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=STOP_S)
        self.paused = False

    def terminate(self) -> None:
        """SIGTERM (after SIGCONT if paused) without waiting."""
        self.resume()
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, wait (bounded), then SIGKILL."""
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=STOP_S)
        self.kill()


def spawn(name: str, args: Sequence[str], log_dir: Path) -> Proc:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "fabric.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=dict(os.environ, UCX_NET_DEVICES="lo"),
        )
    return Proc(name, popen, log_path)


@dataclass
class Deployment:
    """One namespace of workers plus its frontend (see the module docstring)."""

    name: str
    etcd: str
    registry: EtcdRegistry
    model_dir: Path
    log_dir: Path
    namespace: str = ""
    procs: dict[str, Proc] = field(default_factory=dict)
    url: str = ""

    def __post_init__(self) -> None:
        self.namespace = self.namespace or f"e2e-{self.name}-{uuid.uuid4().hex[:6]}"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # processes

    def spawn_worker(self, role: str, worker_id: str, *extra: str) -> Proc:
        assert worker_id not in self.procs or not self.procs[worker_id].alive
        args = [
            "serve",
            role,
            f"--etcd={self.etcd}",
            f"--namespace={self.namespace}",
            f"--model={self.model_dir}",
            f"--worker-id={worker_id}",
            "--threads=1",
            f"--device-blocks={DEVICE_BLOCKS}",
            f"--block-size={BLOCK_SIZE}",
            *extra,
        ]
        proc = spawn(worker_id, args, self.log_dir)
        self.procs[worker_id] = proc
        return proc

    def spawn_frontend(self) -> Proc:
        port = free_port()
        args = [
            "serve",
            "frontend",
            f"--etcd={self.etcd}",
            f"--namespace={self.namespace}",
            f"--model={self.model_dir}",
            f"--port={port}",
            "--idle-timeout=20",
            "--request-timeout=60",
        ]
        proc = spawn("frontend", args, self.log_dir)
        self.procs["frontend"] = proc
        self.url = f"http://127.0.0.1:{port}"
        return proc

    def close(self) -> None:
        """Stop every process (all SIGTERMed first, so they stop in parallel)."""
        for proc in reversed(self.procs.values()):
            proc.terminate()
        for proc in self.procs.values():
            proc.stop()

    def logs(self) -> str:
        return "\n\n".join(
            f"== {proc.name} (exit {proc.popen.poll()})\n{proc.log_tail()}"
            for proc in self.procs.values()
        )

    # frontend

    def health(self) -> dict[str, Any] | None:
        """``/health``'s body (200 or 503), or None while the frontend does not answer."""
        return frontend_health(self.url, timeout_s=2)

    def wait_workers(self, timeout_s: float = STARTUP_S, **expected: int) -> None:
        """Until the frontend's ``/health`` counts ``expected`` workers by role (bounded)."""

        def ready() -> bool:
            dead = [p.name for p in self.procs.values() if not p.alive and p.popen.returncode > 0]
            assert not dead, f"{dead} exited:\n{self.logs()}"
            health = self.health()
            workers = (health or {}).get("workers", {})
            return all(workers.get(role, 0) == n for role, n in expected.items())

        assert wait_until(ready, timeout_s, poll_s=0.1), (
            f"{self.name}: the frontend did not see {expected} within {timeout_s} s "
            f"(health {self.health()}):\n{self.logs()}"
        )

    def client(self, timeout_s: float = REQUEST_S) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=timeout_s
        )

    def frontend_in_flight(self, worker_id: str) -> float:
        text = scrape(f"{self.url}/metrics")
        return metric(text, "fabric_frontend_worker_in_flight", 0.0, worker=worker_id)

    # workers, found in etcd

    def records(self) -> dict[str, WorkerRecord]:
        return worker_records(self.registry, self.namespace)

    def worker_metrics(self, worker_id: str) -> str:
        record = self.records().get(worker_id)
        assert record is not None, f"{worker_id} is not registered in {self.namespace}"
        return scrape_worker(record)

    def worker_metric(
        self, worker_id: str, name: str, default: float | None = None, **labels: str
    ) -> float:
        return metric(self.worker_metrics(worker_id), name, default, **labels)

    def blocks_in_use(self) -> dict[str, float]:
        """``fabric_kvbm_blocks_in_use{tier="G1"}`` of every registered, running worker."""
        running = {name for name, proc in self.procs.items() if proc.alive and not proc.paused}
        return {
            worker_id: metric(scrape_worker(record), "fabric_kvbm_blocks_in_use", tier="G1")
            for worker_id, record in self.records().items()
            if worker_id in running
        }

    def assert_no_blocks_in_use(self, timeout_s: float = 10.0) -> None:
        last: dict[str, float] = {}

        def idle() -> bool:
            nonlocal last
            last = self.blocks_in_use()
            return bool(last) and all(n == 0 for n in last.values())

        assert wait_until(idle, timeout_s, poll_s=0.1), (
            f"{self.name}: G1 blocks still in use after {timeout_s} s: {last}\n{self.logs()}"
        )


@dataclass(frozen=True)
class Worker:
    """One worker of a test's deployment: its role, id and flags beyond ``spawn_worker``'s."""

    role: str
    worker_id: str
    flags: tuple[str, ...] = ()


@contextmanager
def deployed(
    name: str,
    etcd: str,
    registry: EtcdRegistry,
    model_dir: Path,
    log_dir: Path,
    *,
    workers: Sequence[Worker],
) -> Iterator[Deployment]:
    """A deployment in a namespace of its own: the frontend first (every worker joins a running
    frontend), then ``workers`` in order; yielded once the frontend counts them by role, every
    process stopped on exit."""
    deployment = Deployment(name, etcd, registry, model_dir, log_dir)
    try:
        deployment.spawn_frontend()
        for worker in workers:
            deployment.spawn_worker(worker.role, worker.worker_id, *worker.flags)
        deployment.wait_workers(**Counter(worker.role for worker in workers))
        yield deployment
    finally:
        deployment.close()


Deploy = Callable[[str, Sequence[Worker]], AbstractContextManager[Deployment]]
"""``deploy(name, workers)``: a test module's deployment (``deployed``; conftest's fixture)."""


class Reference:
    """The aggregated reference: answers cached by request, ready-checked on first use."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self._ready = False
        self._client: openai.OpenAI | None = None
        self._answers: dict[tuple[str, int], Answer] = {}

    def client(self) -> openai.OpenAI:
        if not self._ready:
            self.deployment.wait_workers(aggregated=1)
            self._ready = True
            self._client = self.deployment.client()
        assert self._client is not None
        return self._client

    def answer(self, prompt: str | list[int], max_tokens: int) -> Answer:
        key = (repr(prompt), max_tokens)
        if key not in self._answers:
            answer = complete(self.client(), prompt, max_tokens)
            assert answer.fabric["decode_worker"] == "aggregated-0"
            assert answer.fabric["prefill_worker"] == ""
            assert answer.fabric["kv_transfer_ms"] == 0
            self._answers[key] = answer
        return self._answers[key]
