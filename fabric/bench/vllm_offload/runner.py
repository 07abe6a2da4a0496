"""One arm of ``bench vllm-offload``: a vLLM server, a warm-up, every turn, then its figures.

The server is ``vs_vllm``'s (``start_server``: vLLM's own OpenAI server in the vLLM
environment, pinned to one core, supervised by ``fabric.supervise``) with G1 cut to
``g1_blocks`` (``--num-gpu-blocks-override``). The client is ``vs_vllm``'s ``ask`` (a streamed
completion through ``fabric.frontend.client``: greedy, ``ignore_eos``, ``return_token_ids``).

What an arm yields (``OffloadRun``): per turn its TTFT, answer, prompt length and reusable
prefix; the wall time of all measured turns; the growth of vLLM's ``prompt_tokens_by_source``
over them (read once it accounts for every prompt token sent, bounded); and, for the fabric's
connector, the worker's counters it logs at shutdown (one line ``fabric worker stats: {json}``
from ``FabricWorker.shutdown``), read from the server's log once it stopped. Those counters
cover the server's whole life, warm-up included.

Invariants: the server is stopped whatever happens; the arm's store directory is removed after
it stopped; nothing here runs two servers at once.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric.bench.vllm_offload.workload import ChatWorkload, Conversation, PrefixHistory
from fabric.bench.vs_vllm.arms import DECODE_CPU, Arm
from fabric.bench.vs_vllm.runner import ask, tokens_by_source
from fabric.bench.vs_vllm.servers import (
    ArmContext,
    Server,
    start_server,
    stop_servers,
    vllm_env,
    wait_servers,
)
from fabric.kvbm.tiers.kernels import ENV_BUILD_DIR
from fabric.supervise import child_env

SHUTDOWN_TIMEOUT_S = 15
"""vLLM's ``--shutdown-timeout``: with its default 0 the server kills its worker at once, before
the connector's ``shutdown`` logs its stats; within ``vs_vllm``'s 30 s stop bound."""
METRICS_SETTLE_S = 10.0
"""Bound on waiting for vLLM's counters to account for the last request."""
STATS_LINE = re.compile(r"fabric worker stats: (\{.*\})\s*$", flags=re.MULTILINE)
"""The line ``FabricWorker.shutdown`` logs (INFO, ``fabric.integrations.vllm.worker``)."""
KERNELS_DIR = Path.home() / ".cache" / "kv-fabric" / "bench-vllm-offload-kernels"
"""Where the vLLM environment's servers build and load the block copy kernels
(``FABRIC_KERNELS_BUILD_DIR``): a directory of that environment alone. In the shared default
one, a process of another environment (another torch build) rebuilds the library, and a
server's first copy then waits for that build, in a measured request or on the connector's
model-thread clock."""
KERNELS_TIMEOUT_S = 600.0
"""Bound on building the block copy kernels in the vLLM environment (about 30 s)."""
COMPUTED_SOURCE = "local_compute"
"""The ``prompt_tokens_by_source`` label of prompt tokens vLLM computed; every other is a hit."""


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    print(f"bench vllm-offload: {message}", file=sys.stderr, flush=True)


