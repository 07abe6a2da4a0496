"""Fixtures of the slow vLLM suite: engines in subprocesses, a private etcd, bounded waits.

Each vLLM engine runs in its own process (``runner.py``, the .venv-vllm interpreter), pinned to
one core with ``VLLM_CPU_OMP_THREADS_BIND``; results come back as JSON lines. Every wait has a
deadline and every process started here is killed in teardown, whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

RUNNER = Path(__file__).with_name("runner.py")
RESULT_PREFIX = "@@fabric-result "  # runner.RESULT_PREFIX
ENGINE_TIMEOUT_S = 240.0


def _vllm_python() -> str | None:
    """An interpreter that imports vLLM: this one, or the repository's .venv-vllm. Fails (never
    skips) when vLLM imports there but the connector does not: that is a bug of ours."""
    candidates = [sys.executable, str(Path(__file__).parents[3] / ".venv-vllm" / "bin" / "python")]
    for python in candidates:
        if not Path(python).exists() or _probe(python, "import vllm").returncode != 0:
            continue
        connector = _probe(python, "import fabric.integrations.vllm.connector")
        if connector.returncode != 0:
            pytest.fail(f"vLLM imports but the connector does not:\n{connector.stderr[-3000:]}")
        return python
    return None


def _probe(python: str, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="session")
def vllm_python() -> str:
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM-CPU is not installed: run launch/setup_vllm.sh (creates .venv-vllm)")
    return python


@pytest.fixture(scope="session")
def model_dir() -> str:
    from fabric.models.presets import ensure_model

    return str(ensure_model("tiny"))


class Engine:
    """One runner process: its result lines arrive on a queue, read by a daemon thread.

    ``prefix`` runs it under another command (``ip netns exec NAME``: a lab host, which execs
    the runner in place, so the process group is still the runner's); ``env`` adds variables.
    """

    def __init__(
        self,
        python: str,
        job: dict[str, Any],
        *,
        cpu: int | str,
        log: Path,
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = {
            **os.environ,
            **(env or {}),
            "VLLM_CPU_OMP_THREADS_BIND": str(cpu),
            "PYTHONUNBUFFERED": "1",
        }
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [*prefix, python, str(RUNNER), json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
            text=True,
            cwd=Path(__file__).parents[3],
            start_new_session=True,  # a group of its own: tensor-parallel workers die with it
        )
        self._results: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"engine-{self.proc.pid}", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                self._results.put(json.loads(line[len(RESULT_PREFIX) :]))
        self._results.put(None)  # stdout closed: the process ended

    def result(self, event: str, timeout_s: float = ENGINE_TIMEOUT_S) -> dict[str, Any]:
        """The next result line, which must be ``event``; fails with the log tail otherwise."""
        try:
            got = self._results.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(f"no {event!r} from the engine within {timeout_s} s\n{self.tail()}")
        if got is None or got.get("event") != event:
            pytest.fail(f"expected {event!r}, the engine gave {got!r}\n{self.tail()}")
        return got

    def wait(self, timeout_s: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"engine {self.proc.pid} did not exit within {timeout_s} s\n{self.tail()}")

    def tail(self, num_lines: int = 40) -> str:
        self._log_file.flush()
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])

    def kill(self) -> None:
        """Kill the runner and every process of its group (vLLM's worker processes)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log_file.close()


VLLM_SHM = "vllm_dist_*"
"""vLLM's shared-memory segments of a tensor-parallel group (``/dev/shm``): an engine killed
before it shuts down (a producer still holding blocks at teardown) leaves them behind."""


class Engines:
    """Starts runner processes and kills every one of them at teardown, then removes the vLLM
    shared-memory segments that appeared meanwhile (tests run one at a time)."""

    def __init__(self, python: str, model: str, logs: Path) -> None:
        self.python = python
        self.model = model
        self.logs = logs
        self._started: list[Engine] = []
        self._shm_before = set(Path("/dev/shm").glob(VLLM_SHM))

    def start(
        self,
        name: str,
        job: dict[str, Any],
        *,
        cpu: int | str = 0,
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Engine:
        engine = Engine(
            self.python,
            {"model": self.model, **job},
            cpu=cpu,
            log=self.logs / f"{name}.log",
            prefix=prefix,
            env=env,
        )
        self._started.append(engine)
        return engine

    def run(self, name: str, job: dict[str, Any], *, cpu: int | str = 0) -> dict[str, Any]:
        """Run ``job`` to completion and return its outputs."""
        engine = self.start(name, job, cpu=cpu)
        outputs = engine.result("outputs")
        if engine.wait() != 0:
            pytest.fail(f"{name} exited with {engine.proc.returncode}\n{engine.tail()}")
        return outputs

    def close(self) -> None:
        for engine in self._started:
            engine.kill()
        for leftover in set(Path("/dev/shm").glob(VLLM_SHM)) - self._shm_before:
            leftover.unlink(missing_ok=True)


class Service:
    """A server process (``vllm serve``, ``fabric serve frontend``) in its own session.

    ``stop`` sends SIGTERM to the process group this object started (the server and the
    children it spawned, such as vLLM's engine core), waits (bounded), then SIGKILLs the group.
    """

    def __init__(self, argv: list[str], *, env: dict[str, str], log: Path, url: str) -> None:
        self.url = url
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).parents[3],
            start_new_session=True,
        )

    def wait_ready(self, path: str, ready: Any, timeout_s: float) -> None:
        """Poll ``GET url+path`` until ``ready(response)``; fails with the log tail."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.log.name}: exited with {self.proc.returncode}\n{self.tail()}")
            try:
                if ready(httpx.get(self.url + path, timeout=2.0)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{self.log.name}: not ready within {timeout_s} s\n{self.tail()}")

    def tail(self, num_lines: int = 40) -> str:
        self._log_file.flush()
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children left behind, if any
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log_file.close()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Any]:
    """``services(name, argv, env=..., url=...)`` starts a ``Service``; all stop at teardown."""
    started: list[Service] = []

    def start(name: str, argv: list[str], *, env: dict[str, str], url: str) -> Service:
        started.append(Service(argv, env=env, log=tmp_path / f"{name}.log", url=url))
        return started[-1]

    try:
        yield start
    finally:
        for service in reversed(started):
            service.stop()


@pytest.fixture(scope="module")
def engines(
    vllm_python: str, model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engines]:
    started = Engines(vllm_python, model_dir, tmp_path_factory.mktemp("engine-logs"))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def etcd_endpoint() -> Iterator[str]:
    from fabric.discovery.etcd_server import EtcdServer

    server = EtcdServer().start()
    try:
        yield server.endpoint
    finally:
        server.close()


def connector_config(role: str, **extra: Any) -> dict[str, Any]:
    """A ``kv_transfer_config`` for the fabric connector (the JSONs of docs/vllm.md)."""
    return {
        "kv_connector": "FabricConnector",
        "kv_connector_module_path": "fabric.integrations.vllm.connector",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


@pytest.fixture(scope="session")
def kv_transfer_config() -> Any:
    """``kv_transfer_config(role, **extra)``: the fabric connector's vLLM config."""
    return connector_config


@pytest.fixture
def node_namespace() -> Iterator[str]:
    """A namespace of its own for a node cache of node ``test``; its shared-memory segment and
    owner file must be gone at teardown (removed, then the test fails, if not)."""
    from fabric.node.config import segment_name

    name = f"v{uuid.uuid4().hex[:12]}"
    yield name
    segment = Path("/dev/shm", segment_name(name, "test"))
    leftovers = [p for p in (segment, segment.with_name(f"{segment.name}.owner")) if p.exists()]
    for leftover in leftovers:
        leftover.unlink()
    if leftovers:
        pytest.fail(f"{leftovers} left behind")


@pytest.fixture
def service(node_namespace: str) -> Iterator[Any]:
    """A node cache of ``page_fixtures``' geometry in this process (real shared memory)."""
    from page_fixtures import node_config

    from fabric.node import build_node_cache

    with build_node_cache(node_config(node_namespace)) as node:
        yield node


@pytest.fixture
def instances(service: Any) -> Iterator[list[Any]]:
    """Two instances' connector sides (``connector_sides.Instance``) on that node cache."""
    from connector_sides import Instance

    made = [Instance({"node_cache": service.endpoint}, seed) for seed in (1, 2)]
    yield made
    for instance in made:
        instance.close()
