"""The simulated fleet of ``router-scale``: each worker's KV event stream, encoded on the wire.

Owns ``build_plan``: for a fleet of ``workers`` and a list of stages (cached-block targets), every
worker's payloads (``encode_event_batch``, vLLM's map format, as a worker publishes them), what the
index must hold after each stage, and the prompts the router is timed on.

One simulated worker (``SimWorker``):

* holds the ``SYSTEM_PROMPTS`` system prompts (``SYSTEM_BLOCKS`` blocks each, the same real
  sequence hashes on every worker: the fleet-wide shared prefixes) on device and host, for good;
* serves requests of 16-511 new prompt blocks and two decode blocks: the prompt's blocks are
  stored on the device (one event), the decode blocks one event each, and all of them on the
  host (write-through offload, one event); the device keeps the newest quarter of the host's
  capacity, the host its capacity: what falls out is removed (one event per tier);
* at a stage's end holds exactly ``cached_blocks / workers`` distinct blocks (the system prompts
  plus its host), after a churn of ``churn`` times its host capacity in requests beyond the fill,
  so stored and removed events both flow.

Every request is one payload (one batch). Block hashes of requests are random 64-bit ints; the
prompts the router is timed on (``RoutedPrompt``) have real tokens and real sequence hashes
(``sequence_hashes(tokens, BLOCK_SIZE, seed=COMPAT)``), start with a system prompt, and are held,
at each stage's end, by three workers: the *holder* (a long prefix on device and host), a
runner-up (a shorter prefix, host only) and a disk-only holder of the whole prompt (the router
must ignore disk copies). The router's KV provider must be the holder.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from fabric.kvbm import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    SequenceHash,
    Tier,
    encode_event_batch,
    sequence_hashes,
)

BLOCK_SIZE = 16
"""Tokens per block: the fabric's default (``KvbmConfig.block_size``)."""
COMPAT = 0x5CA1E
"""The simulated workers' compat hash: their hash seed."""
SYSTEM_PROMPTS = 4
SYSTEM_BLOCKS = 64
PROMPT_BLOCKS = (16, 512)
"""New prompt blocks of one simulated request: uniform in [low, high)."""
DECODE_BLOCKS = 2
VOCAB = 32_000


