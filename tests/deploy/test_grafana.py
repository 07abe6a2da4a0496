"""The Grafana dashboard (``deploy/grafana/kv-fabric.json``) queries only exported metrics.

The exported names come from the real metric objects, built the way the processes build them:
the frontend's ``FrontendMetrics`` (with its fleet and queue readers), and a worker's registry
(``KvbmMetrics`` with every tier and the G4 store bound, plus ``WorkerMetrics``), a node
cache's (``fabric.node.metrics``), and the
process-wide NIXL, signal and etcd registries both register. Each family
yields the series names Prometheus scrapes from it (``_total`` of a counter, ``_bucket`` /
``_sum`` / ``_count`` of a histogram...). Every PromQL expression of every panel is read for
metric names (label matchers, range selectors, grouping clauses, strings and function calls
left out), and each must be exported; the checker is also shown to catch a misspelt name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from fabric.discovery import metrics as etcd_metrics
from fabric.discovery.registry import Role
from fabric.frontend.metrics import FrontendMetrics
from fabric.kvbm import KvbmMetrics, Tier
from fabric.node.metrics import METRICS, node_cache_registry
from fabric.signal import metrics as signal_metrics
from fabric.transfer import metrics as transfer_metrics
from fabric.worker.metrics import WorkerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kv-fabric.json"
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


@dataclass
class _Pool:
    num_blocks: int = 8
    num_in_use: int = 1
    num_cached: int = 1
    num_free: int = 6
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    registered: int = 0
    duplicates: int = 0


class _NodeStats:
    """``NodeCache.stats()``'s keys, each 0 (the figures do not matter here, the names do)."""

    def stats(self) -> dict[str, int]:
        return {key: 0 for _, _, key, _ in METRICS}


def _series(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def exported_series() -> set[str]:
    """Every series name the frontend and a worker export."""
    frontend = FrontendMetrics(
        lambda: {"decode-0": (Role.DECODE, 1)}, lambda: {"decode-0": 3}, lambda: 0
    )
    kvbm = KvbmMetrics()
    for tier in Tier:
        kvbm.bind_pool(tier, _Pool)
    kvbm.bind_store(dict)
    WorkerMetrics(kvbm.registry, role="decode", worker_id="decode-0", model="tiny")
    transport = set()  # the process-wide registries the worker runtime and the frontend add
    for registry in (transfer_metrics.REGISTRY, signal_metrics.REGISTRY, etcd_metrics.REGISTRY):
        transport |= _series(registry)
    node_cache = node_cache_registry(_NodeStats())  # a node cache's own registry
    return _series(frontend.registry) | _series(kvbm.registry) | _series(node_cache) | transport


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings (label values, legend text)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in _KEYWORDS:
            continue  # a function call or an operator
        if match.start() > 0 and (
            text[match.start() - 1].isdigit() or text[match.start() - 1] == "."
        ):
            continue  # the exponent or unit of a number
        names.add(match.group())
    return names


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every target of every panel, rows' panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


def unknown_names(dashboard: dict[str, Any], exported: set[str]) -> list[str]:
    return [
        f"{title}: {name}"
        for title, expr in queries(dashboard)
        for name in sorted(metric_names(expr))
        if name not in exported
    ]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_every_query_names_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = exported_series()
    found = queries(dashboard)
    assert len(found) >= 20
    for title, expr in found:
        assert metric_names(expr), f"{title}: no metric in {expr!r}"
    assert unknown_names(dashboard, exported) == []


def test_the_dashboard_covers_what_operators_ask(dashboard: dict[str, Any]) -> None:
    used = {name for _, expr in queries(dashboard) for name in metric_names(expr)}
    for wanted in (
        "fabric_frontend_ttft_seconds_bucket",
        "fabric_frontend_itl_seconds_bucket",
        "fabric_kvbm_hits_total",
        "fabric_kvbm_offloads_total",
        "fabric_kvbm_onboards_total",
        "fabric_kvbm_blocks_capacity",
        "fabric_frontend_kv_transfer_bytes_total",
        "fabric_frontend_kv_transfer_seconds_bucket",
        "fabric_worker_errors_total",
    ):
        assert wanted in used, wanted


def test_the_checker_catches_a_misspelt_metric(dashboard: dict[str, Any]) -> None:
    broken = json.loads(
        json.dumps(dashboard).replace("fabric_frontend_itl_seconds_bucket", "fabric_itl_bucket")
    )
    assert unknown_names(broken, exported_series()) == ["ITL: fabric_itl_bucket"] * 2
    assert metric_names('sum by (le) (rate(a_b{x="y"}[5m])) / on (z) c + 1e3') == {"a_b", "c"}


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
