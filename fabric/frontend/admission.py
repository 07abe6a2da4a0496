"""Admission control: the frontend's bounded queue of requests not yet sent to a worker.

Owns the requests between their arrival (body read and parsed) and their dispatch: while they
are tokenized, then while they wait for a serving worker with room. Room is the fleet's own
in-flight count, the one the router balances by: the router refuses a route
(``router.AllWorkersBusy``) while every serving worker it could use has its
``max_in_flight_per_worker`` requests, and this queue retries the oldest waiting request until
one has room or its time is up::

    arrive ──max_queued already queued──▶ 429 (queue_full), Retry-After
       │
       └──▶ QUEUED (tokenizing, then waiting for room, oldest first)
              ├──a worker has room──▶ dispatched (leaves the queue)
              ├──queue_timeout_s after arrival, still no room──▶ 429 (no_room), Retry-After
              └──refused otherwise (413, 400, 503) or the client left──▶ leaves the queue

A request a draining worker refused while every other worker was at its cap enters the queue
again (``Frontend._requeue``), as a new arrival: the same bound, order and timeout.

Invariants:

* At most ``max_queued`` requests are queued; each leaves the queue exactly once (``enter`` is a
  context manager), however it ends.
* Waiting requests are dispatched in arrival order: only the oldest tries (an ``asyncio.Lock``
  is FIFO); it retries every ``poll_s`` (a try is a route choice under the fleet's lock, and a
  full fleet is refused before any prefix is hashed).
* No request waits for room past ``queue_timeout_s`` after its arrival: every request is
  dispatched or refused within that time plus its own tokenizing, which the prompt limits bound.
* Event loop only (not thread-safe).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from fabric.frontend.errors import Refusal, too_busy
from fabric.frontend.router import AllWorkersBusy

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ticket:
    """One queued request: when it arrived and until when it may wait (``time.monotonic``)."""

    arrived_at: float
    deadline: float


class Admission:
    """The queue of one frontend (see the module docstring)."""

    def __init__(self, *, max_queued: int, queue_timeout_s: float, poll_s: float = 0.01) -> None:
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = max(1, math.ceil(queue_timeout_s))
        self._poll_s = poll_s
        self._num_queued = 0
        self._turn = asyncio.Lock()

    @property
    def num_queued(self) -> int:
        return self._num_queued

    @contextmanager
    def enter(self) -> Iterator[Ticket]:
        """Queue one request for the ``with`` block.

        Raises:
            ApiError: 429 when ``max_queued`` requests are queued already.
        """
        if self._num_queued >= self.max_queued:
            raise too_busy(
                f"{self._num_queued} requests already wait for a worker in this frontend "
                f"(--max-queued); retry after {self.retry_after_s} s",
                Refusal.QUEUE_FULL,
                self.retry_after_s,
            )
        now = time.monotonic()
        self._num_queued += 1
        try:
            yield Ticket(now, now + self.queue_timeout_s)
        finally:
            self._num_queued -= 1

    async def dispatch(self, ticket: Ticket, attempt: Callable[[], T]) -> T:
        """``attempt()``'s result once it stops raising ``AllWorkersBusy``, oldest ticket first.

        Raises:
            ApiError: 429 when the ticket's deadline passed first; whatever ``attempt`` raises
                besides ``AllWorkersBusy`` (503 no worker, 400 bad pin).
        """
        busy: AllWorkersBusy | None = None
        try:
            async with asyncio.timeout(max(0.0, ticket.deadline - time.monotonic())):
                async with self._turn:
                    while True:
                        try:
                            return attempt()
                        except AllWorkersBusy as exc:
                            busy = exc
                        await asyncio.sleep(self._poll_s)
        except TimeoutError:
            pass
        if busy is None:  # the deadline passed while older requests had their turn
            try:
                return attempt()
            except AllWorkersBusy as exc:
                busy = exc
        raise too_busy(
            f"{busy}; no worker had room within {self.queue_timeout_s:g} s "
            f"(--queue-timeout); retry after {self.retry_after_s} s",
            Refusal.NO_ROOM,
            self.retry_after_s,
        )
