"""The README's block-manager example runs as printed (a renamed import fails here first)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_block_manager_example_runs() -> None:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"## Using the block manager\n\n```python\n(.*?)```", text, re.S)
    assert found is not None, "README lost its block manager example"
    scope: dict[str, object] = {}
    exec(compile(found.group(1), "README.md", "exec"), scope)
    kvbm, hashes = scope["kvbm"], scope["hashes"]
    assert isinstance(hashes, list) and len(hashes) == 4
    assert all(kvbm.pool().contains(h) for h in hashes)  # type: ignore[attr-defined]
