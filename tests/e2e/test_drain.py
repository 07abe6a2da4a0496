"""A worker's drain on SIGTERM, through real processes and the HTTP frontend.

One deployment for the module, in its own namespace: ``agg-a`` and ``agg-b`` (aggregated),
``prefill-h`` and ``prefill-s`` (prefill), ``decode-t`` (decode, ``--drain-timeout=1``) and a
frontend. Requests are pinned where the route matters. In order (each test SIGTERMs its own
worker):

* ``agg-a`` SIGTERMed while it streams a long generation and holds a request waiting for the
  paused ``prefill-s`` (which keeps the drain open until the test resumes it; its lease outlives
  the pause, else agg-a sees it leave and recomputes the held prompt itself): both end with
  the output the aggregated reference gives, a request sent meanwhile is served by another
  worker, ``agg-a`` refuses a ``GenerateRequest`` sent straight to it (``UNAVAILABLE``), the
  frontend shows it draining, and it exits 0.
* ``prefill-h`` SIGTERMed right after its prefill, while ``decode-t`` is paused before reading:
  it holds until ``decode-t`` has read the blocks, and exits 0; the answer equals the
  reference's and its KV trace has no recompute.
* ``decode-t`` SIGTERMed while its request waits for the paused ``prefill-s``: the drain passes
  its one-second deadline, the request ends with an error and the worker exits 0.
* ``agg-b`` SIGTERMed twice while it streams: the second signal stops it at once (far inside
  its 30 s drain), the stream ends with an error, and it exits 0, never -15.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from e2e_harness import (
    MODEL,
    REQUEST_S,
    STOP_S,
    Answer,
    Deploy,
    Deployment,
    Reference,
    Worker,
    complete,
    prompt_ids,
    wait_until,
)

from fabric.signal.client import SignalClient
from fabric.signal.errors import ErrorCode
from fabric.signal.framing import wall_ms
from fabric.signal.messages import ErrorReply, GenerateRequest

pytestmark = [pytest.mark.etcd, pytest.mark.nixl]

LONG_TOKENS = 600  # several hundred decode steps: the stream is still running at SIGTERM
SHORT_TOKENS = 8
DRAIN_SEEN_S = 10.0


@pytest.fixture(scope="module")
def draining(deploy: Deploy, reference: Reference) -> Iterator[Deployment]:
    workers = [
        Worker("aggregated", "agg-a"),
        Worker("aggregated", "agg-b"),
        Worker("prefill", "prefill-h"),
        # Paused while agg-a's stream drains: its lease (5 s by default) lapsed under load and
        # agg-a recomputed the held prompt (prefill_worker ""), as a prefill that left should.
        Worker("prefill", "prefill-s", ("--registration-ttl=30",)),
        Worker(  # a lease that outlives its pause in the prefill test
            "decode",
            "decode-t",
            ("--drain-timeout=1", "--prefill-fallback=recompute", "--registration-ttl=15"),
        ),
    ]
    with deploy("drain", workers) as deployment:
        yield deployment


def pinned(
    deployment: Deployment, prompt: list[int], max_tokens: int, worker: str, source: str
) -> Answer:
    response = deployment.client().completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        extra_body={"fabric": {"worker": worker, "prefill_worker": source}},
    )
    assert response.usage is not None
    choice = response.choices[0]
    fabric = dict((response.model_extra or {})["fabric"])
    return Answer(choice.text, choice.finish_reason, response.usage.completion_tokens, fabric)


def segments(fabric: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    return [
        (s["source"], s["start"], s["end"], s["worker"]) for s in fabric["kv_trace"]["segments"]
    ]


def cluster_state(deployment: Deployment, worker_id: str) -> str | None:
    """The worker's state in the frontend's cluster view (the dashboard's, ``fabric status``'s)."""
    body = httpx.get(f"{deployment.url}/v1/fabric/cluster", timeout=REQUEST_S).json()
    states = {w["id"]: w["state"] for w in body["workers"]}
    return states.get(worker_id)


def refusal(deployment: Deployment, worker_id: str) -> ErrorReply | None:
    """What ``worker_id`` answers a ``GenerateRequest`` sent straight to its signal endpoint."""
    record = deployment.records()[worker_id]
    assert record.endpoints.signal is not None
    client = SignalClient(
        record.endpoints.signal,
        identity=f"probe-{uuid.uuid4().hex[:6]}",
        compat_hash=record.compat_hash,
    )
    try:
        deadline_ms = wall_ms() + int(REQUEST_S * 1000)
        client.send(GenerateRequest("probe-1", prompt_ids(8, seed=3), 2, "", {}, deadline_ms))
        reply = client.receive(REQUEST_S)
    finally:
        client.close()
    return reply if isinstance(reply, ErrorReply) else None


def test_drained_stream_completes_and_new_requests_go_elsewhere(
    draining: Deployment, reference: Reference
) -> None:
    prompt = prompt_ids(40, seed=81)
    want = reference.answer(prompt, LONG_TOKENS)
    assert want.completion_tokens > LONG_TOKENS // 2, "a long generation (EOS came early)"
    held_prompt = prompt_ids(50, seed=85)
    held_want = reference.answer(held_prompt, SHORT_TOKENS)
    other_prompt = prompt_ids(30, seed=82)
    other_want = reference.answer(other_prompt, SHORT_TOKENS)
    victim, waiting = draining.procs["agg-a"], draining.procs["prefill-s"]
    pieces: list[str] = []
    finish, num_tokens = None, -1
    with ThreadPoolExecutor(1) as pool:
        waiting.pause()  # agg-a's request reading from prefill-s keeps the drain open
        try:
            held = pool.submit(pinned, draining, held_prompt, SHORT_TOKENS, "agg-a", "prefill-s")
            assert wait_until(
                lambda: draining.worker_metric("agg-a", "fabric_worker_active_requests") == 1,
                DRAIN_SEEN_S,
            ), draining.logs()
            stream = draining.client().completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=LONG_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"fabric": {"worker": "agg-a", "prefill_worker": ""}},
            )
            with stream:
                chunks = iter(stream)
                first = next(chunks)  # the request runs on agg-a now
                pieces.extend(choice.text for choice in first.choices)
                victim.popen.send_signal(signal.SIGTERM)
                assert wait_until(lambda: draining.records()["agg-a"].draining, DRAIN_SEEN_S), (
                    draining.logs()
                )
                assert wait_until(
                    lambda: cluster_state(draining, "agg-a") == "draining", DRAIN_SEEN_S
                )
                other = complete(draining.client(), other_prompt, SHORT_TOKENS)
                reply = refusal(draining, "agg-a")
                for chunk in chunks:
                    pieces.extend(choice.text for choice in chunk.choices)
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                    if chunk.usage is not None:
                        num_tokens = chunk.usage.completion_tokens
            assert victim.alive  # still draining: the held request is not done
        finally:
            waiting.resume()
        held_answer = held.result(timeout=REQUEST_S)
    assert victim.popen.wait(timeout=STOP_S) == 0, victim.log_tail()
    assert ("".join(pieces), finish, num_tokens) == (
        want.text,
        want.finish_reason,
        want.completion_tokens,
    )
    assert (
        held_answer.same_output(held_want) and held_answer.fabric["prefill_worker"] == "prefill-s"
    )
    assert other.fabric["worker"] != "agg-a" and other.same_output(other_want)
    assert reply is not None and reply.code is ErrorCode.UNAVAILABLE, reply
    assert "draining" in reply.message
    assert "agg-a" not in draining.records()  # its record is gone once it stopped


def test_draining_prefill_serves_its_hold(draining: Deployment, reference: Reference) -> None:
    """SIGTERM lands on ``prefill-h`` right after its prefill, while ``decode-t`` (paused) has
    not read the blocks yet; the hold is served once the decode runs again."""
    prompt = prompt_ids(50, seed=83)
    want = reference.answer(prompt, SHORT_TOKENS)
    victim, decode = draining.procs["prefill-h"], draining.procs["decode-t"]

    def held() -> float:
        return draining.worker_metric("prefill-h", "fabric_worker_held_handoffs", 0.0)

    # Connects decode-t to prefill-h: a link's handshake needs both sides running, and with it
    # done a PrefillRequest reaches the paused prefill worker's socket as soon as it is sent.
    pinned(draining, prompt_ids(20, seed=86), SHORT_TOKENS, "decode-t", "prefill-h")
    with ThreadPoolExecutor(1) as pool:
        victim.pause()
        try:
            future = pool.submit(pinned, draining, prompt, SHORT_TOKENS, "decode-t", "prefill-h")
            assert wait_until(
                lambda: draining.worker_metric("decode-t", "fabric_worker_active_requests") == 1,
                DRAIN_SEEN_S,
            ), draining.logs()  # its PrefillRequest waits for the paused prefill worker
            decode.pause()
            victim.resume()
            assert wait_until(lambda: held() == 1, DRAIN_SEEN_S), draining.logs()  # prefilled
            victim.popen.send_signal(signal.SIGTERM)
            assert wait_until(lambda: draining.records()["prefill-h"].draining, DRAIN_SEEN_S)
            assert victim.alive and held() == 1  # draining, holding for the paused decode
        finally:
            victim.resume()
            decode.resume()
        answer = future.result(timeout=REQUEST_S)
    assert victim.popen.wait(timeout=STOP_S) == 0, victim.log_tail()
    assert "drained" in victim.log_tail(200)
    assert answer.same_output(want)
    assert answer.fabric["prefill_worker"] == "prefill-h"
    assert answer.fabric["kv_trace"]["fallback"] == ""
    assert segments(answer.fabric) == [("prefill", 0, 50, "prefill-h")]
    draining.assert_no_blocks_in_use()


def test_drain_past_its_deadline_ends_requests_with_an_error(draining: Deployment) -> None:
    """It stops ``decode-t``."""
    waiting = draining.procs["prefill-s"]
    victim = draining.procs["decode-t"]
    prompt = prompt_ids(30, seed=84)
    with ThreadPoolExecutor(1) as pool:
        waiting.pause()
        try:
            future = pool.submit(pinned, draining, prompt, SHORT_TOKENS, "decode-t", "prefill-s")
            assert wait_until(
                lambda: draining.worker_metric("decode-t", "fabric_worker_active_requests") == 1,
                DRAIN_SEEN_S,
            ), draining.logs()
            victim.popen.send_signal(signal.SIGTERM)
            with pytest.raises(openai.APIStatusError) as failed:
                future.result(timeout=REQUEST_S)
            assert victim.popen.wait(timeout=STOP_S) == 0, victim.log_tail()
        finally:
            waiting.resume()
    assert failed.value.status_code in (500, 503), failed.value
    assert "drain not done within 1.0 s" in victim.log_tail(200)


def test_a_second_sigterm_stops_at_once(draining: Deployment) -> None:
    """Last: it stops ``agg-b``, whose drain (30 s, the default) would outlast ``STOP_S``."""
    victim = draining.procs["agg-b"]
    stream = draining.client().completions.create(
        model=MODEL,
        prompt=prompt_ids(40, seed=81),
        max_tokens=LONG_TOKENS,
        stream=True,
        extra_body={"fabric": {"worker": "agg-b", "prefill_worker": ""}},
    )
    with stream, pytest.raises(openai.APIError):
        chunks = iter(stream)
        next(chunks)  # the request runs on agg-b now
        victim.popen.send_signal(signal.SIGTERM)
        assert wait_until(lambda: draining.records()["agg-b"].draining, DRAIN_SEEN_S)
        victim.popen.send_signal(signal.SIGTERM)
        for _ in chunks:
            pass
    assert victim.popen.wait(timeout=STOP_S) == 0, victim.log_tail()
    assert "SIGTERM received: stopping" in victim.log_tail(200)
