"""The saves the scheduler side plans for the blocks each step completes.

A ``FullRun`` is one request's blocks that become full by the end of a step beyond those it
already offered (every token in them known and computed then, so their bytes are final once the
step's forward pass ends), with their hashes, the hash before them and their tokens. The
scheduler builds the runs; the planners here turn them into the step's saves, one per
destination::

    node_saves   a NodeSave per run (the worker's store copies only what the node lacks)
    tier_saves   the G2 saves of the blocks the host tier lacks, and their write-downs to G3 / G4
                 (``TierLedger.plan_save``)
    disk_save    without G2: one DiskSave of the blocks the G4 store lacks, or that must be
                 offered again after a failed load (``recheck``)

Planning only: no KV bytes move here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fabric.integrations.vllm.jobs import NodeSave, TierSave, TierWrite
from fabric.integrations.vllm.metadata import DiskSave
from fabric.integrations.vllm.tiers import TierLedger
from fabric.kvbm import SequenceHash, SharedBlockStore


@dataclass(frozen=True, slots=True)
class FullRun:
    """vLLM blocks ``block_ids[i]`` hold ``hashes[i]`` (chained after ``parent``); ``tokens``
    are theirs (``block_size`` per hash); the first ``recheck`` are offered to G4 even when its
    index claims them (their files failed to load)."""

    block_ids: tuple[int, ...]
    hashes: tuple[SequenceHash, ...]
    parent: SequenceHash | None
    tokens: Sequence[int]
    recheck: int = 0


def node_saves(runs: Sequence[FullRun]) -> list[NodeSave]:
    """Every run, to the node tier."""
    return [NodeSave(run.block_ids, run.hashes, run.parent) for run in runs]


def tier_saves(
    runs: Sequence[FullRun], ledger: TierLedger
) -> tuple[list[TierSave], list[TierWrite]]:
    """The copy-outs to G2 of what it lacks and the write-downs of every run (nothing for a run
    G2 cannot take now: a miss, later)."""
    saves: list[TierSave] = []
    writes: list[TierWrite] = []
    for run in runs:
        save, run_writes = ledger.plan_save(run.block_ids, run.hashes, run.parent, run.tokens)
        if save is not None and save.block_ids:
            saves.append(save)
        writes.extend(run_writes)
    return saves, writes


def disk_save(runs: Sequence[FullRun], store: SharedBlockStore) -> DiskSave | None:
    """One save of the runs' blocks the G4 store lacks (or must take again); None: none."""
    block_ids: list[int] = []
    hashes: list[SequenceHash] = []
    for run in runs:
        for i, (block_id, block_hash) in enumerate(zip(run.block_ids, run.hashes, strict=True)):
            if i < run.recheck or not store.contains(block_hash):
                block_ids.append(block_id)
                hashes.append(block_hash)
    return DiskSave(tuple(block_ids), tuple(hashes)) if block_ids else None
