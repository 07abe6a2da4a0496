"""``python -m fabric.bench transfer`` end to end, tiny: JSON shape and byte verification only;
``--hosts`` across two network-namespace hosts over TCP (marked ``multihost``), leaving none."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import pytest

from fabric.bench.netns import LabUnavailable, check_available, stale_namespaces, sweep_stale

pytestmark = [
    pytest.mark.nixl,
]

FIGURES = (
    "block_bytes",
    "total_bytes",
    "num_blocks",
    "num_descriptors",
    "fabric_gbps",
    "nixl_gbps",
    "nixl_per_block_gbps",
    "memcpy_gbps",
    "fabric_vs_nixl",
    "fabric_vs_memcpy",
)


def run_bench(*extra: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fabric.bench", "transfer"]
    cmd += ["--total-mib", "4", "--rounds", "2", "--block-kib", "16,256", *extra]
    done = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    result: dict[str, Any] = json.loads(done.stdout)
    check_rows(result)
    return result


def check_rows(result: dict[str, Any]) -> None:
    assert [row["block_bytes"] for row in result["rows"]] == [16 << 10, 256 << 10]
    for row in result["rows"]:
        for key in FIGURES:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["total_bytes"] == 4 << 20
        assert row["num_blocks"] * row["block_bytes"] == row["total_bytes"]
        assert row["verified"] is True
    assert result["machine"]["cpus"] >= 1


def test_transfer_bench_tiny() -> None:
    assert run_bench()["link"] == "loopback"


@pytest.mark.multihost
def test_transfer_bench_between_hosts_over_tcp() -> None:
    try:
        check_available()
    except LabUnavailable as exc:
        pytest.skip(f"no network namespaces: {exc}")
    sweep_stale()  # earlier crashed runs' labs: not this benchmark's to answer for
    result = run_bench("--hosts")
    assert result["link"].startswith("tcp over veth"), result["link"]
    assert stale_namespaces() == []  # the finished benchmark removed its lab
