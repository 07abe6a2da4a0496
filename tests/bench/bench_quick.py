"""Run ``python -m fabric.bench NAME --quick`` in a child process, bounded, for the bench tests.

The benchmark stops every process it starts itself; on overrun this stops the benchmark (SIGTERM,
which it turns into a clean shutdown, then SIGKILL after 30 s) and fails the test with the tail
of its stderr. A non-zero exit fails the test the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

STOP_S = 30.0


def run_quick(name: str, timeout_s: float, *args: str) -> dict[str, Any]:
    """The JSON the benchmark printed with ``--quick`` and ``args``."""
    cmd = [sys.executable, "-m", "fabric.bench", name, "--quick", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the benchmark stops its children on SIGTERM
        try:
            out, err = proc.communicate(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{name} --quick took over {timeout_s:.0f} s; stderr:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    result: dict[str, Any] = json.loads(out)
    return result
