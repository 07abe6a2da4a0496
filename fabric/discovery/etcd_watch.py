"""EtcdWatch: one prefix watch of an ``EtcdRegistry`` that re-establishes itself.

Each watch owns a thread and a gRPC stream (pyetcd's generated stubs, opened by the registry,
which holds the channel and the auth token). It lists the prefix at revision R and watches from
R + 1, so nothing between list and watch is lost. When the stream breaks (etcd stopped,
connection reset, keepalive ping unanswered, revision compacted) the watch logs a WARNING,
marks itself not ``connected``, retries with backoff, re-lists the prefix and, once the new
stream is created, delivers the difference between what its callback has seen and the new
listing (PUT for new or changed keys, DELETE for vanished ones), logs INFO, and carries on from
the new revision. Re-listing on every reconnect also covers a wiped etcd whose revisions
restarted from 1. Routers therefore always converge to the true set of workers; ``connected``
tells them when their view may be stale.

A stream that broke because its member is unreachable asks the registry to fail over, so the
re-list and the new stream go to another member; a stream cancelled for its token drops the
token, so the next attempt authenticates again. Each lost watch is counted
(``fabric_etcd_watch_losses_total``).

Invariants: the callback sees each key's changes in order; no callback starts once ``cancel``
was called, and ``cancel`` waits (bounded by the registry's timeout) for one in progress; a
callback that raises is logged and the watch goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import grpc
from pyetcd.etcdrpc import kv_pb2
from pyetcd.exceptions import Etcd3Exception
from pyetcd.utils import prefix_range_end

import fabric.discovery.metrics as etcd_metrics
from fabric.discovery.etcd_auth import is_token_refusal
from fabric.discovery.etcd_errors import details, is_unreachable
from fabric.discovery.registry import (
    Backoff,
    WatchCallback,
    WatchEvent,
    WatchEventKind,
    diff_events,
)
from fabric.errors import DiscoveryError

logger = logging.getLogger(__name__)


class WatchSource(Protocol):
    """What a watch needs of its registry (``EtcdRegistry``)."""

    endpoints: str
    timeout_s: float

    def list_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]: ...

    def open_watch_stream(
        self, prefix: str, start_revision: int, requests: queue.SimpleQueue[Any]
    ) -> tuple[Any, str]: ...

    def drop_token(self, stale: str) -> None: ...

    def fail_over(self) -> None: ...

    def forget_watch(self, watch: EtcdWatch) -> None: ...


class EtcdWatch:
    """One prefix watch: a thread, its gRPC stream, and the view its callback has seen."""

    def __init__(
        self,
        registry: WatchSource,
        prefix: str,
        callback: WatchCallback,
        listing: dict[str, bytes],
        revision: int,
        *,
        include_existing: bool,
    ) -> None:
        self.prefix = prefix
        self._registry = registry
        self._callback = callback
        self._seen: dict[str, bytes] = {} if include_existing else dict(listing)
        self._first_listing: tuple[dict[str, bytes], int] | None = (listing, revision)
        self._cancelled = threading.Event()
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None  # the live gRPC streaming call (iterable, has cancel())
        self._backoff = Backoff()
        self._lost_at: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch:{prefix}", daemon=True)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout_s: float) -> None:
        self._thread.start()
        if not self._connected.wait(timeout_s):
            self.cancel()
            raise DiscoveryError(
                f"etcd watch on {self.prefix!r} at {self._registry.endpoints} was not created "
                f"within {timeout_s:g} s: check that etcd is running and reachable there"
            )

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()  # ends the stream; _stream's cleanup ends its request side
        self._registry.forget_watch(self)
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout=self._registry.timeout_s)
            if self._thread.is_alive():
                logger.warning("watch on %r: callback still running after cancel", self.prefix)

    def _run(self) -> None:
        while not self._cancelled.is_set():
            try:
                listing, revision = self._first_listing or self._registry.list_prefix(self.prefix)
                self._first_listing = None
                self._stream(listing, revision)
                reason = "the stream ended (revision compacted or watch canceled by etcd)"
            except (DiscoveryError, grpc.RpcError, Etcd3Exception) as exc:
                reason = details(exc) or type(exc).__name__
                if isinstance(exc, grpc.RpcError) and is_unreachable(exc):
                    self._registry.fail_over()  # the member is gone: re-list on another
            if self._cancelled.is_set():
                break
            self._connected.clear()
            if self._lost_at is None:
                self._lost_at = time.monotonic()
                etcd_metrics.WATCH_LOSSES.inc()
                logger.warning(
                    "etcd watch on %r lost (%s); re-establishing and re-listing",
                    self.prefix,
                    reason,
                )
            self._cancelled.wait(self._backoff.next_delay())
        self._connected.clear()

    def _stream(self, listing: dict[str, bytes], revision: int) -> None:
        """Run one stream from ``revision + 1`` until it ends (raises on a broken stream)."""
        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._lock:
            if self._cancelled.is_set():
                return
            self._call, token = self._registry.open_watch_stream(
                self.prefix, revision + 1, requests
            )
            call = self._call
        try:
            for response in call:
                if response.canceled and is_token_refusal(response.cancel_reason):
                    self._registry.drop_token(token)
                    raise DiscoveryError(
                        f"etcd refused the watch's token: {response.cancel_reason}"
                    )
                if response.compact_revision or response.canceled:
                    return
                if response.created:
                    self._on_created(listing)
                for raw in response.events:
                    self._deliver(self._event(raw))
        finally:
            requests.put(None)  # ends gRPC's request-consumer thread, which would block forever

    def _on_created(self, listing: dict[str, bytes]) -> None:
        """Bring the callback's view up to ``listing``, then report the watch as connected."""
        changes = diff_events(self._seen, listing)
        self._seen = dict(listing)
        for event in changes:
            self._deliver(event)
        self._backoff.reset()
        self._connected.set()
        if self._lost_at is not None:
            logger.info(
                "etcd watch on %r re-established after %.1f s; %d changes delivered from re-list",
                self.prefix,
                time.monotonic() - self._lost_at,
                len(changes),
            )
            self._lost_at = None

    def _event(self, raw: Any) -> WatchEvent:
        key = raw.kv.key.decode(errors="replace")
        if raw.type == kv_pb2.Event.PUT:
            self._seen[key] = raw.kv.value
            return WatchEvent(WatchEventKind.PUT, key, raw.kv.value)
        return WatchEvent(WatchEventKind.DELETE, key, self._seen.pop(key, None))

    def _deliver(self, event: WatchEvent) -> None:
        if self._cancelled.is_set():
            return
        try:
            self._callback(event)
        except Exception:
            logger.exception("watch callback for prefix %r failed on %s", self.prefix, event.key)


def key_range(prefix: str) -> tuple[bytes, bytes]:
    """``(key, range_end)`` covering every key that starts with ``prefix`` (all keys for "")."""
    key = prefix.encode()
    return (key, prefix_range_end(key)) if key else (b"\0", b"\0")


def request_stream(requests: queue.SimpleQueue[Any]) -> Iterator[Any]:
    """The request side of a watch stream: blocks until ``None`` ends it."""
    while (request := requests.get()) is not None:
        yield request
