"""KvTrace: segments stay contiguous and merged, the wire form round-trips, bad ones refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.signal.kv_trace import MAX_SEGMENTS, KvSegment, KvSource, KvTrace


def test_add_continues_merges_and_ignores_empty_ranges() -> None:
    trace = KvTrace()
    trace.add(KvSource.DEVICE, 32)
    trace.add(KvSource.DEVICE, 48)  # same source: one segment
    trace.add(KvSource.NODE, 48)  # empty: nothing
    trace.add(KvSource.PREFILL, 100)
    assert trace.segments == [
        KvSegment(KvSource.DEVICE, 0, 48),
        KvSegment(KvSource.PREFILL, 48, 100),
    ]
    assert trace.end == 100
    assert trace.encode() == "device:0-48,prefill:48-100"


@given(st.lists(st.tuples(st.sampled_from(list(KvSource)), st.integers(0, 40)), max_size=12))
def test_decode_of_encode_is_the_trace(steps: list[tuple[KvSource, int]]) -> None:
    trace = KvTrace()
    for source, length in steps:
        trace.add(source, trace.end + length)
    assert KvTrace.decode(trace.encode()) == trace
    assert sum(s.num_tokens for s in trace.segments) == trace.end


def test_empty_string_is_no_trace() -> None:
    assert KvTrace.decode("").segments == []


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("gpu:0-16", "is not <source>:<start>-<end>"),
        ("device:0-x", "is not <source>:<start>-<end>"),
        ("device", "is not <source>:<start>-<end>"),
        ("device:16-32", "does not continue at position 0"),
        ("device:0-16,host:20-32", "does not continue at position 16"),
        ("device:0-0", "does not continue"),
        ("device:0-16,device:16-32", "repeats the previous source"),
        (
            ",".join(f"{'host' if i % 2 else 'disk'}:{i}-{i + 1}" for i in range(MAX_SEGMENTS + 1)),
            f"at most {MAX_SEGMENTS}",
        ),
    ],
)
def test_decode_refuses_what_encode_never_writes(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        KvTrace.decode(text)
