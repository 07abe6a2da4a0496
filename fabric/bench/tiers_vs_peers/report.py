"""The ``summary`` and ``goals`` of ``tiers-vs-peers``, from its rows.

Per tier (``host``, ``disk``) and block size: our best row against the faster peer's, figure by
figure (the best store bandwidth of our systems against the best of the peers', the same for
load, the lowest single-block load latency p50 against the peers' lowest), each naming the
system it came from. Goals (issue 13): store and load bandwidth at least ``BANDWIDTH_GOAL`` x the
faster peer's, single-block latency lower than the faster peer's. Only rows that measured (no
``error``, ``verified`` true) take part; a comparison with no peer row (or none of ours) is
reported with ``met: null`` and the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

BANDWIDTH_GOAL = 1.5
LATENCY_GOAL = 1.0
"""Our p50 over the faster peer's must be below this."""
OURS_PREFIX = "fabric_"


def summarize(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, goals) of ``rows``: see the module docstring."""
    summary: dict[str, Any] = {}
    goals: dict[str, Any] = {}
    measured = [r for r in rows if r.get("error") is None and r.get("verified") is True]
    cases = sorted({(r["tier"], r["block_bytes"]) for r in rows}, key=lambda c: (c[0], -c[1]))
    for tier, block_bytes in cases:
        same = [r for r in measured if r["tier"] == tier and r["block_bytes"] == block_bytes]
        ours = [r for r in same if r["system"].startswith(OURS_PREFIX)]
        theirs = [r for r in same if not r["system"].startswith(OURS_PREFIX)]
        name = f"{tier}_{size_label(block_bytes)}"
        case: dict[str, Any] = {}
        for figure, pick, goal, higher in (
            ("store_gbps", max, BANDWIDTH_GOAL, True),
            ("load_gbps", max, BANDWIDTH_GOAL, True),
            ("latency_us_p50", min, LATENCY_GOAL, False),
        ):
            compared = _compare(ours, theirs, figure, pick)
            case[figure] = compared
            ratio = compared.get("ratio")
            goals[f"{name}_{figure}_vs_faster_peer"] = {
                "value": ratio,
                "target": goal,
                "rule": "value >= target" if higher else "value < target",
                "met": None if ratio is None else (ratio >= goal if higher else ratio < goal),
                **({"reason": compared["reason"]} if "reason" in compared else {}),
            }
        summary[name] = case
    return summary, goals


def best_of_rounds(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rounds of one (system, block size): each figure's best round (highest
    bandwidth, lowest latency), the rounds' own figures in ``rounds``. A round whose load came
    back wrong wins over everything (``verified: false`` is never hidden); rounds that failed
    otherwise are listed in ``round_errors``, and the row is an error row only when every
    round failed."""
    corrupted = [r for r in runs if r.get("verified") is False]
    if corrupted:
        return corrupted[0]
    measured = [r for r in runs if r.get("error") is None]
    errors = [r["error"] for r in runs if r.get("error") is not None]
    if not measured:
        return {**runs[0], "round_errors": errors}
    row = dict(measured[0])
    for figure in _FIGURES:
        values = [r[figure] for r in measured]
        row[figure] = max(values) if figure.endswith("gbps") else min(values)
    row["rounds"] = [{f: r[f] for f in _FIGURES} for r in measured]
    if errors:
        row["round_errors"] = errors
    return row


_FIGURES = (
    "store_gbps",
    "load_gbps",
    "latency_us_p50",
    "latency_us_p99",
    "store_latency_us_p50",
    "store_latency_us_p99",
)


def _compare(
    ours: Sequence[dict[str, Any]],
    theirs: Sequence[dict[str, Any]],
    figure: str,
    pick: Callable[..., Any],
) -> dict[str, Any]:
    """Our best and the peers' best of ``figure`` and their ratio (ours / theirs)."""
    mine = [r for r in ours if r.get(figure) is not None]
    peers = [r for r in theirs if r.get(figure) is not None]
    out: dict[str, Any] = {}
    if mine:
        best = pick(mine, key=lambda r: r[figure])
        out["ours"] = {"system": best["system"], "value": best[figure]}
    if peers:
        best = pick(peers, key=lambda r: r[figure])
        out["faster_peer"] = {"system": best["system"], "value": best[figure]}
    if not mine or not peers:
        missing = "none of ours" if not mine else "no peer"
        out["reason"] = f"{missing} measured {figure} here"
        return out
    ratio = out["ours"]["value"] / out["faster_peer"]["value"]
    out["ratio"] = round(ratio, 3)
    return out


def size_label(block_bytes: int) -> str:
    """``256KiB``, ``512B``."""
    return f"{block_bytes >> 10}KiB" if block_bytes % 1024 == 0 else f"{block_bytes}B"
