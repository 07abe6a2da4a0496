"""The figures of ``bench vllm``: one row per arm, the headline keys, the ratios to the goals.

Invariants: figures are only ever measured ones (an arm that did not run has ``null`` figures
and its reason under ``errors``); ``outputs_equal`` compares completion token ids prompt by
prompt with the reference arm; ``kv_from_connector`` comes from vLLM's own counters on the
answering server, never from the client.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from fabric.bench.vs_vllm.arms import (
    DECODE_CPU,
    MAX_MODEL_LEN,
    PREFILL_CPU,
    REFERENCE,
    Arm,
    ArmKind,
    Workload,
)
from fabric.bench.vs_vllm.runner import ArmRun, Reply
from fabric.bench.vs_vllm.servers import KV_CACHE_GIB, vllm_version

GOALS = {"fabric_pd_vs_nixl_connector": 0.6, "fabric_hit_vs_example_connector": 1.0}
"""Upper bounds the fabric's ratios should stay under (issue 6)."""
HEADLINE_ARMS = ("fabric_pd", "nixl_connector_pd", "fabric_hit", "example_connector_hit")
"""The arms behind the headline keys, ``<name>_ttft_ms_p50``."""
CONNECTOR_SOURCE = "external_kv_transfer"
"""The ``vllm:prompt_tokens_by_source`` label of prompt tokens a KV connector supplied."""


class ArmStatus(Enum):
    OK = "ok"
    ERROR = "error"
    UNAVAILABLE = "unavailable"


def _p(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values, dtype=float), q)), 1)


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value is not None and base else None


def _fraction(tokens_by_source: Mapping[str, float], source: str) -> float | None:
    total = sum(tokens_by_source.values())
    return round(tokens_by_source.get(source, 0.0) / total, 3) if total else None


def _equal(replies: Sequence[Reply], reference: ArmRun | None) -> bool | None:
    if reference is None:
        return None
    return [r.token_ids for r in replies] == [r.token_ids for r in reference.replies]


def summarize(arm: Arm, got: ArmRun, reference: ArmRun | None) -> dict[str, Any]:
    """One arm's figures (the package docstring lists them)."""
    ttfts = [r.ttft_ms for r in got.replies]
    base = [r.ttft_ms for r in reference.replies] if reference else []
    row: dict[str, Any] = {
        "status": ArmStatus.OK.value,
        "ttft_ms_p50": _p(ttfts, 50),
        "ttft_ms_p90": _p(ttfts, 90),
        "ttft_ms": [round(t, 1) for t in ttfts],
        "ttft_vs_aggregated": _ratio(_p(ttfts, 50), _p(base, 50)),
        "outputs_equal": None if arm is REFERENCE else _equal(got.replies, reference),
        "prompt_tokens_by_source": {k: int(v) for k, v in sorted(got.tokens_by_source.items())},
        "kv_from_connector": _fraction(got.tokens_by_source, CONNECTOR_SOURCE),
    }
    if arm.kind is ArmKind.PD:
        row["prefill_request_ms_p50"] = _p([r.prefill_ms or 0.0 for r in got.replies], 50)
        row["decode_ttft_ms_p50"] = _p([r.decode_ttft_ms or 0.0 for r in got.replies], 50)
        row["cpus"] = {"prefill": PREFILL_CPU, "decode": DECODE_CPU}
        row["kv_transfer_config"] = {"prefill": arm.first, "decode": arm.second}
    elif arm.kind is ArmKind.HIT:
        stored = [r.ttft_ms for r in got.first_replies]
        row["store_ttft_ms_p50"] = _p(stored, 50)
        row["store_ttft_ms_p90"] = _p(stored, 90)
        row["hit_vs_store"] = _ratio(_p(ttfts, 50), _p(stored, 50))
        row["store_outputs_equal"] = _equal(got.first_replies, reference)
        if row["outputs_equal"] is not None and row["store_outputs_equal"] is not None:
            row["outputs_equal"] = row["outputs_equal"] and row["store_outputs_equal"]
        row["cpus"] = {"store": DECODE_CPU, "hit": DECODE_CPU}
        row["kv_transfer_config"] = {"store": arm.first, "hit": arm.second}
    else:
        row["cpus"] = {"server": DECODE_CPU}
    return row


def report(
    arms: Sequence[Arm], results: Mapping[str, dict[str, Any]], workload: Workload
) -> dict[str, Any]:
    """The printed JSON but ``machine``: headline keys first, then per-arm detail, workload."""
    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in HEADLINE_ARMS:
        row = results.get(name)
        out[f"{name}_ttft_ms_p50"] = row.get("ttft_ms_p50") if row else None
        if row is None:
            errors[name] = "not run (not in --arms)"
        elif row["status"] != ArmStatus.OK.value:
            errors[name] = f"{row['status']}: {row['error']}"
    if results.get(REFERENCE.name, {}).get("status") != ArmStatus.OK.value:
        errors[REFERENCE.name] = str(results.get(REFERENCE.name, {}).get("error"))
    warnings = {
        name: f"no prompt token came through the connector ({CONNECTOR_SOURCE} = 0): its "
        "TTFT measures local recompute, not the connector"
        for name, row in results.items()
        if name != REFERENCE.name and row.get("status") == ArmStatus.OK.value
        if not row.get("kv_from_connector")
    }
    compared = [
        r["outputs_equal"]
        for name, r in results.items()
        if name != REFERENCE.name and r.get("status") == ArmStatus.OK.value
    ]
    out["outputs_equal"] = (
        None if not compared or any(c is None for c in compared) else all(compared)
    )
    pairs = {
        "fabric_pd_vs_nixl_connector": ("fabric_pd", "nixl_connector_pd"),
        "fabric_hit_vs_example_connector": ("fabric_hit", "example_connector_hit"),
    }
    for key, (ours, theirs) in pairs.items():
        out[key] = _ratio(out[f"{ours}_ttft_ms_p50"], out[f"{theirs}_ttft_ms_p50"])
    out["goals"] = {
        key: {"at_most": bound, "met": None if out[key] is None else out[key] <= bound}
        for key, bound in GOALS.items()
    }
    out["aggregated_ttft_ms_p50"] = results.get(REFERENCE.name, {}).get("ttft_ms_p50")
    out["errors"] = errors
    out["warnings"] = warnings
    out["arms"] = {arm.name: results.get(arm.name) for arm in arms}
    out["workload"] = {
        "preset": workload.preset,
        "prompt_tokens": len(workload.prompts[0]),
        "requests": len(workload.prompts),
        "max_tokens": workload.max_tokens,
        "warmup_requests_per_server": 1,
        "prompts": "token ids, uniform in [2, vocab), distinct per request, same per arm",
        "sampling": "greedy, ignore_eos",
        "engine": f"vLLM OpenAI server, float32, enforce_eager, block size 128 (CPU default), "
        f"max_model_len = max_num_batched_tokens = {MAX_MODEL_LEN}, "
        f"VLLM_CPU_KVCACHE_SPACE={KV_CACHE_GIB} GiB, one OMP thread per server",
        "ttft": "client clock: send to first streamed token (P/D: prefill request + decode)",
        "outputs_compared": "completion token ids per prompt vs the aggregated arm",
    }
    return out


def machine(python: Path, load_before: tuple[float, float, float], run_dir: Path) -> dict[str, Any]:
    """What the figures ran on."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "vllm_python": str(python),
        "vllm_version": vllm_version(python),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "run_dir": str(run_dir),
    }
