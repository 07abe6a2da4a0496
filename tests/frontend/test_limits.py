"""The limits' cheap checks are sound: JSON values counted outside strings, the character bound
on tokens, and a tokenizer that leaves the GIL to others while it works."""

from __future__ import annotations

import threading
import time

import pytest

from fabric.frontend.limits import count_json_values
from fabric.frontend.tokenizer import TextCodec


@pytest.mark.parametrize(
    ("body", "count"),
    [
        (b"", 0),
        (b'{"model": "tiny"}', 1),
        (b'{"prompt": [1, 2, 3]}', 4),
        (b'{"prompt": [[1], [2]]}', 5),
        (b'{"prompt": "[{,,}]"}', 1),
        (b'{"prompt": "a \\" [,] \\\\", "b": [1]}', 3),
    ],
)
def test_json_values_are_counted_outside_strings(body: bytes, count: int) -> None:
    assert count_json_values(body) == count


@pytest.mark.parametrize(
    "text",
    ["Hello world", " x" * 50, "    indented\n\tcode();", "naïve café 東京 🙂🙂", "a" * 300],
)
def test_no_token_covers_more_characters_than_the_longest_entry(
    codec: TextCodec, text: str
) -> None:
    assert len(codec.encode(text)) * codec.max_token_chars >= len(text)


def test_encoding_lets_other_threads_run(codec: TextCodec) -> None:
    text = "the fabric moves blocks between tiers " * 20_000  # ~0.8 MB: a busy tokenizer
    worker = threading.Thread(target=codec.encode, args=(text,))
    ticks = 0
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        ticks += 1
    worker.join()
    assert ticks >= 10, "encode held the GIL: the event loop would stall while it tokenizes"
