"""Fixtures: the tiny model made once per session in a temp dir, and engines over fresh KVBMs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fabric.engine import Engine, ModelConfig, ensure_model
from fabric.kvbm import KvBlockManager, LayoutKind, build_kvbm, load_kvbm_config

BLOCK_SIZE = 16


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_model("tiny", tmp_path_factory.mktemp("models") / "tiny", progress=lambda _: None)


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
