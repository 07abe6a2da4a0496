"""``fabric launch --node-cache``: the node cache starts before the workers, registers in the
launch's etcd, every worker attaches to it (found by host), the prompt is answered, and the
whole deployment stops cleanly with the shared segment unlinked; its progress lines come in
order, each wait naming what it waits for and its bound."""

from __future__ import annotations

import os
import re
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
            "--startup-timeout=300",
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
    # Progress, not silence: each step in order, and each wait with what it waits for and its
    # bound (plain lines: stdout is a pipe here, not a terminal).
    steps = [
        "starting etcd",
        "etcd: ",
        "started node-cache (pid ",
        "waiting: node-cache has not printed its ready line (",
        "node-cache ready",
        "node cache: ",
        "started aggregated-0 (pid ",
        "started frontend (pid ",
        "waiting: ",
        "ready: 1 workers, frontend ",
        "stopped every process",
    ]
    launch_lines = [line[len("[launch] ") :] for line in done.stdout.splitlines()]
    at = 0
    for step in steps:
        found = next(
            (i for i in range(at, len(launch_lines)) if launch_lines[i].startswith(step)), None
        )
        assert found is not None, f"no {step!r} after line {at}:\n{done.stdout}"
        at = found + 1
    assert re.search(r"^\[launch\] waiting: .* \(\d+ s of 300 s\)$", done.stdout, re.M), output
    node_log = (run_dir / "node-cache.log").read_text()
    assert f'"node": "{node}"' in node_log and "node-cache-" + node in node_log
    assert "aggregated-0 attached" in node_log  # the worker found it through etcd
    worker_log = (run_dir / "aggregated-0.log").read_text()
    assert "node tier attached" in worker_log
    assert not Path("/dev/shm", segment_name(DEFAULT_NAMESPACE, node)).exists()