@dataclass(frozen=True, slots=True)
class RoutedPrompt:
    """A prompt the router is timed on, and the longest cached prefix it must find."""

    token_ids: list[int]
    holder: str
    holder_blocks: int


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage: each worker's payloads, then what the index must hold.

    Attributes:
        payloads: per worker (in ``Plan.worker_ids`` order), its encoded batches.
        num_event_blocks: blocks named by the stage's events (stored and removed, every tier).
        expected_blocks: per worker, the distinct blocks it holds at the stage's end.
        prompts: ``prompt_tokens -> prompts`` timed after the stage.
    """

    cached_blocks: int
    payloads: list[list[bytes]]
    num_event_blocks: int
    expected_blocks: list[int]
    prompts: dict[int, list[RoutedPrompt]]


@dataclass(frozen=True, slots=True)
class Plan:
    worker_ids: list[str]
    stages: list[Stage]


def _stored(tier: Tier, hashes: Sequence[int]) -> BlockStored:
    return BlockStored(tier, _as_hashes(hashes), None, None, None, BLOCK_SIZE)


def _as_hashes(hashes: Sequence[int]) -> tuple[SequenceHash, ...]:
    return cast(tuple[SequenceHash, ...], tuple(hashes))


def _num_named(events: Sequence[KvEvent]) -> int:
    """Blocks named by ``events`` (stored or removed, every tier)."""
    return sum(len(e.sequence_hashes) for e in events if not isinstance(e, AllCleared))


class SimWorker:
    """One simulated worker's cache (see the module docstring)."""

    def __init__(self, rng: np.random.Generator, system: list[list[SequenceHash]]) -> None:
        self._rng = rng
        self._order: list[int] = []  # request blocks in the order stored (host FIFO)
        self._host_start = 0
        self._device_start = 0
        self._pinned: set[int] = {h for prompt in system for h in prompt}
        self.first_events: list[KvEvent] = [
            _stored(tier, prompt) for prompt in system for tier in (Tier.DEVICE, Tier.HOST)
        ]

    @property
    def num_blocks(self) -> int:
        """Distinct blocks held on any tier."""
        return len(self._pinned) + len(self._order) - self._host_start

    def request(self, host_capacity: int) -> tuple[list[KvEvent], int, int]:
        """One request's events, the blocks they name and the new blocks among them."""
        low, high = PROMPT_BLOCKS
        num_prompt = int(self._rng.integers(low, high))
        fresh = self._rng.integers(1, 2**64 - 1, num_prompt + DECODE_BLOCKS, dtype=np.uint64)
        new = fresh.tolist()
        events: list[KvEvent] = [_stored(Tier.DEVICE, new[:num_prompt])]
        events += [_stored(Tier.DEVICE, [h]) for h in new[num_prompt:]]
        events.append(_stored(Tier.HOST, new))
        self._order.extend(new)
        num_named = 2 * len(new)
        device_start = max(self._device_start, len(self._order) - host_capacity // 4)
        host_start = max(self._host_start, len(self._order) - host_capacity)
        if device_start > self._device_start:
            gone = self._order[self._device_start : device_start]
            events.append(BlockRemoved(Tier.DEVICE, _as_hashes(gone)))
            num_named += len(gone)
            self._device_start = device_start
        if host_start > self._host_start:
            gone = self._order[self._host_start : host_start]
            events.append(BlockRemoved(Tier.HOST, _as_hashes(gone)))
            num_named += len(gone)
            self._host_start = host_start
        if self._host_start > len(self._order) // 2:  # forget what no tier holds any more
            del self._order[: self._host_start]
            self._device_start -= self._host_start
            self._host_start = 0
        return events, num_named, len(new)

    def pin(self, events: list[KvEvent]) -> None:
        """Blocks stored outside the FIFO (a routed prompt's prefix), held until the end."""
        for event in events:
            if isinstance(event, BlockStored):
                self._pinned.update(event.sequence_hashes)


def build_plan(
    *,
    num_workers: int,
    stages: Sequence[int],
    prompt_tokens: Sequence[int],
    num_prompts: int,
    churn: float,
    seed: int,
) -> Plan:
    """Every payload and expectation of one fleet (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    worker_ids = [f"sim-{i:04d}" for i in range(num_workers)]
    system_tokens = [
        rng.integers(0, VOCAB, SYSTEM_BLOCKS * BLOCK_SIZE).tolist() for _ in range(SYSTEM_PROMPTS)
    ]
    system = [sequence_hashes(tokens, BLOCK_SIZE, seed=COMPAT) for tokens in system_tokens]
    sims = [SimWorker(np.random.default_rng([seed, i]), system) for i in range(num_workers)]
    ts = 0.0
    planned: list[Stage] = []
    for stage_index, cached_blocks in enumerate(stages):
        host_capacity = max(1, cached_blocks // num_workers - SYSTEM_PROMPTS * SYSTEM_BLOCKS)
        payloads: list[list[bytes]] = [[] for _ in sims]
        num_named = 0
        for w, sim in enumerate(sims):
            if stage_index == 0:
                payloads[w].append(encode_event_batch(sim.first_events, ts=ts))
                num_named += _num_named(sim.first_events)
            stored = 0
            while stored < host_capacity * (1 + churn):  # the host is full, then some churn
                events, named, new = sim.request(host_capacity)
                payloads[w].append(encode_event_batch(events, ts=ts))
                num_named += named
                stored += new
                ts += 0.001
        prompts: dict[int, list[RoutedPrompt]] = {}
        for num_tokens in prompt_tokens:
            prompts[num_tokens] = []
            for _ in range(num_prompts):
                routed, extra = _routed_prompt(rng, pick, worker_ids, system_tokens, num_tokens)
                prompts[num_tokens].append(routed)
                for worker_id, events in extra.items():
                    w = worker_ids.index(worker_id)
                    payloads[w].append(encode_event_batch(events, ts=ts))
                    num_named += _num_named(events)
                    sims[w].pin(events)
        planned.append(
            Stage(
                cached_blocks=cached_blocks,
                payloads=payloads,
                num_event_blocks=num_named,
                expected_blocks=[sim.num_blocks for sim in sims],
                prompts=prompts,
            )
        )
    return Plan(worker_ids, planned)


def _routed_prompt(
    rng: np.random.Generator,
    pick: random.Random,
    worker_ids: list[str],
    system_tokens: list[list[int]],
    num_tokens: int,
) -> tuple[RoutedPrompt, dict[str, list[KvEvent]]]:
    """A prompt and the events that make three workers hold it (see the module docstring)."""
    system = system_tokens[pick.randrange(len(system_tokens))]
    tail = rng.integers(0, VOCAB, max(0, num_tokens - len(system))).tolist()
    tokens = (system + tail)[:num_tokens]
    hashes = sequence_hashes(tokens, BLOCK_SIZE, seed=COMPAT)
    num_blocks = len(hashes)
    holder, runner_up, disk_only = pick.sample(worker_ids, 3)
    held = pick.randrange(max(SYSTEM_BLOCKS + 2, num_blocks // 2), num_blocks + 1)
    shorter = pick.randrange(SYSTEM_BLOCKS + 1, held)
    events: dict[str, list[KvEvent]] = {
        holder: [_stored(Tier.DEVICE, hashes[:held]), _stored(Tier.HOST, hashes[:held])],
        runner_up: [_stored(Tier.HOST, hashes[:shorter])],
        disk_only: [_stored(Tier.DISK, hashes)],
    }
    return RoutedPrompt(tokens, holder, held), events
