"""EtcdRegistry: the ``Registry`` protocol on an etcd v3 cluster.

Owns one gRPC connection (per endpoint) to etcd and the threads of its prefix watches.

Client library: ``etcd-sdk-python`` (import ``pyetcd``), which keeps the ``etcd3`` package's API.
``etcd3`` 0.12 no longer imports with current protobuf ("Descriptors cannot be created
directly"); ``aetcd`` is asyncio-only and cannot share a process with ``pyetcd`` (both register
etcd's ``kv.proto``, a duplicate-descriptor error). Unary calls go through ``pyetcd``'s client;
watches use its generated gRPC stubs directly (see below).

Invariants:

* Every unary call has a deadline of ``timeout_s`` per endpoint tried; a failure raises
  ``DiscoveryError`` naming the endpoints and what to do. The channel reconnects by itself with
  a short, capped backoff (``_GRPC_OPTIONS``), so a restarted etcd is usable again within about
  a second. ``pyetcd`` marks a failed endpoint unusable for ``time_retry`` seconds (300 by
  default): with one endpoint we set it to 0 (nothing to fail over to), with several to 1 s.
* Failover (several endpoints: the members of one cluster): a call that finds its endpoint
  unreachable (unavailable, or no answer by the deadline) is retried at once on the next
  endpoint pyetcd has not marked failed, up to once per endpoint, so one lost member costs a
  call at most ``timeout_s`` more and no error; a watch whose stream breaks that way marks the
  endpoint failed too, so its re-list and new stream go to another member.
* TTLs are whole seconds in etcd: ``grant_lease`` rounds up, and etcd raises a TTL below its
  minimum (``1.5 * election timeout``, rounded up) to that minimum; ``Lease.ttl_s`` is as granted.
* Watches re-establish themselves. Each watch owns a thread and a gRPC stream. It lists the
  prefix at revision R and watches from R + 1, so nothing between list and watch is lost. When
  the stream breaks (etcd stopped, connection reset, keepalive ping unanswered, revision
  compacted) the watch logs a WARNING, marks itself not ``connected``, retries with backoff,
  re-lists the prefix and, once the new stream is created, delivers the difference between what
  its callback has seen and the new listing (PUT for new or changed keys, DELETE for vanished
  ones), logs INFO, and carries on from the new revision. Re-listing on every reconnect also
  covers a wiped etcd whose revisions restarted from 1. Routers therefore always converge to the
  true set of workers; ``connected`` tells them when their view may be stale.
* Authentication (``etcd_auth``): ``auth`` or, by default, the ``FABRIC_ETCD_*`` variables.
  ``https://`` endpoints use one TLS channel for calls and watches. With a user, the first call
  authenticates; the token rides as call metadata on unary calls, keepalives and watch streams;
  a call refused for its token (or a watch cancelled for it) drops it, authenticates again and
  is retried once. Refused credentials and failed TLS handshakes are ``EtcdAuthError``s naming
  the variable to fix.
* Every failed call, retry and lost watch is counted (``fabric.discovery.metrics``).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2
from pyetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception
from pyetcd.utils import prefix_range_end

import fabric.discovery.metrics as etcd_metrics
from fabric.discovery.etcd_auth import (
    ENV_PASSWORD_FILE,
    ENV_USER,
    EtcdAuth,
    EtcdAuthError,
    authenticate,
    diagnose_tls,
    is_token_refusal,
)
from fabric.discovery.registry import (
    Backoff,
    Lease,
    LeaseId,
    WatchCallback,
    WatchEvent,
    WatchEventKind,
    diff_events,
)
from fabric.errors import ConfigError, DiscoveryError

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 2379
_GRPC_OPTIONS = [
    # Calls wait for a connection until their deadline instead of failing at once while the
    # channel is between reconnect attempts (e.g. the first second after etcd restarts).
    (
        "grpc.service_config",
        json.dumps({"methodConfig": [{"name": [{}], "waitForReady": True}]}),
    ),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Detect a silently dead peer on idle watch streams (etcd allows pings every 5 s or more).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]
_FAILOVER_RETRY_S = 1.0


def parse_endpoints(endpoints: str | list[str]) -> tuple[bool, list[tuple[str, int]]]:
    """``"http://h:p,h2:p2"`` or a list of such items -> ``(secure, [(host, port), ...])``.

    ``secure``: the endpoints are ``https://`` (all or none; no scheme means ``http://``).
    """
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    addresses, schemes = [], set()
    for item in (i.strip() for i in items):
        parts = urlsplit(item if "://" in item else f"http://{item}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"etcd endpoint {item!r} is not http://host:port or https://host:port"
            )
        schemes.add(parts.scheme)
        addresses.append((parts.hostname, parts.port or DEFAULT_PORT))
    if not addresses:
        raise ConfigError("no etcd endpoints given")
    if len(schemes) > 1:
        raise ConfigError(f"etcd endpoints {endpoints!r} mix http:// and https://: use one")
    return schemes == {"https"}, addresses


class EtcdRegistry:
    """A ``Registry`` on etcd v3 (see the module docstring for timeouts and watch recovery)."""

    def __init__(
        self,
        endpoints: str | list[str],
        *,
        timeout_s: float = 5.0,
        auth: EtcdAuth | None = None,
    ) -> None:
        """Args:
        auth: credentials and TLS files; None reads them from the environment
            (``EtcdAuth.from_env``, the ``FABRIC_ETCD_*`` variables).
        """
        secure, addresses = parse_endpoints(endpoints)
        self._auth = EtcdAuth.from_env() if auth is None else auth
        self._auth.check_scheme(
            secure, endpoints if isinstance(endpoints, str) else ",".join(endpoints)
        )
        scheme = "https" if secure else "http"
        self.endpoints = ",".join(f"{scheme}://{host}:{port}" for host, port in addresses)
        self.timeout_s = timeout_s
        self._addresses = addresses
        self._secure = secure
        credentials = self._auth.channel_credentials() if secure else None
        retry_s = 0.0 if len(addresses) == 1 else _FAILOVER_RETRY_S
        self._client = pyetcd.MultiEndpointEtcd3Client(
            endpoints=[
                pyetcd.Endpoint(
                    host,
                    port,
                    secure=secure,
                    creds=credentials,
                    time_retry=retry_s,
                    opts=_GRPC_OPTIONS,
                )
                for host, port in addresses
            ],
            timeout=timeout_s,
            failover=True,
        )
        self._lock = threading.Lock()
        self._watches: set[_EtcdWatch] = set()
        self._closed = False
        # The auth token (module docstring): None until the first call; "" when auth is off.
        self._token_lock = threading.Lock()
        self._token: str | None = None if self._auth.user else ""

    def __repr__(self) -> str:
        return f"EtcdRegistry({self.endpoints!r}, user={self._auth.user!r})"

    # -- key-value ------------------------------------------------------------------------------

    def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> None:
        self._call("put", self._client.put, key, value, lease=None if lease is None else lease.id)

    def get(self, key: str) -> bytes | None:
        value: bytes | None
        value, _ = self._call("get", self._client.get, key)
        return value

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return self.list_prefix(prefix)[0]

    def list_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """The keys under ``prefix`` and the etcd revision they were read at."""
        key, range_end = _range(prefix)
        response = self._call(
            "get prefix", self._client.get_range_response, key, range_end, sort_order="ascend"
        )
        kvs = {kv.key.decode(errors="replace"): kv.value for kv in response.kvs}
        return kvs, response.header.revision

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", self._client.delete, key))

    # -- leases ---------------------------------------------------------------------------------

    def grant_lease(self, ttl_s: float) -> Lease:
        granted = self._call("grant lease", self._client.lease, max(1, math.ceil(ttl_s)))
        return Lease(LeaseId(granted.id), float(granted.ttl))

    def keepalive(self, lease: Lease) -> bool:
        responses = self._call(
            "lease keepalive", lambda: list(self._client.refresh_lease(lease.id))
        )
        return bool(responses) and responses[0].TTL > 0

    def revoke(self, lease: Lease) -> None:
        try:
            self._call("revoke lease", self._client.revoke_lease, lease.id)
        except DiscoveryError as exc:
            if _status(exc.__cause__) is not grpc.StatusCode.NOT_FOUND:
                raise

    # -- watches --------------------------------------------------------------------------------

    def watch_prefix(
        self, prefix: str, callback: WatchCallback, *, include_existing: bool = False
    ) -> _EtcdWatch:
        """Watch ``prefix``; returns once the stream is created (DiscoveryError otherwise)."""
        listing, revision = self.list_prefix(prefix)
        watch = _EtcdWatch(
            self, prefix, callback, listing, revision, include_existing=include_existing
        )
        with self._lock:
            self._watches.add(watch)
        watch.start(self.timeout_s)
        return watch

    def close(self) -> None:
        with self._lock:
            self._closed = True
            watches, self._watches = self._watches, set()
        for watch in watches:
            watch.cancel()
        self._client.close()

    # -- internals ------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise DiscoveryError(f"etcd {what}: this EtcdRegistry ({self.endpoints}) is closed")
        for _ in range(len(self._addresses) - 1):  # failover: the module docstring
            try:
                return self._call_endpoint(what, fn, *args, **kwargs)
            except DiscoveryError as exc:
                cause = exc.__cause__
                if cause is None or not _is_unreachable(cause):
                    raise
                logger.warning("etcd %s: %s; trying the next endpoint", what, _details(cause))
                etcd_metrics.RETRIES.labels("failover").inc()
        return self._call_endpoint(what, fn, *args, **kwargs)

    def _fail_over(self) -> None:
        """Mark the endpoint in use failed (with several): pyetcd's next channel is another's.

        pyetcd does this itself for the calls it wraps; the raw watch streams need it here."""
        if len(self._addresses) > 1:
            self._client.endpoint_in_use.fail()
            self._client._clear_old_stubs()

    def _call_endpoint(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One call on the endpoint in use (re-authenticating once when etcd refuses the token)."""
        token = self._current_token(what)
        try:
            return fn(*args, **kwargs)
        except (grpc.RpcError, Etcd3Exception) as exc:
            if not (self._auth.user and is_token_refusal(_details(exc))):
                raise self._error(what, exc) from exc
            logger.info(
                "etcd refused this client's token (%s); authenticating again", _details(exc)
            )
            self._drop_token(token)
            etcd_metrics.RETRIES.labels("reauth").inc()
        self._current_token(what)
        try:
            return fn(*args, **kwargs)
        except (grpc.RpcError, Etcd3Exception) as exc:
            raise self._error(what, exc) from exc

    def _current_token(self, what: str) -> str:
        """The token calls carry (authenticating first when there is none); "" without auth."""
        with self._token_lock:
            if self._token is None:
                try:
                    token = authenticate(
                        self._client.channel, self._auth, self.timeout_s, self.endpoints
                    )
                except (grpc.RpcError, Etcd3Exception) as exc:
                    raise self._error(f"{what} (authenticate)", exc) from exc
                if not token:
                    logger.warning(
                        "%s is set, but etcd at %s has authentication off: its records are "
                        "writable by anyone who can reach it (docs/security.md)",
                        ENV_USER,
                        self.endpoints,
                    )
                self._token = token
                self._client.metadata = (("token", token),) if token else None
            return self._token

    def _drop_token(self, stale: str) -> None:
        """Forget ``stale`` (etcd refused it); the next call authenticates again."""
        with self._token_lock:
            if self._token == stale:
                self._token = None

    def _error(self, what: str, exc: BaseException) -> DiscoveryError:
        status, detail = _status(exc), _details(exc) or type(exc).__name__
        etcd_metrics.CALL_FAILURES.labels(what, _failure_kind(exc, status)).inc()
        where = f"etcd {what} at {self.endpoints}"
        if status is grpc.StatusCode.NOT_FOUND:
            return DiscoveryError(
                f"{where}: lease not found (expired or revoked); grant a new lease"
            )
        if status is grpc.StatusCode.PERMISSION_DENIED:
            return DiscoveryError(
                f"{where}: permission denied for user {self._auth.user!r} ({detail}): grant its "
                "role readwrite on the fabric's prefix (docs/security.md)"
            )
        if is_token_refusal(detail):
            return EtcdAuthError(
                f"{where}: etcd requires authentication ({detail}): set {ENV_USER} and "
                f"{ENV_PASSWORD_FILE}, or a client certificate (docs/security.md)"
            )
        if self._secure and _is_unreachable(exc):
            for host, port in self._addresses:
                problem = diagnose_tls(host, port, self._auth, self.timeout_s)
                if problem is not None:
                    return EtcdAuthError(f"{where}: {problem}")
        hint = "" if self._secure else " (an etcd serving TLS needs https:// endpoints)"
        return DiscoveryError(
            f"{where} failed ({detail}; deadline {self.timeout_s:g} s): check that etcd is "
            "running and reachable there (`python -m fabric.discovery.etcd_server` starts one) "
            f"and that the endpoints are right{hint}"
        )

    def _open_watch_stream(
        self, prefix: str, start_revision: int, requests: queue.SimpleQueue[Any]
    ) -> tuple[Any, str]:
        """Open a watch stream: the gRPC streaming call (iterate it for responses, cancel() it)
        and the token it carries."""
        token = self._current_token("watch")
        key, range_end = _range(prefix)
        create = etcdrpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision
        )
        requests.put(etcdrpc.WatchRequest(create_request=create))
        stub = etcdrpc.WatchStub(self._client.channel)
        return stub.Watch(_drain(requests), metadata=(("token", token),) if token else None), token

    def _forget(self, watch: _EtcdWatch) -> None:
        with self._lock:
            self._watches.discard(watch)


