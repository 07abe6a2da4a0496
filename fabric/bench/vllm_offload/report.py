"""The figures of ``bench vllm-offload``: one row per arm, the goals, the workload.

A row has exactly ``arm``, ``hit_rate``, ``ttft_ms_p50``, ``ttft_ms_p90``, ``total_s``,
``outputs_equal`` and ``connector_ms_model_thread``; a row of an arm that did not run carries
``status`` and ``reason`` besides, with every figure ``null``. ``details`` holds what explains
a row (vLLM's counters, the connector's, TTFT per turn, the config).

Invariants: figures are only ever measured ones; ``hit_rate`` is vLLM's own count of prompt
tokens not computed (every ``prompt_tokens_by_source`` source but ``local_compute``) over the
reusable prefix tokens the client sent (``PrefixHistory``); ``outputs_equal`` compares
completion token ids turn by turn with the reference arm's (``null`` for the reference);
``connector_ms_model_thread`` is the fabric worker's ``save_ms_model_thread +
load_ms_model_thread`` over the server's life (warm-up included), ``null`` without the fabric's
connector or when its log held no stats line. A goal whose figure could not be measured is not
met.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from fabric.bench.vllm_offload.arms import FABRIC_ARMS, REFERENCE
from fabric.bench.vllm_offload.runner import COMPUTED_SOURCE, OffloadRun, TurnResult
from fabric.bench.vllm_offload.workload import BLOCK_SIZE, ChatWorkload
from fabric.bench.vs_vllm.arms import DECODE_CPU, MAX_MODEL_LEN, Arm
from fabric.bench.vs_vllm.servers import KV_CACHE_GIB

ROW_KEYS = (
    "arm",
    "hit_rate",
    "ttft_ms_p50",
    "ttft_ms_p90",
    "total_s",
    "outputs_equal",
    "connector_ms_model_thread",
)


class ArmStatus(Enum):
    OK = "ok"
    ERROR = "error"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Goal:
    """A bound on one figure of ``fabric_g2``: its hit rate, or a ratio to another arm's."""

    name: str
    figure: str
    base_arm: str | None
    at_least: float | None = None
    at_most: float | None = None


GOALS = (
    Goal("fabric_g2_hit_rate", "hit_rate", None, at_least=0.99),
    Goal("fabric_g2_ttft_p50_vs_vllm", "ttft_ms_p50", "vllm", at_most=0.3),
    Goal("fabric_g2_total_s_vs_example_connector", "total_s", "example_connector", at_most=0.8),
)
"""Issue 12's goals for the host tier under vLLM."""
GOAL_ARM = "fabric_g2"


def _p(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values, dtype=float), q)), 1)


def _equal(got: Sequence[TurnResult], reference: OffloadRun | None) -> bool | None:
    if reference is None:
        return None
    return [r.token_ids for r in got] == [r.token_ids for r in reference.turns]


