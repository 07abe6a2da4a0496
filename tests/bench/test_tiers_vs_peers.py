"""``python -m fabric.bench tiers-vs-peers``: our three tier paths end to end on a tiny size (a
real node cache process with its shared segment, a real G3 file), the checker that makes
``verified`` mean something, the error rows of a missing peer, the summary's ratios; and, in the
slow suite, each peer's runner in its own venv (skipped with a reason when the venv was not made).
No timing is judged.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fabric.bench.tiers_vs_peers import command, measure, peers, report
from fabric.errors import ConfigError
from fabric.node import segment_name

ROW_KEYS = {
    "system",
    "tier",
    "block_bytes",
    "store_gbps",
    "load_gbps",
    "latency_us_p50",
    "latency_us_p99",
    "verified",
}
TINY = measure.Plan(block_bytes=512, num_blocks=8, repeats=1, latency_samples=3)


def _args(tmp_path: Path, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args([f"--workdir={tmp_path}", *flags])


class MemoryPath:
    """A ``measure.TierPath`` over a dict; ``corrupt`` flips one byte of the block at that
    position of every load (a tier that returns other bytes than it stored)."""

    def __init__(self, corrupt: int | None = None) -> None:
        self.corrupt = corrupt
        self.engine: dict[int, np.ndarray] = {}
        self.tier: dict[int, bytes] = {}

    def stage(self, keys: Sequence[int], data: np.ndarray) -> None:
        self.engine = {k: data[i].copy() for i, k in enumerate(keys)}

    def store(self, keys: Sequence[int]) -> None:
        self.tier.update({k: self.engine[k].tobytes() for k in keys})

    def clear(self, keys: Sequence[int]) -> None:
        self.engine = {k: np.zeros_like(v) for k, v in self.engine.items()}

    def load(self, keys: Sequence[int]) -> None:
        for i, k in enumerate(keys):
            block = np.frombuffer(self.tier[k], dtype=np.uint8).copy()
            if i == self.corrupt:
                block[len(block) // 2] ^= 0x01
            self.engine[k] = block

    def loaded(self, keys: Sequence[int]) -> np.ndarray:
        return np.stack([self.engine[k] for k in keys])

    def finish(self, keys: Sequence[int]) -> None:
        pass


def test_first_mismatch_names_the_first_differing_block() -> None:
    data = np.arange(4 * 512, dtype=np.uint32).astype(np.uint8).reshape(4, 512)
    assert measure.first_mismatch(data, data.copy()) is None
    bad = data.copy()
    bad[2, 100] ^= 0x80
    bad[3, 0] ^= 0x01
    assert measure.first_mismatch(data, bad) == 2
    assert measure.first_mismatch(data, data[:3]) == 0  # a short load is a mismatch


def test_measure_path_verifies_every_load_and_catches_a_corrupted_one() -> None:
    row = measure.measure_path(MemoryPath(), TINY)
    assert row["verified"] is True and row["store_gbps"] > 0 and row["latency_us_p99"] > 0
    with pytest.raises(measure.VerificationFailed, match="block 5 of 8"):
        measure.measure_path(MemoryPath(corrupt=5), TINY)
    with pytest.raises(measure.VerificationFailed, match="block 0 of 8"):
        measure.measure_path(MemoryPath(corrupt=0), TINY)  # the first (warm-up) batch fails


def test_kv_shape_gives_the_block_bytes() -> None:
    for block_bytes in (256 << 10, 16 << 10, 512):
        layers, heads, head_size = measure.kv_shape(block_bytes)
        assert layers * 2 * heads * head_size * measure.BLOCK_TOKENS * 2 == block_bytes
    with pytest.raises(ValueError):
        measure.kv_shape(1000)


def test_our_systems_store_load_and_verify_on_a_tiny_size(tmp_path: Path) -> None:
    flags = [
        "--sizes=16,0.5",
        "--total-mib=0.25",
        "--repeats=1",
        "--latency-samples=3",
        "--rounds=1",
    ]
    result = command.run(_args(tmp_path, *flags, "--systems=fabric_host,fabric_node,fabric_disk"))

    rows = result["rows"]
    assert [(r["system"], r["block_bytes"]) for r in rows] == [
        (system, size) for size in (16384, 512) for system in command.OURS
    ]
    for row in rows:
        assert row.get("error") is None, row
        assert set(row) >= ROW_KEYS and row["verified"] is True
        assert row["tier"] == ("disk" if row["system"] == "fabric_disk" else "host")
        assert row["num_blocks"] == (256 << 10) // row["block_bytes"]
        assert row["store_gbps"] > 0 and row["load_gbps"] > 0 and row["latency_us_p50"] > 0
    assert result["memcpy"]["gbps"] > 0
    assert set(result["summary"]) == {"host_16KiB", "host_512B", "disk_16KiB", "disk_512B"}
    goal = result["goals"]["host_16KiB_load_gbps_vs_faster_peer"]
    assert goal["met"] is None and "no peer" in goal["reason"]  # no peer row was asked for
    assert set(result["paths"]) == set(command.OURS)
    # nothing left behind: the node cache's segment, its owner file, the work directory
    segment = segment_name("bench", f"tiers-vs-peers-{os.getpid()}")
    assert not Path("/dev/shm", segment).exists()
    assert not Path("/dev/shm", f"{segment}.owner").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_peer_venv_gives_an_error_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FABRIC_KVCR_VENV", str(tmp_path / "absent"))
    result = command.run(
        _args(
            tmp_path,
            "--sizes=0.5",
            "--total-mib=0.0078125",
            "--rounds=1",
            "--systems=kvcr_host,fabric_host",
        )
    )
    kvcr, ours = result["rows"]
    assert kvcr["system"] == "kvcr_host" and peers.SETUP_HINT in kvcr["error"]
    assert kvcr["store_gbps"] is None and kvcr["load_gbps"] is None and kvcr["verified"] is None
    assert ours["verified"] is True
    goal = result["goals"]["host_512B_store_gbps_vs_faster_peer"]
    assert goal["met"] is None and goal["value"] is None


def test_summary_compares_our_best_with_the_faster_peer() -> None:
    def row(system: str, store: float, load: float, p50: float, **extra: Any) -> dict[str, Any]:
        return {
            "system": system,
            "tier": "host",
            "block_bytes": 16384,
            "store_gbps": store,
            "load_gbps": load,
            "latency_us_p50": p50,
            "verified": True,
            **extra,
        }

    rows = [
        row("fabric_host", 6.0, 4.0, 100.0),
        row("fabric_node", 3.0, 8.0, 200.0),
        row("kvcr_host", 1.0, 1.0, 1000.0),
        row("lmcache_cpu", 2.0, 8.0, 50.0),
        row("kvcr_disk", 99.0, 99.0, 1.0, error="crashed"),  # not measured: left out
    ]
    summary, goals = report.summarize(rows)

    store = summary["host_16KiB"]["store_gbps"]
    assert store["ours"] == {"system": "fabric_host", "value": 6.0}
    assert store["faster_peer"] == {"system": "lmcache_cpu", "value": 2.0}
    assert goals["host_16KiB_store_gbps_vs_faster_peer"]["value"] == 3.0
    assert goals["host_16KiB_store_gbps_vs_faster_peer"]["met"] is True
    assert goals["host_16KiB_load_gbps_vs_faster_peer"] == {
        "value": 1.0,
        "target": 1.5,
        "rule": "value >= target",
        "met": False,
    }
    latency = goals["host_16KiB_latency_us_p50_vs_faster_peer"]
    assert latency["value"] == 2.0 and latency["met"] is False  # 100 us against LMCache's 50


def test_bad_flags_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown"):
        command.run(_args(tmp_path, "--systems=fabric_host,mooncake"))
    with pytest.raises(ConfigError, match="heads"):
        command.run(_args(tmp_path, "--sizes=0.3"))


@pytest.mark.slow
@pytest.mark.parametrize("system", sorted(peers.PEERS))
def test_peer_runner_measures_and_verifies(system: str, tmp_path: Path) -> None:
    peer = peers.PEERS[system]
    if not peer.python().exists():
        pytest.skip(f"{peer.python()} is missing: {peers.SETUP_HINT}")
    plan = measure.Plan(block_bytes=16384, num_blocks=16, repeats=1, latency_samples=3)
    row = peers.peer_row(peer, plan, tmp_path, timeout_s=240.0)
    assert row.get("error") is None, row
    assert set(row) >= ROW_KEYS and row["verified"] is True and row["system"] == system
    assert row["store_gbps"] > 0 and row["load_gbps"] > 0 and "version" in row
