"""Fixtures and hooks every suite shares.

``tiny_dir``: the tiny preset, made once per session in a temp dir (its served name is ``tiny``).

``nixl`` marker: a test that needs the nixl package and its UCX/POSIX backends says so with
``pytest.mark.nixl``; where NIXL cannot be loaded, it is skipped with the loader's reason (the
README's set-up installs NIXL, so in CI this never skips; the reason names what is missing when
it does elsewhere).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from fabric.errors import FabricError


@functools.cache
def nixl_missing() -> str | None:
    """Why NIXL cannot be loaded here, or None."""
    from fabric.transfer.nixl_agent import load_nixl

    try:
        load_nixl()
    except FabricError as e:
        return str(e)
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("nixl") is not None and nixl_missing() is not None:
            item.add_marker(pytest.mark.skip(reason=f"NIXL missing: {nixl_missing()}"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fabric.models.presets import ensure_model  # torch: only when a test needs the model

    return ensure_model("tiny", tmp_path_factory.mktemp("models") / "tiny", progress=lambda _: None)