class _EtcdWatch:
    """One prefix watch: a thread, its gRPC stream, and the view its callback has seen."""

    def __init__(
        self,
        registry: EtcdRegistry,
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
        self._registry._forget(self)
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
                reason = _details(exc) or type(exc).__name__
                if isinstance(exc, grpc.RpcError) and _is_unreachable(exc):
                    self._registry._fail_over()  # the member is gone: re-list on another
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
            self._call, token = self._registry._open_watch_stream(
                self.prefix, revision + 1, requests
            )
            call = self._call
        try:
            for response in call:
                if response.canceled and is_token_refusal(response.cancel_reason):
                    self._registry._drop_token(token)
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


def _range(prefix: str) -> tuple[bytes, bytes]:
    """``(key, range_end)`` covering every key that starts with ``prefix`` (all keys for "")."""
    key = prefix.encode()
    return (key, prefix_range_end(key)) if key else (b"\0", b"\0")


def _drain(requests: queue.SimpleQueue[Any]) -> Iterator[Any]:
    """The request side of a watch stream: blocks until ``None`` ends it."""
    while (request := requests.get()) is not None:
        yield request


def _status(exc: BaseException | None) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    return code() if callable(code) else None


def _failure_kind(exc: BaseException, status: grpc.StatusCode | None) -> str:
    """The ``kind`` label of a failed call (``fabric.discovery.metrics``)."""
    if isinstance(exc, ConnectionTimeoutError) or status is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout"
    if isinstance(exc, ConnectionFailedError):
        return "unavailable"
    return "error" if status is None else status.name.lower()


def _is_unreachable(exc: BaseException) -> bool:
    """A failure to connect or to answer in time (where a TLS handshake may be the cause)."""
    if isinstance(exc, ConnectionFailedError | ConnectionTimeoutError):
        return True
    return _status(exc) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _details(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    return str(details() if callable(details) else exc)
