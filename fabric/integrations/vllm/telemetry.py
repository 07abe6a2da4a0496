"""The connector's NIXL transfer metrics, exported through vLLM's connector stats.

A vLLM instance serves its own ``/metrics`` from its API server process, not from the worker
processes where the connector's NIXL agent moves bytes, so the fabric's ``fabric.transfer``
registry (which the agent fills there, as in a reference worker) is never scraped. The counts
take vLLM's road instead:

* ``TransferTally`` (worker side) is a ``fabric.transfer.metrics`` observer: it keeps every
  transfer that module records (the same ``NixlAgent`` hook that counts a reference worker's)
  until ``take``;
* each step, ``FabricConnector.get_kv_connector_stats`` hands the rows taken to vLLM as
  ``FabricTransferStats`` (``{"nixl": [[op, outcome, backend, bytes, seconds, descriptors],
  ...]}``), which vLLM merges over ranks (``aggregate``) and sends to its API server;
* there ``FabricPromMetrics`` (``FabricConnector.build_prom_metrics``) adds them to the
  fabric's series under vLLM's prefix, with vLLM's labels (``model_name``, ``engine``) before
  ours: ``vllm:fabric_nixl_transfers_total{op,outcome}``,
  ``vllm:fabric_nixl_transfer_bytes_total{op,backend}``,
  ``vllm:fabric_nixl_transfer_seconds{op,backend}``,
  ``vllm:fabric_nixl_transfer_descriptors_total{op}``,
  ``vllm:fabric_nixl_transfer_errors_total{op,kind}`` (the meanings of
  ``fabric.transfer.metrics``), and vLLM's periodic log line shows ``reduce``'s summary.

Invariants: a row is taken once (``take`` empties the tally under its lock; the agent may record
on another thread than the one taking); stats are only built from rows, so a rank without NIXL
sends none (``None``: vLLM then sends nothing).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from fabric.transfer import metrics as transfer_metrics
from fabric.transfer.metrics import TransferOutcome, TransferRecord

Row = list[str | int | float]
"""One transfer: ``[op, outcome, backend, bytes, seconds, descriptors]`` (msgpack-friendly)."""
_NAME = "vllm:" + transfer_metrics.PREFIX


def _row(record: TransferRecord) -> Row:
    return [
        record.op,
        record.outcome.value,
        record.backend,
        record.nbytes,
        record.seconds,
        record.num_descs,
    ]


class TransferTally:
    """The transfers ``fabric.transfer.metrics`` recorded since the last ``take`` (module
    docstring); installed with ``start``, removed with ``stop``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[Row] = []

    def start(self) -> None:
        transfer_metrics.add_observer(self.record)

    def stop(self) -> None:
        transfer_metrics.remove_observer(self.record)

    def record(self, record: TransferRecord) -> None:
        with self._lock:
            self._rows.append(_row(record))

    def take(self) -> list[Row]:
        with self._lock:
            rows, self._rows = self._rows, []
        return rows


@dataclass
class FabricTransferStats(KVConnectorStats):
    """vLLM's container for the rows of one interval (``data["nixl"]``)."""

    def __post_init__(self) -> None:
        self.data.setdefault("nixl", [])

    @property
    def rows(self) -> list[Row]:
        rows: list[Row] = self.data["nixl"]
        return rows

    def reset(self) -> None:
        self.data: dict[str, Any] = {"nixl": []}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        """These rows and ``other``'s (another rank's, or a later step's)."""
        self.rows.extend(other.data.get("nixl", []))
        return self

    def reduce(self) -> dict[str, int | float]:
        """What vLLM's periodic log line shows: transfers by outcome, bytes, mean NIXL time."""
        done = [row for row in self.rows if row[1] == TransferOutcome.DONE.value]
        seconds = sum(float(row[4]) for row in done)
        return {
            "nixl_transfers": len(done),
            "nixl_failed_transfers": len(self.rows) - len(done),
            "nixl_MB": round(sum(int(row[3]) for row in done) / 1e6, 3),
            "nixl_avg_ms": round(seconds * 1000 / len(done), 3) if done else 0.0,
        }

    def is_empty(self) -> bool:
        return not self.rows


class FabricPromMetrics(KVConnectorPromMetrics):
    """The fabric's NIXL series in vLLM's registry (module docstring)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter, histogram = self._counter_cls, self._histogram_cls
        self._transfers = counter(
            name=_NAME + "transfers",
            documentation="NIXL transfers of the fabric connector ended, by outcome.",
            labelnames=[*labelnames, "op", "outcome"],
        )
        self._bytes = counter(
            name=_NAME + "transfer_bytes",
            documentation="Bytes NIXL moved in the fabric connector's completed transfers.",
            labelnames=[*labelnames, "op", "backend"],
        )
        self._seconds = histogram(
            name=_NAME + "transfer_seconds",
            documentation="NIXL's own duration of the fabric connector's completed transfers.",
            labelnames=[*labelnames, "op", "backend"],
            buckets=list(transfer_metrics.SECONDS_BUCKETS),
        )
        self._descriptors = counter(
            name=_NAME + "transfer_descriptors",
            documentation="Descriptors NIXL posted for the fabric connector's transfers.",
            labelnames=[*labelnames, "op"],
        )
        self._errors = counter(
            name=_NAME + "transfer_errors",
            documentation="The fabric connector's NIXL transfers that failed, were cancelled "
            "or could not be posted, by kind.",
            labelnames=[*labelnames, "op", "kind"],
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        engine = self.per_engine_labelvalues[engine_idx]
        for op, outcome, backend, nbytes, seconds, num_descs in transfer_stats_data.get("nixl", []):
            self._transfers.labels(*engine, op, outcome).inc()
            if outcome == TransferOutcome.DONE.value:
                self._bytes.labels(*engine, op, backend).inc(nbytes)
                self._seconds.labels(*engine, op, backend).observe(seconds)
                self._descriptors.labels(*engine, op).inc(num_descs)
            else:
                self._errors.labels(*engine, op, outcome).inc()
