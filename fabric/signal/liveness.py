"""When each peer was last seen: a recency table bounded in time and in size.

Owns ``LastSeenTable``, the map behind ``SignalServer.last_seen``. Any identity may connect to a
server (a restarted worker, a port scanner cycling identities), so the table forgets a peer not
seen for ``horizon_s`` and holds at most ``max_peers`` entries, dropping the least recently seen
first. Imports only ``fabric.errors`` and the stdlib.

Invariants:

* Entries are ordered by last-seen time, oldest first (``touch`` moves a peer to the end), so
  pruning pops from the front and costs O(1) per entry dropped, nothing when none is due.
* ``len(table) <= max_peers`` after every ``touch``; ``get`` never returns a time older than
  ``horizon_s``, whether or not ``prune`` has run since.
* One thread writes (``touch``, ``prune``); ``get`` and ``len`` may be called from any thread (each
  is a single operation on the underlying ``OrderedDict``).
"""

from __future__ import annotations

from collections import OrderedDict

from fabric.errors import ConfigError

DEFAULT_HORIZON_S = 600.0
DEFAULT_MAX_PEERS = 65_536


class LastSeenTable:
    """``peer -> time.monotonic()`` of its latest message, bounded (see module doc)."""

    def __init__(
        self, *, horizon_s: float = DEFAULT_HORIZON_S, max_peers: int = DEFAULT_MAX_PEERS
    ) -> None:
        """Args:
            horizon_s: a peer not seen for longer is forgotten (``get`` returns None).
            max_peers: the most peers remembered; the least recently seen go first.

        Raises:
            ConfigError: ``horizon_s`` is not positive or ``max_peers`` is below 1.
        """
        if not horizon_s > 0:
            raise ConfigError(f"last-seen horizon must be positive, got {horizon_s} s")
        if max_peers < 1:
            raise ConfigError(f"last-seen table must hold at least 1 peer, got {max_peers}")
        self._horizon_s = horizon_s
        self._max_peers = max_peers
        self._peer_to_seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peer_to_seen)

    def touch(self, peer: str, now: float) -> None:
        """Record that ``peer`` was seen at ``now``; evicts the oldest peers beyond the cap."""
        self._peer_to_seen[peer] = now
        self._peer_to_seen.move_to_end(peer)
        while len(self._peer_to_seen) > self._max_peers:
            self._peer_to_seen.popitem(last=False)

    def get(self, peer: str, now: float) -> float | None:
        """When ``peer`` was last seen, or None if never or longer than ``horizon_s`` ago."""
        seen = self._peer_to_seen.get(peer)
        if seen is None or now - seen > self._horizon_s:
            return None
        return seen

    def prune(self, now: float) -> int:
        """Forget every peer not seen for longer than ``horizon_s``.

        Returns:
            The number of peers forgotten.
        """
        num_pruned = 0
        while self._peer_to_seen:
            peer, seen = next(iter(self._peer_to_seen.items()))
            if now - seen <= self._horizon_s:
                break
            del self._peer_to_seen[peer]
            num_pruned += 1
        return num_pruned
