"""``python -m fabric.bench vllm-offload``: the workload's arithmetic, the goals, and (slow) the
whole benchmark at a tiny size: JSON shape, every arm run, equal outputs, hit-rate sanity; never
timings.

The slow test runs real vLLM-CPU servers one after another (vLLM alone, the ExampleConnector,
the fabric's connector with G2, G2 + G3 and G4) on the tiny preset: 4 conversations x 3 turns
of 512-token messages, G1 at vLLM's minimum of 32 blocks (the conversations fill 60). The
benchmark stops its servers itself; this test stops the benchmark (SIGTERM, which it turns into
a clean shutdown, then SIGKILL) if it overruns.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fabric.bench.vllm_offload.arms import ARM_NAMES, FABRIC_ARMS, build_arms
from fabric.bench.vllm_offload.report import ROW_KEYS, goals
from fabric.bench.vllm_offload.workload import BLOCK_SIZE, ChatShape, PrefixHistory

BENCH_TIMEOUT_S = 1200.0
"""Five vLLM server start-ups of about 30-60 s each, and the setup of .venv-vllm if missing."""
CONVERSATIONS, TURNS = 4, 3


# -- the workload and the goals (fast) ----------------------------------------------------------


def test_shape_sizes_prompts_and_the_blocks_a_tier_needs() -> None:
    shape = ChatShape(16, 6, 512, 512, 16)
    assert shape.prompt_tokens(0) == 1024
    assert shape.max_prompt_tokens == 512 + 6 * 512 + 5 * 16
    assert shape.request_blocks == -(-(shape.max_prompt_tokens + 16) // BLOCK_SIZE)
    # system prompt once, each conversation's own full blocks, the warm-up's
    final = (shape.max_prompt_tokens + 15) // BLOCK_SIZE
    assert shape.num_workload_blocks == 4 + 16 * (final - 4) + (1024 + 15) // BLOCK_SIZE


def test_a_shape_longer_than_the_servers_model_length_is_refused() -> None:
    from fabric.errors import ConfigError

    with pytest.raises(ConfigError, match="max_model_len"):
        ChatShape(2, 8, 512, 512, 16)


def test_reusable_prefix_is_whole_blocks_an_earlier_request_computed() -> None:
    history = PrefixHistory(block_size=4)
    system = list(range(100, 106))  # 6 tokens: one whole block
    first = [*system, 1, 2, 3]
    assert history.reusable(first) == 0  # nothing ran yet
    history.add(first, [7, 8, 9])  # KV of first + 7, 8 (the last answer token is never fed)
    assert history.reusable([*system, 50, 51, 52]) == 4  # the system prompt's whole block
    second = [*first, 7, 8, 9, 60, 61]
    assert history.reusable(second) == 8  # 11 tokens shared, whole blocks: 8
    assert history.reusable([*first, 7, 8]) == 8  # never the last prompt token: 10 -> 8


def test_the_arms_configs_size_the_tiers_from_the_workload() -> None:
    arms = {arm.name: arm for arm in build_arms(100, {"X": "1"})}
    assert tuple(arms) == ARM_NAMES
    assert arms["vllm"].first is None
    assert arms["example_connector"].first is not None
    extra = {
        name: dict(arms[name].first or {})["kv_connector_extra_config"] for name in FABRIC_ARMS
    }
    assert extra["fabric_g2"] == {"cpu_cache_blocks": 100}
    assert extra["fabric_g2_g3"]["cpu_cache_blocks"] == 50
    assert extra["fabric_g2_g3"]["disk_cache_blocks"] == 100
    assert extra["fabric_g4"] == {"disk_path": "{store_dir}"}
    for name in FABRIC_ARMS:
        assert dict(arms[name].first or {})["kv_load_failure_policy"] == "recompute"
        assert arms[name].needs_module is not None
    assert all(arm.env == {"X": "1"} for arm in arms.values())


def test_goals_report_the_measured_ratio_and_an_unmeasured_goal_is_not_met() -> None:
    rows = {
        "vllm": {"ttft_ms_p50": 200.0, "total_s": 10.0},
        "example_connector": {"ttft_ms_p50": 210.0, "total_s": 20.0},
        "fabric_g2": {"hit_rate": 1.0, "ttft_ms_p50": 50.0, "total_s": 18.0},
    }
    got = goals(rows)
    assert got["fabric_g2_hit_rate"] == {"measured": 1.0, "at_least": 0.99, "met": True}
    assert got["fabric_g2_ttft_p50_vs_vllm"] == {"measured": 0.25, "at_most": 0.3, "met": True}
    assert got["fabric_g2_total_s_vs_example_connector"]["measured"] == 0.9
    assert got["fabric_g2_total_s_vs_example_connector"]["met"] is False
    missing = goals({"vllm": rows["vllm"]})
    assert all(g["measured"] is None and g["met"] is False for g in missing.values())


# -- the benchmark end to end (slow) ----------------------------------------------------------


def _run_bench(json_out: Path) -> tuple[int, str, str]:
    cmd = [sys.executable, "-m", "fabric.bench", "vllm-offload", "--preset", "tiny"]
    cmd += ["--conversations", str(CONVERSATIONS), "--turns", str(TURNS)]
    cmd += ["--system-tokens", "512", "--user-tokens", "512", "--max-tokens", "8"]
    cmd += ["--json-out", str(json_out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the benchmark stops its servers on SIGTERM
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"bench vllm-offload took over {BENCH_TIMEOUT_S:.0f} s; stderr:\n{err[-3000:]}")
    return proc.returncode, out, err


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.timeout(BENCH_TIMEOUT_S + 120)
def test_vllm_offload_bench_tiny(tmp_path: Path) -> None:
    json_out = tmp_path / "bench.json"
    code, out, err = _run_bench(json_out)
    assert code == 0, err[-3000:]
    result = json.loads(out)
    assert json.loads(json_out.read_text()) == result
    assert {"rows", "goals", "workload", "machine"} <= set(result)
    workload = result["workload"]
    assert workload["conversations"] == CONVERSATIONS and workload["turns"] == TURNS
    assert workload["requests"] == CONVERSATIONS * TURNS
    assert workload["g1_blocks"] < workload["workload_blocks"]  # G1 holds only a fraction
    assert result["machine"]["cpus"] >= 2

    rows = {row["arm"]: row for row in result["rows"]}
    assert list(rows) == list(ARM_NAMES)
    for name, row in rows.items():
        assert tuple(row) == ROW_KEYS, (name, row)  # every arm ran: no status / reason keys
        for key in ("ttft_ms_p50", "ttft_ms_p90", "total_s"):
            assert _positive(row[key]), (name, key, row)
        assert 0.0 <= row["hit_rate"] <= 1.0, (name, row)
        details = result["details"][name]
        assert details["status"] == "ok" and details["metrics_settled"], (name, details)
        assert details["cached_tokens"] <= details["reusable_tokens"], (name, details)
        if name == "vllm":
            assert row["outputs_equal"] is None
        else:
            assert row["outputs_equal"] is True, (name, row)
        if name in FABRIC_ARMS:  # the worker's stats line was found in the server log
            assert _positive(row["connector_ms_model_thread"]), (name, row)
        else:
            assert row["connector_ms_model_thread"] is None, (name, row)

    # G1 alone loses the conversations between turns; a host tier that holds them all does not.
    assert rows["vllm"]["hit_rate"] < rows["fabric_g2"]["hit_rate"]
    assert rows["fabric_g2"]["hit_rate"] >= 0.99
    assert rows["fabric_g4"]["hit_rate"] > rows["vllm"]["hit_rate"]
    by_source = result["details"]["fabric_g2"]["prompt_tokens_by_source"]
    assert by_source["external_kv_transfer"] > 0  # the hits came through the connector
    assert result["details"]["vllm"]["prompt_tokens_by_source"]["external_kv_transfer"] == 0

    for goal in result["goals"].values():
        assert isinstance(goal["met"], bool) and goal["measured"] is not None, goal
