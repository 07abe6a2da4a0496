"""The chaos suite's deployments: a 1P1D under test and an aggregated reference, one private etcd.

Owns every process the suite starts and the ways faults touch them: ``ChaosDeployment`` starts
them as the other serving benchmarks do (``fabric.bench.deployment``'s ``start_worker`` /
``start_frontend`` / ``wait_serving``, the commands of ``fabric launch``),
kills a worker with SIGKILL and restarts it under the same worker id, pauses, kills and restarts
etcd (``EtcdServer``), reads worker records from etcd and scrapes every ``/metrics`` (a worker's
URL is its record's ``endpoints.metrics``; the frontend's is ``<url>/metrics``).

Layout: etcd; ``prefill-0`` pinned to core 0 and ``decode-0`` pinned to core 1 (one thread
each) with their frontend, in one namespace; ``reference-0`` (aggregated, unpinned, one thread)
with a frontend of its own in another namespace: the healthy deployment whose greedy texts
served texts are compared with. The reference frontend queues patiently (``--queue-timeout``)
because it is only ever asked for references.

Invariants: every wait is bounded; ``close`` stops every process ever started (killed ones are
reaped when killed) and etcd, whatever happened; logs stay in the run directory (a restarted
worker logs to ``<id>.<n>.log``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fabric.bench.deployment import STARTUP_S, start_frontend, start_worker, wait_serving
from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.records import WorkerRecord
from fabric.discovery.registry import Role, worker_key
from fabric.errors import FabricError
from fabric.launch.processes import registered_workers
from fabric.supervise import POLL_S, Child, ChildFailed, check_alive, stop_processes

REFERENCE_TIMEOUT_S = 600.0
"""The reference frontend's queue and request timeouts: it is only ever asked for references."""
SCRAPE_TIMEOUT_S = 2.0
PREFILL = "prefill-0"
DECODE = "decode-0"
REFERENCE = "reference-0"
WORKER_TO_ROLE: dict[str, Role] = {PREFILL: Role.PREFILL, DECODE: Role.DECODE}

BLOCK_GAUGES = ("fabric_kvbm_blocks_in_use",)
"""Summed over tiers and workers: the blocks some request still references."""
HOLD_GAUGES = (
    "fabric_worker_held_handoffs",
    "fabric_worker_active_requests",
    "fabric_worker_waiting_requests",
    "fabric_frontend_worker_in_flight",
    "fabric_frontend_queued",
)
"""Per-request state that must be gone once nothing is in flight (workers' and frontend's)."""


def log(message: str) -> None:
    print(f"chaos: {message}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class Gauges:
    """One scrape of every live endpoint: the leak gauges, summed, and per source."""

    blocks: int = 0
    holds: int = 0
    nonzero: dict[str, float] = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)
    first_nonzero: dict[str, float] = field(default_factory=dict)
    """``wait_idle``: what the first scrape found not yet at 0."""

    @property
    def idle(self) -> bool:
        return self.blocks == 0 and self.holds == 0 and not self.unreachable


