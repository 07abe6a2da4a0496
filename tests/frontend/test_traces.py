"""Per-request KV traces on the frontend: the response's ``fabric.kv_trace`` decoded from the
worker's statistics, ``GET /v1/requests/{id}`` (the same content, bounded, 404 with a reason,
behind the API key) and the one log line per request."""

from __future__ import annotations

import logging
from collections.abc import Callable

import frontend_fakes
import httpx
import openai
import pytest
from frontend_fakes import FakeWorker, RunningFrontend, wait_until

from fabric.frontend.api_key import ApiKey
from fabric.frontend.protocol import KvTraceInfo
from fabric.frontend.traces import TraceLog, kv_trace_view

KEY = "trace-key-0123456789"
WORKER_TRACE = "host:0-16,prefill:16-20"


def test_view_names_the_source_worker_and_sums_the_queues() -> None:
    stats = {
        "kv_trace": WORKER_TRACE,
        "prefill_worker": "prefill-1",
        "queue_ms": 2.0,
        "onboard_ms": 0.5,
        "kv_transfer_ms": 1.5,
        "kv_wait_ms": 0.25,
        "prefill_ms": 7.0,
        "fallback": "",
    }
    view = kv_trace_view(stats, route_ms=0.25, frontend_queue_ms=1.0, first_token_ms=12.0)
    assert [(s.source, s.start, s.end, s.worker) for s in view.segments] == [
        ("host", 0, 16, ""),
        ("prefill", 16, 20, "prefill-1"),
    ]
    assert view.steps_ms == {
        "route": 0.25,
        "queue": 3.0,
        "onboard": 0.5,
        "transfer": 1.5,
        "transfer_wait": 0.25,
        "prefill": 7.0,
        "first_token": 12.0,
    }


def test_view_of_a_worker_without_a_trace_or_with_a_bad_one_is_empty(
    caplog: pytest.LogCaptureFixture,
) -> None:
    view = kv_trace_view({}, route_ms=0.0, frontend_queue_ms=0.0, first_token_ms=None)
    assert view.segments == [] and view.fallback == "" and view.steps_ms["first_token"] == 0.0
    with caplog.at_level(logging.WARNING, logger="fabric.frontend.traces"):
        bad = kv_trace_view(
            {"kv_trace": "gpu:0-4"}, route_ms=0.0, frontend_queue_ms=0.0, first_token_ms=None
        )
    assert bad.segments == []
    assert "unreadable kv_trace" in caplog.text


def test_log_keeps_the_last_requests_and_logs_each_once(caplog: pytest.LogCaptureFixture) -> None:
    log = TraceLog(capacity=2)
    trace = KvTraceInfo(segments=[], steps_ms={}, fallback="prefill worker 'p' timed out")
    with caplog.at_level(logging.INFO, logger="fabric.frontend.traces"):
        log.record("a", {"worker": "w"})  # DEBUG: nothing notable
        log.record("b", {"worker": "w", "kv_trace": trace})  # INFO: a fallback
        log.record("c", {"worker": "w", "error": "boom"})  # INFO: failed
    assert len(log) == 2 and log.get("a") is None
    b = log.get("b")
    assert b is not None and b["kv_trace"]["fallback"] == "prefill worker 'p' timed out"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("request b kv: ") and "timed out" in lines[0]
    assert lines[1].startswith("request c kv: ") and "boom" in lines[1]
    with pytest.raises(ValueError, match="at least 1"):
        TraceLog(capacity=0)


@pytest.fixture
def traced(
    make_worker: Callable[..., FakeWorker],
    start_frontend: Callable[..., RunningFrontend],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[RunningFrontend, FakeWorker]:
    """A frontend behind an API key over a fake worker whose statistics carry a KV trace."""
    monkeypatch.setitem(frontend_fakes.STATS, "kv_trace", WORKER_TRACE)
    monkeypatch.setitem(frontend_fakes.STATS, "prefill_worker", "prefill-1")
    worker = make_worker("decode-0")
    running = start_frontend(api_key=ApiKey(KEY))
    assert wait_until(lambda: len(running.frontend.router.fleet.workers()) == 1)
    return running, worker


def test_response_and_requests_route_show_the_trace(
    traced: tuple[RunningFrontend, FakeWorker],
) -> None:
    running, _ = traced
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)
    completion = client.completions.create(model="tiny", prompt="hello", max_tokens=4)
    fabric = (completion.model_extra or {})["fabric"]
    trace = fabric["kv_trace"]
    assert [(s["source"], s["start"], s["end"], s["worker"]) for s in trace["segments"]] == [
        ("host", 0, 16, ""),
        ("prefill", 16, 20, "prefill-1"),
    ]
    steps = trace["steps_ms"]
    assert set(steps) == {
        "route",
        "queue",
        "onboard",
        "transfer",
        "transfer_wait",
        "prefill",
        "first_token",
    }
    assert all(value >= 0 for value in steps.values())

    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{running.url}/v1/requests/{completion.id}"
    shown = httpx.get(url, headers=auth, timeout=10)
    assert shown.status_code == 200, shown.text
    assert shown.json() == {"id": completion.id, "fabric": fabric}
    assert httpx.get(url, timeout=10).status_code == 401  # behind the key like /v1/*

    missing = httpx.get(f"{running.url}/v1/requests/cmpl-nope", headers=auth, timeout=10)
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "request_not_found" and "keeps the last" in error["message"]


def test_a_failed_request_is_kept_with_its_error(
    traced: tuple[RunningFrontend, FakeWorker],
) -> None:
    running, worker = traced
    worker.fail_with = "the worker broke"
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="tiny", prompt="hello", max_tokens=4)
    request_id = worker.next_request().request_id
    shown = httpx.get(
        f"{running.url}/v1/requests/{request_id}",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert shown.status_code == 200, shown.text
    fabric = shown.json()["fabric"]
    assert fabric["error"] == "the worker broke" and fabric["worker"] == "decode-0"
    assert fabric["kv_trace"]["segments"] == []
