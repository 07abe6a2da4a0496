"""Shared constants and helpers of the signal channel tests (fixtures are in ``conftest``).

Imported by bare name (pytest puts this directory on ``sys.path``); the name is unique across the
test tree so it never shadows another module.
"""

from __future__ import annotations

import queue
import threading

import zmq

from fabric.signal.framing import PeerId
from fabric.signal.messages import Abort, Message, TransferDone, decode

LOCALHOST = "tcp://127.0.0.1:0"
COMPAT = 0xC0FFEE
WAIT_S = 5.0


class Recorder:
    """A handler that records what it got and answers TransferDone with num_blocks + 1.

    ``Abort`` is one-way (no reply); ``reason == "boom"`` raises; ``reason == "echo"`` answers.
    A ``TransferDone`` for request ``"slow"`` waits for ``release`` first.
    """

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[Message, PeerId]] = queue.Queue()
        self.release = threading.Event()

    def __call__(self, message: Message, peer: PeerId) -> Message | None:
        self.received.put((message, peer))
        if isinstance(message, TransferDone):
            if message.request_id == "slow":
                self.release.wait(WAIT_S)
            return TransferDone(message.request_id, message.num_blocks + 1)
        if isinstance(message, Abort) and message.reason == "boom":
            raise RuntimeError("handler exploded")
        if isinstance(message, Abort) and message.reason == "echo":
            return message
        return None


def raw_reply(sock: zmq.Socket[bytes]) -> tuple[int, Message]:
    """The next ``(corr, message)`` a raw DEALER receives, within ``WAIT_S``."""
    assert sock.poll(int(WAIT_S * 1000)), "no reply within the bound"
    corr, payload = sock.recv_multipart()
    return int.from_bytes(corr, "big"), decode(payload, expected_compat=COMPAT, max_bytes=1 << 20)
