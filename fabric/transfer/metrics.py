"""NIXL transfer metrics of this process: NIXL's own per-transfer telemetry, and errors by kind.

``NixlAgent`` reports every transfer once, when it is released (``record_done`` with NIXL's
telemetry, ``record_error`` otherwise), and every post NIXL refused (``record_error``). The
metrics live in this module's own ``REGISTRY`` (transfers are the process's, whatever owns the
agent); a process that serves ``/metrics`` registers it into its registry (the worker runtime).

* ``fabric_nixl_transfers_total{op,outcome}``: transfers ended, by ``TransferOutcome``;
* ``fabric_nixl_transfer_bytes_total{op,backend}``: bytes moved (NIXL's ``totalBytes``);
* ``fabric_nixl_transfer_seconds{op,backend}``: NIXL's ``xferDuration`` (post to completion);
* ``fabric_nixl_transfer_descriptors_total{op}``: descriptors NIXL posted (after its merging);
* ``fabric_nixl_transfer_errors_total{op,kind}``: failed, cancelled or refused transfers.

Without NIXL telemetry (an agent built with ``AgentConfig(telemetry=False)``, or NIXL refusing
to give it) the agent's own post-to-release time and its byte count stand in.

Each record is also handed, as a ``TransferRecord``, to the observers ``add_observer``
installed (a process that exports the counts elsewhere than a ``/metrics`` of its own, e.g. the
vLLM connector through vLLM's ``KVConnectorStats``); observers run on the recording thread and
must not raise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()
PREFIX = "fabric_nixl_"
SECONDS_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)


class TransferOutcome(Enum):
    """How a transfer ended."""

    DONE = "done"
    FAILED = "failed"
    """The transport reported an error (``check_xfer_state`` ERR)."""
    PEER_UNAVAILABLE = "peer_unavailable"
    """The peer was gone or unknown (when posting, or while in flight)."""
    CANCELLED = "cancelled"
    """Released while pending: a ``wait`` that timed out, or an abandoned transfer."""
    POST_FAILED = "post_failed"
    """NIXL refused to create or post it."""


_TRANSFERS = Counter(
    PREFIX + "transfers", "NIXL transfers ended, by outcome.", ["op", "outcome"], registry=REGISTRY
)
_BYTES = Counter(
    PREFIX + "transfer_bytes",
    "Bytes NIXL moved in completed transfers.",
    ["op", "backend"],
    registry=REGISTRY,
)
_SECONDS = Histogram(
    PREFIX + "transfer_seconds",
    "NIXL's own duration of completed transfers (post to completion).",
    ["op", "backend"],
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
_DESCRIPTORS = Counter(
    PREFIX + "transfer_descriptors",
    "Descriptors NIXL posted for completed transfers (after merging contiguous ones).",
    ["op"],
    registry=REGISTRY,
)
_ERRORS = Counter(
    PREFIX + "transfer_errors",
    "NIXL transfers that failed, were cancelled or could not be posted, by kind.",
    ["op", "kind"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class TransferRecord:
    """One ended transfer as the series above count it (``backend`` and the sizes are only
    known for a DONE one)."""

    op: str
    outcome: TransferOutcome
    backend: str = ""
    nbytes: int = 0
    seconds: float = 0.0
    num_descs: int = 0


TransferObserver = Callable[[TransferRecord], None]


class _Observers:
    """The installed observers; the tuple is replaced, never mutated, so a recording thread
    iterates the one it read while another adds or removes."""

    current: tuple[TransferObserver, ...] = ()


_OBSERVERS = _Observers()


def add_observer(observer: TransferObserver) -> None:
    """Hand every record from now on to ``observer`` too (module docstring)."""
    _OBSERVERS.current = (*_OBSERVERS.current, observer)


def remove_observer(observer: TransferObserver) -> None:
    """Stop handing records to ``observer`` (nothing if it was not added)."""
    _OBSERVERS.current = tuple(o for o in _OBSERVERS.current if o != observer)


def record_done(op: str, backend: str, nbytes: int, seconds: float, num_descs: int) -> None:
    """One completed transfer."""
    _TRANSFERS.labels(op, TransferOutcome.DONE.value).inc()
    _BYTES.labels(op, backend).inc(nbytes)
    _SECONDS.labels(op, backend).observe(seconds)
    _DESCRIPTORS.labels(op).inc(num_descs)
    for observer in _OBSERVERS.current:
        observer(TransferRecord(op, TransferOutcome.DONE, backend, nbytes, seconds, num_descs))


def record_error(op: str, outcome: TransferOutcome) -> None:
    """One transfer that did not complete (``outcome`` is not DONE)."""
    _TRANSFERS.labels(op, outcome.value).inc()
    _ERRORS.labels(op, outcome.value).inc()
    for observer in _OBSERVERS.current:
        observer(TransferRecord(op, outcome))
