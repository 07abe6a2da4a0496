"""KvEventSubscriber against a scripted publisher: replay on join, gaps repaired or forgotten.

The test drives a raw PUB and a raw replay ROUTER itself, so it decides exactly which batches
the subscriber sees and what the replay answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import zmq
from frontend_fakes import BLOCK_SIZE, WAIT_S, wait_until

from fabric.frontend.kv_index import KvPrefixIndex
from fabric.frontend.kv_subscriber import KvEventSubscriber
from fabric.kvbm import BlockStored, SequenceHash, Tier, encode_event_batch

END = (-1).to_bytes(8, "big", signed=True)


def payload(*hashes: int) -> bytes:
    event = BlockStored(
        Tier.DEVICE, tuple(SequenceHash(h) for h in hashes), None, None, None, BLOCK_SIZE
    )
    return encode_event_batch([event], ts=0.0)


class ScriptedPublisher:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.router = self.ctx.socket(zmq.ROUTER)
        for sock in (self.pub, self.router):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)

    def publish(self, seq: int, data: bytes) -> None:
        self.pub.send_multipart((b"kv-events", seq.to_bytes(8, "big"), data))

    def publish_until(self, seq: int, data: bytes, done: Callable[[], bool]) -> bool:
        """Re-send batch ``seq`` until ``done()`` (a new subscription drops the first sends)."""

        def send_and_check() -> bool:
            self.publish(seq, data)
            return done()

        return wait_until(send_and_check)

    def answer_replay(self, batches: list[tuple[int, bytes]]) -> int:
        """Serve one replay request with ``batches``; returns the requested start seq."""
        assert self.router.poll(int(WAIT_S * 1000)), "no replay request"
        client, _, start = self.router.recv_multipart()
        for seq, data in batches:
            self.router.send_multipart((client, b"", seq.to_bytes(8, "big"), data))
        self.router.send_multipart((client, b"", END, b""))
        return int.from_bytes(start, "big")

    def close(self) -> None:
        self.pub.close(linger=0)
        self.router.close(linger=0)
        self.ctx.term()


@pytest.fixture
def scripted() -> Iterator[ScriptedPublisher]:
    publisher = ScriptedPublisher()
    yield publisher
    publisher.close()


@pytest.fixture
def index() -> KvPrefixIndex:
    return KvPrefixIndex()


@pytest.fixture
def subscriber(scripted: ScriptedPublisher, index: KvPrefixIndex) -> Iterator[KvEventSubscriber]:
    sub = KvEventSubscriber(
        "p1",
        index,
        endpoint=scripted.endpoint,
        replay_endpoint=scripted.replay_endpoint,
        replay_timeout_s=WAIT_S,
    ).start()
    yield sub
    sub.close()


def held(index: KvPrefixIndex, *hashes: int) -> bool:
    keys = [SequenceHash(h) for h in hashes]
    return all(index.match_lengths([key], ["p1"])["p1"] == 1 for key in keys)


def test_replay_on_join_then_gaps_are_replayed_or_forgotten(
    scripted: ScriptedPublisher, subscriber: KvEventSubscriber, index: KvPrefixIndex
) -> None:
    # Joining: the replay holds batch 0, published before the subscriber existed.
    assert scripted.answer_replay([(0, payload(10))]) == 0
    assert subscriber.wait_synced(WAIT_S)
    assert held(index, 10)
    # Live batch 1 (re-sent until the subscription is established; duplicates are skipped).
    assert scripted.publish_until(1, payload(11), lambda: held(index, 11))
    # Batch 3 arrives without 2: the subscriber replays from 2 and applies 2 and 3 in order.
    scripted.publish(3, payload(13))
    assert scripted.answer_replay([(2, payload(12)), (3, payload(13))]) == 2
    assert wait_until(lambda: held(index, 10, 11, 12, 13))
    # Batch 6 without 4 and 5, and the replay lost 4: the worker is forgotten, then 5 and 6 apply.
    scripted.publish(6, payload(16))
    assert scripted.answer_replay([(5, payload(15)), (6, payload(16))]) == 4
    assert wait_until(lambda: held(index, 15, 16))
    assert index.num_blocks("p1") == 2
    assert subscriber.num_batches == 6


def test_an_undecodable_batch_forgets_the_worker(
    scripted: ScriptedPublisher, subscriber: KvEventSubscriber, index: KvPrefixIndex
) -> None:
    scripted.answer_replay([(0, payload(10))])
    assert subscriber.wait_synced(WAIT_S)
    assert scripted.publish_until(1, b"\xc1 not msgpack", lambda: index.num_blocks("p1") == 0)
    scripted.publish(2, payload(12))
    assert wait_until(lambda: held(index, 12))
    assert not held(index, 10)


def hub_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kv-events"]


def test_one_thread_follows_every_subscriber(scripted: ScriptedPublisher) -> None:
    """Twenty subscribers (one PUB here) cost no thread each; each applies every batch."""
    index = KvPrefixIndex()
    subs = [
        KvEventSubscriber(f"w{i}", index, endpoint=scripted.endpoint, replay_endpoint=None).start()
        for i in range(20)
    ]
    try:
        assert all(sub.wait_synced(WAIT_S) for sub in subs)
        assert len(hub_threads()) == 1
        assert scripted.publish_until(
            0, payload(10), lambda: all(index.num_blocks(f"w{i}") == 1 for i in range(20))
        )
        scripted.publish(1, payload(11))
        assert wait_until(lambda: all(sub.num_batches == 2 for sub in subs))
    finally:
        for sub in subs:
            sub.close()
    assert len(hub_threads()) == 1


def test_a_failing_subscriber_is_closed_alone(
    scripted: ScriptedPublisher, subscriber: KvEventSubscriber, index: KvPrefixIndex
) -> None:
    scripted.answer_replay([(0, payload(10))])
    assert subscriber.wait_synced(WAIT_S)
    index.apply("broken", [BlockStored(Tier.DEVICE, (SequenceHash(1),), None, None, None, 4)])
    broken = KvEventSubscriber(
        "broken", index, endpoint="tcp://no-such-host-:x", replay_endpoint=None
    )
    broken.start()
    try:
        assert broken.wait_synced(WAIT_S)  # failed: its entries are gone, and it says so
        assert wait_until(lambda: index.num_blocks("broken") == 0)
        assert scripted.publish_until(1, payload(11), lambda: held(index, 11))
    finally:
        broken.close()
