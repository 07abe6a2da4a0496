"""Signal errors as metrics: each provoked error moves ``fabric_signal_errors_total`` by one for
its side and kind (a malformed and an incompatible message, a timed-out request, a push to a
peer that is not connected, a handler that raised), and a good exchange moves nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import zmq
from signal_harness import raw_reply

from fabric.errors import PeerUnavailable, TransferTimeout
from fabric.signal import IncompatiblePeer, RemoteError
from fabric.signal.client import SignalClient
from fabric.signal.messages import Abort, ErrorReply, TransferDone
from fabric.signal.metrics import REGISTRY
from fabric.signal.server import SignalServer


class Errors:
    """``fabric_signal_errors_total`` since the test began, by (side, kind)."""

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> dict[tuple[str, str], float]:
        return {
            (s.labels["side"], s.labels["kind"]): s.value
            for metric in REGISTRY.collect()
            for s in metric.samples
            if s.name == "fabric_signal_errors_total"
        }

    def moved(self) -> dict[tuple[str, str], float]:
        now = self._now()
        return {k: v - self._start.get(k, 0.0) for k, v in now.items() if v != self._start.get(k)}


@pytest.fixture
def errors() -> Iterator[Errors]:
    yield Errors()


def test_a_good_exchange_counts_nothing(client: SignalClient, errors: Errors) -> None:
    assert client.request(TransferDone("r1", 1)) == TransferDone("r1", 2)
    assert errors.moved() == {}


def test_a_malformed_message_counts_on_the_server(
    raw_dealer: zmq.Socket[bytes], errors: Errors
) -> None:
    raw_dealer.send_multipart([(5).to_bytes(8, "big"), b"\x94\x01"])
    assert isinstance(raw_reply(raw_dealer)[1], ErrorReply)
    assert errors.moved() == {("server", "malformed"): 1}


def test_an_incompatible_peer_counts_on_both_sides(
    make_client: Callable[..., SignalClient], server: SignalServer, errors: Errors
) -> None:
    stranger = make_client(server.endpoint, identity="stranger", compat_hash=0xBAD)
    with pytest.raises(IncompatiblePeer):
        stranger.request(TransferDone("r1", 1))
    assert errors.moved() == {("server", "incompatible"): 1, ("client", "remote_error"): 1}


def test_a_request_without_a_reply_counts_a_client_timeout(
    make_client: Callable[..., SignalClient], server: SignalServer, errors: Errors
) -> None:
    client = make_client(server.endpoint, timeout_s=0.2)
    with pytest.raises(TransferTimeout):
        client.request(TransferDone("slow", 1))  # the handler holds it past the timeout
    assert errors.moved() == {("client", "timeout"): 1}


def test_a_push_to_a_peer_that_is_gone_counts_connection_lost(
    server: SignalServer, errors: Errors
) -> None:
    with pytest.raises(PeerUnavailable):
        server.send("nobody", Abort("r1", "gone"))
    assert errors.moved() == {("server", "connection_lost"): 1}


def test_a_handler_that_raised_counts_on_the_server(client: SignalClient, errors: Errors) -> None:
    with pytest.raises(RemoteError):
        client.request(Abort("r1", "boom"))
    assert errors.moved() == {("server", "handler_failed"): 1, ("client", "remote_error"): 1}
