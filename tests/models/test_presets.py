"""Embedded presets: deterministic bytes, atomic creation (also under a two-process race)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from fabric.errors import ConfigError
from fabric.models import presets
from fabric.models.presets import ensure_model

FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def quiet(_: str) -> None:
    pass


def same_files(a: Path, b: Path) -> bool:
    names = {p.name for p in a.iterdir()}
    assert names == FILES == {p.name for p in b.iterdir()}
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_creation_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    assert same_files(ensure_model("tiny", tmp_path / "again", progress=quiet), tiny_dir)


def test_existing_model_is_reused_without_work(tiny_dir: Path) -> None:
    messages: list[str] = []
    assert ensure_model("tiny", tiny_dir, progress=messages.append) == tiny_dir
    assert messages == []


def test_failed_creation_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object) -> dict[str, object]:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(presets, "random_weights", boom)
    with pytest.raises(OSError, match="simulated"):
        ensure_model("tiny", tmp_path / "model", progress=quiet)
    assert list(tmp_path.iterdir()) == []


def test_half_made_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ensure_model("tiny", tmp_path / "model", progress=quiet)


def _create(path: str) -> None:
    ensure_model("tiny", path, progress=quiet)


def test_two_processes_racing_see_only_a_complete_model(tiny_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "model"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_create, args=(str(target),)) for _ in range(2)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        if target.exists():  # once visible, it is whole
            assert {p.name for p in target.iterdir()} == FILES
        for p in procs:
            p.join(timeout=0.01)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp directory left
    assert same_files(target, tiny_dir)


def test_transformers_loads_the_tokenizer(tiny_dir: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from tokenizers import Tokenizer

    text = "The prefill worker hands the blocks to a decode worker."
    hf = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    ours = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert hf(text)["input_ids"] == ours.encode(text).ids
    assert hf.decode(ours.encode(text).ids) == text
