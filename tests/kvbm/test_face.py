"""The block manager's public face: one table, every name importable, typed for the checker."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import fabric.kvbm as face


def test_every_public_name_resolves_to_its_module() -> None:
    table = face._NAME_TO_MODULE
    assert sorted(face.__all__) == sorted(table), "__all__ and the lazy table differ"
    for name in face.__all__:
        module = importlib.import_module(table[name])
        assert getattr(face, name) is getattr(module, name), name


def test_the_type_checker_sees_every_public_name() -> None:
    tree = ast.parse(Path(face.__file__).read_text(encoding="utf-8"))
    guarded = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
    )
    seen = {
        alias.asname or alias.name
        for node in guarded.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == set(face.__all__)
