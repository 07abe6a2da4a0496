"""The OpenAI-compatible API against fake workers: the official client, errors, lifecycle."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import httpx
import openai
import pytest
from frontend_fakes import ANSWER, STATS, FakeWorker, RunningFrontend, wait_until

from fabric.discovery.registry import Role
from fabric.frontend.generation import FrontendSettings
from fabric.frontend.tokenizer import TextCodec, render_chat

MakeWorker = Callable[..., FakeWorker]
StartFrontend = Callable[..., RunningFrontend]


def client(running: RunningFrontend) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=15.0
    )


def wait_healthy(running: RunningFrontend, healthy: bool = True) -> None:
    def check() -> bool:
        status = httpx.get(f"{running.url}/health", timeout=5.0).status_code
        return (status == 200) == healthy

    assert wait_until(check), f"/health never became {'200' if healthy else '503'}"


@pytest.fixture
def served(make_worker: MakeWorker, start_frontend: StartFrontend) -> RunningFrontend:
    make_worker("decode-a")
    running = start_frontend()
    wait_healthy(running)
    return running


def test_completion_with_the_openai_client(
    served: RunningFrontend, make_worker: MakeWorker, codec: TextCodec
) -> None:
    result = client(served).completions.create(model="tiny", prompt="Hello world", max_tokens=64)
    assert result.choices[0].text == ANSWER
    assert result.choices[0].finish_reason == "stop"
    prompt_ids = codec.encode("Hello world")
    answer_tokens = len(codec.encode(ANSWER)) + 1  # EOS counted, not shown
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == answer_tokens
    assert result.usage.total_tokens == len(prompt_ids) + answer_tokens
    fabric = (result.model_extra or {})["fabric"]
    assert fabric["decode_worker"] == "decode-a"
    assert fabric["prefill_worker"] == ""  # no prefill worker: the decode worker computes
    assert fabric["kv_transfer_ms"] == STATS["kv_transfer_ms"]


def test_completion_max_tokens_and_token_prompt(served: RunningFrontend, codec: TextCodec) -> None:
    result = client(served).completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2)
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].text == codec.decode(codec.encode(ANSWER)[:2])
    assert result.usage is not None and result.usage.prompt_tokens == 3


def test_streaming_completion_with_usage(served: RunningFrontend) -> None:
    stream = client(served).completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ANSWER
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_chat_with_the_openai_client(
    served: RunningFrontend, make_worker: MakeWorker, codec: TextCodec
) -> None:
    result = client(served).chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
        ],
        max_completion_tokens=64,
    )
    assert result.choices[0].message.content == ANSWER
    assert result.choices[0].message.role == "assistant"
    expected_prompt = codec.encode(render_chat([("system", "You are terse."), ("user", "Hi")]))
    assert result.usage is not None and result.usage.prompt_tokens == len(expected_prompt)


def test_streaming_chat(served: RunningFrontend) -> None:
    stream = client(served).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # no include_usage


def test_the_worker_receives_the_tokens_and_limits(
    make_worker: MakeWorker, start_frontend: StartFrontend, codec: TextCodec
) -> None:
    worker = make_worker("decode-a")
    running = start_frontend()
    wait_healthy(running)
    client(running).completions.create(
        model="tiny", prompt="Hello world", max_tokens=5, temperature=0.7, seed=3
    )
    request = worker.next_request()
    assert request.token_ids == codec.encode("Hello world")
    assert request.max_tokens == 5
    assert request.sampling == {"temperature": 0.7, "seed": 3}
    assert request.prefill_worker == ""
    assert request.deadline_ms > 0


def test_models_health_metrics_openapi(served: RunningFrontend) -> None:
    models = client(served).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ok"
    assert health["workers"] == {"prefill": 0, "decode": 1, "aggregated": 0}
    client(served).completions.create(model="tiny", prompt="Hello", max_tokens=3)
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'fabric_frontend_requests_total{endpoint="completions"} 1.0' in metrics
    assert "fabric_frontend_ttft_seconds_count 1.0" in metrics
    assert "fabric_frontend_itl_seconds_count 2.0" in metrics
    assert 'fabric_frontend_worker_in_flight{role="decode",worker="decode-a"} 0.0' in metrics
    spec = httpx.get(f"{served.url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(
        spec["paths"]
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "temperature": 9}, "temperature"),
        ({"model": "tiny", "prompt": "x", "n": 2}, "n"),
        ({"model": "tiny", "prompt": "x", "stop": ["\n"]}, "stop"),
        ({"model": "tiny"}, "prompt"),
        ({"model": "tiny", "prompt": ""}, "prompt"),
        ({"model": "tiny", "prompt": [1, 99999]}, "prompt"),
        ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "tiny", "prompt": [1, "a"]}, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 5000}, "max_tokens"),
    ],
)
def test_bad_completion_input_is_a_400_naming_the_field(
    served: RunningFrontend, body: dict[str, object], param: str
) -> None:
    response = httpx.post(f"{served.url}/v1/completions", json=body, timeout=5.0)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param in error["message"]


def test_bad_chat_input_and_unknown_model(served: RunningFrontend) -> None:
    bad_role = {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}
    response = httpx.post(f"{served.url}/v1/chat/completions", json=bad_role)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.0.role"
    empty = {"model": "tiny", "messages": []}
    response = httpx.post(f"{served.url}/v1/chat/completions", json=empty)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client(served).chat.completions.create(model="tiny", messages=[], max_tokens=1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(served).completions.create(model="other", prompt="x")
    response = httpx.post(f"{served.url}/v1/completions", content=b"{not json")
    assert response.status_code == 400 and "error" in response.json()


def test_no_workers_is_a_503(start_frontend: StartFrontend) -> None:
    running = start_frontend()
    response = httpx.get(f"{running.url}/health")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    with pytest.raises(openai.APIStatusError) as info:
        client(running).completions.create(model="tiny", prompt="Hello")
    assert info.value.status_code == 503
    assert "no decode or aggregated worker" in str(info.value)


def test_worker_error_is_a_500_with_its_message(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    worker = make_worker("decode-a")
    worker.fail_with = "device pool exhausted"
    running = start_frontend()
    wait_healthy(running)
    with pytest.raises(openai.InternalServerError, match="device pool exhausted"):
        client(running).completions.create(model="tiny", prompt="Hello")
    response = httpx.post(
        f"{running.url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": True},
    )
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "worker_error"
    metrics = httpx.get(f"{running.url}/metrics").text
    assert 'fabric_frontend_request_errors_total{endpoint="chat",status="500"} 1.0' in metrics


def test_silent_worker_is_a_504_and_is_aborted(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    worker = make_worker("decode-a")
    worker.silent = True
    running = start_frontend(FrontendSettings(idle_timeout_s=0.5))
    wait_healthy(running)
    response = httpx.post(
        f"{running.url}/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=10.0
    )
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout"
    request = worker.next_request()
    assert worker.next_abort().request_id == request.request_id


def test_client_disconnect_mid_stream_aborts_the_request(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    worker = make_worker("decode-a")
    worker.token_delay_s = 0.2
    running = start_frontend()
    wait_healthy(running)
    body = {"model": "tiny", "prompt": "Hello", "stream": True, "max_tokens": 50}
    with (
        httpx.Client(timeout=10.0) as http,
        http.stream("POST", f"{running.url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: ")
        assert json.loads(first.removeprefix("data: "))["choices"][0]["text"]
    request = worker.next_request()
    assert worker.next_abort().request_id == request.request_id
    fleet = running.frontend.router.fleet
    assert wait_until(lambda: fleet.in_flight()["decode-a"][1] == 0)


def test_client_gone_before_a_json_answer_aborts_the_request(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    worker = make_worker("decode-a")
    worker.token_delay_s = 0.5
    running = start_frontend()
    wait_healthy(running)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 50}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{running.url}/v1/completions", json=body, timeout=0.3)
    request = worker.next_request()
    assert worker.next_abort().request_id == request.request_id
    fleet = running.frontend.router.fleet
    assert wait_until(lambda: fleet.in_flight()["decode-a"][1] == 0)


def test_workers_joining_and_leaving_are_picked_up(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    running = start_frontend()
    wait_healthy(running, healthy=False)
    first = make_worker("decode-a")
    wait_healthy(running)
    assert client(running).completions.create(model="tiny", prompt="x").choices[0].text
    second = make_worker("agg-b", role=Role.AGGREGATED)
    make_worker("other-model", model="llama")  # ignored: another model
    assert wait_until(lambda: running.frontend.router.fleet.count_by_role()[Role.AGGREGATED] == 1)
    first.close()
    assert wait_until(lambda: running.frontend.router.fleet.count_by_role()[Role.DECODE] == 0)
    result = client(running).completions.create(model="tiny", prompt="x")
    assert (result.model_extra or {})["fabric"]["decode_worker"] == "agg-b"
    second.close()
    wait_healthy(running, healthy=False)
    with pytest.raises(openai.APIStatusError) as info:
        client(running).completions.create(model="tiny", prompt="x")
    assert info.value.status_code == 503


def test_decode_worker_chosen_by_load(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    busy = make_worker("decode-a")
    busy.silent = True
    make_worker("decode-b")
    running = start_frontend(FrontendSettings(idle_timeout_s=1.5))
    assert wait_until(lambda: running.frontend.router.fleet.count_by_role()[Role.DECODE] == 2)
    statuses: list[int] = []
    body = {"model": "tiny", "prompt": "x"}
    stuck = threading.Thread(
        target=lambda: statuses.append(
            httpx.post(f"{running.url}/v1/completions", json=body, timeout=10.0).status_code
        )
    )
    stuck.start()  # both idle: decode-a (the smallest id) takes it, and never answers
    try:
        busy.next_request()
        result = client(running).completions.create(model="tiny", prompt="x")
        assert (result.model_extra or {})["fabric"]["decode_worker"] == "decode-b"
    finally:
        stuck.join(10.0)
    assert statuses == [504]
