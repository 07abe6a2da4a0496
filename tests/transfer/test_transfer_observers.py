"""``fabric.transfer.metrics`` observers: every record the counters take reaches each observer
once, with what was counted, and a removed observer gets nothing more."""

from __future__ import annotations

from fabric.transfer import metrics
from fabric.transfer.metrics import REGISTRY, TransferOutcome, TransferRecord


def test_observers_see_what_the_counters_count() -> None:
    seen: list[TransferRecord] = []
    before = REGISTRY.get_sample_value(
        "fabric_nixl_transfer_bytes_total", {"op": "READ", "backend": "UCX"}
    )
    metrics.add_observer(seen.append)
    try:
        metrics.record_done("READ", "UCX", 4096, 0.002, 3)
        metrics.record_error("READ", TransferOutcome.PEER_UNAVAILABLE)
    finally:
        metrics.remove_observer(seen.append)
    metrics.record_done("READ", "UCX", 1, 0.001, 1)  # after removal: not seen
    assert seen == [
        TransferRecord("READ", TransferOutcome.DONE, "UCX", 4096, 0.002, 3),
        TransferRecord("READ", TransferOutcome.PEER_UNAVAILABLE),
    ]
    after = REGISTRY.get_sample_value(
        "fabric_nixl_transfer_bytes_total", {"op": "READ", "backend": "UCX"}
    )
    assert after == (before or 0.0) + 4096 + 1
