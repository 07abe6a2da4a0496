"""The frontend and draining workers: no new routes to one, its open streams finish, and a
request one refuses (``UNAVAILABLE``, before the frontend saw its record's ``draining``) is
served by another worker, or answered 503 when there is none. Fake workers on a real frontend.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
import openai
import pytest
from frontend_fakes import WAIT_S, FakeWorker, RunningFrontend, wait_until

from fabric.frontend.generation import FrontendSettings

MakeWorker = Callable[..., FakeWorker]
StartFrontend = Callable[..., RunningFrontend]


def client(running: RunningFrontend) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S
    )


def served_by(running: RunningFrontend) -> str:
    """Send one completion; the worker that served it."""
    response = client(running).completions.create(model="tiny", prompt="Hello", max_tokens=3)
    return str((response.model_extra or {})["fabric"]["worker"])


def sees(running: RunningFrontend, *worker_ids: str) -> bool:
    return set(worker_ids) <= set(running.frontend.router.fleet.workers())


def test_a_refused_request_is_served_by_another_worker(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    running = start_frontend(FrontendSettings(idle_timeout_s=5.0, request_timeout_s=30.0))
    refusing, serving = make_worker("d-refusing"), make_worker("d-serving")
    refusing.refuse_with = "the worker is draining"
    serving.gate.clear()  # requests on it stay in flight (load 1) until the gate opens
    assert wait_until(lambda: sees(running, "d-refusing", "d-serving"))
    answers: list[str] = []
    senders = [threading.Thread(target=lambda: answers.append(served_by(running))) for _ in "ab"]
    for sender in senders:
        sender.start()
        # The second goes to the least-loaded worker, the refusing one, whatever the first did.
        assert wait_until(lambda: refusing.requests.qsize() + serving.requests.qsize() >= 1)
    assert wait_until(lambda: serving.requests.qsize() == 2)  # both ended up there
    serving.gate.set()
    for sender in senders:
        sender.join(WAIT_S)
    assert answers == ["d-serving", "d-serving"]
    assert refusing.requests.qsize() >= 1  # at least one was refused, then routed again
    fleet = running.frontend.router.fleet
    assert wait_until(lambda: fleet.in_flight()["d-serving"][1] == 0)
    assert fleet.in_flight()["d-refusing"][1] == 0  # its slot was given back


def test_a_refusal_with_no_other_worker_is_a_503(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    running = start_frontend()
    refusing = make_worker("d-only")
    refusing.refuse_with = "the worker is draining"
    assert wait_until(lambda: sees(running, "d-only"))
    with pytest.raises(openai.APIStatusError) as refused:
        served_by(running)
    assert refused.value.status_code == 503
    assert "draining" in str(refused.value)


def test_a_draining_worker_finishes_its_stream_and_gets_no_new_request(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    running = start_frontend()
    old = make_worker("d-old")
    assert wait_until(lambda: sees(running, "d-old"))
    old.gate.clear()
    streamed: list[str] = []

    def stream() -> None:
        response = client(running).completions.create(
            model="tiny", prompt="Hello", max_tokens=3, stream=True
        )
        streamed.extend(choice.text for chunk in response for choice in chunk.choices)

    sender = threading.Thread(target=stream)
    sender.start()
    old.next_request()  # in flight on d-old
    new = make_worker("d-new")
    old.drain()
    fleet = running.frontend.router.fleet
    assert wait_until(lambda: sees(running, "d-new") and fleet.workers()["d-old"].draining)
    old.gate.set()  # the draining worker's connection stays: its stream finishes
    sender.join(WAIT_S)
    assert "".join(streamed) and not sender.is_alive()
    new.gate.clear()  # d-new's load grows: only the drain keeps requests off idle d-old
    answers: list[str] = []
    senders = [threading.Thread(target=lambda: answers.append(served_by(running))) for _ in "ab"]
    for sender in senders:
        sender.start()
    assert wait_until(lambda: new.requests.qsize() == 2), old.requests.qsize()
    new.gate.set()
    for sender in senders:
        sender.join(WAIT_S)
    assert answers == ["d-new", "d-new"] and old.requests.qsize() == 0


def test_health_counts_no_draining_worker_and_is_503_when_only_draining_ones_serve(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    running = start_frontend()
    first, second = make_worker("d-first"), make_worker("d-second")
    assert wait_until(lambda: sees(running, "d-first", "d-second"))
    fleet = running.frontend.router.fleet

    def health() -> httpx.Response:
        return httpx.get(f"{running.url}/health", timeout=WAIT_S)

    assert health().json()["workers"]["decode"] == 2
    first.drain()
    assert wait_until(lambda: fleet.workers()["d-first"].draining)
    answer = health()
    assert answer.status_code == 200 and answer.json()["workers"]["decode"] == 1
    second.drain()
    assert wait_until(lambda: fleet.workers()["d-second"].draining)
    answer = health()
    assert answer.status_code == 503 and answer.json()["status"] == "unavailable"
    assert answer.json()["workers"]["decode"] == 0


def test_a_refused_request_waits_in_the_queue_while_the_others_are_at_their_cap(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    settings = FrontendSettings(
        idle_timeout_s=5.0, request_timeout_s=30.0, max_in_flight_per_worker=1, queue_timeout_s=5
    )
    running = start_frontend(settings)
    refusing, serving = make_worker("d-refusing"), make_worker("d-busy")
    refusing.refuse_with = "the worker is draining"
    serving.gate.clear()
    assert wait_until(lambda: sees(running, "d-refusing", "d-busy"))
    answers: list[str] = []
    senders = [threading.Thread(target=lambda: answers.append(served_by(running))) for _ in "ab"]
    senders[0].start()
    assert wait_until(lambda: serving.requests.qsize() == 1)  # d-busy is at its cap now
    senders[1].start()
    assert wait_until(lambda: refusing.requests.qsize() == 1)  # refused: every other at cap
    admission = running.frontend.admission
    assert wait_until(lambda: admission.num_queued == 1)  # waits for room, no 503
    serving.gate.set()  # the first ends; the queued one gets d-busy's slot
    for sender in senders:
        sender.join(WAIT_S)
    assert answers == ["d-busy", "d-busy"] and serving.requests.qsize() == 2
    assert admission.num_queued == 0
    fleet = running.frontend.router.fleet
    assert wait_until(lambda: fleet.in_flight()["d-busy"][1] == 0)
    assert fleet.in_flight()["d-refusing"][1] == 0


def test_a_refused_request_gets_429_with_retry_after_when_no_room_comes_in_time(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    settings = FrontendSettings(
        idle_timeout_s=5.0, request_timeout_s=30.0, max_in_flight_per_worker=1, queue_timeout_s=0.3
    )
    running = start_frontend(settings)
    refusing, serving = make_worker("d-refusing"), make_worker("d-busy")
    refusing.refuse_with = "the worker is draining"
    serving.gate.clear()
    assert wait_until(lambda: sees(running, "d-refusing", "d-busy"))
    first = threading.Thread(target=lambda: served_by(running))
    first.start()
    assert wait_until(lambda: serving.requests.qsize() == 1)
    answer = httpx.post(
        f"{running.url}/v1/completions",
        json={"model": "tiny", "prompt": "Hello", "max_tokens": 3},
        timeout=WAIT_S,
    )
    assert answer.status_code == 429, answer.text
    assert answer.headers["Retry-After"] == "1"
    assert "queue-timeout" in answer.json()["error"]["message"]
    assert refusing.requests.qsize() == 1  # it was refused, then queued, then refused here
    serving.gate.set()
    first.join(WAIT_S)
    fleet = running.frontend.router.fleet
    assert wait_until(lambda: fleet.in_flight()["d-busy"][1] == 0)
    assert fleet.in_flight()["d-refusing"][1] == 0