def summarize(
    name: str, got: OffloadRun, reference: OffloadRun | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One arm's row and its details (module docstring)."""
    ttfts = [t.ttft_ms for t in got.turns]
    sources = got.tokens_by_source
    cached = sum(v for k, v in sources.items() if k != COMPUTED_SOURCE)
    reusable = sum(t.reusable_tokens for t in got.turns)
    stats = got.connector_stats
    model_thread = None
    if name in FABRIC_ARMS and stats is not None:
        spent = float(stats.get("save_ms_model_thread", 0.0))
        spent += float(stats.get("load_ms_model_thread", 0.0))
        model_thread = round(spent, 1)
    row = {
        "arm": name,
        "hit_rate": round(cached / reusable, 4) if reusable else None,
        "ttft_ms_p50": _p(ttfts, 50),
        "ttft_ms_p90": _p(ttfts, 90),
        "total_s": round(got.total_s, 2),
        "outputs_equal": None if name == REFERENCE else _equal(got.turns, reference),
        "connector_ms_model_thread": model_thread,
    }
    turns = sorted({t.turn for t in got.turns})
    details: dict[str, Any] = {
        "status": ArmStatus.OK.value,
        "prompt_tokens_by_source": {k: int(v) for k, v in sorted(sources.items())},
        "prompt_tokens": sum(t.prompt_tokens for t in got.turns),
        "reusable_tokens": reusable,
        "cached_tokens": int(cached),
        "metrics_settled": got.metrics_settled,
        "ttft_ms_p50_by_turn": [
            _p([r.ttft_ms for r in got.turns if r.turn == turn], 50) for turn in turns
        ],
        "connector_stats": stats,
    }
    return row, details


def tabulate(
    names: Sequence[str], runs: Mapping[str, OffloadRun], failed: Mapping[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows, in ``names`` order, and the details by arm."""
    reference = runs.get(REFERENCE)
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    for name in names:
        if name in runs:
            row, details[name] = summarize(name, runs[name], reference)
        else:
            row = failed[name]
            details[name] = {"status": row["status"], "reason": row["reason"]}
        rows.append(row)
    return rows, details


def failed_row(name: str, status: ArmStatus, reason: str) -> dict[str, Any]:
    """The row of an arm that did not run: every figure ``null``, and why."""
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row["arm"] = name
    row["status"] = status.value
    row["reason"] = reason
    return row


def goals(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each goal with its measured figure (``null`` when unmeasured) and whether it is met."""
    out: dict[str, dict[str, Any]] = {}
    for goal in GOALS:
        value: float | None = rows.get(GOAL_ARM, {}).get(goal.figure)
        if goal.base_arm is not None:
            base = rows.get(goal.base_arm, {}).get(goal.figure)
            value = round(value / base, 3) if value is not None and base else None
        entry: dict[str, Any] = {"measured": value}
        if goal.at_least is not None:
            entry["at_least"] = goal.at_least
        if goal.at_most is not None:
            entry["at_most"] = goal.at_most
        entry["met"] = value is not None and _within(value, goal)
        out[goal.name] = entry
    return out


def _within(value: float, goal: Goal) -> bool:
    above = goal.at_least is None or value >= goal.at_least
    below = goal.at_most is None or value <= goal.at_most
    return above and below


def describe_workload(
    workload: ChatWorkload, g1_blocks: int, arms: Sequence[Arm]
) -> dict[str, Any]:
    """The ``workload`` object: sizes, tiers, and how the figures were taken."""
    shape = workload.shape
    return {
        "preset": workload.preset,
        "conversations": shape.num_conversations,
        "turns": shape.num_turns,
        "system_tokens": shape.system_tokens,
        "user_tokens": shape.user_tokens,
        "max_tokens": shape.max_tokens,
        "requests": shape.num_conversations * shape.num_turns,
        "prompt_tokens_min": shape.prompt_tokens(0),
        "prompt_tokens_max": shape.max_prompt_tokens,
        "block_size": BLOCK_SIZE,
        "g1_blocks": g1_blocks,
        "workload_blocks": shape.num_workload_blocks,
        "g1_fraction_of_workload": round(g1_blocks / shape.num_workload_blocks, 3),
        "order": "round-robin: turn 1 of every conversation, then turn 2, ...",
        "prompts": "token ids uniform in [2, vocab): system prompt + earlier user messages and "
        "the arm's own answers + a new user message",
        "sampling": "greedy, ignore_eos",
        "engine": "vLLM OpenAI server, float32, enforce_eager, "
        f"max_model_len = max_num_batched_tokens = {MAX_MODEL_LEN}, "
        f"--num-gpu-blocks-override {g1_blocks} (VLLM_CPU_KVCACHE_SPACE={KV_CACHE_GIB} GiB), "
        f"one server at a time on cpu {DECODE_CPU}, one OMP thread",
        "warmup_requests_per_server": 1,
        "ttft": "client clock: request sent to first streamed token",
        "total_s": "wall time of every measured request, one after another",
        "hit_rate": "vLLM's prompt_tokens_by_source: (all sources but local_compute) / "
        "reusable prefix tokens (whole blocks an earlier request computed, last token excluded)",
        "connector_ms_model_thread": "the fabric worker's save_ms_model_thread + "
        "load_ms_model_thread over the server's life, warm-up included (its first copy loads "
        "the block copy kernel)",
        "kv_transfer_config": {arm.name: arm.first for arm in arms},
    }
