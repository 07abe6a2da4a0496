"""Fixtures: engines over fresh KVBMs, on the session's tiny model (``tiny_dir``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fabric.engine import Engine
from fabric.kvbm import KvBlockManager, LayoutKind, build_kvbm, load_kvbm_config
from fabric.models.config import ModelConfig

BLOCK_SIZE = 16


@pytest.fixture
def make_engine(tiny_dir: Path) -> Iterator[Callable[..., Engine]]:
    """``make_engine(layout=..., device_blocks=...)``: an engine over its own new KVBM."""
    managers: list[KvBlockManager] = []

    def make(
        *, layout: LayoutKind = LayoutKind.FULLY_CONTIGUOUS, device_blocks: int = 32
    ) -> Engine:
        config = load_kvbm_config(block_size=BLOCK_SIZE, device_blocks=device_blocks, layout=layout)
        kvbm = build_kvbm(config, ModelConfig.from_dir(tiny_dir).kv_geometry())
        managers.append(kvbm)
        return Engine(tiny_dir, kvbm)

    yield make
    for kvbm in managers:
        kvbm.close()
