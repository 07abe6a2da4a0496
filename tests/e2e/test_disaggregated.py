"""Disaggregated serving through the real HTTP frontend, driven by the official ``openai`` client.

One deployment for the module, on the session's etcd in its own namespace: the frontend
(``fabric serve frontend``) starts first, then ``prefill-0`` and ``decode-0`` join it (1P1D).
``decode-1`` joins for one test (1P2D) and ``prefill-1`` for another (2P1D), each stopped at the
end of its test, all without restarting the frontend; every test leaves 1P1D behind. Every
answer is compared with the aggregated reference deployment (conftest), token for token: same
text, same number of completion tokens, same finish reason.

Checked: prompts of 1 to 300 tokens (ids and text); chat streaming vs not; four concurrent
requests; a shared prefix computed once (the prefill worker's own counter, and the response's
``fabric`` field); a stream closed by the client aborts its request and frees every block; late
workers are routed to; the prefill worker is chosen by cached prefix; no blocks in use at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from e2e_harness import (
    MODEL,
    REQUEST_S,
    Answer,
    Deployment,
    Reference,
    chat,
    chat_streamed,
    complete,
    complete_streamed,
    metric,
    num_blocks,
    prompt_ids,
    wait_until,
)

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.nixl,
]

MAX_TOKENS = 16
LONG_STREAM_TOKENS = 2000  # far more than a test waits for: the stream is closed early


@pytest.fixture(scope="module")
def pd(
    etcd: EtcdServer,
    registry: EtcdRegistry,
    model_dir: Path,
    reference: Reference,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    deployment = Deployment("pd", etcd.endpoint, registry, model_dir, tmp_path_factory.mktemp("pd"))
    try:
        deployment.spawn_frontend()  # first: every worker joins a running frontend
        deployment.spawn_worker("prefill", "prefill-0")
        deployment.spawn_worker("decode", "decode-0")
        deployment.wait_workers(prefill=1, decode=1)
        yield deployment
    finally:
        deployment.close()


def check_same(got: Answer, want: Answer) -> None:
    assert got.same_output(want), f"disaggregated {got}\n!= aggregated {want}"
    assert got.completion_tokens > 0


def check_route(answer: Answer, prefill: str, decode: str) -> None:
    assert (answer.fabric["prefill_worker"], answer.fabric["decode_worker"]) == (prefill, decode)
    assert answer.fabric["fallback"] == ""


def test_disaggregated_completions_equal_aggregated(pd: Deployment, reference: Reference) -> None:
    client = pd.client()
    prompts: list[str | list[int]] = [prompt_ids(n, seed=n) for n in (1, 15, 16, 17, 100, 300)]
    prompts += ["KV blocks", "A prefill worker computes the prompt; a decode worker reads " * 6]
    for prompt in prompts:
        got = complete(client, prompt, MAX_TOKENS)
        check_same(got, reference.answer(prompt, MAX_TOKENS))
        check_route(got, "prefill-0", "decode-0")
        length = int(got.fabric["prompt_tokens"])
        assert (got.fabric["computed_tokens"], got.fabric["cached_tokens"]) == (length, 0)
        assert got.fabric["local_prefix_tokens"] == 0
        assert got.fabric["transferred_blocks"] == num_blocks(length)  # the partial one too
        assert got.fabric["kv_transfer_ms"] > 0
    assert length > 64  # the text prompt is several blocks long


def test_chat_streaming_equals_non_streaming(pd: Deployment, reference: Reference) -> None:
    messages = [
        {"role": "system", "content": "You answer about KV caches, briefly."},
        {"role": "user", "content": "Which worker computed this prompt, and which one decodes?"},
    ]
    client = pd.client()
    whole = chat(client, messages, 24)
    streamed, num_chunks = chat_streamed(client, messages, 24)
    check_same(whole, chat(reference.client(), messages, 24))
    check_same(streamed, whole)
    assert num_chunks > 1  # really streamed, chunk by chunk
    check_route(whole, "prefill-0", "decode-0")
    # The second time decode-0 holds every full block of the prompt itself, so it computes the
    # block holding the last token (again, for its logits) without asking prefill-0.
    check_route(streamed, "", "decode-0")
    prompt_tokens = int(streamed.fabric["prompt_tokens"])
    cached = 16 * ((prompt_tokens - 1) // 16)
    assert cached >= 16
    assert (streamed.fabric["cached_tokens"], whole.fabric["cached_tokens"]) == (cached, 0)
    assert streamed.fabric["local_prefix_tokens"] == cached


def test_concurrent_requests_are_all_correct(pd: Deployment, reference: Reference) -> None:
    prompts = [prompt_ids(n, seed=500 + n) for n in (20, 45, 80, 130)]
    wants = [reference.answer(prompt, 24) for prompt in prompts]
    barrier = threading.Barrier(len(prompts))

    def run(index: int) -> Answer:
        client = pd.client()
        barrier.wait(timeout=REQUEST_S)
        send = complete_streamed if index % 2 else complete
        return send(client, prompts[index], 24)

    with ThreadPoolExecutor(len(prompts)) as pool:
        gots = list(pool.map(run, range(len(prompts)), timeout=REQUEST_S * 2))
    for got, want in zip(gots, wants, strict=True):
        check_same(got, want)
        check_route(got, "prefill-0", "decode-0")
    assert wait_until(lambda: pd.frontend_in_flight("decode-0") == 0, 5.0)


def test_shared_prefix_is_computed_once(pd: Deployment, reference: Reference) -> None:
    first = prompt_ids(160, seed=7)
    second = first[:128] + prompt_ids(24, seed=8)  # 8 shared full blocks, then 24 new tokens
    client = pd.client()
    computed = []
    answers = []
    for prompt in (first, second):
        before = pd.worker_metric("prefill-0", "fabric_worker_computed_tokens_total")
        answers.append(complete(client, prompt, MAX_TOKENS))
        after = pd.worker_metric("prefill-0", "fabric_worker_computed_tokens_total")
        computed.append(after - before)
        check_same(answers[-1], reference.answer(prompt, MAX_TOKENS))
        check_route(answers[-1], "prefill-0", "decode-0")
    assert computed == [160, 24]  # the prefill worker's own count: the prefix once
    stats = answers[1].fabric
    assert (stats["computed_tokens"], stats["cached_tokens"]) == (24, 128)
    assert stats["routed_prefix_blocks"] == 8  # the router knew prefill-0 held them
    assert stats["local_prefix_tokens"] == 128  # decode-0 kept them from the first request ...
    assert stats["transferred_blocks"] == 2  # ... and read only blocks 8 and 9 (152 tokens)


def test_closing_a_stream_aborts_the_request_and_frees_blocks(pd: Deployment) -> None:
    def decode_metrics() -> tuple[float, float, float]:
        text = pd.worker_metrics("decode-0")
        return (
            metric(text, "fabric_worker_errors_total", 0.0, kind="aborted"),
            metric(text, "fabric_worker_generated_tokens_total"),
            metric(text, "fabric_worker_active_requests"),
        )

    aborted_before, generated_before, _ = decode_metrics()
    stream = pd.client().completions.create(
        model=MODEL, prompt=prompt_ids(64, seed=11), max_tokens=LONG_STREAM_TOKENS, stream=True
    )
    chunks = []
    with stream:
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 3:
                break
    assert len(chunks) == 3 and all(c.choices[0].finish_reason is None for c in chunks)

    def aborted_on_decode() -> bool:
        return decode_metrics()[0] == aborted_before + 1 and decode_metrics()[2] == 0

    assert wait_until(aborted_on_decode, 10.0), f"no abort counted on decode-0:\n{pd.logs()}"
    generated = decode_metrics()[1] - generated_before
    assert 3 <= generated < LONG_STREAM_TOKENS  # stopped early, not run to the end
    pd.assert_no_blocks_in_use()  # decode-0 and prefill-0
    assert wait_until(lambda: pd.frontend_in_flight("decode-0") == 0, 5.0)


def test_late_decode_worker_is_routed_to_1p2d(pd: Deployment, reference: Reference) -> None:
    pd.spawn_worker("decode", "decode-1")
    try:
        pd.wait_workers(prefill=1, decode=2)  # the running frontend saw it join
        prompt = prompt_ids(75, seed=21)
        want = reference.answer(prompt, MAX_TOKENS)
        # A long stream keeps decode-0 busy, so the least-loaded choice is decode-1.
        holder = pd.client().completions.create(
            model=MODEL, prompt=prompt_ids(40, seed=22), max_tokens=LONG_STREAM_TOKENS, stream=True
        )
        with holder:
            next(iter(holder))
            assert pd.frontend_in_flight("decode-0") == 1
            got = complete(pd.client(), prompt, MAX_TOKENS)
        check_same(got, want)
        check_route(got, "prefill-0", "decode-1")
        assert got.fabric["transferred_blocks"] == num_blocks(75)  # decode-1 held nothing
        # With both idle again, a request goes to decode-0 (ties: the smallest id) and is
        # equal too: one prefill worker served two decode workers.
        assert wait_until(lambda: pd.frontend_in_flight("decode-0") == 0, 5.0)
        again = complete(pd.client(), prompt, MAX_TOKENS)
        check_same(again, want)
        check_route(again, "prefill-0", "decode-0")
    finally:
        pd.procs["decode-1"].stop()
    pd.wait_workers(prefill=1, decode=1, timeout_s=15.0)  # and saw it leave


def test_late_prefill_worker_two_prefills_one_decode(pd: Deployment, reference: Reference) -> None:
    pd.spawn_worker("prefill", "prefill-1")
    try:
        pd.wait_workers(prefill=2, decode=1)
        first, second = prompt_ids(90, seed=31), prompt_ids(70, seed=32)
        wants = [reference.answer(prompt, MAX_TOKENS) for prompt in (first, second)]
        prefill0 = pd.procs["prefill-0"]
        with ThreadPoolExecutor(1) as pool:
            prefill0.pause()  # holds `first` at prefill-0, so `second` goes to idle prefill-1
            try:
                pending = pool.submit(complete, pd.client(), first, MAX_TOKENS)
                assert wait_until(lambda: pd.frontend_in_flight("prefill-0") == 1, 10.0)
                got_second = complete(pd.client(), second, MAX_TOKENS)
            finally:
                prefill0.resume()
            got_first = pending.result(timeout=REQUEST_S)
        check_same(got_first, wants[0])
        check_route(got_first, "prefill-0", "decode-0")
        check_same(got_second, wants[1])
        check_route(got_second, "prefill-1", "decode-0")
        # KV-aware routing: only prefill-1 holds `second`'s blocks, so a prompt sharing its
        # first 64 tokens goes there although the tie-break would pick prefill-0.
        third = second[:64] + prompt_ids(30, seed=33)
        got_third = complete(pd.client(), third, MAX_TOKENS)
        check_same(got_third, reference.answer(third, MAX_TOKENS))
        check_route(got_third, "prefill-1", "decode-0")
        assert got_third.fabric["routed_prefix_blocks"] == 4
        assert (got_third.fabric["computed_tokens"], got_third.fabric["cached_tokens"]) == (30, 64)
        pd.assert_no_blocks_in_use()  # prefill-0, prefill-1 and decode-0
    finally:
        pd.procs["prefill-1"].stop()
    pd.wait_workers(prefill=1, decode=1, timeout_s=15.0)


def test_no_blocks_in_use_anywhere_at_the_end(pd: Deployment) -> None:
    pd.assert_no_blocks_in_use()
    assert set(pd.blocks_in_use()) == {"prefill-0", "decode-0"}
    for name in ("frontend", "prefill-0", "decode-0"):
        assert pd.procs[name].alive, f"{name} died:\n{pd.procs[name].log_tail()}"
