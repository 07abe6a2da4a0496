"""Progress a producer's transfer agent while it holds blocks a consumer may read.

Why. With NIXL's progress thread off (``fabric.transfer.AgentConfig``), an agent's UCX worker
moves only when its owner polls it. Over shared memory a consumer's READ completes without the
producer (UCX copies from the consumer's side); over a network (UCX on TCP: between hosts, or
``UCX_TLS=tcp`` on one) the producer's worker must answer the consumer's requests and push the
bytes, about one socket buffer per poll (measured on loopback TCP: a 32 MiB READ took 0.09 s
with the producer polled every 2 ms, 0.8 s every 100 ms, and never finished unpolled). A
producer that holds blocks and never polls stalls every read until the consumer's deadline,
and the consumer recomputes.

What. ``HoldProgress.maybe_progress`` polls the agent (``notifications``: NIXL's progress call;
producers use no NIXL notifications, so what it returns is dropped) when the hold table has
entries and ``interval_s`` has passed since its last poll. Nothing held: a length check, no
poll. Holds: at most one poll per ``interval_s`` however often it is called.

Who calls it. The thread that owns the agent, never another: agents are not thread-safe
(``fabric.transfer.agent``; NIXL's own sync mode is NONE without its listen thread), so a
background poller would need a lock around every agent call of the owner. The owners call it
wherever their loop passes while holding: the reference engine's scheduler loop
(``fabric.worker.handoff.PrefillHandoff.progress``, every ``POLL_S`` while it holds), vLLM's
model thread at every connector call (``fabric.integrations.vllm.worker``: each step's
``start_load_kv`` / ``wait_for_save`` / ``get_finished`` and each attention layer's hooks). A
consumer's own waits (``wait``, ``poll``) progress the same agent too. NIXL's progress thread
would serve reads during long computations without the owner, but it spins a core and cost 3x
bandwidth on these 2-core machines (ENVIRONMENT.md), idle or not.
"""

from __future__ import annotations

import time
from typing import Any

from fabric.errors import InvalidInput
from fabric.pd.holds import HoldTable
from fabric.transfer.agent import TransferAgent

DEFAULT_INTERVAL_S = 0.001
"""At most one poll per millisecond: well under a socket buffer's transfer time, and a few
microseconds of the owner's thread per poll."""


class HoldProgress:
    """Polls ``agent`` while ``holds`` has entries (module docstring); owner thread only."""

    def __init__(
        self,
        agent: TransferAgent,
        holds: HoldTable[Any],
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        if interval_s < 0:
            raise InvalidInput(f"interval_s={interval_s} must be >= 0")
        self._agent = agent
        self._holds = holds
        self._interval_s = interval_s
        self._next = 0.0
        self.num_polls = 0
        """Polls made (only grows)."""

    def maybe_progress(self) -> bool:
        """Poll the agent if blocks are held and the interval has passed; True if it polled."""
        if not len(self._holds):
            return False
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._interval_s
        self._agent.notifications()
        self.num_polls += 1
        return True
