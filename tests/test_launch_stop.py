"""``fabric launch`` stops gracefully: its workers drain before anything else stops.

A real ``fabric launch --aggregated=1`` on the tiny model (its own etcd, a worker and the
frontend), driven the way a user does: a long streamed completion, then SIGTERM to the command.

* One SIGTERM: the worker finishes the request in flight (the same text a request that was not
  interrupted got, its full length), launch says what it waits for, and every process exits 0.
* Two SIGTERMs: the second stops everything at once, far inside the two-minute drain: the stream
  ends with an error, and every process still exits 0 (the worker's stop-at-once).

Both check that no process launch started outlives it (its children run in groups of their
own, so the pids are read from its ``started ... (pid N)`` lines).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from harness_probes import launched_pids, process_alive, wait_until

from fabric.config import ServeConfig
from fabric.errors import FabricError
from fabric.frontend.client import served_model
from fabric.launch.stopping import DRAIN_ENV, WORKER_DRAIN_S, StopSignals, drain_timeout

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 240.0
LONG_TOKENS = 600  # several hundred decode steps: the stream still runs at SIGTERM
DRAIN_S = 120.0  # longer than any wait below: only the drain's end (or a hurry) ends a stop
STOP_S = 60.0  # bound on the stop of a deployment with nothing left to drain
PROMPT = list(range(2, 42))


@dataclass
class Launch:
    """A running ``fabric launch`` and its output so far."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    url: str = ""

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def pids(self) -> list[int]:
        return launched_pids(self.output)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=STOP_S
        )


@contextmanager
def launched(run_dir: Path, model: Path) -> Iterator[Launch]:
    """``fabric launch`` until it is ready; whatever is left of it is killed on exit."""
    cmd = [sys.executable, "-m", "fabric.cli", "launch", "--aggregated=1", f"--model={model}"]
    cmd += [f"--run-dir={run_dir}", f"--drain-timeout={DRAIN_S}", f"--startup-timeout={STARTUP_S}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    launch = Launch(proc)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            launch.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: "ready: " in launch.output or proc.poll() is not None, STARTUP_S)
        ready = re.search(r"ready: 1 workers, frontend (\S+) ", launch.output)
        assert ready is not None, launch.output
        launch.url = ready.group(1)
        yield launch
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in launch.pids():  # the deployment's processes, in groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        reader.join(timeout=5.0)


def test_the_second_signal_or_one_during_a_stop_hurries() -> None:
    asked_twice = StopSignals()
    asked_twice._on_signal(15, None)
    assert asked_twice.stopping() and not asked_twice.hurry()
    asked_twice.stop_begins()
    assert not asked_twice.hurry()  # the stop the first signal asked for: graceful
    asked_twice._on_signal(2, None)
    assert asked_twice.hurry()

    failed = StopSignals()  # a child failed: the stop began with no signal
    failed.stop_begins()
    assert not failed.hurry()
    failed._on_signal(2, None)
    assert failed.hurry()  # the first Ctrl-C during that stop

    impatient = StopSignals()  # two signals before the stop began
    impatient._on_signal(2, None)
    impatient._on_signal(2, None)
    impatient.stop_begins()
    assert impatient.hurry()


def test_the_drain_bound_is_the_workers_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DRAIN_ENV, raising=False)
    assert drain_timeout(None) == WORKER_DRAIN_S == ServeConfig().drain_timeout_s
    monkeypatch.setenv(DRAIN_ENV, "7.5")
    assert drain_timeout(None) == 7.5 == ServeConfig().drain_timeout_s
    assert drain_timeout(0.0) == 0.0  # the flag first
    monkeypatch.setenv(DRAIN_ENV, "soon")
    with pytest.raises(FabricError, match=DRAIN_ENV):
        drain_timeout(None)


@pytest.mark.etcd
@pytest.mark.nixl
def test_a_request_in_flight_finishes_when_launch_is_stopped(
    tmp_path: Path, tiny_dir: Path
) -> None:
    with launched(tmp_path / "run", tiny_dir) as launch:
        client = launch.client()
        model = served_model(launch.url)
        want = client.completions.create(model=model, prompt=PROMPT, max_tokens=LONG_TOKENS)
        assert want.usage is not None and want.usage.completion_tokens > LONG_TOKENS // 2
        stream = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=LONG_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        num_tokens = -1
        with stream:
            chunks = iter(stream)
            pieces.extend(choice.text for choice in next(chunks).choices)  # it runs now
            launch.proc.send_signal(signal.SIGTERM)
            for chunk in chunks:
                pieces.extend(choice.text for choice in chunk.choices)
                if chunk.usage is not None:
                    num_tokens = chunk.usage.completion_tokens
        code = launch.proc.wait(timeout=DRAIN_S + STOP_S)
        assert not [pid for pid in launch.pids() if process_alive(pid)], launch.output
    assert code == 0, launch.output
    assert ("".join(pieces), num_tokens) == (want.choices[0].text, want.usage.completion_tokens)
    assert re.search(
        r"stopping: aggregated-0 finish their requests \(drain up to 120 s", launch.output
    )
    assert "Ctrl-C again stops everything at once" in launch.output
    assert "[launch] stopped every process" in launch.output
    worker_log = (tmp_path / "run" / "aggregated-0.log").read_text()
    assert (
        "SIGTERM received: draining" in worker_log and "worker aggregated-0 drained" in worker_log
    )


@pytest.mark.etcd
@pytest.mark.nixl
def test_a_second_sigterm_stops_everything_at_once(tmp_path: Path, tiny_dir: Path) -> None:
    with launched(tmp_path / "run", tiny_dir) as launch:
        stream = launch.client().completions.create(
            model=served_model(launch.url), prompt=PROMPT, max_tokens=LONG_TOKENS, stream=True
        )
        with stream, pytest.raises(openai.APIError):
            chunks = iter(stream)
            next(chunks)  # the request runs on the worker now
            launch.proc.send_signal(signal.SIGTERM)
            assert wait_until(lambda: "stopping: aggregated-0" in launch.output, STOP_S)
            launch.proc.send_signal(signal.SIGTERM)
            for _ in chunks:
                pass
        # Far inside the drain's two minutes: the hurry, not the drain, ended it.
        code = launch.proc.wait(timeout=STOP_S)
        assert not [pid for pid in launch.pids() if process_alive(pid)], launch.output
    assert code == 0, launch.output
    assert "stopping at once: aggregated-0" in launch.output
    worker_log = (tmp_path / "run" / "aggregated-0.log").read_text()
    assert "SIGINT received: stopping" in worker_log
