"""Fixtures for the signal channel tests: servers and clients on 127.0.0.1 ephemeral ports.

Every server, client and raw socket made here is closed in the fixture's teardown, and a
``Recorder`` handler is always released so no server thread is left waiting in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import zmq
from signal_harness import COMPAT, LOCALHOST, WAIT_S, Recorder

from fabric.signal.client import SignalClient
from fabric.signal.framing import PeerId
from fabric.signal.messages import Message
from fabric.signal.server import SignalServer


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    handler = Recorder()
    yield handler
    handler.release.set()  # never leave a server thread waiting in the handler


@pytest.fixture
def make_server() -> Iterator[Callable[..., SignalServer]]:
    servers: list[SignalServer] = []

    def make(
        handler: Callable[[Message, PeerId], Message | None], **kwargs: object
    ) -> SignalServer:
        kwargs.setdefault("compat_hash", COMPAT)
        server = SignalServer(kwargs.pop("endpoint", LOCALHOST), handler, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server: Callable[..., SignalServer], recorder: Recorder) -> SignalServer:
    return make_server(recorder)


@pytest.fixture
def small_server(make_server: Callable[..., SignalServer], recorder: Recorder) -> SignalServer:
    """A server that refuses messages larger than 1 KiB."""
    return make_server(recorder, max_bytes=1024)


@pytest.fixture
def make_client() -> Iterator[Callable[..., SignalClient]]:
    clients: list[SignalClient] = []

    def make(endpoint: str, identity: str = "decode-0", **kwargs: object) -> SignalClient:
        kwargs.setdefault("compat_hash", COMPAT)
        kwargs.setdefault("timeout_s", WAIT_S)
        client = SignalClient(endpoint, identity=identity, **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., SignalClient], server: SignalServer) -> SignalClient:
    return make_client(server.endpoint)


@pytest.fixture
def raw_dealer(server: SignalServer) -> Iterator[zmq.Socket[bytes]]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    yield sock
    sock.close(linger=0)
