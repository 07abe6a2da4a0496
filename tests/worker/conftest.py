"""Fixtures of the worker tests: ``registry``, an in-memory discovery registry, closed after the
test. (``tiny_dir``, the tiny model, is the root conftest's.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fabric.discovery.memory import InMemoryRegistry


@pytest.fixture
def registry() -> Iterator[InMemoryRegistry]:
    registry = InMemoryRegistry()
    yield registry
    registry.close()
