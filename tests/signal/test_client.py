"""Tests for fabric.signal.client over real sockets on 127.0.0.1 ephemeral ports.

Every wait is bounded; every server, client and raw socket is closed by a fixture's teardown
(``conftest``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
import zmq
from signal_harness import COMPAT, LOCALHOST, WAIT_S, Recorder

from fabric.errors import ConfigError, InvalidInput, TransferTimeout
from fabric.signal.client import SignalClient
from fabric.signal.framing import PeerId
from fabric.signal.messages import BlocksReady, Message, TransferDone
from fabric.signal.server import SignalServer


def test_timeout_is_bounded_and_a_late_reply_is_not_taken_for_the_next(
    client: SignalClient, recorder: Recorder
) -> None:
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match=r"no reply from .* to TransferDone within 0.2 s"):
        client.request(TransferDone("slow", 1), timeout_s=0.2)
    assert 0.2 <= time.monotonic() - start < 0.7
    recorder.release.set()  # the late reply to "slow" is sent now, before the next request's
    assert client.request(TransferDone("next", 10)) == TransferDone("next", 11)


def test_request_to_no_server_times_out(make_client: Callable[..., SignalClient]) -> None:
    probe = zmq.Context.instance().socket(zmq.ROUTER)  # find a free port, then free it
    probe.bind(LOCALHOST)
    endpoint = probe.getsockopt_string(zmq.LAST_ENDPOINT)
    probe.close(linger=0)
    with pytest.raises(TransferTimeout):
        make_client(endpoint).request(TransferDone("r1", 1), timeout_s=0.1)


@pytest.mark.parametrize("identity", ["", "\0reserved", "x" * 256, "\u00e9" * 128])
def test_client_identity_is_validated(identity: str) -> None:
    with pytest.raises(InvalidInput, match="client identity"):
        SignalClient("tcp://127.0.0.1:1", identity=identity, compat_hash=COMPAT, timeout_s=1.0)


@pytest.mark.parametrize("identity", ["\ud800", "decode-\udfff", "\udc80"])
def test_identity_with_a_lone_surrogate_is_invalid_input(identity: str) -> None:
    with pytest.raises(InvalidInput, match="cannot be encoded as UTF-8"):
        SignalClient("tcp://127.0.0.1:1", identity=identity, compat_hash=COMPAT, timeout_s=1.0)


# Pushes buffered while a request waits
# ---------------------------------------------------------------------------------------------


def _flooding_server(
    make_server: Callable[..., SignalServer], num_pushes: int
) -> tuple[SignalServer, list[BlocksReady]]:
    """A server that answers ``TransferDone`` after pushing ``num_pushes`` messages to the peer.

    ZMQ keeps the order on one connection, so every push reaches the client before the reply,
    while it waits in ``request``.
    """
    pushes = [BlocksReady(f"p{i}", i, "agent", b"", 1) for i in range(num_pushes)]
    servers: list[SignalServer] = []

    def handler(message: Message, peer: PeerId) -> Message | None:
        for push in pushes:
            servers[0].send(peer, push)
        return message

    servers.append(make_server(handler))
    return servers[0], pushes


def test_pushes_during_a_request_are_kept_for_receive_in_order(
    make_server: Callable[..., SignalServer], make_client: Callable[..., SignalClient]
) -> None:
    server, pushes = _flooding_server(make_server, 3)
    client = make_client(server.endpoint, max_pending_pushes=3)
    assert client.request(TransferDone("r1", 1)) == TransferDone("r1", 1)
    assert client.num_pending_pushes == 3
    assert [client.receive(WAIT_S) for _ in pushes] == pushes
    assert client.num_dropped_pushes == 0
    assert client.receive(0.1) is None


def test_push_buffer_is_bounded_and_drops_the_oldest(
    make_server: Callable[..., SignalServer],
    make_client: Callable[..., SignalClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, pushes = _flooding_server(make_server, 5)
    client = make_client(server.endpoint, max_pending_pushes=2)
    with caplog.at_level(logging.WARNING, logger="fabric.signal.client"):
        assert client.request(TransferDone("r1", 1)) == TransferDone("r1", 1)
    assert client.num_pending_pushes == 2
    assert client.num_dropped_pushes == 3
    drops = [r for r in caplog.records if "push buffer full" in r.getMessage()]
    assert len(drops) == 3
    assert all(r.levelno == logging.WARNING for r in drops)
    assert [client.receive(WAIT_S), client.receive(WAIT_S)] == pushes[-2:]
    assert client.receive(0.1) is None


def test_push_buffer_size_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_pending_pushes"):
        SignalClient(
            "tcp://127.0.0.1:1",
            identity="decode-0",
            compat_hash=COMPAT,
            max_pending_pushes=0,
        )
