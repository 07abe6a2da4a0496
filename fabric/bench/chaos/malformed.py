"""Malformed inputs: bad HTTP requests to the frontend, bad msgpack frames to a worker's signal
socket.

``malformed_http`` sends each case of ``http_cases`` ``--malformed-rounds`` times over a raw
socket (so the body can be anything, a 20 MB one included, with a ``Content-Length`` and
chunked); every answer must be a 4xx with OpenAI error JSON. While the large bodies are refused,
a thread times ``/health``. ``malformed_wire`` sends random, truncated, mistyped and oversized
frames to the prefill worker's signal endpoint (from its etcd record) from a foreign DEALER; the
worker must keep serving (a P/D request afterwards reads its KV).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack
import numpy as np
import zmq

from fabric.bench.chaos.context import Context, Observed
from fabric.bench.chaos.deployment import PREFILL
from fabric.bench.chaos.outcomes import Outcome
from fabric.signal.messages import PROTOCOL_VERSION

HEALTH_POLL_S = 0.05
WIRE_REPLY_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class HttpCase:
    name: str
    body: bytes
    chunked: bool = False

    @property
    def big(self) -> bool:
        return len(self.body) > 1 << 20


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int | None
    body: bytes
    latency_s: float

    @property
    def clear_4xx(self) -> bool:
        if self.status is None or not 400 <= self.status < 500:
            return False
        try:
            parsed = json.loads(self.body)
        except ValueError:
            return False
        return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


def http_cases(model: str, big_bytes: int) -> list[HttpCase]:
    """Bad JSON, wrong types, a lone surrogate, undecodable bytes, two ``big_bytes`` bodies."""

    def body(**fields: object) -> bytes:
        return json.dumps({"model": model, "max_tokens": 4, **fields}).encode()

    huge = b'{"model": "' + model.encode() + b'", "prompt": "' + b"a" * big_bytes + b'"}'
    return [
        HttpCase("bad_json", b'{"model": "' + model.encode() + b'", "prompt": '),
        HttpCase("not_an_object", b"[1, 2, 3]"),
        HttpCase("prompt_int", body(prompt=5)),
        HttpCase("max_tokens_str", body(prompt="hi", max_tokens="many")),
        HttpCase("max_tokens_negative", body(prompt="hi", max_tokens=-3)),
        HttpCase("token_id_out_of_range", body(prompt=[1, 2, 10**12])),
        HttpCase("lone_surrogate", body(prompt="\ud800 hello")),
        HttpCase("not_utf8", b'{"model": "x", "prompt": "\xff\xfe"}'),
        HttpCase("messages_wrong_type", body(messages="hello")),
        HttpCase("unknown_model", body(prompt="hi", model="no-such-model")),
        HttpCase("body_20mb", huge),
        HttpCase("body_20mb_chunked", huge, chunked=True),
    ]


def malformed_http(context: Context) -> Observed:
    deployment, settings = context.deployment, context.settings
    port = int(deployment.url.rsplit(":", 1)[1])
    cases = http_cases(deployment.model, settings.big_body_bytes)
    bad: list[str] = []
    clear = hung = 0
    big_latencies: list[float] = []
    health = _HealthTimer(deployment.url)
    for _ in range(settings.malformed_rounds):
        for case in cases:
            if case.big:
                health.start()
            answer = _post_raw(port, case, settings.bound_s)
            if case.big:
                health.stop()
                big_latencies.append(answer.latency_s)
            if answer.status is None:
                hung += 1
                bad.append(f"{case.name}: no answer")
            elif answer.clear_4xx:
                clear += 1
            else:
                bad.append(f"{case.name}: {answer.status} {answer.body[:80]!r}")
    after = context.send(context.prompt("malformed_http", 0))
    notes = [
        f"{len(cases) * settings.malformed_rounds} malformed requests, {clear} answered 4xx JSON",
        f"not 4xx JSON: {bad[:4]}" if bad else "every one a 4xx JSON",
        f"{settings.big_body_bytes / 1e6:.0f} MB bodies answered in "
        f"max {max(big_latencies, default=0):.3f} s",
        f"/health meanwhile: {health.summary()}",
        f"a normal request afterwards: {after.outcome.value}",
    ]
    return Observed(
        [after], None, notes, own_recovery=True, extra_failed_clearly=clear, extra_hung=hung
    )


def _post_raw(port: int, case: HttpCase, bound_s: float) -> HttpAnswer:
    """POST ``case`` on a fresh connection; status None: no answer within ``bound_s``."""
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    head += "Content-Type: application/json\r\nConnection: close\r\n"
    if case.chunked:
        head += "Transfer-Encoding: chunked\r\n\r\n"
    else:
        head += f"Content-Length: {len(case.body)}\r\n\r\n"
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=bound_s) as sock:
        try:
            sock.sendall(head.encode())
            for piece in _pieces(case):
                sock.sendall(piece)
        except OSError:
            pass  # the server answered and closed before reading it all: read its answer
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return HttpAnswer(None, received, time.monotonic() - start)
        except OSError:
            pass
    latency = time.monotonic() - start
    status_line, _, rest = received.partition(b"\r\n")
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return HttpAnswer(None, received[:200], latency)
    return HttpAnswer(int(parts[1]), _http_body(rest), latency)


def _pieces(case: HttpCase) -> Iterator[bytes]:
    step = 1 << 20
    for offset in range(0, len(case.body), step):
        piece = case.body[offset : offset + step]
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if case.chunked else piece
    if case.chunked:
        yield b"0\r\n\r\n"


def _http_body(rest: bytes) -> bytes:
    headers, _, body = rest.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in headers.lower():
        return body
    out, data = b"", body
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


class _HealthTimer:
    """Times ``GET /health`` on a thread while started (every ``HEALTH_POLL_S``)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._latencies: list[float] = []
        self._failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def summary(self) -> str:
        if not self._latencies:
            return f"no answers ({self._failures} failed)"
        return (
            f"{len(self._latencies)} answers, max {max(self._latencies) * 1e3:.0f} ms, "
            f"median {float(np.median(self._latencies)) * 1e3:.0f} ms, {self._failures} failed"
        )

    def _run(self) -> None:
        while True:
            start = time.monotonic()
            try:
                with urllib.request.urlopen(f"{self._url}/health", timeout=5.0) as response:
                    response.read()
                self._latencies.append(time.monotonic() - start)
            except OSError:
                self._failures += 1
            if self._stop.wait(HEALTH_POLL_S):
                return


