"""``Outbox``: where a worker's scheduler pushes messages to its clients.

``SignalServer`` is the real one (``send(peer, message)`` pushes to the client whose identity is
``peer``, from any thread; ``send_all`` pushes several in order in one hand-over to its thread,
for messages the client needs together); tests pass a recording fake. A failed push raises a
``FabricError`` (``PeerUnavailable`` when the client is gone), which the scheduler treats as a
disconnect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fabric.signal.messages import Message


class Outbox(Protocol):
    def send(self, peer: str, message: Message) -> None: ...

    def send_all(self, peer: str, messages: Sequence[Message]) -> None: ...
