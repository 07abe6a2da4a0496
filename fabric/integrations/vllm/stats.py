"""Counters of the connector's two sides, for logs, tests and ``FabricConnector.stats()``.

Plain integers bumped on the owning thread (the scheduler's or the worker's engine thread); the
producer's hold counters are the hold table's (``fabric.pd.HoldCounts``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class SchedulerStats:
    num_lookups: int = 0
    """Disk-tier prefix lookups (one per admitted request that could hit)."""
    num_disk_hit_tokens: int = 0
    """Tokens vLLM agreed to load from the disk tier instead of computing."""
    num_save_blocks: int = 0
    """Blocks handed to the worker to offload."""
    num_peer_reads: int = 0
    """Prefills planned to be read from a producer instance."""
    num_holds: int = 0
    """Finished prefills held for a consumer instance."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class WorkerStats:
    num_loaded_blocks: int = 0
    """Blocks copied from the disk tier into vLLM's KV cache."""
    num_load_errors: int = 0
    """Blocks reported to vLLM as failed loads (disk misses, corrupt files, failed reads)."""
    num_saved_blocks: int = 0
    """Blocks written to the disk tier (not counting ones another instance wrote first)."""
    num_save_failures: int = 0
    """Save batches dropped because the disk tier could not be written."""
    num_peer_read_blocks: int = 0
    """Blocks read from producer instances with NIXL."""
    num_peer_read_failures: int = 0
    """Prefill reads that failed (the request recomputes)."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