class ChaosDeployment:
    """The processes under test (see the module docstring)."""

    def __init__(self, run_dir: Path, preset: str, request_timeout_s: float) -> None:
        self.run_dir = run_dir
        self.preset = preset
        self.namespace = f"chaos-{os.getpid()}"
        self.etcd = EtcdServer(data_dir=run_dir / "etcd-data")
        self.url = ""
        self.reference_url = ""
        self.model = ""
        self._request_timeout_s = request_timeout_s
        self._started: list[Child] = []
        """Every process ever started (killed and retired ones too): what ``close`` stops."""
        self._children: dict[str, Child] = {}
        """The live ones, by worker id or role (``frontend``, ``reference-frontend``)."""
        self._restarts = 0
        self._registry: EtcdRegistry | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """etcd, both deployments; returns once both frontends count their workers."""
        self.etcd.start()
        log(f"etcd at {self.etcd.endpoint}")
        for worker_id in (PREFILL, DECODE):
            self._start_worker(worker_id, worker_id)
        self.url = self._start_frontend(
            "frontend", self.namespace, request_timeout_s=self._request_timeout_s
        )
        ref_namespace = f"{self.namespace}-ref"
        self._children[REFERENCE] = start_worker(
            self._started,
            REFERENCE,
            Role.AGGREGATED.value,
            etcd=self.etcd.endpoint,
            model=self.preset,
            namespace=ref_namespace,
            cpus=None,
            threads=1,
            run_dir=self.run_dir,
            progress=log,
        )
        self.reference_url = self._start_frontend(
            "reference-frontend",
            ref_namespace,
            request_timeout_s=REFERENCE_TIMEOUT_S,
            extra=["--queue-timeout", str(REFERENCE_TIMEOUT_S)],
        )
        self.model = wait_serving(self.url, self._started, 2, log)
        wait_serving(self.reference_url, self._started, 1, log)
        log(f"1P1D at {self.url}, reference at {self.reference_url}")

    def close(self) -> None:
        """Stop every process and etcd (idempotent)."""
        children, self._started, self._children = self._started, [], {}
        try:
            stop_processes(children, progress=log)
        finally:
            if self._registry is not None:
                self._registry.close()
                self._registry = None
            self.etcd.close()

    def check_alive(self) -> None:
        check_alive(list(self._children.values()))

    def dead_workers(self) -> list[str]:
        """Workers under test that exited though nobody killed them."""
        return [
            w
            for w in WORKER_TO_ROLE
            if w in self._children and self._children[w].process.poll() is not None
        ]

    def retire(self, worker_id: str) -> None:
        """Forget a worker that exited by itself (reaped), so ``restart`` can start it again."""
        child = self._children.pop(worker_id)
        child.process.wait(10.0)
        child.log_file.close()

    # -- faults on workers -------------------------------------------------------------------

    def kill(self, worker_id: str) -> float:
        """SIGKILL ``worker_id`` and reap it; returns the time (``monotonic``) of the kill."""
        child = self._children.pop(worker_id)
        child.process.send_signal(signal.SIGKILL)
        at = time.monotonic()
        child.process.wait(10.0)
        child.log_file.close()
        log(f"killed {worker_id} (pid {child.process.pid}) with SIGKILL")
        return at

    def restart(self, worker_id: str, *, after_wall: float) -> None:
        """Start ``worker_id`` again under the same id; returns once its new record (started
        after ``after_wall``, wall clock) is in etcd and the frontend counts both workers."""
        self._restarts += 1
        self._start_worker(worker_id, f"{worker_id}.{self._restarts}")
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            self.check_alive()
            record = self.record(worker_id)
            if record is not None and record.started_at >= after_wall and self._counts(2):
                log(f"{worker_id} is back")
                return
            time.sleep(POLL_S)
        raise ChildFailed(f"{worker_id} did not come back within {STARTUP_S:.0f} s")

    def wait_registered(self, timeout_s: float) -> float | None:
        """Seconds until both records are in etcd and the frontend counts both, or None."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if all(self.record(w) is not None for w in WORKER_TO_ROLE) and self._counts(2):
                return time.monotonic() - start
            time.sleep(POLL_S)
        return None

    def _start_worker(self, worker_id: str, log_name: str) -> None:
        """A worker under test, pinned to its core (prefill 0, decode 1) when there are two;
        ``log_name`` names its log (``<id>.<n>`` after a restart)."""
        cpu = "0" if worker_id == PREFILL else "1"
        self._children[worker_id] = start_worker(
            self._started,
            worker_id,
            WORKER_TO_ROLE[worker_id].value,
            etcd=self.etcd.endpoint,
            model=self.preset,
            namespace=self.namespace,
            cpus=cpu if (os.cpu_count() or 1) >= 2 else None,
            threads=1,
            run_dir=self.run_dir,
            progress=log,
            name=log_name,
        )

    def _start_frontend(
        self,
        name: str,
        namespace: str,
        *,
        request_timeout_s: float,
        extra: Sequence[str] = (),
    ) -> str:
        url = start_frontend(
            self._started,
            etcd=self.etcd.endpoint,
            model=self.preset,
            namespace=namespace,
            run_dir=self.run_dir,
            progress=log,
            name=name,
            request_timeout_s=request_timeout_s,
            extra=extra,
        )
        self._children[name] = self._started[-1]
        return url

    def _counts(self, num_workers: int) -> bool:
        registered = registered_workers(self.url)
        return registered is not None and registered >= num_workers

    # -- etcd ------------------------------------------------------------------------------

    def registry(self) -> EtcdRegistry:
        if self._registry is None:
            self._registry = EtcdRegistry(self.etcd.endpoint, timeout_s=2.0)
        return self._registry

    def record_key(self, worker_id: str) -> str:
        return worker_key(self.namespace, WORKER_TO_ROLE[worker_id], worker_id)

    def record(self, worker_id: str) -> WorkerRecord | None:
        """The worker's record in etcd; None when absent or etcd does not answer."""
        key = self.record_key(worker_id)
        try:
            raw = self.registry().get(key)
        except FabricError:
            return None
        return None if raw is None else WorkerRecord.from_bytes(raw, key=key)

    # -- metrics ---------------------------------------------------------------------------

    def scrape(self) -> Gauges:
        """The leak gauges of both workers (URLs from their records) and the frontend."""
        urls = {"frontend": f"{self.url}/metrics"}
        for worker_id in WORKER_TO_ROLE:
            record = self.record(worker_id)
            if record is None or record.endpoints.metrics is None:
                urls[worker_id] = ""
            else:
                urls[worker_id] = record.endpoints.metrics
        gauges = Gauges()
        for source, url in urls.items():
            text = _fetch(url) if url else None
            if text is None:
                gauges.unreachable.append(source)
                continue
            for family in text_string_to_metric_families(text):
                is_block = family.name in BLOCK_GAUGES
                if not is_block and family.name not in HOLD_GAUGES:
                    continue
                total = sum(sample.value for sample in family.samples)
                if total:
                    gauges.nonzero[f"{source}:{family.name}"] = total
                if is_block:
                    gauges.blocks += int(total)
                else:
                    gauges.holds += int(total)
        return gauges

    def wait_idle(self, bound_s: float) -> tuple[Gauges, float]:
        """Scrape until every leak gauge reads 0 or ``bound_s`` passed: the last scrape and
        the seconds it took."""
        start = time.monotonic()
        first: dict[str, float] | None = None
        while True:
            gauges = self.scrape()
            if first is None:
                first = dict(gauges.nonzero)
            gauges.first_nonzero = first
            elapsed = time.monotonic() - start
            if gauges.idle or elapsed >= bound_s:
                return gauges, elapsed
            time.sleep(0.5)

    def metric(self, worker_id: str, name: str) -> float | None:
        """The sum of one metric's samples on ``worker_id`` (None: not reachable)."""
        record = self.record(worker_id)
        text = _fetch(record.endpoints.metrics) if record and record.endpoints.metrics else None
        if text is None:
            return None
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        )


def _fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
            return bytes(response.read()).decode()
    except (urllib.error.URLError, OSError):
        return None
