"""``python -m fabric.bench copy`` runs end to end and reports every figure (no timing asserts)."""

from __future__ import annotations

import json
import math
import subprocess
import sys


def test_copy_bench_prints_verified_rows() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fabric.bench",
            "copy",
            "--total-mib",
            "2",
            "--rounds",
            "1",
            "--block-kib",
            "16,64",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=180,
    ).stdout
    result = json.loads(out)
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2  # block sizes x layout pairs x patterns
    for row in rows:
        assert row["verified"] is True
        figures = ["fallback_gbps", "memcpy_gbps"]
        if result["native_available"]:
            figures += ["native_gbps", "native_vs_fallback", "native_vs_memcpy"]
        for key in figures:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)


def test_copy_bench_refuses_bad_block_sizes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fabric.bench", "copy", "--block-kib", "16,0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "must be positive" in proc.stderr
