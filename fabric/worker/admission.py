"""Admission of ``GenerateRequest``s: the waiting queue and who computes each prompt.

Owns the requests that wait for device blocks, in arrival order. ``submit`` refuses a request
the worker can never serve (invalid, larger than the pool, already late), a repeated request id
and one arriving at a full queue, each with the reason. ``admit_next`` takes the queue head once
the device pool has room for all of its blocks (prompt + ``max_tokens - 1``, reserved in its
``SequenceBlocks``) and decides where its prompt is computed:

* on another worker (``Phase.REMOTE_PREFILL``) when the request names a ``prefill_worker`` that
  is not this one and this worker has remote prefills, unless its own tiers (G4 included)
  already hold every full block of the prompt (at least one): computing the partial last block
  here beats a round trip;
* here (``Phase.PREFILLING``) otherwise, but only while the caller's local budget lasts (the
  generation service gives one while its step's token budget has room left, or one per step
  without a budget, so running requests keep decoding).

Invariants: requests leave the queue in arrival order, only through ``admit_next`` (with their
blocks reserved) or ``remove``; a head that found no room is not tried again until the pool has
more free blocks than it had then, or ``retry`` is called (a request ended, offload copies
freed blocks): no re-onboarding of its prefix every loop. Runs on the scheduler thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from fabric.engine import Engine
from fabric.kvbm import SequenceBlocks
from fabric.signal.framing import PeerId
from fabric.signal.messages import GenerateRequest
from fabric.worker.request import Phase, WorkerRequest, new_worker_request

logger = logging.getLogger(__name__)


class Admission:
    """The waiting queue of one worker (module docstring)."""

    def __init__(
        self, engine: Engine, *, worker_id: str, max_waiting: int, remote_prefills: bool
    ) -> None:
        self._engine = engine
        self._kvbm = engine.kvbm
        self._worker_id = worker_id
        self._max_waiting = max_waiting
        self._remote_prefills = remote_prefills
        self._waiting: deque[WorkerRequest] = deque()
        self._blocked = False  # the head found no room at the last admission
        self._free_when_blocked = 0  # the pool's free blocks then: retry once more are free

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        """A waiting request may be admissible now."""
        return bool(self._waiting) and not self._blocked

    def retry(self) -> None:
        """Blocks may have been freed: try the head again at the next admission."""
        self._blocked = False

    def submit(
        self, request: GenerateRequest, peer: PeerId, arrived_at: float, *, known: bool
    ) -> WorkerRequest | str:
        """Queue ``request`` (``known``: its id is already being served); the queued request,
        or why it is refused."""
        gen = new_worker_request(
            request,
            peer,
            arrived_at,
            self._engine.config,
            block_size=self._kvbm.block_size,
            num_blocks=self._kvbm.pool().num_blocks,
        )
        if known:
            return f"request id {request.request_id!r} is already being served"
        if isinstance(gen, str):
            return gen
        if len(self._waiting) >= self._max_waiting:
            return f"{len(self._waiting)} requests already wait for blocks; retry later"
        if not self._waiting:
            self._blocked = False  # a new head: not tried yet
        self._waiting.append(gen)
        return gen

    def remove(self, gen: WorkerRequest) -> None:
        """Take a waiting request out (it ended before admission)."""
        self._waiting.remove(gen)

    def admit_next(self, *, local_budget: int) -> WorkerRequest | None:
        """The queue head, its blocks reserved and its phase set (module docstring), or None:
        the queue is empty, the head does not fit yet, or it would be computed here and
        ``local_budget`` is spent."""
        pool = self._kvbm.pool()
        if not self._waiting:
            return None
        if self._blocked and pool.num_free <= self._free_when_blocked:
            return None  # nothing freed since the head found no room
        gen = self._waiting[0]
        source = gen.request.prefill_worker
        remote = self._remote_prefills and source not in ("", self._worker_id)
        if not remote and local_budget <= 0:
            return None
        began = time.perf_counter()
        seq = SequenceBlocks.open(self._kvbm, gen.prompt, on_registered=self._engine.on_registered)
        onboard_ms = (time.perf_counter() - began) * 1000
        full = len(gen.prompt) // self._kvbm.block_size
        if remote and 0 < full <= seq.num_matched_blocks:  # only a partial block is left
            remote = False
            if local_budget <= 0:
                seq.release()
                return None
            logger.debug(
                "request %s: every full block is here; not asking %s", gen.request_id, source
            )
        room = seq.reserve(len(gen.prompt) + gen.request.max_tokens - 1)  # fits: submit checked
        self._blocked = not room
        if not room:  # wait: running requests free blocks as they end
            seq.release()
            self._free_when_blocked = pool.num_free
            return None
        self._waiting.popleft()
        gen.phase = Phase.REMOTE_PREFILL if remote else Phase.PREFILLING
        gen.seq = seq
        gen.stats.queue_ms = (time.perf_counter() - gen.arrived_at) * 1000
        gen.stats.local_prefix_tokens = seq.num_cached_tokens
        gen.stats.onboard_ms = onboard_ms
        gen.trace_cached()
        return gen
