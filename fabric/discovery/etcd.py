"""EtcdRegistry: the ``Registry`` protocol on an etcd v3 cluster.

Owns one gRPC connection (per endpoint) to etcd, its calls (deadlines, failover between members,
the auth token) and the set of its prefix watches (``etcd_watch.EtcdWatch``); failures are
classified by ``etcd_errors``.

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
* Watches re-establish themselves (``etcd_watch``: re-list and resume, so routers converge to
  the true set of workers); the registry holds their channel and token and cancels them on
  ``close``.
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
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd.exceptions import Etcd3Exception

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
from fabric.discovery.etcd_errors import details, failure_kind, is_unreachable, status_of
from fabric.discovery.etcd_watch import EtcdWatch, key_range, request_stream
from fabric.discovery.registry import Lease, LeaseId, WatchCallback
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
        self._watches: set[EtcdWatch] = set()
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
        key, range_end = key_range(prefix)
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
            if status_of(exc.__cause__) is not grpc.StatusCode.NOT_FOUND:
                raise

    # -- watches --------------------------------------------------------------------------------

    def watch_prefix(
        self, prefix: str, callback: WatchCallback, *, include_existing: bool = False
    ) -> EtcdWatch:
        """Watch ``prefix``; returns once the stream is created (DiscoveryError otherwise)."""
        listing, revision = self.list_prefix(prefix)
        watch = EtcdWatch(
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

    # -- internals (fail_over, drop_token, open_watch_stream and forget_watch also serve its
    # watches: etcd_watch.WatchSource) -------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise DiscoveryError(f"etcd {what}: this EtcdRegistry ({self.endpoints}) is closed")
        for _ in range(len(self._addresses) - 1):  # failover: the module docstring
            try:
                return self._call_endpoint(what, fn, *args, **kwargs)
            except DiscoveryError as exc:
                cause = exc.__cause__
                if cause is None or not is_unreachable(cause):
                    raise
                logger.warning("etcd %s: %s; trying the next endpoint", what, details(cause))
                etcd_metrics.RETRIES.labels("failover").inc()
        return self._call_endpoint(what, fn, *args, **kwargs)

    def fail_over(self) -> None:
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
            if not (self._auth.user and is_token_refusal(details(exc))):
                raise self._error(what, exc) from exc
            logger.info("etcd refused this client's token (%s); authenticating again", details(exc))
            self.drop_token(token)
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

    def drop_token(self, stale: str) -> None:
        """Forget ``stale`` (etcd refused it); the next call authenticates again."""
        with self._token_lock:
            if self._token == stale:
                self._token = None

    def _error(self, what: str, exc: BaseException) -> DiscoveryError:
        status, detail = status_of(exc), details(exc) or type(exc).__name__
        etcd_metrics.CALL_FAILURES.labels(what, failure_kind(exc, status)).inc()
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
        if self._secure and is_unreachable(exc):
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

    def open_watch_stream(
        self, prefix: str, start_revision: int, requests: queue.SimpleQueue[Any]
    ) -> tuple[Any, str]:
        """Open a watch stream: the gRPC streaming call (iterate it for responses, cancel() it)
        and the token it carries."""
        token = self._current_token("watch")
        key, range_end = key_range(prefix)
        create = etcdrpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision
        )
        requests.put(etcdrpc.WatchRequest(create_request=create))
        stub = etcdrpc.WatchStub(self._client.channel)
        return stub.Watch(
            request_stream(requests), metadata=(("token", token),) if token else None
        ), token

    def forget_watch(self, watch: EtcdWatch) -> None:
        with self._lock:
            self._watches.discard(watch)
