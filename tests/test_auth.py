"""CURVE on the fabric's ZeroMQ channels (``fabric.auth``): with ``FABRIC_CURVE_KEY_FILE`` set,
holders of the deployment key talk; a peer without it (plain ZeroMQ, or another key) gets no
answer from a signal server and no events from a publisher."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from fabric import auth
from fabric.errors import ConfigError, PeerUnavailable, TransferTimeout
from fabric.frontend.kv_index import KvPrefixIndex
from fabric.frontend.kv_subscriber import KvEventSubscriber
from fabric.kvbm.core.events import BlockStored
from fabric.kvbm.core.types import SequenceHash, Tier
from fabric.kvbm.stream.publisher import ZmqEventPublisher
from fabric.signal.client import SignalClient
from fabric.signal.framing import PeerId
from fabric.signal.messages import Message, TransferDone
from fabric.signal.server import SignalServer

COMPAT = 0xC0FFEE
LOCALHOST = "tcp://127.0.0.1:0"


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> auth.CurveKeys:
    path = auth.keygen(tmp_path / "keys")
    monkeypatch.setenv(auth.ENV_CURVE_KEY_FILE, str(path))
    loaded = auth.keys_from_env()
    assert loaded is not None
    return loaded


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A context of the test's own: its ZAP authenticator goes with it."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    auth.release_context(context)
    context.destroy(linger=0)  # closes what a failed test left open


def test_keygen_writes_a_private_key_file_and_bad_files_are_refused(tmp_path: Path) -> None:
    path = auth.keygen(tmp_path)
    assert path.stat().st_mode & 0o077 == 0
    keys = auth.CurveKeys.load(path)
    assert len(keys.public) == len(keys.secret) == 40 and "secret" not in repr(keys)
    with pytest.raises(ConfigError, match="holds no secret key"):
        auth.CurveKeys.load(path.with_name("fabric.key"))  # the public half only
    with pytest.raises(ConfigError, match="cannot read a CURVE key"):
        auth.CurveKeys.load(tmp_path / "missing")
    cli = subprocess.run(
        [sys.executable, "-m", "fabric.auth", "keygen", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert (
        cli.stdout.strip()
        == f"export {auth.ENV_CURVE_KEY_FILE}={tmp_path / 'cli'}/fabric.key_secret"
    )


def test_only_holders_of_the_key_reach_the_signal_handler(
    keys: auth.CurveKeys,
    ctx: zmq.Context[zmq.Socket[bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handled: list[Message] = []

    def handler(message: Message, peer: PeerId) -> Message | None:
        handled.append(message)
        return None

    server = SignalServer(LOCALHOST, handler, compat_hash=COMPAT, context=ctx)
    try:
        member = SignalClient(
            server.endpoint, identity="member", compat_hash=COMPAT, timeout_s=5.0, context=ctx
        )
        assert member.ping() > 0
        member.send(TransferDone("r1", 1))
        deadline = time.monotonic() + 5
        while not handled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [m.request_id for m in handled] == ["r1"]  # type: ignore[attr-defined]
        member.close()

        # Another key pair, then no keys at all: the handshake never completes.
        monkeypatch.setenv(auth.ENV_CURVE_KEY_FILE, str(auth.keygen(tmp_path / "other")))
        stranger = SignalClient(
            server.endpoint, identity="stranger", compat_hash=COMPAT, timeout_s=1.0, context=ctx
        )
        monkeypatch.delenv(auth.ENV_CURVE_KEY_FILE)
        plain = SignalClient(
            server.endpoint, identity="plain", compat_hash=COMPAT, timeout_s=1.0, context=ctx
        )
        for outsider in (stranger, plain):
            with pytest.raises((TransferTimeout, PeerUnavailable)):
                outsider.ping()
            with contextlib.suppress(PeerUnavailable):  # or queued for a handshake that fails
                outsider.send(TransferDone("forged", 1))
            outsider.close()
        time.sleep(0.5)
        assert [m.request_id for m in handled] == ["r1"]  # type: ignore[attr-defined]
        assert server.last_seen("stranger") is None and server.last_seen("plain") is None
    finally:
        server.close()


def _subscriber(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, keys: auth.CurveKeys | None
) -> zmq.Socket[bytes]:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    auth.secure_client(sub, keys)
    sub.connect(endpoint)
    return sub


def test_only_holders_of_the_key_receive_kv_events(
    keys: auth.CurveKeys, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """The frontend's subscriber (replay over the ROUTER, then the PUB stream) with the key; a
    plain SUB socket without it."""
    publisher = ZmqEventPublisher(LOCALHOST, replay_endpoint=LOCALHOST)
    event = BlockStored(
        Tier.HOST, (SequenceHash(1),), None, token_ids=None, block_size=4, block_hashes=None
    )
    publisher.publish([event])
    follower = KvEventSubscriber(
        "w", KvPrefixIndex(), endpoint=publisher.endpoint, replay_endpoint=publisher.replay_endpoint
    ).start()
    member = _subscriber(ctx, publisher.endpoint, keys)
    plain = _subscriber(ctx, publisher.endpoint, None)
    try:
        assert follower.wait_synced(10) and follower.num_batches == 1  # replayed through CURVE
        deadline = time.monotonic() + 10
        received = False
        while not received and time.monotonic() < deadline:  # PUB drops until SUB has joined
            publisher.publish([event])
            received = member.poll(100) != 0
        assert received
        assert plain.poll(500) == 0
    finally:
        follower.close()
        member.close()
        plain.close()
        publisher.close()
