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
    num_host_hit_tokens: int = 0
    """Tokens vLLM agreed to load from the host tier (G2) instead of computing."""
    num_local_disk_hit_tokens: int = 0
    """Tokens vLLM agreed to load from the local disk tier (G3)."""
    num_disk_hit_tokens: int = 0
    """Tokens vLLM agreed to load from the shared disk tier (G4)."""
    num_node_hit_tokens: int = 0
    """Tokens vLLM agreed to load from this host's node cache (the node tier, G2N)."""
    num_node_save_blocks: int = 0
    """Blocks handed to the worker to store in the node tier (it copies only those it lacks)."""
    num_save_blocks: int = 0
    """Blocks handed to the worker to offload (to G2 with a host tier, else to G4)."""
    num_peer_reads: int = 0
    """Prefills planned to be read from a producer instance."""
    num_load_error_blocks: int = 0
    """Blocks the workers reported failed to load (every rank's, merged by vLLM): recomputed."""
    num_holds: int = 0
    """Finished prefills held for a consumer instance."""
    num_host_holds: int = 0
    """Of those, held in the host tier (vLLM's blocks freed after one copy)."""

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


@dataclass(slots=True)
class WorkerStats:
    num_tier_loaded_blocks: int = 0
    """Blocks copied from the host or local disk tier into vLLM's KV cache."""
    num_tier_saved_blocks: int = 0
    """Blocks copied out of vLLM's KV cache into the host tier."""
    num_tier_writes: int = 0
    """Write-downs (host to local disk or G4) handed to the copy thread."""
    save_ms_model_thread: float = 0.0
    """Milliseconds the model thread spent in ``wait_for_save`` (copy-out, queueing writes)."""
    load_ms_model_thread: float = 0.0
    """Milliseconds the model thread spent in ``start_load_kv`` on tier and disk loads."""
    num_loaded_blocks: int = 0
    """Blocks copied from the shared disk tier (G4) into vLLM's KV cache."""
    num_node_loaded_blocks: int = 0
    """Blocks copied from the node tier into vLLM's KV cache."""
    num_node_stored_blocks: int = 0
    """Blocks copied into the node tier (new to it; blocks it held are not copied)."""
    node_ms_model_thread: float = 0.0
    """Of ``save_ms_model_thread``, the part spent storing into the node tier (node loads are
    in ``load_ms_model_thread``)."""
    num_load_errors: int = 0
    """Blocks reported to vLLM as failed loads (disk misses, corrupt files, failed reads, node
    blocks gone or unreadable)."""
    num_saved_blocks: int = 0
    """Blocks written to the disk tier (not counting ones another instance wrote first)."""
    num_save_failures: int = 0
    """Save batches dropped because the disk tier could not be written."""
    num_peer_read_blocks: int = 0
    """Blocks read from producer instances with NIXL."""
    num_peer_read_failures: int = 0
    """Prefill reads that failed (the request recomputes)."""

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)
