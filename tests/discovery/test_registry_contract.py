"""The Registry contract, run over every implementation (InMemoryRegistry and EtcdRegistry).

Then the in-memory fake's own promises: synchronous delivery and a controllable clock.
"""

from __future__ import annotations

import threading

import pytest

from fabric.discovery.memory import InMemoryRegistry, ManualClock
from fabric.discovery.registry import Registry, WatchEvent, WatchEventKind
from fabric.errors import DiscoveryError

PUT, DELETE = WatchEventKind.PUT, WatchEventKind.DELETE
TTL_S = 1.0
EXPIRY_BOUND_S = 5.0  # TTL + etcd's 0.5 s expiry sweep + slack for a loaded 2-core host
EVENT_BOUND_S = 5.0


class Recorder:
    """A watch callback that records events and lets a test wait for them."""

    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self._cond = threading.Condition()

    def __call__(self, event: WatchEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout_s: float = EVENT_BOUND_S) -> list[WatchEvent]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.events) >= count, timeout_s)
            return list(self.events)

    def triples(self) -> list[tuple[WatchEventKind, str, bytes | None]]:
        with self._cond:
            return [(e.kind, e.key, e.value) for e in self.events]


@pytest.fixture
def prefix(namespace: str) -> str:
    return f"/{namespace}/contract/"


def test_put_get_overwrite(registry: Registry, prefix: str) -> None:
    assert registry.get(prefix + "a") is None
    registry.put(prefix + "a", b"1")
    assert registry.get(prefix + "a") == b"1"
    registry.put(prefix + "a", b"2")
    assert registry.get(prefix + "a") == b"2"


def test_get_prefix_returns_only_keys_under_the_prefix(registry: Registry, prefix: str) -> None:
    registry.put(prefix + "x/1", b"1")
    registry.put(prefix + "x/2", b"2")
    registry.put(prefix + "x2", b"outside")  # shares the characters but not the "x/" prefix
    assert registry.get_prefix(prefix + "x/") == {prefix + "x/1": b"1", prefix + "x/2": b"2"}
    assert registry.get_prefix(prefix + "nothing/") == {}


def test_delete_reports_whether_the_key_existed(registry: Registry, prefix: str) -> None:
    registry.put(prefix + "d", b"v")
    assert registry.delete(prefix + "d") is True
    assert registry.delete(prefix + "d") is False
    assert registry.get(prefix + "d") is None


def test_lease_expiry_removes_its_keys(registry: Registry, prefix: str, wait_until) -> None:
    lease = registry.grant_lease(TTL_S)
    assert lease.ttl_s >= TTL_S
    registry.put(prefix + "leased", b"v", lease=lease)
    registry.put(prefix + "plain", b"v")
    assert registry.get(prefix + "leased") == b"v"
    assert wait_until(lambda: registry.get(prefix + "leased") is None, EXPIRY_BOUND_S)
    assert registry.get(prefix + "plain") == b"v"
    assert registry.keepalive(lease) is False
    with pytest.raises(DiscoveryError, match="lease"):
        registry.put(prefix + "late", b"v", lease=lease)


def test_keepalive_keeps_keys_past_the_ttl(registry: Registry, prefix: str) -> None:
    lease = registry.grant_lease(TTL_S)
    registry.put(prefix + "kept", b"v", lease=lease)
    stop = threading.Event()
    for _ in range(6):  # 6 x 0.3 s: well past one TTL
        assert registry.keepalive(lease) is True
        stop.wait(0.3)
    assert registry.get(prefix + "kept") == b"v"
    registry.revoke(lease)


def test_revoke_removes_keys_at_once_and_is_idempotent(registry: Registry, prefix: str) -> None:
    lease = registry.grant_lease(30)
    registry.put(prefix + "r1", b"1", lease=lease)
    registry.put(prefix + "r2", b"2", lease=lease)
    registry.revoke(lease)
    assert registry.get_prefix(prefix) == {}
    registry.revoke(lease)
    assert registry.keepalive(lease) is False


def test_watch_sees_put_delete_revoke_and_expiry(registry: Registry, prefix: str) -> None:
    recorder = Recorder()
    watch = registry.watch_prefix(prefix, recorder)
    try:
        assert watch.connected
        registry.put(prefix + "a", b"1")
        registry.put(prefix + "a", b"2")
        registry.delete(prefix + "a")
        revoked = registry.grant_lease(30)
        registry.put(prefix + "r", b"r", lease=revoked)
        registry.revoke(revoked)
        expiring = registry.grant_lease(TTL_S)
        registry.put(prefix + "e", b"e", lease=expiring)
        recorder.wait_for(7, EXPIRY_BOUND_S)
        assert recorder.triples() == [
            (PUT, prefix + "a", b"1"),
            (PUT, prefix + "a", b"2"),
            (DELETE, prefix + "a", b"2"),  # a DELETE carries the last value seen
            (PUT, prefix + "r", b"r"),
            (DELETE, prefix + "r", b"r"),
            (PUT, prefix + "e", b"e"),
            (DELETE, prefix + "e", b"e"),
        ]
    finally:
        watch.cancel()


