"""``Roster``: the routable workers by geometry, node and load, kept right through every change."""

from __future__ import annotations

from frontend_fakes import COMPAT
from frontend_fakes import worker_record as record
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.discovery.registry import Role
from fabric.frontend.roster import Roster


def test_groups_follow_puts_replacements_and_discards() -> None:
    roster = Roster()
    roster.put(record("a", Role.AGGREGATED, node="n1"))
    roster.put(record("p", Role.PREFILL, node="n1"), load=3)
    roster.put(record("g", Role.DECODE, block_size=None))
    roster.put(record("d", Role.DECODE, node="n1", attached=False))  # not in n1's group
    assert roster.by_geometry == {(COMPAT, 16): {"a": None, "p": None, "d": None}}
    assert roster.no_geometry == {"g": None} and roster.by_node == {"n1": {"a": None, "p": None}}
    assert roster.num_serving == 3  # a prefill worker is no serving worker, whatever its load
    roster.discard("d")
    roster.put(record("a", Role.AGGREGATED, block_size=32, node="n2"), load=1)  # replaced
    assert roster.by_geometry == {(COMPAT, 16): {"p": None}, (COMPAT, 32): {"a": None}}
    assert roster.by_node == {"n1": {"p": None}, "n2": {"a": None}}
    assert roster.least_loaded() == (0, {"g": roster.records["g"]})
    roster.discard("g")
    roster.discard("p")
    roster.discard("missing")
    assert roster.by_geometry == {(COMPAT, 32): {"a": None}} and not roster.no_geometry
    assert roster.by_node == {"n2": {"a": None}} and roster.least_loaded()[0] == 1


loads_strategy = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4)), max_size=40)


@settings(max_examples=100, deadline=None)
@given(loads_strategy, st.sets(st.integers(0, 5)))
def test_least_loaded_is_the_minimum_over_every_serving_worker(
    changes: list[tuple[int, int]], excluded: set[int]
) -> None:
    roster = Roster()
    load: dict[str, int] = {}
    for i in range(6):
        roster.put(record(f"w{i}", Role.DECODE if i % 2 else Role.AGGREGATED))
        load[f"w{i}"] = 0
    for worker, count in changes:
        roster.set_load(f"w{worker}", count)
        load[f"w{worker}"] = count
    exclude = {f"w{i}" for i in excluded}
    least, tied = roster.least_loaded(exclude)
    left = {w: n for w, n in load.items() if w not in exclude}
    if not left:
        assert (least, tied) == (0, {})
        return
    assert least == min(left.values())
    assert set(tied) == {w for w, n in left.items() if n == least}
    assert sorted(r.worker_id for r in roster.serving()) == sorted(load)
