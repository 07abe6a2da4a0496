"""Tests for fabric.signal.liveness: the last-seen table stays bounded in time and size."""

from __future__ import annotations

import pytest

from fabric.errors import ConfigError
from fabric.signal.liveness import LastSeenTable


def test_get_returns_the_latest_touch_within_the_horizon() -> None:
    table = LastSeenTable(horizon_s=10.0)
    assert table.get("a", 0.0) is None
    table.touch("a", 1.0)
    table.touch("a", 2.0)
    assert table.get("a", 5.0) == 2.0
    assert table.get("a", 12.0) == 2.0  # exactly at the horizon: still seen
    assert table.get("a", 12.5) is None  # past it, even before a prune


def test_prune_forgets_only_peers_past_the_horizon() -> None:
    table = LastSeenTable(horizon_s=10.0)
    for i, peer in enumerate(["a", "b", "c"]):
        table.touch(peer, float(i))
    table.touch("a", 5.0)  # a talked again: now the most recent
    assert table.prune(12.5) == 2  # b (1.0) and c (2.0) are past; a (5.0) is not
    assert len(table) == 1
    assert table.get("a", 12.5) == 5.0
    assert table.prune(12.5) == 0


def test_a_stream_of_new_peers_never_grows_past_the_horizon() -> None:
    table = LastSeenTable(horizon_s=1.0)
    for i in range(10_000):  # one new identity every 10 ms, pruned as the server loop does
        now = i * 0.01
        table.touch(f"peer-{i}", now)
        table.prune(now)
    assert len(table) <= 101


def test_size_cap_evicts_the_least_recently_seen() -> None:
    table = LastSeenTable(horizon_s=1e9, max_peers=3)
    for i, peer in enumerate(["a", "b", "c"]):
        table.touch(peer, float(i))
    table.touch("a", 3.0)  # refresh a: b is now the least recent
    table.touch("d", 4.0)
    assert len(table) == 3
    assert table.get("b", 4.0) is None
    assert [table.get(p, 4.0) for p in ("a", "c", "d")] == [3.0, 2.0, 4.0]


@pytest.mark.parametrize(
    "kwargs",
    [{"horizon_s": 0.0}, {"horizon_s": -1.0}, {"horizon_s": float("nan")}, {"max_peers": 0}],
)
def test_bounds_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="last-seen"):
        LastSeenTable(**kwargs)  # type: ignore[arg-type]