def test_watch_ignores_other_prefixes(registry: Registry, prefix: str) -> None:
    recorder = Recorder()
    watch = registry.watch_prefix(prefix + "mine/", recorder)
    try:
        registry.put(prefix + "other/x", b"no")
        registry.put(prefix + "mine/x", b"yes")
        assert [e.key for e in recorder.wait_for(1)] == [prefix + "mine/x"]
    finally:
        watch.cancel()


def test_include_existing_delivers_present_keys_first(registry: Registry, prefix: str) -> None:
    registry.put(prefix + "old1", b"1")
    registry.put(prefix + "old2", b"2")
    recorder = Recorder()
    watch = registry.watch_prefix(prefix, recorder, include_existing=True)
    try:
        registry.put(prefix + "new", b"3")
        recorder.wait_for(3)
        assert recorder.triples() == [
            (PUT, prefix + "old1", b"1"),
            (PUT, prefix + "old2", b"2"),
            (PUT, prefix + "new", b"3"),
        ]
    finally:
        watch.cancel()


def test_cancel_stops_delivery(registry: Registry, prefix: str) -> None:
    recorder, sentinel = Recorder(), Recorder()
    watch = registry.watch_prefix(prefix, recorder)
    second = registry.watch_prefix(prefix, sentinel)
    try:
        registry.put(prefix + "before", b"1")
        recorder.wait_for(1)
        watch.cancel()
        watch.cancel()  # idempotent
        registry.put(prefix + "after", b"2")
        sentinel.wait_for(2)  # once the other watch has seen "after", this one would have too
        assert [e.key for e in recorder.events] == [prefix + "before"]
    finally:
        second.cancel()


def test_a_failing_callback_does_not_stop_the_watch(registry: Registry, prefix: str) -> None:
    recorder = Recorder()

    def callback(event: WatchEvent) -> None:
        recorder(event)
        if event.key.endswith("boom"):
            raise RuntimeError("callback bug")

    watch = registry.watch_prefix(prefix, callback)
    try:
        registry.put(prefix + "boom", b"1")
        registry.put(prefix + "fine", b"2")
        assert [e.key for e in recorder.wait_for(2)] == [prefix + "boom", prefix + "fine"]
    finally:
        watch.cancel()


def test_close_cancels_watches_and_refuses_calls(registry: Registry, prefix: str) -> None:
    recorder = Recorder()
    watch = registry.watch_prefix(prefix, recorder)
    registry.close()
    assert not watch.connected
    for call in (
        lambda: registry.get(prefix + "k"),
        lambda: registry.put(prefix + "k", b"v"),
        lambda: registry.watch_prefix(prefix, recorder),
    ):
        with pytest.raises(DiscoveryError, match="closed"):
            call()
    registry.close()  # idempotent


# -- InMemoryRegistry specifics: synchronous delivery, controllable clock -----------------------


def test_memory_delivers_synchronously_and_allows_reentrant_callbacks() -> None:
    registry = InMemoryRegistry(clock=ManualClock())
    seen: list[str] = []

    def mirror(event: WatchEvent) -> None:
        seen.append(event.key)
        if event.key == "/src/k" and event.kind is PUT:
            registry.put("/dst/k", event.value or b"")

    registry.watch_prefix("/", mirror)
    registry.put("/src/k", b"v")
    assert seen == ["/src/k", "/dst/k"]  # delivered before put returned, in change order
    assert registry.get("/dst/k") == b"v"


def test_memory_leases_follow_the_manual_clock() -> None:
    clock = ManualClock()
    registry = InMemoryRegistry(clock=clock)
    recorder = Recorder()
    registry.watch_prefix("/", recorder)
    lease = registry.grant_lease(10)
    registry.put("/k", b"v", lease=lease)
    clock.advance(9.9)
    assert registry.keepalive(lease) is True  # deadline moves to 19.9
    clock.advance(9.9)
    registry.expire_due()
    assert registry.get("/k") == b"v"
    clock.advance(0.1)
    registry.expire_due()
    assert recorder.triples() == [(PUT, "/k", b"v"), (DELETE, "/k", b"v")]
    assert registry.keepalive(lease) is False


def test_memory_put_without_lease_detaches_the_key() -> None:
    clock = ManualClock()
    registry = InMemoryRegistry(clock=clock)
    lease = registry.grant_lease(1)
    registry.put("/k", b"leased", lease=lease)
    registry.put("/k", b"plain")
    clock.advance(2)
    assert registry.get("/k") == b"plain"


def test_memory_rejects_a_non_positive_ttl() -> None:
    with pytest.raises(DiscoveryError, match="TTL"):
        InMemoryRegistry().grant_lease(0)
