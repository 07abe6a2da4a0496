"""Helpers the discovery tests share: short lease TTLs, their bounds, records, log lines."""

from __future__ import annotations

import time

import pytest

from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registry import Role

TTL_S = 1.0
BOUND_S = 10.0  # generous bound for anything that should take about one TTL


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
