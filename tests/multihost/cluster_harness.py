"""A fabric deployment across lab hosts: an etcd member on each of three hosts, workers and
frontends on chosen hosts, the tests' client in the root namespace.

Imported by bare name (pytest puts this directory on ``sys.path``); the name is unique across the
test tree.

Workers bind 0.0.0.0 on their host and advertise what ``fabric.discovery.addresses`` picks (the
route to etcd: their ``eth0`` address) unless a test passes ``--bind-host`` / ``--advertise-host``;
every worker and frontend is given all three etcd endpoints. Processes are started with
``fabric.launch``'s command lines and supervised by the lab (``fabric.supervise``); etcd members
are ``EtcdServer``s run under ``ip netns exec``. ``close`` stops all of it, bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from harness_probes import frontend_health, worker_records

from fabric.bench.netns import Host, Lab
from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdCluster, EtcdServer
from fabric.discovery.records import WorkerRecord
from fabric.launch import frontend_command, wait_deployment_ready, worker_command
from fabric.supervise import Child

MakeLab = Callable[[Sequence[str]], Lab]
"""The ``make_lab`` fixture (conftest): a lab with those hosts, closed at the module's end."""

CLIENT_PORT = 2379
PEER_PORT = 2380
FRONTEND_PORT = 8000
STARTUP_S = 180.0
REQUEST_S = 60.0
BLOCK_SIZE = 16
DEVICE_BLOCKS = 256


def start_etcd_cluster(hosts: Sequence[Host], data_root: Path) -> list[EtcdServer]:
    """One member on each host, started together, returned once every one is healthy."""
    cluster = EtcdCluster(
        tuple((f"etcd-{h.name}", f"http://{h.address}:{PEER_PORT}") for h in hosts),
        token=f"{hosts[0].lab.tag}-etcd",
    )
    members = [
        EtcdServer(
            host=h.address,
            client_port=CLIENT_PORT,
            peer_port=PEER_PORT,
            data_dir=data_root / f"etcd-{h.name}",
            name=f"etcd-{h.name}",
            cluster=cluster,
            command_prefix=("ip", "netns", "exec", h.netns),
            startup_timeout_s=60.0,
        )
        for h in hosts
    ]
    try:
        for member in members:
            member.start(wait=False)
        for member in members:
            member.wait_healthy()
    except BaseException:
        for member in members:
            member.stop()
        raise
    return members


@dataclass
class Deployment:
    """Workers and a frontend of one discovery namespace on the lab's etcd cluster."""

    lab: Lab
    etcd: str
    model_dir: Path
    namespace: str
    frontend_host: Host
    children: dict[str, Child] = field(default_factory=dict)
    url: str = ""

    def start_worker(self, role: str, worker_id: str, host: Host, *extra: str) -> Child:
        flags = ["--bind-host=0.0.0.0"] if not any("-host=" in e for e in extra) else []
        cmd = worker_command(
            role,
            etcd=self.etcd,
            model=str(self.model_dir),
            worker_id=worker_id,
            namespace=self.namespace,
            threads=1,
            extra=[
                f"--device-blocks={DEVICE_BLOCKS}",
                f"--block-size={BLOCK_SIZE}",
                *flags,
                *extra,
            ],
        )
        child = host.start(f"{self.namespace}-{worker_id}", cmd)
        self.children[worker_id] = child
        return child

    def start_frontend(self, port: int = FRONTEND_PORT) -> Child:
        host = self.frontend_host
        cmd = frontend_command(
            etcd=self.etcd,
            model=str(self.model_dir),
            port=port,
            namespace=self.namespace,
            extra=[f"--host={host.address}", "--idle-timeout=20", "--request-timeout=60"],
        )
        child = host.start(f"{self.namespace}-frontend", cmd)
        self.children["frontend"] = child
        self.url = f"http://{host.address}:{port}"
        return child

    def wait_ready(self, num_workers: int, timeout_s: float = STARTUP_S) -> None:
        wait_deployment_ready(
            self.url,
            list(self.children.values()),
            num_workers,
            timeout_s,
            progress=self.lab.progress,
        )

    def health(self) -> dict[str, Any] | None:
        return frontend_health(self.url, timeout_s=5)

    def workers_seen(self) -> dict[str, int]:
        """The frontend's worker count by role (``/health``)."""
        return dict((self.health() or {}).get("workers", {}))

    def client(self, timeout_s: float = REQUEST_S) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=timeout_s
        )

    def records(self, registry: EtcdRegistry) -> dict[str, WorkerRecord]:
        return worker_records(registry, self.namespace)

    def logs(self) -> str:
        return "\n\n".join(
            f"== {name} (exit {child.process.poll()})\n{child.tail()}"
            for name, child in self.children.items()
        )
