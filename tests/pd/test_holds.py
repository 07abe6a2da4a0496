"""The producer's hold table: every hold leaves once, lent holds outlive their deadline, a
re-armed deadline only moves later, late
requests are refused as finished, a departed consumer's holds are abandoned."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from fabric.errors import InvalidInput
from fabric.pd import HoldState, HoldTable, Refusal
from fabric.signal.errors import ErrorCode


def _prompt_is(expected: str) -> Callable[[str], str | None]:
    return lambda item: None if item == expected else f"holds {item!r}"


def test_hold_is_lent_only_to_its_prompt_and_leaves_once_released() -> None:
    table: HoldTable[str] = HoldTable(lend_grace_s=2.0)
    refusal = table.lend("r1", 0.0)
    assert isinstance(refusal, Refusal) and refusal.code is ErrorCode.UNAVAILABLE  # not yet
    table.hold("r1", "abc", num_blocks=2, deadline=10.0)
    wrong = table.lend("r1", 1.0, _prompt_is("abd"))
    assert isinstance(wrong, Refusal) and wrong.code is ErrorCode.UNKNOWN_REQUEST
    assert "holds 'abc'" in wrong.message
    assert table.lend("r1", 1.0, _prompt_is("abc")) == "abc"
    assert table.collect(2.0) == []
    assert table.num_active == 1
    assert table.release("r1")
    assert table.num_active == 0 and len(table) == 1  # released, not yet collected
    assert not table.release("r1")  # released once
    (freed,) = table.collect(2.0)
    assert (freed.request_id, freed.item, freed.state) == ("r1", "abc", HoldState.DONE)
    assert table.collect(3.0) == [] and len(table) == 0
    late = table.lend("r1", 3.0)
    assert isinstance(late, Refusal) and late.code is ErrorCode.UNKNOWN_REQUEST
    assert "was done" in late.message
    assert table.counts.as_dict() == {
        "num_holds": 1,
        "num_holds_released": 1,
        "num_holds_expired": 0,
        "num_holds_abandoned": 0,
    }


def test_a_lent_hold_outlives_its_deadline_by_the_grace() -> None:
    table: HoldTable[str] = HoldTable(lend_grace_s=5.0)
    table.hold("idle", "a", num_blocks=1, deadline=10.0)
    table.hold("reading", "b", num_blocks=1, deadline=10.0)
    assert table.lend("reading", 9.0) == "b"
    assert [f.request_id for f in table.collect(10.0)] == ["idle"]  # at its deadline
    assert table.collect(13.0) == []  # lent at 9 s: kept until 14 s
    (freed,) = table.collect(14.0)
    assert (freed.request_id, freed.state) == ("reading", HoldState.EXPIRED)
    assert table.counts.num_holds_expired == 2
    late = table.lend("idle", 15.0)
    assert isinstance(late, Refusal) and "expired" in late.message


def test_rearm_pushes_a_deadline_later_never_earlier_and_only_while_held() -> None:
    table: HoldTable[str] = HoldTable()
    table.hold("r1", "a", num_blocks=1, deadline=10.0)
    assert table.rearm("r1", 20.0)
    assert table.collect(15.0) == []  # the old deadline no longer frees it
    assert table.rearm("r1", 5.0)  # earlier: kept at 20 s
    assert table.collect(19.0) == []
    (freed,) = table.collect(20.0)
    assert (freed.request_id, freed.state) == ("r1", HoldState.EXPIRED)
    assert not table.rearm("r1", 30.0)  # gone
    table.hold("r2", "b", num_blocks=1, deadline=10.0)
    assert table.release("r2") and not table.rearm("r2", 30.0)  # released: nothing to arm


def test_finish_takes_the_hold_out_at_once_and_only_once() -> None:
    table: HoldTable[str] = HoldTable()
    table.hold("r", "owner", num_blocks=3, deadline=1.0)
    with pytest.raises(InvalidInput, match="already has blocks on offer"):
        table.hold("r", "other", num_blocks=1, deadline=1.0)
    assert table.finish("r") == "owner"
    assert table.finish("r") is None
    assert table.collect(5.0) == []  # finished holds never expire later
    assert table.counts.num_holds_released == 1 and table.counts.num_holds_expired == 0
    table.hold("r", "again", num_blocks=1, deadline=1.0)  # an id may be held again
    assert table.lend("r", 0.5) == "again"


def test_expire_all_frees_everything_once() -> None:
    table: HoldTable[int] = HoldTable()
    for i in range(3):
        table.hold(f"r{i}", i, num_blocks=1, deadline=100.0)
    assert table.release("r1")
    freed = {f.request_id: f.state for f in table.expire_all()}
    assert freed == {"r0": HoldState.EXPIRED, "r1": HoldState.DONE, "r2": HoldState.EXPIRED}
    assert table.expire_all() == [] and len(table) == 0


def test_abandon_frees_only_the_departed_consumers_holds_taken_before_it_left() -> None:
    table: HoldTable[str] = HoldTable(lend_grace_s=60.0)
    table.hold("d-held", "a", num_blocks=2, deadline=100.0, consumer="d")
    table.hold("d-lent", "b", num_blocks=3, deadline=100.0, consumer="d")
    table.hold("d-done", "c", num_blocks=1, deadline=100.0, consumer="d")
    table.hold("e", "e", num_blocks=4, deadline=100.0, consumer="e")
    table.hold("anonymous", "x", num_blocks=5, deadline=100.0)
    assert table.lend("d-lent", 1.0) == "b"
    assert table.release("d-done")
    left_at = time.monotonic()
    table.hold("d-back", "n", num_blocks=6, deadline=100.0, consumer="d")  # d restarted

    freed = {f.request_id: (f.state, f.num_blocks) for f in table.abandon("d", held_before=left_at)}
    assert freed == {
        "d-held": (HoldState.ABANDONED, 2),
        "d-lent": (HoldState.ABANDONED, 3),
        "d-done": (HoldState.DONE, 1),
    }
    assert table.abandon("d", held_before=left_at) == []  # each hold leaves once
    assert sorted(f.request_id for f in table.expire_all()) == ["anonymous", "d-back", "e"]
    assert table.counts.num_holds_abandoned == 2 and table.counts.num_holds_released == 1
    late = table.lend("d-held", 2.0)
    assert isinstance(late, Refusal) and late.code is ErrorCode.UNKNOWN_REQUEST
    assert "abandoned" in late.message


def test_concurrent_release_and_collect_free_each_hold_exactly_once() -> None:
    table: HoldTable[int] = HoldTable()
    n = 2000
    for i in range(n):
        table.hold(str(i), i, num_blocks=1, deadline=float("inf"))
    freed: list[int] = []

    def collector() -> None:
        while len(freed) < n:
            freed.extend(f.item for f in table.collect(0.0))

    thread = threading.Thread(target=collector)
    thread.start()
    for i in range(n):
        assert table.release(str(i))
    thread.join(10)
    assert not thread.is_alive()
    assert sorted(freed) == list(range(n))


def test_negative_grace_is_refused() -> None:
    with pytest.raises(InvalidInput, match="lend_grace_s"):
        HoldTable(lend_grace_s=-1.0)
