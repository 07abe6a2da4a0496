"""Worker start-up fixes glibc's malloc thresholds (the decode-step slowdown they caused)."""

from __future__ import annotations

import platform

import pytest

from fabric.worker.runtime import keep_heap_warm


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_heap_warm_sets_the_thresholds() -> None:
    assert keep_heap_warm() is True
