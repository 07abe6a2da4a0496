"""A frontend one client cannot stall: size limits, bad input, admission control, disconnects.

Against fake workers over real HTTP. Timings decide nothing here but gross bounds: behaviour is
asserted instead (a 413 that arrives though the body was never sent, ``/health`` answering while
a tokenization is blocked on an Event, a queued request served once its worker is released).
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from frontend_fakes import FakeWorker, RunningFrontend, register, wait_until

from fabric.discovery.records import Endpoints
from fabric.discovery.registry import Registry, Role
from fabric.errors import ConfigError
from fabric.frontend import cli
from fabric.frontend.errors import NO_WORKERS_RETRY_AFTER_S
from fabric.frontend.generation import FrontendSettings

MakeWorker = Callable[..., FakeWorker]
StartFrontend = Callable[..., RunningFrontend]
GROSS_S = 10.0  # the only timing bound: "answered at all, not after a timeout"


def settings(**overrides: Any) -> FrontendSettings:
    return FrontendSettings(**{"idle_timeout_s": 5.0, "request_timeout_s": 30.0, **overrides})


def completion(
    running: RunningFrontend, body: dict[str, object], timeout: float = GROSS_S
) -> httpx.Response:
    return httpx.post(f"{running.url}/v1/completions", json=body, timeout=timeout)


def serve(
    make_worker: MakeWorker, start_frontend: StartFrontend, **overrides: Any
) -> tuple[FakeWorker, RunningFrontend]:
    worker = make_worker("decode-a")
    running = start_frontend(settings(**overrides))
    assert wait_until(lambda: httpx.get(f"{running.url}/health").status_code == 200)
    return worker, running


def metric(running: RunningFrontend, line_prefix: str) -> float:
    text = httpx.get(f"{running.url}/metrics").text
    lines = [line for line in text.splitlines() if line.startswith(line_prefix + " ")]
    assert lines, f"no {line_prefix} in /metrics"
    return float(lines[0].rsplit(" ", 1)[1])


def refusals(running: RunningFrontend, reason: str) -> float:
    return metric(running, f'fabric_frontend_refusals_total{{reason="{reason}"}}')


def raw_exchange(running: RunningFrontend, head: bytes, body: bytes) -> bytes:
    """Send a request head and part of a body on a raw socket; the response, read until the
    server closes the connection (a refusal says ``Connection: close``)."""
    url = urlsplit(running.url)
    assert url.hostname is not None and url.port is not None
    answer = b""
    with socket.create_connection((url.hostname, url.port), timeout=GROSS_S) as sock:
        sock.sendall(head + body)
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


# -- size limits ------------------------------------------------------------------------------


def test_a_20_mb_body_is_a_413_naming_the_limit_and_health_is_unaffected(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    _, running = serve(make_worker, start_frontend)
    body = json.dumps({"model": "tiny", "prompt": "x" * 20_000_000}).encode()
    started = time.monotonic()
    response = httpx.post(
        f"{running.url}/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=GROSS_S,
    )
    assert time.monotonic() - started < GROSS_S
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "body_too_large"
    assert "4194304" in error["message"] and "--max-body-bytes" in error["message"]
    assert httpx.get(f"{running.url}/health", timeout=GROSS_S).status_code == 200
    assert refusals(running, "body_too_large") == 1
    assert (
        metric(running, 'fabric_frontend_request_errors_total{endpoint="completions",status="413"}')
        == 1
    )


def test_a_declared_oversized_body_is_refused_before_it_is_sent(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    _, running = serve(make_worker, start_frontend, max_body_bytes=1000)
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: fabric\r\n"
        b"Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n"
    )
    answer = raw_exchange(running, head, b'{"model": "tiny", "prompt": "')  # and no more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"1000 (--max-body-bytes)" in answer


def test_a_chunked_body_is_refused_once_it_passes_the_limit(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    _, running = serve(make_worker, start_frontend, max_body_bytes=1000)
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: fabric\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 1500
    answer = raw_exchange(running, head, b"%x\r\n%s\r\n" % (len(chunk), chunk))  # never ended
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"more than 1000 bytes" in answer


def test_a_body_of_many_json_values_is_refused_before_parsing(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    _, running = serve(make_worker, start_frontend, max_prompt_tokens=100)  # 4 * 100 + 1024
    response = completion(running, {"model": "tiny", "prompt": [[1]] * 1000})
    assert response.status_code == 413, response.text
    assert "more than 1424 JSON values" in response.json()["error"]["message"]
    brackets_in_a_string = {"model": "tiny", "prompt": "x", "user": "[,{" * 1000}
    assert completion(running, brackets_in_a_string).status_code == 200  # strings do not count


def test_a_prompt_over_the_limit_is_a_413_and_too_long_a_text_is_never_tokenized(
    make_worker: MakeWorker,
    start_frontend: StartFrontend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, running = serve(make_worker, start_frontend, max_prompt_tokens=64)
    codec = running.frontend.codec
    too_many_tokens = " x" * 100
    num_tokens = len(codec.encode(too_many_tokens))
    assert 64 < num_tokens <= len(too_many_tokens)
    tokenized: list[int] = []
    encode = codec.encode

    def counting_encode(text: str) -> list[int]:
        tokenized.append(len(text))
        return encode(text)

    monkeypatch.setattr(codec, "encode", counting_encode)
    too_many_chars = "a" * (64 * codec.max_token_chars + 1)
    response = completion(running, {"model": "tiny", "prompt": too_many_chars})
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "prompt_too_large")
    assert "64 prompt tokens" in error["message"] and "--max-prompt-tokens" in error["message"]
    assert tokenized == []
    response = completion(running, {"model": "tiny", "prompt": too_many_tokens})
    assert response.status_code == 413
    assert f"{num_tokens} tokens" in response.json()["error"]["message"]
    assert tokenized == [len(too_many_tokens)]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": too_many_tokens}]}
    response = httpx.post(f"{running.url}/v1/chat/completions", json=chat, timeout=GROSS_S)
    assert response.status_code == 413 and response.json()["error"]["param"] == "messages"
    ids = completion(running, {"model": "tiny", "prompt": [5] * 65})
    assert ids.status_code == 413 and "65 tokens" in ids.json()["error"]["message"]
    assert refusals(running, "prompt_too_large") == 4
    assert completion(running, {"model": "tiny", "prompt": [5] * 64, "max_tokens": 2}).is_success


def test_the_default_prompt_limit_is_the_models_context(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    _, running = serve(make_worker, start_frontend)
    assert running.frontend.prompt_limit.max_tokens == running.frontend.codec.max_model_len == 4096


def test_health_answers_while_a_prompt_is_tokenized(
    make_worker: MakeWorker,
    start_frontend: StartFrontend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, running = serve(make_worker, start_frontend)
    codec = running.frontend.codec
    entered, release = threading.Event(), threading.Event()
    encode = codec.encode

    def blocked_encode(text: str) -> list[int]:
        entered.set()
        release.wait(GROSS_S)
        return encode(text)

    monkeypatch.setattr(codec, "encode", blocked_encode)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(completion, running, {"model": "tiny", "prompt": "Hello"})
        try:
            assert entered.wait(GROSS_S), "the prompt never reached the tokenizer"
            health = httpx.get(f"{running.url}/health", timeout=GROSS_S)
            assert health.status_code == 200  # the event loop is free while encode is blocked
            assert metric(running, "fabric_frontend_queued") == 1
        finally:
            release.set()
        assert pending.result().status_code == 200
    assert metric(running, "fabric_frontend_queued") == 0


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
        ("completions", b'{"model": "tiny", "prompt": ["\\udc00"]}', "prompt"),
        ("completions", b'{"model": "\\ud800", "prompt": "x"}', "model"),
        (
            "chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}',
            "messages.0.content",
        ),
        (
            "chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": '
            b'[{"type": "text", "text": "\\ud83d"}]}]}',
            "messages.0.content",
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    make_worker: MakeWorker, start_frontend: StartFrontend, path: str, raw: bytes, param: str
) -> None:
    _, running = serve(make_worker, start_frontend)
    response = httpx.post(
        f"{running.url}/v1/{path}",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=GROSS_S,
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "tiny", "prompt": "a\xff\xfeb"}',  # not UTF-8
        b'{"model": "tiny", "prompt": "x"',  # truncated
        b"[]",
        b"null",
        b'"text"',
        b'{"model": "tiny", "prompt": {"text": "x"}}',
        b'{"model": "tiny", "prompt": "x", "max_tokens": "many"}',
        b'{"model": "tiny", "prompt": "x", "max_tokens": 1e400}',
        b'{"model": "tiny", "prompt": "x", "seed": 100000000000000000000000}',
        b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
        b'{"model": "tiny", "prompt": [1, 2.5]}',
        b'{"model": "tiny", "prompt": [100000000000000000000000]}',
        b'{"model": 7, "prompt": "x"}',
        b'{"model": "tiny", "prompt": "x", "fabric": {"worker": ""}}',
    ],
)
def test_bad_bodies_are_400_json(
    make_worker: MakeWorker, start_frontend: StartFrontend, raw: bytes
) -> None:
    _, running = serve(make_worker, start_frontend)
    response = httpx.post(
        f"{running.url}/v1/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=GROSS_S,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_an_unexpected_failure_is_a_500_json(
    make_worker: MakeWorker,
    start_frontend: StartFrontend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, running = serve(make_worker, start_frontend)

    def broken_encode(text: str) -> list[int]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(running.frontend.codec, "encode", broken_encode)
    response = completion(running, {"model": "tiny", "prompt": "Hello"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error" and "RuntimeError" in error["message"]
    assert metric(running, "fabric_frontend_queued") == 0
    monkeypatch.undo()
    assert completion(running, {"model": "tiny", "prompt": "Hello"}).status_code == 200


# -- admission control ------------------------------------------------------------------------


def test_a_saturating_burst_is_served_or_refused_never_timed_out(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    worker, running = serve(
        make_worker,
        start_frontend,
        max_in_flight_per_worker=2,
        max_queued=4,
        queue_timeout_s=0.5,
    )
    worker.token_delay_s = 0.05  # about 0.3 s per request

    def timed_request(_: int) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = completion(running, {"model": "tiny", "prompt": "Hello"}, timeout=30.0)
        return response, time.monotonic() - started

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(timed_request, range(24)))
    statuses = sorted(response.status_code for response, _ in results)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    for response, took in results:
        assert took < GROSS_S
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
    assert worker.max_active <= 2
    refused = refusals(running, "queue_full") + refusals(running, "no_room")
    assert refused == statuses.count(429)
    fleet = running.frontend.router.fleet
    assert wait_until(lambda: fleet.in_flight()["decode-a"][1] == 0)
    assert running.frontend.admission.num_queued == 0


def test_a_queued_request_is_sent_once_its_worker_has_room_and_a_full_queue_refuses(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    worker, running = serve(
        make_worker,
        start_frontend,
        max_in_flight_per_worker=1,
        max_queued=1,
        queue_timeout_s=GROSS_S,
    )
    worker.gate.clear()
    body = {"model": "tiny", "prompt": "Hello"}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(completion, running, body, 30.0)
        first_id = worker.next_request().request_id
        second = pool.submit(completion, running, body, 30.0)
        assert wait_until(lambda: running.frontend.admission.num_queued == 1)
        refused = completion(running, body)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == str(int(GROSS_S))
        assert "--max-queued" in refused.json()["error"]["message"]
        assert worker.requests.empty()  # the queued one waits in the frontend, not the worker
        worker.gate.set()
        assert first.result().status_code == 200
        assert second.result().status_code == 200
    assert worker.next_request().request_id != first_id
    assert worker.max_active == 1
    assert refusals(running, "queue_full") == 1


def test_no_room_in_time_is_a_429_and_a_full_worker_is_skipped(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    busy = make_worker("decode-a")
    idle = make_worker("decode-b")
    running = start_frontend(settings(max_in_flight_per_worker=1, queue_timeout_s=0.3))
    fleet = running.frontend.router.fleet
    assert wait_until(lambda: fleet.count_by_role()[Role.DECODE] == 2)
    busy.gate.clear()
    body: dict[str, object] = {"model": "tiny", "prompt": "Hello"}
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(completion, running, body, 30.0)
        busy.next_request()  # decode-a (the smallest id) holds it
        pinned = completion(running, {**body, "fabric": {"worker": "decode-a"}})
        assert pinned.status_code == 429, pinned.text
        assert pinned.headers["retry-after"] == "1"
        message = pinned.json()["error"]["message"]
        assert "decode-a" in message and "--max-in-flight-per-worker" in message
        routed = completion(running, body)  # decode-a is full: decode-b takes it
        assert routed.status_code == 200
        assert routed.json()["fabric"]["worker"] == "decode-b"
        busy.gate.set()
        assert held.result().status_code == 200
    assert idle.next_request()
    assert refusals(running, "no_room") == 1


def test_no_workers_is_a_503_with_retry_after(start_frontend: StartFrontend) -> None:
    running = start_frontend()
    response = completion(running, {"model": "tiny", "prompt": "Hello"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == str(NO_WORKERS_RETRY_AFTER_S)
    assert refusals(running, "no_workers") == 1


# -- disconnects ------------------------------------------------------------------------------


def test_a_client_gone_while_queued_is_never_sent(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    worker, running = serve(
        make_worker, start_frontend, max_in_flight_per_worker=1, queue_timeout_s=30.0
    )
    worker.gate.clear()
    body = {"model": "tiny", "prompt": "Hello"}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(completion, running, body, 30.0)
        worker.next_request()
        with pytest.raises(httpx.ReadTimeout):
            completion(running, body, timeout=0.3)
        admission = running.frontend.admission
        assert wait_until(lambda: admission.num_queued == 0)  # long before its 30 s timeout
        worker.gate.set()
        assert first.result().status_code == 200
    last = completion(running, body)
    assert last.status_code == 200
    assert worker.next_request().request_id == last.json()["id"]  # nothing in between
    assert worker.requests.empty()


def test_a_client_gone_before_its_prefill_finished_aborts_it_on_both_workers(
    make_worker: MakeWorker, start_frontend: StartFrontend, registry: Registry
) -> None:
    worker = make_worker("decode-a")
    prefill = register(registry, "prefill-1", Role.PREFILL, Endpoints())
    try:
        running = start_frontend()
        fleet = running.frontend.router.fleet
        assert wait_until(lambda: fleet.count_by_role()[Role.PREFILL] == 1)
        worker.gate.clear()  # the decode worker waits for the prefill: no token yet
        with pytest.raises(httpx.ReadTimeout):
            completion(running, {"model": "tiny", "prompt": "Hello"}, timeout=0.3)
        request = worker.next_request()
        assert request.prefill_worker == "prefill-1"
        # The decode worker passes Abort on to the prefill worker (fabric.worker.generation).
        assert worker.next_abort().request_id == request.request_id
        assert wait_until(lambda: [count for _, count in fleet.in_flight().values()] == [0, 0]), (
            fleet.in_flight()
        )
    finally:
        worker.gate.set()
        prefill.close()


# -- configuration ----------------------------------------------------------------------------


def test_every_limit_is_a_flag_and_out_of_range_values_are_refused() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    flags = [
        "--max-body-bytes=1000",
        "--max-prompt-tokens=64",
        "--max-in-flight-per-worker=3",
        "--max-queued=5",
        "--queue-timeout=0.5",
        "--tokenizer-threads=1",
    ]
    args = parser.parse_args(flags)
    assert (args.max_body_bytes, args.max_prompt_tokens, args.max_in_flight_per_worker) == (
        1000,
        64,
        3,
    )
    assert (args.max_queued, args.queue_timeout, args.tokenizer_threads) == (5, 0.5, 1)
    assert parser.parse_args([]).max_prompt_tokens is None  # the model's context
    with pytest.raises(ConfigError, match="max_body_bytes"):
        cli.run(parser.parse_args(["--max-body-bytes=0"]))
    with pytest.raises(ConfigError, match="max_queued"):
        FrontendSettings(max_queued=0)