def wire_frames(compat_hash: int, count: int, seed: int = 7) -> list[list[bytes]]:
    """``count`` malformed multipart messages: random, truncated, mistyped, oversized."""
    rng = np.random.default_rng(seed)
    corr = (1).to_bytes(8, "big")
    valid = msgpack.packb([PROTOCOL_VERSION, 1, compat_hash, {"worker_id": "x"}])
    kinds: list[list[bytes]] = [
        [os.urandom(int(rng.integers(1, 512)))],
        [corr, os.urandom(int(rng.integers(0, 4096)))],
        [corr, valid[: int(rng.integers(1, len(valid)))]],
        [corr, msgpack.packb([PROTOCOL_VERSION + 7, 1, compat_hash, {}])],
        [corr, msgpack.packb([PROTOCOL_VERSION, 999, compat_hash, {}])],
        [corr, msgpack.packb([PROTOCOL_VERSION, 1, compat_hash + 1, {}])],
        [corr, msgpack.packb({"a": [1, 2, {"b": None}]})],
        [corr, valid],
        [corr[:3], valid],
        [corr, valid, valid],
        [corr, b"\x00" * (2 << 20)],
        [corr, os.urandom(6 << 20)],
    ]
    return [kinds[i % len(kinds)] for i in range(count)]


def malformed_wire(context: Context) -> Observed:
    deployment, settings = context.deployment, context.settings
    record = deployment.record(PREFILL)
    if record is None or record.endpoints.signal is None:
        return Observed([], None, ["no prefill record or signal endpoint"], own_recovery=True)
    frames = wire_frames(record.compat_hash, settings.wire_frames)
    zctx = zmq.Context()
    replies = 0
    try:
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"chaos-" + os.urandom(4).hex().encode())
        sock.connect(record.endpoints.signal)
        for message in frames:
            sock.send_multipart(message)
        deadline = time.monotonic() + WIRE_REPLY_WAIT_S
        while time.monotonic() < deadline:
            if sock.poll(100):
                sock.recv_multipart()
                replies += 1
        sock.close()
    finally:
        zctx.term()
    dead = deployment.dead_workers()
    results = [context.send(context.prompt("malformed_wire", i)) for i in range(2)]
    notes = [
        f"{len(frames)} frames to {record.endpoints.signal}, {replies} replies (ErrorReply)",
        f"dead afterwards: {dead}" if dead else "prefill alive",
        "P/D afterwards: "
        + ", ".join(
            f"{r.outcome.value}/{r.fabric.get('prefill_worker') or 'recompute'}" for r in results
        ),
    ]
    if any(r.outcome is not Outcome.SERVED for r in results):
        notes.append("a request after the frames was not served")
    return Observed(results, None, notes, own_recovery=True, served_needs_pd=True)
