"""One arm of ``bench vllm``: start its servers, warm them, send every prompt, read the counters.

Requests go through ``fabric.frontend.client``, the client ``fabric launch`` and the other
benchmarks use, against vLLM's own ``/v1/completions``: greedy, ``ignore_eos``, streamed with
``return_token_ids``. A P/D arm is driven the way vLLM's example proxy drives it: the prompt
goes to prefill, not streamed, with ``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode":
true}``, then to decode, streamed, with the ``kv_transfer_params`` prefill returned. TTFT is
timed from sending the first request of a prompt to the first streamed token.

Invariants: every server an arm started is stopped when ``run_arm`` returns or raises; a failed
request raises ``ArmFailed`` naming the server (and quoting its log when it died); a hit arm's
hitting server starts only after the storing server stopped.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric.bench.vs_vllm.arms import DECODE_CPU, PREFILL_CPU, Arm, ArmFailed, ArmKind, Workload
from fabric.bench.vs_vllm.servers import (
    ArmContext,
    Server,
    log,
    start_server,
    stop_servers,
    wait_servers,
)
from fabric.errors import FabricError
from fabric.frontend.client import complete, stream_completion
from fabric.supervise import check_alive

REQUEST_TIMEOUT_S = 600.0
SAMPLING = {"temperature": 0.0, "ignore_eos": True}
"""Greedy, and always ``max_tokens`` tokens."""
PD_PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
"""The ``kv_transfer_params`` of vLLM's example proxy for the prefill request."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One prompt's answer as the client saw it; times in milliseconds."""

    ttft_ms: float
    token_ids: tuple[int, ...]
    prefill_ms: float | None = None
    decode_ttft_ms: float | None = None


@dataclass(slots=True)
class ArmRun:
    """What one arm produced."""

    replies: list[Reply] = field(default_factory=list)
    first_replies: list[Reply] = field(default_factory=list)
    """Hit arms: the storing server's answers (misses)."""
    tokens_by_source: dict[str, float] = field(default_factory=dict)


def run_arm(python: Path, arm: Arm, workload: Workload, run_dir: Path, etcd: str) -> ArmRun:
    """Start the arm's servers, warm them, send every prompt; stop every server it started."""
    store_dir = Path(tempfile.mkdtemp(prefix=f"{arm.name}-store-", dir=run_dir))
    placeholders = {"store_dir": str(store_dir), "etcd": etcd}
    ctx = ArmContext(arm, python, workload, run_dir, placeholders)
    servers: list[Server] = []
    result = ArmRun()
    try:
        if arm.kind is ArmKind.AGGREGATED:
            server = start_server(ctx, "server", None, DECODE_CPU)
            servers.append(server)
            wait_servers(servers)
            result.replies, result.tokens_by_source = _serve_all(
                workload, server, lambda p: ask(server, p, workload)
            )
        elif arm.kind is ArmKind.PD:
            prefill = start_server(ctx, "prefill", arm.first, PREFILL_CPU)
            servers.append(prefill)
            decode = start_server(ctx, "decode", arm.second, DECODE_CPU)
            servers.append(decode)
            wait_servers(servers)
            result.replies, result.tokens_by_source = _serve_all(
                workload, decode, lambda p: _ask_pd(prefill, decode, p, workload)
            )
        else:
            first = start_server(ctx, "store", arm.first, DECODE_CPU)
            servers.append(first)
            wait_servers(servers)
            result.first_replies, _ = _serve_all(workload, first, lambda p: ask(first, p, workload))
            stop_servers(servers)
            servers.clear()
            second = start_server(ctx, "hit", arm.second, DECODE_CPU)
            servers.append(second)
            wait_servers(servers)
            result.replies, result.tokens_by_source = _serve_all(
                workload, second, lambda p: ask(second, p, workload)
            )
    finally:
        stop_servers(servers)
        shutil.rmtree(store_dir, ignore_errors=True)
    return result


def _serve_all(
    workload: Workload, answering: Server, send: Callable[[Sequence[int]], Reply]
) -> tuple[list[Reply], dict[str, float]]:
    """One warm-up (not kept), then every prompt in order.

    Returns:
        The replies, and the growth of ``answering``'s prompt-token counters over them.
    """
    send(workload.warmup)
    before = tokens_by_source(answering)
    replies = []
    for index, prompt in enumerate(workload.prompts):
        reply = send(prompt)
        log(f"{answering.name} #{index}: ttft {reply.ttft_ms:.0f} ms")
        replies.append(reply)
    after = tokens_by_source(answering)
    return replies, {k: v - before.get(k, 0.0) for k, v in after.items()}


@contextmanager
def _named_failures(server: Server) -> Iterator[None]:
    """Turn a failed request to ``server`` into ``ArmFailed`` naming it (and its log, if dead)."""
    try:
        yield
    except urllib.error.HTTPError as exc:
        raise ArmFailed(f"{server.name}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
    except (urllib.error.URLError, OSError) as exc:
        check_alive([server.child])
        raise ArmFailed(f"{server.name}: request failed: {exc}") from exc
    except FabricError as exc:
        raise ArmFailed(f"{server.name}: {exc}") from exc


def _stream(
    server: Server, prompt: Sequence[int], workload: Workload, **extra: Any
) -> tuple[float, tuple[int, ...]]:
    """One streamed completion: (the first token's ``perf_counter`` time, the token ids)."""
    extra = SAMPLING | {"return_token_ids": True} | extra
    with _named_failures(server):
        got = stream_completion(
            server.url,
            workload.preset,
            prompt,
            workload.max_tokens,
            REQUEST_TIMEOUT_S,
            extra=extra,
        )
    return got.arrivals[0], got.token_ids


def ask(server: Server, prompt: Sequence[int], workload: Workload) -> Reply:
    """One streamed completion from one server."""
    started = time.perf_counter()
    first, token_ids = _stream(server, prompt, workload)
    return Reply((first - started) * 1e3, token_ids)


def _ask_pd(prefill: Server, decode: Server, prompt: Sequence[int], workload: Workload) -> Reply:
    """The P/D proxy flow of vLLM's examples: prefill (1 token), then decode with its params."""
    started = time.perf_counter()
    with _named_failures(prefill):
        answer = complete(
            prefill.url,
            workload.preset,
            prompt,
            1,
            REQUEST_TIMEOUT_S,
            extra=SAMPLING | {"kv_transfer_params": PD_PREFILL_PARAMS},
        )
    prefilled = time.perf_counter()
    kv_params = answer.get("kv_transfer_params")
    if not kv_params:
        raise ArmFailed(f"{prefill.name} returned no kv_transfer_params: {str(answer)[:300]}")
    first, token_ids = _stream(decode, prompt, workload, kv_transfer_params=kv_params)
    ttft_s, prefill_s = first - started, prefilled - started
    return Reply(ttft_s * 1e3, token_ids, prefill_s * 1e3, (ttft_s - prefill_s) * 1e3)


def tokens_by_source(server: Server) -> dict[str, float]:
    """``vllm:prompt_tokens_by_source`` of ``server`` now, by source (summed over engines)."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for match in re.finditer(
        r'^vllm:prompt_tokens_by_source_total\{[^}]*source="([a-z_]+)"[^}]*\}\s+(\S+)$',
        text,
        flags=re.MULTILINE,
    ):
        totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(2))
    return totals