def prepare_kernels(python: Path) -> bool:
    """Build (or just load) the fabric's block copy kernels in the vLLM environment.

    Done once before any server starts, so that no measured request, and no warm-up, pays for
    a build (a server's first copy then only loads the library).

    Returns:
        Whether the native kernels load there (else the connector copies with the fallback).
    """
    code = "import sys; from fabric.kvbm.tiers.kernels import build as n; "
    code += "sys.exit(0 if n() else 3)"
    try:
        proc = subprocess.run(
            [str(python), "-c", code],
            env=child_env(vllm_env(**{ENV_BUILD_DIR: str(KERNELS_DIR)})),
            capture_output=True,
            timeout=KERNELS_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


@dataclass(frozen=True, slots=True)
class TurnResult:
    """One request as the client saw it."""

    conversation: int
    turn: int
    prompt_tokens: int
    reusable_tokens: int
    ttft_ms: float
    token_ids: tuple[int, ...]


@dataclass(slots=True)
class OffloadRun:
    """What one arm produced (module docstring)."""

    turns: list[TurnResult] = field(default_factory=list)
    total_s: float = 0.0
    tokens_by_source: dict[str, float] = field(default_factory=dict)
    metrics_settled: bool = True
    connector_stats: dict[str, Any] | None = None


def run_arm(
    python: Path, arm: Arm, workload: ChatWorkload, run_dir: Path, g1_blocks: int
) -> OffloadRun:
    """Start the arm's server, warm it, send every turn; stop it and read its connector stats."""
    store_dir = Path(tempfile.mkdtemp(prefix=f"{arm.name}-store-", dir=run_dir))
    server_workload = workload.server_workload()
    placeholders = {"store_dir": str(store_dir), "etcd": ""}
    ctx = ArmContext(arm, python, server_workload, run_dir, placeholders)
    servers: list[Server] = []
    result = OffloadRun()
    try:
        extra_args = ["--num-gpu-blocks-override", str(g1_blocks)]
        extra_args += ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
        server = start_server(ctx, "server", arm.first, DECODE_CPU, extra_args)
        servers.append(server)
        wait_servers(servers)
        ask(server, workload.warmup, server_workload)
        _serve_turns(server, workload, result)
    finally:
        stop_servers(servers)
        shutil.rmtree(store_dir, ignore_errors=True)
    if servers:
        result.connector_stats = connector_stats(servers[0].child.log_path)
    return result


def _serve_turns(server: Server, workload: ChatWorkload, result: OffloadRun) -> None:
    server_workload = workload.server_workload()
    conversations = [Conversation(list(workload.system)) for _ in workload.users]
    history = PrefixHistory()
    before = tokens_by_source(server)
    num_sent = 0
    started = time.perf_counter()
    for c, t in workload.order():
        prompt = conversations[c].prompt(workload.users[c][t])
        reusable = history.reusable(prompt)
        reply = ask(server, prompt, server_workload)
        history.add(prompt, reply.token_ids)
        conversations[c].answered(prompt, reply.token_ids)
        num_sent += len(prompt)
        result.turns.append(TurnResult(c, t, len(prompt), reusable, reply.ttft_ms, reply.token_ids))
        log(
            f"{server.name} conversation {c} turn {t + 1}: {len(prompt)} tokens, "
            f"ttft {reply.ttft_ms:.0f} ms"
        )
    result.total_s = time.perf_counter() - started
    result.tokens_by_source, result.metrics_settled = _settled_growth(server, before, num_sent)


def _settled_growth(
    server: Server, before: dict[str, float], num_sent: int
) -> tuple[dict[str, float], bool]:
    """Growth of ``prompt_tokens_by_source`` since ``before``, once it counts ``num_sent``.

    Returns:
        The growth by source, and whether it reached ``num_sent`` within the bound.
    """
    deadline = time.monotonic() + METRICS_SETTLE_S
    while True:
        after = tokens_by_source(server)
        growth = {k: v - before.get(k, 0.0) for k, v in after.items()}
        if sum(growth.values()) >= num_sent:
            return growth, True
        if time.monotonic() > deadline:
            log(
                f"{server.name}: vLLM's counters show {sum(growth.values()):.0f} of "
                f"{num_sent} prompt tokens sent"
            )
            return growth, False
        time.sleep(0.2)


def connector_stats(log_path: Path) -> dict[str, Any] | None:
    """The fabric worker's counters from the last stats line of a server log, or ``None``."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    matches = STATS_LINE.findall(text)
    if not matches:
        return None
    stats = json.loads(matches[-1])
    return stats if isinstance(stats, dict) else None
