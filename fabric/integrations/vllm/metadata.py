"""What the scheduler side tells the worker side each step (vLLM's ``KVConnectorMetadata``).

The two sides may live in different processes (vLLM's multiprocess executors), so everything the
worker needs travels here as plain, picklable records; the sides share no state. One
``FabricMetadata`` per step, built by ``FabricScheduler.build_connector_meta``:

* ``loads``: disk-tier prefix hits to copy into the blocks vLLM allocated, before this step's
  forward pass (synchronous loads);
* ``saves``: full blocks computed by the end of this step that the disk tier lacks (offload),
  written after the forward pass;
* ``reads``: prefill -> decode transfers to pull from a producer instance (asynchronous loads:
  the request waits in ``WAITING_FOR_REMOTE_KVS`` until the worker reports it received);
* ``holds``: finished prefills whose blocks this producer keeps for a decode instance until it
  reports ``TransferDone`` or the hold times out;
* ``tier_loads``, ``tier_saves``, ``tier_writes``: the jobs of the connector's host and local
  disk tiers (``jobs``), planned by ``tiers.TierLedger``;
* ``node_loads``, ``node_saves``: the node tier's loads (before the forward pass) and stores
  (after it) (``jobs``, ``node``).

``FabricWorkerMeta`` goes the other way (vLLM's ``kv_connector_worker_meta``): each worker
rank's ``JobReport`` of finished tier jobs, merged over ranks by ``aggregate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from fabric.integrations.vllm.jobs import (
    JobReport,
    NodeLoad,
    NodeSave,
    TierLoad,
    TierSave,
    TierWrite,
)
from fabric.kvbm import SequenceHash, as_token_array


def token_digest(token_ids: Sequence[int]) -> int:
    """xxh3-64 of ``token_ids`` as little-endian u32 (what a hold and a read must agree on)."""
    return xxhash.xxh3_64_intdigest(as_token_array(list(token_ids)).data.cast("B"))


@dataclass(frozen=True, slots=True)
class DiskLoad:
    """Copy the disk tier's ``hashes[i]`` into vLLM block ``block_ids[i]`` (one request)."""

    request_id: str
    block_ids: tuple[int, ...]
    hashes: tuple[SequenceHash, ...]


@dataclass(frozen=True, slots=True)
class DiskSave:
    """Offload vLLM blocks ``block_ids[i]`` under ``hashes[i]`` (every request of a step)."""

    block_ids: tuple[int, ...]
    hashes: tuple[SequenceHash, ...]


@dataclass(frozen=True, slots=True)
class PeerRead:
    """Pull a prefill's blocks from a producer instance into ``block_ids`` (one request).

    ``first_block`` is the index, in the producer's list, of the block that lands in
    ``block_ids[0]`` (blocks before it were local prefix hits). An empty ``block_ids`` only tells
    the producer it may free its blocks (nothing to read); ``report`` is False then, since vLLM
    is not waiting for this request.
    """

    request_id: str
    remote_worker_id: str
    remote_request_id: str
    token_ids: tuple[int, ...]
    first_block: int
    block_ids: tuple[int, ...]
    report: bool = True


@dataclass(frozen=True, slots=True)
class PeerHold:
    """Keep ``block_ids`` (the first ``num_tokens`` tokens' KV) for a consumer instance.

    ``token_digest`` is the xxh3-64 of those tokens as little-endian u32: a consumer must present
    the same prompt before it is told where the blocks are.

    With ``host_ids`` (a host tier is configured), the worker first copies ``block_ids`` into
    those host blocks and serves the hold from there, so vLLM frees its blocks at once: a
    consumer that never comes costs host blocks, not vLLM's. The host blocks are the scheduler's
    job ``job_id``, reported done when the hold is released or expires.
    """

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    token_digest: int
    timeout_s: float
    host_ids: tuple[int, ...] = ()
    job_id: int = 0

    @property
    def served_ids(self) -> tuple[int, ...]:
        """The blocks a consumer reads: the host copies when there are, else vLLM's."""
        return self.host_ids or self.block_ids


@dataclass(slots=True)
class FabricMetadata(KVConnectorMetadata):
    """One step's work for the worker side (module docstring)."""

    loads: list[DiskLoad] = field(default_factory=list)
    saves: list[DiskSave] = field(default_factory=list)
    reads: list[PeerRead] = field(default_factory=list)
    holds: list[PeerHold] = field(default_factory=list)
    tier_loads: list[TierLoad] = field(default_factory=list)
    tier_saves: list[TierSave] = field(default_factory=list)
    tier_writes: list[TierWrite] = field(default_factory=list)
    node_loads: list[NodeLoad] = field(default_factory=list)
    node_saves: list[NodeSave] = field(default_factory=list)


@dataclass(slots=True)
class FabricWorkerMeta(KVConnectorWorkerMetadata):
    """One step's tier jobs finished on the worker ranks (module docstring)."""

    report: JobReport = field(default_factory=JobReport)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, FabricWorkerMeta), f"cannot merge {type(other).__name__}"
        return FabricWorkerMeta(self.report.merge(other.report))
