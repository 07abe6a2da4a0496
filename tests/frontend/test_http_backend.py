"""The frontend in front of vLLM instances, against fake OpenAI servers (``httpx.MockTransport``).

``FakeVllm`` plays two or three ``vllm serve`` instances (hosts ``prefill.test``,
``decode.test``, ``agg.test``) behind one transport, records every body it receives and answers
like vLLM 0.32 with the fabric connector: the prefill a JSON body carrying ``kv_transfer_params``,
the others an SSE stream of ``return_token_ids`` chunks. The frontend is real (router, HTTP
connection, API on uvicorn), its registry the in-memory one; nothing leaves the process.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from frontend_fakes import RunningFrontend, wait_until

from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.records import Endpoints, VllmLayout, WorkerRecord
from fabric.discovery.registration import WorkerRegistration
from fabric.discovery.registry import Role
from fabric.frontend.api import build_app
from fabric.frontend.api_key import ApiKey
from fabric.frontend.generation import FrontendSettings
from fabric.frontend.http_backend import HttpSettings
from fabric.frontend.http_connection import HttpClients
from fabric.frontend.server import BackgroundServer, build_frontend
from fabric.frontend.tokenizer import TextCodec

COMPAT = 0x5EED_CAFE
PROMPT = [5, 17, 42, 99, 7, 300, 12]
PARAMS = {
    "do_remote_prefill": True,
    "remote_worker_id": "prefill-v",
    "remote_request_id": "cmpl-up-0",
    "remote_block_ids": [0],
    "remote_num_tokens": len(PROMPT),
    "remote_compat_hash": f"{COMPAT:016x}",
}
HOSTS = {"prefill-v": "prefill.test", "decode-v": "decode.test", "agg-v": "agg.test"}


class FakeVllm:
    """Fake vLLM OpenAI servers (module docstring); knobs are plain attributes."""

    def __init__(self, answer: list[int]) -> None:
        self.answer = answer
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.status: dict[str, int] = {}  # host -> HTTP status to answer instead of 200
        self.unreachable: set[str] = set()
        self.error_event = False  # the stream sends an error event after its first token
        self.hang = False  # the stream stops after its first token and never ends
        self.stream_closed = threading.Event()
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self.api_key: str | None = None  # like vLLM's --api-key: 401 without it

    def hosts(self) -> list[str]:
        return [host for host, _ in self.bodies]

    def body(self, host: str) -> dict[str, Any]:
        return next(body for h, body in self.bodies if h == host)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        body = json.loads(request.content)
        self.bodies.append((host, body))
        self.authorizations.append(request.headers.get("authorization"))
        if self.api_key is not None and request.headers.get("authorization") != (
            f"Bearer {self.api_key}"
        ):
            return httpx.Response(401, json={"error": "Unauthorized"})
        if host in self.unreachable:
            raise httpx.ConnectError("connection refused", request=request)
        status = self.status.get(host, 200)
        if status != 200:
            error = {"message": f"fake failure {status}", "type": "BadRequestError"}
            return httpx.Response(status, json={"error": error})
        if not body.get("stream"):
            return httpx.Response(200, json=self._completion(body))
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=self._events(body)
        )

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        params = (body.get("kv_transfer_params") or {}).get("do_remote_decode")
        return {
            "id": "cmpl-up-0",
            "object": "text_completion",
            "model": body["model"],
            "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
            "kv_transfer_params": dict(PARAMS) if params else None,
        }

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        tokens = self.answer[: body["max_tokens"]]
        try:
            for i, token in enumerate(tokens):
                last = i == len(tokens) - 1
                choice = {
                    "index": 0,
                    "text": "?",
                    "token_ids": [token],
                    "finish_reason": "length" if last else None,
                }
                yield _sse({"id": "cmpl-up-1", "choices": [choice]})
                if self.error_event:
                    yield _sse({"error": {"message": "engine died", "code": 500}})
                    return
                if self.hang:
                    await asyncio.sleep(3600)
            yield b"data: [DONE]\n\n"
        finally:
            self.stream_closed.set()


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def _record(worker_id: str, role: Role) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        role=role,
        endpoints=Endpoints(http=f"http://{HOSTS[worker_id]}"),
        agent_name=None,
        layout=VllmLayout(model="tiny", block_size=32),
        compat_hash=COMPAT,
        started_at=time.time(),
    )


@pytest.fixture
def answer(codec: TextCodec) -> list[int]:
    return codec.encode(" the fabric fronts vLLM instances")


@pytest.fixture
def upstream(answer: list[int]) -> FakeVllm:
    return FakeVllm(answer)


@pytest.fixture
def serve(
    registry: InMemoryRegistry, model_dir: Path, upstream: FakeVllm
) -> Iterator[Callable[..., RunningFrontend]]:
    """``serve(*records, upstream_key=None)``: register ``records``, start a frontend that sees
    them all (and sends them ``upstream_key``)."""
    registrations: list[WorkerRegistration] = []
    running: list[RunningFrontend] = []

    def start(*records: WorkerRecord, upstream_key: ApiKey | None = None) -> RunningFrontend:
        for record in records:
            registrations.append(WorkerRegistration(registry, record, ttl_s=5.0).start())
        frontend = build_frontend(
            registry,
            str(model_dir),
            settings=FrontendSettings(idle_timeout_s=5.0, request_timeout_s=30.0),
            http=HttpClients(
                HttpSettings(api_key=upstream_key), transport=httpx.MockTransport(upstream.handle)
            ),
        )
        try:
            server = BackgroundServer(build_app(frontend)).start()
        except BaseException:
            frontend.close()
            raise
        running.append(RunningFrontend(frontend, server))
        assert wait_until(lambda: len(frontend.router.fleet.workers()) == len(records))
        return running[-1]

    yield start
    for item in running:
        item.server.stop()
        item.frontend.close()
    for registration in registrations:
        registration.close()


def _complete(url: str, **fields: Any) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, **fields}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=10.0)


def test_pd_request_prefills_then_decodes_with_the_returned_params(
    serve: Callable[..., RunningFrontend], upstream: FakeVllm, codec: TextCodec, answer: list[int]
) -> None:
    running = serve(_record("prefill-v", Role.PREFILL), _record("decode-v", Role.DECODE))
    response = _complete(running.server.url, seed=3)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["text"] == codec.decode(answer[:5])
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    fabric = body["fabric"]
    assert (fabric["worker"], fabric["prefill_worker"], fabric["route"]) == (
        "decode-v",
        "prefill-v",
        "prefill",
    )
    assert fabric["engine"] == "vllm" and fabric["kv_transfer_tokens"] == len(PROMPT)
    assert upstream.hosts() == ["prefill.test", "decode.test"]
    prefill = upstream.body("prefill.test")
    assert prefill["prompt"] == PROMPT and prefill["model"] == "tiny"
    assert (prefill["max_tokens"], prefill["stream"]) == (1, False)
    assert prefill["kv_transfer_params"] == {"do_remote_decode": True}
    decode = upstream.body("decode.test")
    assert decode["kv_transfer_params"] == PARAMS
    assert (decode["prompt"], decode["max_tokens"], decode["stream"]) == (PROMPT, 5, True)
    assert decode["return_token_ids"] is True
    assert (decode["temperature"], decode["seed"]) == (0.0, 3)  # greedy unless asked
    assert running.frontend.router.fleet.in_flight() == {
        "prefill-v": (Role.PREFILL, 0),
        "decode-v": (Role.DECODE, 0),
    }


def test_stream_relays_the_upstream_chunks(
    serve: Callable[..., RunningFrontend], upstream: FakeVllm, codec: TextCodec, answer: list[int]
) -> None:
    running = serve(_record("prefill-v", Role.PREFILL), _record("decode-v", Role.DECODE))
    events = []
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{running.server.url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == codec.decode(answer[:6])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["fabric"]["prefill_worker"] == "prefill-v"
    assert upstream.hosts() == ["prefill.test", "decode.test"]


def test_an_aggregated_instance_serves_alone(
    serve: Callable[..., RunningFrontend], upstream: FakeVllm, codec: TextCodec, answer: list[int]
) -> None:
    running = serve(_record("agg-v", Role.AGGREGATED))
    response = _complete(running.server.url, max_tokens=3, temperature=0.7)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == codec.decode(answer[:3])
    assert response.json()["fabric"]["route"] == "local"
    assert upstream.hosts() == ["agg.test"]
    sent = upstream.body("agg.test")
    assert "kv_transfer_params" not in sent and sent["temperature"] == 0.7


def test_a_failed_prefill_falls_back_to_the_decode_instance(
    serve: Callable[..., RunningFrontend], upstream: FakeVllm, codec: TextCodec, answer: list[int]
) -> None:
    running = serve(_record("prefill-v", Role.PREFILL), _record("decode-v", Role.DECODE))
    upstream.status["prefill.test"] = 500
    response = _complete(running.server.url)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["text"] == codec.decode(answer[:5])
    assert body["fabric"]["prefill_worker"] == ""
    assert body["fabric"]["routed_prefill_worker"] == "prefill-v"
    assert "prefill on prefill-v failed" in body["fabric"]["fallback"]
    assert "kv_transfer_params" not in upstream.body("decode.test")


@pytest.mark.parametrize(
    ("failure", "status", "words"),
    [
        ("decode_500", 500, "answered HTTP 500: fake failure 500"),
        ("decode_400", 400, "refused the request: fake failure 400"),
        ("prefill_400", 400, "refused the request: fake failure 400"),
        ("unreachable", 503, "is unreachable"),
    ],
)
def test_upstream_failures_are_openai_errors(
    serve: Callable[..., RunningFrontend],
    upstream: FakeVllm,
    failure: str,
    status: int,
    words: str,
) -> None:
    running = serve(_record("prefill-v", Role.PREFILL), _record("decode-v", Role.DECODE))
    if failure == "unreachable":
        upstream.unreachable.add("decode.test")
    else:
        host, code = failure.split("_")
        upstream.status[f"{host}.test"] = int(code)
    response = _complete(running.server.url)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert running.frontend.router.fleet.in_flight()["decode-v"] == (Role.DECODE, 0)


def test_an_error_event_mid_stream_ends_the_stream_with_an_error(
    serve: Callable[..., RunningFrontend], upstream: FakeVllm
) -> None:
    running = serve(_record("decode-v", Role.DECODE))
    upstream.error_event = True
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{running.server.url}/v1/completions", json=body) as response:
        assert response.status_code == 200  # the first token came before the error
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    last = json.loads(events[-1][len("data: ") :])
    assert "engine died" in last["error"]["message"]
    assert "[DONE]" not in events[-1]


def test_a_client_disconnect_closes_the_upstream_request(
    serve: Callable[..., RunningFrontend], upstream: FakeVllm
) -> None:
    running = serve(_record("decode-v", Role.DECODE))
    upstream.hang = True
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{running.server.url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one token arrived; the client goes away
    assert upstream.stream_closed.wait(5.0), "the upstream stream stayed open"
    assert wait_until(lambda: running.frontend.router.fleet.in_flight()["decode-v"][1] == 0)


def test_a_vllm_record_without_http_endpoint_is_not_routed(
    registry: InMemoryRegistry, serve: Callable[..., RunningFrontend]
) -> None:
    bare = WorkerRecord(
        worker_id="prefill-old",
        role=Role.PREFILL,
        endpoints=Endpoints(signal="tcp://127.0.0.1:1"),
        agent_name="agent",
        layout=VllmLayout(model="tiny", block_size=32),
        compat_hash=COMPAT,
        started_at=time.time(),
    )
    with WorkerRegistration(registry, bare, ttl_s=5.0):
        running = serve(_record("decode-v", Role.DECODE))
        time.sleep(0.1)
        assert set(running.frontend.router.fleet.workers()) == {"decode-v"}
        health = httpx.get(f"{running.server.url}/health").json()
        assert health["workers"] == {"prefill": 0, "decode": 1, "aggregated": 0}


def test_the_upstream_api_key_is_sent_when_configured(
    serve: Callable[..., RunningFrontend], upstream: FakeVllm
) -> None:
    upstream.api_key = "upstream-secret"
    records = (_record("prefill-v", Role.PREFILL), _record("decode-v", Role.DECODE))
    running = serve(*records, upstream_key=ApiKey("upstream-secret"))
    assert _complete(running.server.url).status_code == 200
    assert upstream.authorizations == ["Bearer upstream-secret"] * 2


def test_without_the_upstream_key_an_instance_that_wants_one_is_a_500(
    serve: Callable[..., RunningFrontend], upstream: FakeVllm
) -> None:
    upstream.api_key = "upstream-secret"
    running = serve(_record("agg-v", Role.AGGREGATED))
    response = _complete(running.server.url)
    assert response.status_code == 500
    assert "HTTP 401" in response.json()["error"]["message"]
    assert upstream.authorizations == [None]  # off by default: no header at all
