"""``python -m fabric.bench transfer`` end to end, tiny: JSON shape and byte verification only."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

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


def test_transfer_bench_tiny() -> None:
    cmd = [sys.executable, "-m", "fabric.bench", "transfer"]
    cmd += ["--total-mib", "4", "--rounds", "2", "--block-kib", "16,256"]
    done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    result = json.loads(done.stdout)
    assert [row["block_bytes"] for row in result["rows"]] == [16 << 10, 256 << 10]
    for row in result["rows"]:
        for key in FIGURES:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["total_bytes"] == 4 << 20
        assert row["num_blocks"] * row["block_bytes"] == row["total_bytes"]
        assert row["verified"] is True
    assert result["machine"]["cpus"] >= 1
