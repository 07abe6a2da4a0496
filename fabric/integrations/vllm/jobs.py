"""Tier moves between vLLM's pages and the connector's tiers, as plain records.

``NodeLoad`` / ``NodeSave`` are the node tier's (``node``): executed by the worker side alone
(the node cache keeps its own leases), so they carry no job id and are never reported.

The scheduler side (``tiers.TierLedger``) plans them and puts them in the step's
``FabricMetadata``; the worker side (``mover.TierMover``) executes them and reports each by its
``job_id`` in a ``JobReport`` (carried back in vLLM's ``kv_connector_worker_meta``). Picklable
and free of vLLM imports, so both sides and the tests share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fabric.kvbm import SequenceHash, Tier


@dataclass(frozen=True, slots=True)
class TierLoad:
    """Before the forward pass: copy ``tier``'s blocks ``src_ids[i]`` into vLLM block
    ``block_ids[i]`` (a prefix hit of request ``request_id``)."""

    job_id: int
    request_id: str
    tier: Tier
    src_ids: tuple[int, ...]
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TierSave:
    """After the forward pass, on the model thread: copy vLLM blocks ``block_ids[i]`` into host
    blocks ``host_ids[i]`` (one copy; registered by the scheduler when planned)."""

    block_ids: tuple[int, ...]
    host_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TierWrite:
    """On the worker's copy thread, after this step's saves: copy ``src`` blocks ``src_ids[i]``
    to ``dst`` block ``dst_ids[i]``; for ``Tier.SHARED`` (the G4 store), ``dst_ids`` are the
    sequence hashes to store them under."""

    job_id: int
    src: Tier
    src_ids: tuple[int, ...]
    dst: Tier
    dst_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """Before the forward pass: copy the node tier's blocks of ``hashes`` into vLLM blocks
    ``block_ids`` (a prefix hit of request ``request_id``; blocks it no longer holds are load
    errors)."""

    request_id: str
    block_ids: tuple[int, ...]
    hashes: tuple[SequenceHash, ...]


@dataclass(frozen=True, slots=True)
class NodeSave:
    """After the forward pass: store vLLM blocks ``block_ids[i]`` under ``hashes[i]`` (a run of
    one request's consecutive full blocks, chained after ``parent``) in the node tier, those it
    lacks."""

    block_ids: tuple[int, ...]
    hashes: tuple[SequenceHash, ...]
    parent: SequenceHash | None


@dataclass(slots=True)
class JobReport:
    """Jobs a worker rank finished since its last report (``done[job] = ranks``; merged over
    ranks by ``merge``) and jobs it could not do."""

    done: dict[int, int] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.done or self.failed)

    def merge(self, other: JobReport) -> JobReport:
        done = dict(self.done)
        for job_id, ranks in other.done.items():
            done[job_id] = done.get(job_id, 0) + ranks
        return JobReport(done, self.failed | other.failed)
