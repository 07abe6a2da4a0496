"""Helpers the discovery tests share: short lease TTLs, their bounds, records, log lines, and the
users of the authenticated etcd servers."""

from __future__ import annotations

import time

import pytest

from fabric.discovery.etcd_auth import EtcdAuth
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.etcd_users import ServerUsers
from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registry import Role

TTL_S = 1.0
BOUND_S = 10.0  # generous bound for anything that should take about one TTL
TEST_PREFIX = "/test-"  # every namespace of the ``namespace`` fixture
USERS = ServerUsers(root_password="root-secret", password="fabric-secret", prefix=TEST_PREFIX)


def cert_only(server: EtcdServer) -> EtcdAuth:
    """The fabric user's credentials on ``server`` without its password (the client cert's CN)."""
    auth = server.client_auth
    return EtcdAuth(ca_file=auth.ca_file, cert_file=auth.cert_file, key_file=auth.key_file)


def record_of(worker_id: str, role: Role = Role.PREFILL, port: int = 5555) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        role=role,
        endpoints=Endpoints(signal=f"tcp://127.0.0.1:{port}"),
        agent_name=f"nixl-{worker_id}",
        layout=FabricLayout(block_size=16, dtype="float32"),
        compat_hash=0xC0FFEE,
        started_at=time.time(),
    )


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]
