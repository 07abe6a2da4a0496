"""Worker runtimes in this process: the scheduling and failure paths, without etcd or NIXL.

Each worker is a real ``build_worker`` runtime (engine, manager, scheduler thread, signal
server, metrics) on the tiny model, registered in an ``InMemoryRegistry``, moving KV with
``LoopbackAgent``s; a ``Frontend`` speaks the protocol over real signal sockets. Covered here:
a full pool makes requests wait (and a full queue refuses), an aborted waiting request, a stalled
KV read falling back to recompute with every block released on both sides, the ``fail``
fallback, EOS, deadlines, chunked prefill configured, messages a role does not serve, and
shutdown mid-stream.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness_probes import wait_until
from serving_harness import Frontend, Result, metric, prompt_of, scrape

from fabric.config import load_config
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.registration import WorkerDirectory
from fabric.discovery.registry import Role
from fabric.signal.errors import UnknownMessageType
from fabric.signal.framing import wall_ms
from fabric.signal.messages import PrefillRequest
from fabric.transfer.loopback import LoopbackAgent, LoopbackRegistry
from fabric.worker.runtime import WorkerRuntime, build_worker

StartWorker = Callable[..., WorkerRuntime]


@pytest.fixture
def loopback() -> LoopbackRegistry:
    return LoopbackRegistry()


@pytest.fixture
def start_worker(
    tiny_dir: Path, registry: InMemoryRegistry, loopback: LoopbackRegistry
) -> Iterator[StartWorker]:
    """``start_worker(role, worker_id, model=..., **config)``: a runtime, closed at teardown."""
    runtimes: list[WorkerRuntime] = []

    def start(role: Role, worker_id: str, **overrides: Any) -> WorkerRuntime:
        config = load_config(
            **{
                "model": str(tiny_dir),
                "worker_id": worker_id,
                "namespace": "inprocess",
                "device_blocks": 64,
                "registration_ttl_s": 1.0,
                **overrides,
            }
        )
        runtime = build_worker(
            role,
            config,
            registry=registry,
            make_agent=lambda name: LoopbackAgent(name, loopback),
        )
        runtimes.append(runtime)
        return runtime

    yield start
    for runtime in reversed(runtimes):
        runtime.close()


@pytest.fixture
def frontend(registry: InMemoryRegistry) -> Iterator[Frontend]:
    directory = WorkerDirectory(registry, namespace="inprocess").start()
    front = Frontend(directory)
    yield front
    front.close()
    directory.close()


def in_use(runtime: WorkerRuntime) -> int:
    return runtime.kvbm.pool().stats().num_in_use


def assert_error(result: Result, needle: str) -> None:
    assert result.final.finish_reason == "error", result.final
    assert needle in str(result.stats["error"]), result.stats["error"]


def test_full_pool_makes_requests_wait_and_a_full_queue_refuses(
    start_worker: StartWorker, frontend: Frontend
) -> None:
    start_worker(Role.AGGREGATED, "reference")
    small = start_worker(Role.AGGREGATED, "small", device_blocks=6, max_waiting=2)
    prompts = [prompt_of(20, seed=s) for s in (1, 2, 3, 4)]
    reference = frontend.generate("reference", prompts[1], 20)

    blocker = frontend.send("small", prompts[0], 60)  # 79 positions: 5 of the 6 blocks
    frontend.wait_chunks("small", blocker, lambda chunks: len(chunks) >= 1)
    waiting = [frontend.send("small", p, 20) for p in prompts[1:]]  # 3 blocks each: they wait
    assert_error(frontend.result("small", waiting[2]), "already wait")
    frontend.abort("small", waiting[1])
    assert_error(frontend.result("small", waiting[1]), "aborted")

    assert frontend.result("small", blocker).final.finish_reason == "length"
    served = frontend.result("small", waiting[0])
    assert served.tokens == reference.tokens
    assert float(served.stats["queue_ms"]) > 0
    assert wait_until(lambda: in_use(small) == 0, 2.0)


def test_stalled_read_falls_back_to_recompute_and_releases_both_sides(
    start_worker: StartWorker, frontend: Frontend, loopback: LoopbackRegistry
) -> None:
    prefill = start_worker(Role.PREFILL, "prefill")
    decode = start_worker(Role.DECODE, "decode", transfer_timeout_s=0.3)
    start_worker(Role.AGGREGATED, "reference")
    prompt = prompt_of(45, seed=5)
    reference = frontend.generate("reference", prompt, 12)

    loopback.pause("prefill")  # the decode's read of prefill's blocks stays pending
    result = frontend.generate("decode", prompt, 12, prefill_worker="prefill")
    assert result.tokens == reference.tokens
    assert "reading its blocks failed" in str(result.stats["fallback"])
    assert result.stats["computed_tokens"] == 45  # recomputed here, nothing was kept
    loopback.resume("prefill")
    assert wait_until(lambda: in_use(prefill) == in_use(decode) == 0, 2.0)

    again = frontend.generate("decode", prompt_of(30, seed=6), 4, prefill_worker="prefill")
    assert again.stats["fallback"] == "" and again.stats["transferred_blocks"] == 2


def test_fail_fallback_answers_an_error(start_worker: StartWorker, frontend: Frontend) -> None:
    start_worker(Role.DECODE, "decode", prefill_fallback="fail")
    result = frontend.generate("decode", prompt_of(20, seed=7), 4, prefill_worker="nobody")
    assert_error(result, "prefill failed: producer 'nobody' is not registered")
    assert result.tokens == []


def test_eos_stops_and_deadlines_end_requests(
    start_worker: StartWorker, frontend: Frontend, tiny_dir: Path, tmp_path: Path
) -> None:
    start_worker(Role.AGGREGATED, "reference")
    prompt = prompt_of(30, seed=8)
    tokens = frontend.generate("reference", prompt, 8).tokens
    eos = tokens[3]
    model = tmp_path / "tiny-eos"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    start_worker(Role.AGGREGATED, "eos", model=str(model))

    stopped = frontend.result("eos", frontend.send("eos", prompt, 8, ignore_eos=False))
    assert stopped.final.finish_reason == "stop"
    assert stopped.tokens == tokens[: tokens.index(eos) + 1]  # EOS is streamed, then it ends
    ignored = frontend.result("eos", frontend.send("eos", prompt, 8, ignore_eos=True))
    assert ignored.tokens == tokens and ignored.final.finish_reason == "length"

    past = frontend.send("reference", prompt, 4, deadline_ms=1)  # 1 ms after the epoch
    assert_error(frontend.result("reference", past), "deadline passed")
    soon = frontend.send("reference", prompt, 500, deadline_ms=wall_ms() + 300)
    ended = frontend.result("reference", soon)
    assert_error(ended, "deadline exceeded")
    assert 0 < len(ended.tokens) < 500
    too_long = frontend.generate("reference", prompt, 64 * 16)
    assert_error(too_long, "needs 66 blocks of 16 tokens, the device pool holds 64")


def test_chunked_prefill_serves_what_whole_prefills_serve(
    start_worker: StartWorker, frontend: Frontend
) -> None:
    """The budget setting reaches the scheduler: concurrent prompts longer than 24 tokens are
    computed in chunks (the counter says so) and stream what whole-prompt prefills stream."""
    start_worker(Role.AGGREGATED, "whole", max_num_batched_tokens=0)
    chunked = start_worker(Role.AGGREGATED, "chunked", max_num_batched_tokens=24)
    prompts = [prompt_of(length, seed=length) for length in (130, 75, 41)]
    whole = [frontend.generate("whole", prompt, 10).tokens for prompt in prompts]
    request_ids = [frontend.send("chunked", prompt, 10) for prompt in prompts]
    assert [frontend.result("chunked", r).tokens for r in request_ids] == whole
    scrape_text = scrape(frontend.record(chunked.worker_id))
    assert metric(scrape_text, "fabric_worker_prefill_chunks_total") >= (130 + 75 + 41) / 24
    assert wait_until(lambda: in_use(chunked) == 0, 2.0)


def test_a_decode_worker_recomputes_a_failed_prefill_in_chunks(
    start_worker: StartWorker, frontend: Frontend
) -> None:
    start_worker(Role.AGGREGATED, "reference", max_num_batched_tokens=0)
    decode = start_worker(Role.DECODE, "decode", max_num_batched_tokens=16)
    prompt = prompt_of(70, seed=11)
    reference = frontend.generate("reference", prompt, 8)
    result = frontend.generate("decode", prompt, 8, prefill_worker="nobody")
    assert result.tokens == reference.tokens
    assert "not registered" in str(result.stats["fallback"])
    scrape_text = scrape(frontend.record(decode.worker_id))
    assert metric(scrape_text, "fabric_worker_prefill_chunks_total") >= 70 / 16
    assert wait_until(lambda: in_use(decode) == 0, 2.0)


def test_roles_refuse_what_they_do_not_serve(start_worker: StartWorker, frontend: Frontend) -> None:
    start_worker(Role.PREFILL, "prefill")
    start_worker(Role.DECODE, "decode")
    assert_error(frontend.generate("prefill", [5, 6, 7], 2), "does not serve GenerateRequest")
    request = PrefillRequest("p", [5, 6, 7], 1, frontend.identity, {}, 0)
    with pytest.raises(UnknownMessageType, match="does not serve PrefillRequest"):
        frontend.client("decode").request(request, timeout_s=5.0)


def test_shutdown_ends_requests_in_flight(start_worker: StartWorker, frontend: Frontend) -> None:
    worker = start_worker(Role.AGGREGATED, f"doomed-{uuid.uuid4().hex[:4]}")
    request_id = frontend.send(worker.worker_id, prompt_of(20, seed=9), 1000)
    frontend.wait_chunks(worker.worker_id, request_id, lambda chunks: len(chunks) >= 2)
    worker.close()
    assert_error(frontend.result(worker.worker_id, request_id), "shutting down")
    assert in_use(worker) == 0
