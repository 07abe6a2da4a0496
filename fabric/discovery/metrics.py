"""etcd errors of this process (Prometheus counters): failed calls, retries, lost watches,
re-granted leases.

``EtcdRegistry`` and ``WorkerRegistration`` count here; the metrics live in this module's own
``REGISTRY`` (the process's etcd clients, whoever owns them), which a process serving
``/metrics`` registers into its registry (the worker runtime, the frontend).

* ``fabric_etcd_call_failures_total{call,kind}``: a call to one etcd endpoint that failed;
  ``call`` the operation (``put``, ``grant lease``, ``lease keepalive``...), ``kind``
  ``timeout`` (no answer by the deadline), ``unavailable`` (not reachable), or the gRPC status
  otherwise (``not_found``: the lease expired, ``permission_denied``, ``unauthenticated``...);
* ``fabric_etcd_retries_total{reason}``: calls tried again, ``failover`` (on the next member)
  or ``reauth`` (after etcd refused the token);
* ``fabric_etcd_watch_losses_total``: watch streams that broke and were re-established;
* ``fabric_etcd_lease_regrants_total``: registrations that lost their lease (or never got one
  through) and were registered again under a new one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry()
PREFIX = "fabric_etcd_"

CALL_FAILURES = Counter(
    PREFIX + "call_failures",
    "Calls to an etcd endpoint that failed, by call and kind.",
    ["call", "kind"],
    registry=REGISTRY,
)
RETRIES = Counter(
    PREFIX + "retries", "etcd calls tried again, by reason.", ["reason"], registry=REGISTRY
)
WATCH_LOSSES = Counter(
    PREFIX + "watch_losses",
    "etcd watch streams that broke (each re-established with a re-list).",
    registry=REGISTRY,
)
LEASE_REGRANTS = Counter(
    PREFIX + "lease_regrants",
    "Registrations registered again under a new lease after losing theirs.",
    registry=REGISTRY,
)
