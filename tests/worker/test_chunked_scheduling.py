"""Chunked prefill in the decode/aggregated scheduler (``GenerationService`` with a per-step token
budget), driven step by step on this thread with a recording outbox: greedy outputs equal the
whole-prompt ones (single and concurrent, budgets on and off block boundaries, after prefix
hits), every step keeps to the budget and mixes decodes with chunks, running decodes get a token
at every step of a long prefill, and blocks register only once full and computed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from fabric.engine import DecodeRequest, Engine, PrefillChunk
from fabric.errors import ConfigError
from fabric.kvbm import (
    ImmutableBlocks,
    KvBlockManager,
    SequenceBlocks,
    build_kvbm,
    load_kvbm_config,
)
from fabric.models.config import ModelConfig
from fabric.signal.framing import PeerId
from fabric.signal.messages import GenerateRequest, Message, TokenChunk
from fabric.worker.generation import GenerationService
from fabric.worker.metrics import WorkerMetrics

BLOCK = 16
CLIENT = PeerId("client")
MAX_STEPS = 2000


@dataclass
class Recorder:
    """An ``Outbox`` keeping every message, in order."""

    messages: list[Message] = field(default_factory=list)

    def send(self, peer: str, message: Message) -> None:
        self.messages.append(message)

    def send_all(self, peer: str, messages: Sequence[Message]) -> None:
        for message in messages:
            self.send(peer, message)

    def chunks(self, request_id: str) -> list[TokenChunk]:
        return [
            m for m in self.messages if isinstance(m, TokenChunk) and m.request_id == request_id
        ]

    def tokens(self, request_id: str) -> list[int]:
        return [t for c in self.chunks(request_id) for t in c.token_ids]

    def finished(self, request_id: str) -> bool:
        chunks = self.chunks(request_id)
        return bool(chunks) and chunks[-1].finished


@dataclass
class Step:
    """What one engine step computed: its decodes and the size of each prompt chunk."""

    num_decodes: int
    chunk_sizes: list[int]


@dataclass
class Worker:
    engine: Engine
    kvbm: KvBlockManager
    service: GenerationService
    outbox: Recorder
    steps: list[Step]
    registered: list[ImmutableBlocks]
    budget: int | None

    def submit(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        request = GenerateRequest(request_id, prompt, max_tokens, "", {"ignore_eos": True}, 0)
        self.service.submit(request, CLIENT, time.perf_counter())

    def step(self) -> None:
        self.service.step(0.0)

    def drain(self) -> None:
        for _ in range(MAX_STEPS):
            if not self.service.has_local_work:
                return
            self.step()
        raise AssertionError(f"work left after {MAX_STEPS} steps")

    def num_in_use(self) -> int:
        return self.kvbm.pool().stats().num_in_use

    def num_cached(self, tokens: list[int]) -> int:
        """Tokens of ``tokens`` (block-aligned) a new request would find registered."""
        with SequenceBlocks.open(self.kvbm, [*tokens, 1]) as probe:
            return probe.num_cached_tokens


MakeWorker = Callable[..., Worker]


@pytest.fixture
def make_worker(tiny_dir: Path) -> Iterator[MakeWorker]:
    """``make_worker(budget)``: a generation service over its own engine and manager."""
    made: list[Worker] = []

    def make(budget: int | None, *, device_blocks: int = 96) -> Worker:
        config = load_kvbm_config(block_size=BLOCK, device_blocks=device_blocks)
        kvbm = build_kvbm(config, ModelConfig.from_dir(tiny_dir).kv_geometry())
        engine = Engine(tiny_dir, kvbm)
        registered: list[ImmutableBlocks] = []
        engine.on_registered = registered.append
        steps: list[Step] = []
        real_step = engine.step

        def recording_step(
            decodes: list[DecodeRequest], chunks: list[PrefillChunk]
        ) -> torch.Tensor:
            steps.append(Step(len(decodes), [len(c.tokens) for c in chunks]))
            return real_step(decodes, chunks)

        engine.step = recording_step  # type: ignore[method-assign]
        metrics = WorkerMetrics(kvbm.metrics.registry, role="aggregated", worker_id="w", model="m")
        outbox = Recorder()
        service = GenerationService(
            engine, outbox, metrics, worker_id="w", max_waiting=16, max_num_batched_tokens=budget
        )
        worker = Worker(engine, kvbm, service, outbox, steps, registered, budget)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.service.close()
        worker.kvbm.close()


def prompt_of(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, 1024, (length,), generator=generator).tolist()


PROMPTS = {"long": prompt_of(150, 1), "mid": prompt_of(95, 2), "edge": prompt_of(64, 3)}
MAX_TOKENS = {"long": 9, "mid": 14, "edge": 6}


def outputs(worker: Worker, names: list[str], *, together: bool) -> dict[str, list[int]]:
    """Greedy outputs of ``names``, submitted at once (``together``) or one after another."""
    for name in names:
        worker.submit(name, PROMPTS[name], MAX_TOKENS[name])
        if not together:
            worker.drain()
    worker.drain()
    assert all(worker.outbox.finished(n) for n in names)
    assert worker.num_in_use() == 0
    return {name: worker.outbox.tokens(name) for name in names}


def check_budget(worker: Worker) -> None:
    """No step computed more prompt tokens than the budget left after its decodes."""
    assert worker.budget is not None
    for step in worker.steps:
        assert sum(step.chunk_sizes) <= max(0, worker.budget - step.num_decodes), step


@pytest.mark.parametrize("budget", [16, 37, 100])
def test_chunked_outputs_equal_whole_prompt_outputs(make_worker: MakeWorker, budget: int) -> None:
    names = list(PROMPTS)
    whole = outputs(make_worker(None), names, together=False)
    single = make_worker(budget)
    assert outputs(single, names, together=False) == whole
    together = make_worker(budget)
    assert outputs(together, names, together=True) == whole
    for worker in (single, together):
        check_budget(worker)
        num_chunks = sum(len(s.chunk_sizes) for s in worker.steps)
        assert num_chunks >= sum(-(-len(p) // budget) for p in PROMPTS.values())
    assert any(s.num_decodes and s.chunk_sizes for s in together.steps)  # mixed steps ran


def test_whole_prompts_without_a_budget(make_worker: MakeWorker) -> None:
    worker = make_worker(None)
    outputs(worker, list(PROMPTS), together=True)
    assert sorted(s for step in worker.steps for s in step.chunk_sizes) == sorted(
        len(p) for p in PROMPTS.values()
    )
    assert all(len(step.chunk_sizes) <= 1 for step in worker.steps)  # one new prompt per step


def test_running_decodes_get_a_token_at_every_step_of_a_long_prefill(
    make_worker: MakeWorker,
) -> None:
    worker = make_worker(32)
    worker.submit("running", prompt_of(20, 4), 40)
    worker.step()  # its prompt and first token
    assert len(worker.outbox.tokens("running")) == 1
    worker.submit("long", prompt_of(300, 5), 2)
    num_steps = 0
    while not worker.outbox.tokens("long"):
        worker.step()
        num_steps += 1
        assert len(worker.outbox.tokens("running")) == 1 + num_steps
    assert num_steps == -(-300 // 31)  # 31 prompt tokens per step beside the one decode
    check_budget(worker)
    worker.drain()
    assert worker.num_in_use() == 0


def test_prefix_hit_then_chunks_ending_mid_block(make_worker: MakeWorker) -> None:
    first = prompt_of(64, 6)
    second = first[:48] + prompt_of(40, 7)
    fresh = make_worker(None)
    fresh.submit("second", second, 12)
    fresh.drain()
    worker = make_worker(20)
    worker.submit("first", first, 3)
    worker.drain()
    before = len(worker.steps)
    worker.submit("second", second, 12)
    worker.drain()
    assert worker.outbox.tokens("second") == fresh.outbox.tokens("second")
    stats = worker.outbox.chunks("second")[-1].stats
    assert (stats["cached_tokens"], stats["computed_tokens"]) == (48, 40)
    assert [s.chunk_sizes for s in worker.steps[before:]][:2] == [[20], [20]]  # 48->68->88
    assert worker.num_in_use() == 0


def test_blocks_register_only_once_full_and_computed(make_worker: MakeWorker) -> None:
    worker = make_worker(24)
    prompt = prompt_of(100, 8)
    worker.submit("long", prompt, 2)
    for step in range(1, 5):
        worker.step()
        computed = 24 * step
        num_full = computed // BLOCK
        assert sum(len(h) for h in worker.registered) == num_full
        assert worker.num_cached(prompt) == num_full * BLOCK
    worker.drain()
    assert worker.num_cached(prompt) == 96


def test_abort_mid_prefill_releases_blocks_and_keeps_the_computed_ones(
    make_worker: MakeWorker,
) -> None:
    worker = make_worker(32)
    prompt = prompt_of(100, 9)
    worker.submit("long", prompt, 5)
    worker.step()
    worker.step()  # 64 positions computed: 4 blocks registered
    worker.service.abort("long", "test")
    final = worker.outbox.chunks("long")[-1]
    assert final.finished and "aborted" in str(final.stats["error"])
    assert worker.num_in_use() == 0
    assert worker.num_cached(prompt) == 64
    assert not worker.service.has_local_work


def test_a_budget_below_one_token_is_refused(make_worker: MakeWorker) -> None:
    worker = make_worker(None)
    metrics = WorkerMetrics(CollectorRegistry(), role="aggregated", worker_id="x", model="m")
    with pytest.raises(ConfigError, match="at least 1 token"):
        GenerationService(
            worker.engine,
            worker.outbox,
            metrics,
            worker_id="x",
            max_waiting=1,
            max_num_batched_tokens=0,
        )
