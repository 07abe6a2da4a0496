"""``fabric launch --secure``: one switch turns authentication on for every channel.

The deployment (etcd over TLS with users, CURVE on ZeroMQ, an API key on the HTTP API) serves a
prompt through prefill and decode (so the signal channel and the KV event stream worked with
CURVE and the workers found each other in an authenticated etcd); while it runs, a client
without the API key gets 401 and a registry without etcd's material cannot reach etcd. The
launcher runs in its own process group and is stopped with SIGTERM, which it passes on to its
children (the group is SIGKILLed if it hangs); nothing of it survives the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from e2e_harness import REPO_ROOT, STOP_S, wait_until

from fabric.discovery.etcd import EtcdRegistry
from fabric.errors import ConfigError, DiscoveryError

pytestmark = [pytest.mark.etcd, pytest.mark.nixl]

READY_S = 120.0


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue[str | None], pattern: str, seen: list[str]) -> re.Match[str]:
    while True:
        line = lines.get(timeout=READY_S)
        if line is None:
            pytest.fail("fabric launch --secure ended early:\n" + "".join(seen))
        seen.append(line)
        if match := re.search(pattern, line):
            return match


def _get(url: str, key: str | None) -> int:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_secure_launch_serves_members_and_refuses_outsiders(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fabric.cli", "launch", "--secure", "--run-dir", str(run_dir)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen: list[str] = []
    lines = _lines(proc)
    try:
        etcd = _wait_for(lines, r"\[launch\] etcd: (https://\S+)", seen).group(1)
        url = _wait_for(lines, r"ready: 2 workers, frontend (http://\S+)", seen).group(1)
        secrets_dir = run_dir / "secrets"
        assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
        key = (secrets_dir / "api-key").read_text().strip()
        assert stat.S_IMODE((secrets_dir / "api-key").stat().st_mode) == 0o600

        # HTTP: the key is required on /v1/*, /health stays open.
        assert _get(f"{url}/v1/models", None) == 401
        assert _get(f"{url}/v1/models", "wrong") == 401
        assert _get(f"{url}/v1/models", key) == 200
        assert _get(f"{url}/health", None) == 200
        body = json.dumps({"model": "tiny", "prompt": "The fabric", "max_tokens": 4}).encode()
        request = urllib.request.Request(
            f"{url}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        fabric = answer["fabric"]
        assert answer["choices"][0]["text"]
        assert fabric["prefill_worker"] == "prefill-0" and fabric["decode_worker"] == "decode-0"
        assert fabric["transferred_blocks"] >= 1  # NIXL read after a CURVE handshake

        # etcd: without the CA (and the user) nothing can be read or written there.
        with pytest.raises((ConfigError, DiscoveryError)):
            EtcdRegistry(etcd, timeout_s=5).get_prefix("/")
        # No secret on any command line or in any log.
        for log in run_dir.glob("*.log"):
            assert key not in log.read_text(errors="replace"), log
    finally:
        # The launcher alone: it stops its children (a group-wide SIGTERM would reach them
        # directly as well, in the middle of the launcher's own stop).
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        wait_until(lambda: _group_gone(proc.pid), STOP_S)
    with contextlib.suppress(queue.Empty):
        while (line := lines.get(timeout=5)) is not None:
            seen.append(line)
    assert proc.returncode == 0, "".join(seen)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False
