"""``fabric launch --node-cache``: the node cache starts before the workers, registers in the
launch's etcd, every worker attaches to it (found by host), the prompt is answered, and the
whole deployment stops cleanly with the shared segment unlinked."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from node_harness import REPO

from fabric.discovery.registry import DEFAULT_NAMESPACE
from fabric.node.config import segment_name

pytestmark = [pytest.mark.etcd, pytest.mark.nixl]

LAUNCH_S = 300.0  # a bound: etcd, a node cache, a worker and a frontend on two busy cores


def test_launch_starts_a_node_cache_and_attaches_the_workers(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    node = f"launch-{uuid.uuid4().hex[:8]}"  # its own segment, whatever else runs here
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    env["FABRIC_NODE_NAME"] = node
    prompt = "The fabric moves blocks of keys and values between the workers of one host " * 3
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fabric.cli",
            "launch",
            "--aggregated=1",
            "--node-cache=0.05",
            f"--run-dir={run_dir}",
            "--prompt",
            prompt,
            "--max-tokens=4",
        ],
        check=False,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LAUNCH_S,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "[launch] node-cache ready" in output and "answer:" in output
    node_log = (run_dir / "node-cache.log").read_text()
    assert f'"node": "{node}"' in node_log and "node-cache-" + node in node_log
    assert "aggregated-0 attached" in node_log  # the worker found it through etcd
    worker_log = (run_dir / "aggregated-0.log").read_text()
    assert "node tier attached" in worker_log
    assert not Path("/dev/shm", segment_name(DEFAULT_NAMESPACE, node)).exists()
