"""The README's quickstart command, run as a user runs it: ``launch/quickstart.sh``.

It sets up the environment (a no-op when it is up to date; ``FABRIC_VENV`` points it at the
environment running these tests), then ``fabric launch`` starts a private etcd, ``prefill-0``,
``decode-0`` and the frontend (1P1D on the tiny model), answers one prompt, prints the answer,
the timings and the route the KV took, and stops everything. The script runs in its own session
(process group), bounded by ``TIMEOUT_S``; whatever happens, the group is SIGTERMed, then
SIGKILLed, so no process of it survives the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_harness import REPO_ROOT, STOP_S, wait_until
from harness_probes import launched_pids, process_alive

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.nixl,
]

QUICKSTART = REPO_ROOT / "launch" / "quickstart.sh"
TIMEOUT_S = 90.0


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def run_in_own_group(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = ""
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"{cmd[0]} did not finish within {TIMEOUT_S} s:\n{out}")
    finally:
        # Every child is gone when launch returns; anything left is a leak, and is stopped.
        # launch runs each process it starts in a group of its own: those are checked by pid.
        groups = [proc.pid, *launched_pids(out)]
        leaked = not wait_until(
            lambda: group_gone(proc.pid) and not any(process_alive(p) for p in groups[1:]), 5.0
        )
        if leaked:
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
    assert groups[1:], f"no 'started NAME (pid N)' line in the output of {cmd[0]}:\n{out}"
    assert not leaked, f"processes of {cmd[0]} outlived it:\n{out}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


@pytest.mark.skipif(not QUICKSTART.is_file(), reason="launch/quickstart.sh does not exist")
@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs a virtual environment")
def test_quickstart_answers_through_prefill_and_decode(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = dict(os.environ, FABRIC_VENV=sys.prefix)
    prompt = "A prefill worker computes the prompt"
    cmd = [str(QUICKSTART), "--prompt", prompt, "--max-tokens", "8", "--run-dir", str(run_dir)]
    result = run_in_own_group(cmd, env)
    out = result.stdout
    assert result.returncode == 0, out
    assert f"prompt: {prompt!r}" in out
    answer = re.search(r"^answer: '(.*)'$", out, re.MULTILINE)
    assert answer is not None and answer.group(1).strip(), out
    route = re.search(r"^route: prefill prefill-0 -> decode decode-0; (.*)$", out, re.MULTILINE)
    assert route is not None, out
    computed = re.search(r"prompt tokens computed (\d+), cached 0", route.group(1))
    assert computed is not None and int(computed.group(1)) > 0, out
    assert re.search(r"KV transfer [\d.]+ ms \([1-9]\d* blocks\)", route.group(1)), out
    assert re.search(r"time to first token \d+ ms", out), out
    assert "[launch] stopped every process" in out
    for name in ("prefill-0", "decode-0", "frontend"):
        assert (run_dir / f"{name}.log").is_file()
