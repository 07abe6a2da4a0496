"""Tests for fabric.signal.server over real sockets on 127.0.0.1 ephemeral ports.

Every wait is bounded; every server, client and raw socket is closed by a fixture's teardown
(``conftest``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import msgpack
import pytest
import zmq
from signal_harness import COMPAT, WAIT_S, Recorder, raw_reply

from fabric.errors import ConfigError, InvalidInput, InvalidTransition, PeerUnavailable
from fabric.signal.client import SignalClient
from fabric.signal.errors import ErrorCode, IncompatiblePeer, MessageTooLarge, RemoteError
from fabric.signal.framing import PeerId, peer_id
from fabric.signal.messages import (
    Abort,
    BlocksReady,
    ErrorReply,
    Heartbeat,
    Message,
    PrefillRequest,
    TokenChunk,
    TransferDone,
    encode,
)
from fabric.signal.server import SignalServer

# Request / reply
# ---------------------------------------------------------------------------------------------


def test_request_reply(client: SignalClient, server: SignalServer, recorder: Recorder) -> None:
    assert client.request(TransferDone("r1", 3)) == TransferDone("r1", 4)
    assert recorder.received.get(timeout=WAIT_S) == (TransferDone("r1", 3), "decode-0")
    assert server.endpoint.startswith("tcp://127.0.0.1:")
    assert not server.endpoint.endswith(":0")


def test_concurrent_clients_each_get_their_own_replies(
    make_client: Callable[..., SignalClient], server: SignalServer
) -> None:
    clients = [make_client(server.endpoint, identity=f"decode-{i}") for i in range(4)]
    failures: list[str] = []

    def run(client: SignalClient) -> None:  # each client is used by its own thread only
        for n in range(50):
            request_id = f"{client.identity}-{n}"
            reply = client.request(TransferDone(request_id, n))
            if reply != TransferDone(request_id, n + 1):
                failures.append(f"{request_id}: {reply}")

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S * 2)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []


def test_ping_measures_rtt_and_heartbeats_skip_the_handler(
    client: SignalClient, server: SignalServer, recorder: Recorder
) -> None:
    assert server.last_seen("decode-0") is None
    before = time.monotonic()
    rtt = client.ping()
    assert 0 < rtt < WAIT_S
    seen = server.last_seen("decode-0")
    assert seen is not None
    assert seen >= before
    client.send(Heartbeat("decode-0", 7, 0))  # one-way heartbeat: seen, not answered
    assert client.receive(0.2) is None
    assert recorder.received.empty()


# Pushes and one-way messages
# ---------------------------------------------------------------------------------------------


def test_server_pushes_to_a_client_by_identity(
    make_client: Callable[..., SignalClient], server: SignalServer
) -> None:
    decode_0 = make_client(server.endpoint, identity="decode-0")
    decode_1 = make_client(server.endpoint, identity="decode-1")
    decode_0.ping()  # connected: the server knows both identities
    decode_1.ping()
    ready = BlocksReady("r1", 42, "prefill-agent", b"\x00opaque", 16)
    server.send("decode-1", ready)
    assert decode_1.receive(WAIT_S) == ready
    assert decode_0.receive(0.1) is None


def test_send_all_pushes_in_order_in_one_hand_over(
    make_client: Callable[..., SignalClient], server: SignalServer
) -> None:
    decode = make_client(server.endpoint, identity="decode-1")
    decode.ping()
    chunk = TokenChunk("r1", [42], False, "", {"prefill_ms": 1.5})
    ready = BlocksReady("r1", 42, "prefill-agent", b"\x00opaque", 16)
    server.send_all("decode-1", [chunk, ready])
    assert decode.receive(WAIT_S) == chunk
    assert decode.receive(WAIT_S) == ready
    with pytest.raises(PeerUnavailable, match="'nobody' is not connected"):
        server.send_all("nobody", [chunk, ready])


def test_push_to_an_unknown_peer_raises(server: SignalServer) -> None:
    with pytest.raises(PeerUnavailable, match="'nobody' is not connected"):
        server.send("nobody", Abort("r1", "gone"))


def test_handler_can_push_to_another_peer_while_replying(
    make_server: Callable[..., SignalServer], make_client: Callable[..., SignalClient]
) -> None:
    """The disaggregated flow: frontend -> prefill request, prefill -> decode "blocks ready"."""
    servers: list[SignalServer] = []

    def prefill(message: Message, peer: PeerId) -> Message | None:
        assert isinstance(message, PrefillRequest)
        ready = BlocksReady(message.request_id, 7, "prefill-agent", b"set", len(message.token_ids))
        servers[0].send(message.decode_worker, ready)  # from the handler's own thread
        return TransferDone(message.request_id, 0)  # an acknowledgement for the frontend

    servers.append(make_server(prefill))
    decode_worker = make_client(servers[0].endpoint, identity="decode-0")
    frontend = make_client(servers[0].endpoint, identity="frontend")
    decode_worker.ping()
    request = PrefillRequest("r9", [1, 2, 3], 8, "decode-0", {"temperature": 0.0}, 0)
    assert frontend.request(request) == TransferDone("r9", 0)
    assert decode_worker.receive(WAIT_S) == BlocksReady("r9", 7, "prefill-agent", b"set", 3)


def test_one_way_message_reaches_the_handler_and_gets_no_reply(
    client: SignalClient, recorder: Recorder
) -> None:
    client.send(Abort("r1", "client went away"))
    assert recorder.received.get(timeout=WAIT_S) == (Abort("r1", "client went away"), "decode-0")
    assert client.receive(0.2) is None


def test_answer_to_a_one_way_message_arrives_as_a_push(client: SignalClient) -> None:
    client.send(Abort("r1", "echo"))
    assert client.receive(WAIT_S) == Abort("r1", "echo")


def test_request_whose_handler_returns_none_fails_fast(client: SignalClient) -> None:
    start = time.monotonic()
    with pytest.raises(RemoteError, match=r"no reply to Abort \(the handler returned NoneType\)"):
        client.request(Abort("r1", "nothing to say"))
    assert time.monotonic() - start < 1.0


# Refusals: the server answers with an ErrorReply and keeps serving
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"garbage"], ErrorCode.MALFORMED),  # no correlation frame at all
        ([bytes(8), b"\xc1garbage"], ErrorCode.MALFORMED),
        ([bytes(8), msgpack.packb([4, 3, COMPAT, ["r", 1]])], ErrorCode.UNSUPPORTED_VERSION),
        ([bytes(8), msgpack.packb([3, 99, COMPAT, ["r", 1]])], ErrorCode.UNKNOWN_TYPE),
        ([bytes(8), encode(TransferDone("r", 1), COMPAT + 1)], ErrorCode.INCOMPATIBLE),
        ([bytes(8), b"\x00" * 2000], ErrorCode.TOO_LARGE),
    ],
)
def test_bad_messages_from_a_raw_dealer_get_an_error_reply(
    small_server: SignalServer,
    make_client: Callable[..., SignalClient],
    frames: list[bytes],
    code: ErrorCode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = zmq.Context.instance().socket(zmq.DEALER)
    try:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(small_server.endpoint)
        with caplog.at_level(logging.WARNING, logger="fabric.signal.server"):
            raw.send_multipart(frames)
            corr, reply = raw_reply(raw)
    finally:
        raw.close(linger=0)
    assert corr == 0
    assert isinstance(reply, ErrorReply)
    assert reply.code is code
    assert reply.request_id is None
    assert f"({code.name})" in caplog.text
    assert make_client(small_server.endpoint).request(TransferDone("r2", 1)) == TransferDone(
        "r2", 2
    )


def test_malformed_request_keeps_its_correlation_id(raw_dealer: zmq.Socket[bytes]) -> None:
    raw_dealer.send_multipart([(77).to_bytes(8, "big"), b"\x94\x01"])
    corr, reply = raw_reply(raw_dealer)
    assert corr == 77
    assert isinstance(reply, ErrorReply)
    assert reply.code is ErrorCode.MALFORMED
    assert "not well-formed msgpack" in reply.message


def test_incompatible_client_is_refused_with_both_hashes(
    make_client: Callable[..., SignalClient], server: SignalServer, client: SignalClient
) -> None:
    stranger = make_client(server.endpoint, identity="stranger", compat_hash=0xBAD)
    with pytest.raises(
        IncompatiblePeer, match=r"INCOMPATIBLE: .*0x0000000000000bad.*0x0000000000c0ffee"
    ):
        stranger.request(TransferDone("r1", 1))
    assert client.request(TransferDone("r2", 1)) == TransferDone("r2", 2)


def test_handler_exception_becomes_an_internal_error(
    client: SignalClient, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="fabric.signal.server"),
        pytest.raises(
            RemoteError, match="INTERNAL about request 'r1': RuntimeError: handler exploded"
        ),
    ):
        client.request(Abort("r1", "boom"))
    record = next(r for r in caplog.records if "handler failed" in r.getMessage())
    assert record.levelno == logging.WARNING
    assert record.exc_info is not None
    assert client.request(TransferDone("r2", 1)) == TransferDone("r2", 2)


def test_handler_returning_a_non_message_is_an_internal_error(
    make_server: Callable[..., SignalServer], make_client: Callable[..., SignalClient]
) -> None:
    server = make_server(lambda message, peer: {"not": "a message"})
    client = make_client(server.endpoint)
    with pytest.raises(RemoteError, match="the handler returned dict"):
        client.request(TransferDone("r1", 1))
    assert client.ping() > 0  # the server thread survived


def test_oversized_request_is_refused(
    small_server: SignalServer, make_client: Callable[..., SignalClient], recorder: Recorder
) -> None:
    client = make_client(small_server.endpoint)
    big = PrefillRequest("r1", list(range(1000)), 1, "decode-0", {}, 0)
    with pytest.raises(MessageTooLarge, match="exceeds the 1024-byte limit"):
        client.request(big)
    assert client.request(TransferDone("r2", 1)) == TransferDone("r2", 2)
    assert recorder.received.get(timeout=WAIT_S)[0] == TransferDone("r2", 1)


# Lifecycle
# ---------------------------------------------------------------------------------------------


def test_close_is_bounded_and_frees_the_port(
    make_server: Callable[..., SignalServer],
    make_client: Callable[..., SignalClient],
    recorder: Recorder,
) -> None:
    first = make_server(recorder)
    assert make_client(first.endpoint).request(TransferDone("r1", 1)) == TransferDone("r1", 2)
    start = time.monotonic()
    first.close()
    assert time.monotonic() - start < 1.0
    first.close()  # idempotent
    second = make_server(recorder, endpoint=first.endpoint)  # rebinding the same port succeeds
    assert second.endpoint == first.endpoint
    assert make_client(second.endpoint, identity="d1").request(TransferDone("r2", 1)) == (
        TransferDone("r2", 2)
    )


def test_use_after_close_is_refused(server: SignalServer, client: SignalClient) -> None:
    client.close()
    with pytest.raises(InvalidTransition):
        client.request(TransferDone("r1", 1))
    server.close()
    with pytest.raises(InvalidTransition):
        server.send("decode-0", Abort("r1", ""))


def test_push_to_an_unencodable_peer_is_invalid_input(server: SignalServer) -> None:
    with pytest.raises(InvalidInput, match="cannot be encoded as UTF-8"):
        server.send("decode-\ud800", Abort("r1", "gone"))


def test_push_reaches_a_foreign_peer_with_a_non_utf8_identity(server: SignalServer) -> None:
    raw = zmq.Context.instance().socket(zmq.DEALER)
    try:
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.IDENTITY, b"\xffraw")
        raw.connect(server.endpoint)
        raw.send_multipart([(1).to_bytes(8, "big"), encode(Heartbeat("raw", 1, 0), COMPAT)])
        assert raw_reply(raw)[0] == 1  # connected: the server knows the identity
        peer = peer_id(b"\xffraw")
        assert server.last_seen(peer) is not None
        server.send(peer, Abort("r1", "to a foreign peer"))
        assert raw_reply(raw) == (0, Abort("r1", "to a foreign peer"))
    finally:
        raw.close(linger=0)


# Liveness table bounds
# ---------------------------------------------------------------------------------------------


def _wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def test_last_seen_forgets_peers_silent_past_the_horizon(
    make_server: Callable[..., SignalServer],
    make_client: Callable[..., SignalClient],
    recorder: Recorder,
) -> None:
    server = make_server(recorder, last_seen_horizon_s=0.3)
    for i in range(3):
        make_client(server.endpoint, identity=f"decode-{i}").ping()
    assert server.num_tracked_peers == 3
    assert server.last_seen("decode-0") is not None
    assert _wait_until(lambda: server.num_tracked_peers == 0)  # pruned by the server thread
    assert server.last_seen("decode-0") is None


def test_a_peer_that_keeps_talking_stays_tracked(
    make_server: Callable[..., SignalServer],
    make_client: Callable[..., SignalClient],
    recorder: Recorder,
) -> None:
    server = make_server(recorder, last_seen_horizon_s=0.3)
    chatty = make_client(server.endpoint, identity="chatty")
    make_client(server.endpoint, identity="quiet").ping()
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        chatty.ping()
        time.sleep(0.05)
    assert server.last_seen("quiet") is None
    assert server.last_seen("chatty") is not None
    assert server.num_tracked_peers == 1


def test_last_seen_keeps_at_most_max_tracked_peers(
    make_server: Callable[..., SignalServer],
    make_client: Callable[..., SignalClient],
    recorder: Recorder,
) -> None:
    server = make_server(recorder, max_tracked_peers=2)
    for name in ("a", "b", "c"):
        make_client(server.endpoint, identity=name).ping()
    assert server.num_tracked_peers == 2
    assert server.last_seen("a") is None  # the least recently seen went first
    assert server.last_seen("b") is not None
    assert server.last_seen("c") is not None


@pytest.mark.parametrize(
    "bounds", [{"last_seen_horizon_s": 0.0}, {"max_tracked_peers": 0}], ids=["horizon", "cap"]
)
def test_last_seen_bounds_are_validated(
    make_server: Callable[..., SignalServer], recorder: Recorder, bounds: dict[str, float]
) -> None:
    with pytest.raises(ConfigError, match="last-seen"):
        make_server(recorder, **bounds)


def test_the_wake_socket_is_drained_after_a_push(
    make_client: Callable[..., SignalClient], server: SignalServer
) -> None:
    """An undrained wake socket keeps the server thread spinning on every later poll."""
    client = make_client(server.endpoint, identity="decode-0")
    client.ping()  # the server learns the client's identity
    server.send("decode-0", Abort("r", "x"))
    assert client.receive(WAIT_S) == Abort("r", "x")
    deadline = time.monotonic() + 5
    while True:
        try:
            server._wake_recv.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return  # drained by the server thread
        assert time.monotonic() < deadline, "the server thread never drained its wake socket"
        time.sleep(0.01)
