"""Fixtures of the multi-host suite: a ``Lab`` of network-namespace hosts per test module.

Every test module here is marked ``multihost`` (``pytest -m multihost`` runs only them). Where
network namespaces cannot be made (not Linux, not root, no iproute2, no permission), every test is
skipped with that reason. At the session's first lab, namespaces left by crashed runs of this
harness are swept (``netns_harness.sweep_stale``). Each lab is closed in its fixture's
finalizer, whatever the tests did: its processes stopped, its namespaces deleted, and the
teardown fails if any namespace is left.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence

import pytest
from cluster_harness import MakeLab

from fabric.bench.netns import Lab, LabUnavailable, check_available, sweep_stale

logger = logging.getLogger(__name__)


@functools.cache
def lab_unavailable() -> str | None:
    """Why no lab can be made here, or None (checked once; sweeps stale labs first)."""
    try:
        check_available()
    except LabUnavailable as exc:
        return str(exc)
    swept = sweep_stale()
    if swept:
        logger.warning("removed namespaces of crashed runs: %s", ", ".join(swept))
    return None


@pytest.fixture(autouse=True)
def _needs_namespaces() -> None:
    """Every test here is skipped, with the reason, where no lab can be made."""
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(f"no network namespaces: {reason}")


@pytest.fixture(scope="module")
def make_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeLab]:
    """``make_lab(["h1", "h2"])``: a lab with those hosts, closed at the module's end."""
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(f"no network namespaces: {reason}")
    labs: list[Lab] = []

    def make(host_names: Sequence[str]) -> Lab:
        lab = Lab(tmp_path_factory.mktemp("lab"), progress=logger.info)
        labs.append(lab)
        return lab.open(host_names)

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()
        left = [n for lab in labs for n in lab.leftovers()]
        assert not left, f"namespaces left after close: {left}"
