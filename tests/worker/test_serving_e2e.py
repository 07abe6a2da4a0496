"""Serving end to end: real etcd, worker processes, NIXL reads, this process as the frontend.

Five workers on the tiny model share one etcd namespace: ``prefill-a``, ``decode-r``
(``--prefill-fallback recompute``), ``aggregated``, and for the fault test ``prefill-b`` (killed)
and ``decode-f`` (``--prefill-fallback fail``). This process speaks the frontend's protocol
(``GenerateRequest`` in, ``TokenChunk``s out, ``Abort``) over signal clients, finds every
endpoint in etcd, and checks the pools through each worker's ``/metrics``.

Checked: disaggregated output equals aggregated output token for token (prompts of 5, 40 and
130 tokens, three concurrent requests batched, 1P2D and 2P1D routes); a second prompt sharing a
long prefix is computed only past the prefix, and its decode reads only the blocks it lacks;
Abort mid-stream ends the stream and frees the blocks on both sides; a request too large for the
pool is refused; a SIGKILLed prefill worker is recomputed around (recompute) or reported (fail);
no worker holds a block at the end. Every process is stopped in the fixture's teardown; every
wait is bounded.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness_probes import wait_until
from serving_harness import (
    ServingFleet,
    check_equal,
    metric,
    prompt_of,
    scrape,
    serving_fleet,
)

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.nixl,
]

BLOCK_SIZE = 16
DEVICE_BLOCKS = 96
MAX_TOKENS = 16
WORKERS = {
    "prefill-a": ("prefill", []),
    "prefill-b": ("prefill", []),
    "decode-r": ("decode", ["--prefill-fallback=recompute"]),
    "decode-f": ("decode", ["--prefill-fallback=fail"]),
    "aggregated": ("aggregated", []),
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingFleet]:
    extra = [
        f"--device-blocks={DEVICE_BLOCKS}",
        f"--block-size={BLOCK_SIZE}",
        "--registration-ttl=1",
    ]
    with serving_fleet(tmp_path_factory.mktemp("serving"), WORKERS, extra) as (frontend, workers):
        yield ServingFleet(frontend, workers)


def test_disaggregated_output_equals_aggregated(deployment: ServingFleet) -> None:
    frontend = deployment.frontend
    for length in (5, 40, 130):
        prompt = prompt_of(length, seed=length)
        aggregated = frontend.generate("aggregated", prompt, MAX_TOKENS)
        disaggregated = frontend.generate(
            "decode-r", prompt, MAX_TOKENS, prefill_worker="prefill-a"
        )
        check_equal(disaggregated, aggregated)
        assert len(aggregated.tokens) == MAX_TOKENS
        num_blocks = -(-length // BLOCK_SIZE)
        stats = disaggregated.stats
        assert stats["prefill_worker"] == "prefill-a" and stats["fallback"] == "", stats
        assert (stats["computed_tokens"], stats["cached_tokens"]) == (length, 0)
        assert stats["transferred_blocks"] == num_blocks  # the partial last block too
        assert float(stats["kv_transfer_ms"]) > 0
        assert aggregated.stats["kv_transfer_ms"] == 0
        assert aggregated.stats["computed_tokens"] == length
        for result in (aggregated, disaggregated):
            assert result.chunks[0].stats["ttft_ms"] == result.stats["ttft_ms"]
            assert float(result.stats["ttft_ms"]) > 0
    # The decode worker computes the prompt itself when no prefill worker is named.
    local = frontend.generate("decode-r", prompt_of(40, seed=99), MAX_TOKENS)
    reference = frontend.generate("aggregated", prompt_of(40, seed=99), MAX_TOKENS)
    check_equal(local, reference)
    assert local.stats["prefill_worker"] == "" and local.stats["computed_tokens"] == 40


def test_concurrent_requests_are_batched_and_equal(deployment: ServingFleet) -> None:
    frontend = deployment.frontend
    prompts = [prompt_of(length, seed=1000 + length) for length in (9, 33, 70)]
    references = [frontend.generate("aggregated", p, MAX_TOKENS) for p in prompts]
    before = scrape(frontend.record("decode-r"))
    request_ids = [
        frontend.send("decode-r", p, MAX_TOKENS, prefill_worker="prefill-a") for p in prompts
    ]
    results = [frontend.result("decode-r", request_id) for request_id in request_ids]
    for result, reference in zip(results, references, strict=True):
        check_equal(result, reference)
    # Continuous batching: the decode steps computed more than one token on average.
    after = scrape(frontend.record("decode-r"))
    steps, tokens = (
        metric(after, name) - metric(before, name)
        for name in ("fabric_worker_decode_steps_total", "fabric_worker_decode_tokens_total")
    )
    assert tokens == 3 * (MAX_TOKENS - 1)
    assert steps < tokens, (steps, tokens)


def test_shared_prefix_is_computed_once(deployment: ServingFleet) -> None:
    frontend = deployment.frontend
    first = prompt_of(100, seed=7)
    second = first[:96] + prompt_of(20, seed=8)
    for prompt in (first, second):
        reference = frontend.generate("aggregated", prompt, MAX_TOKENS)
        result = frontend.generate("decode-r", prompt, MAX_TOKENS, prefill_worker="prefill-a")
        check_equal(result, reference)
    stats = result.stats
    assert (stats["computed_tokens"], stats["cached_tokens"]) == (20, 96)
    assert stats["local_prefix_tokens"] == 96  # the decode held the prefix already ...
    assert stats["transferred_blocks"] == 2  # ... and read only blocks 6 and 7 (116 tokens)
    assert reference.stats["computed_tokens"] == 20


def test_one_prefill_two_decodes_and_two_prefills_one_decode(deployment: ServingFleet) -> None:
    frontend = deployment.frontend
    prompts = [prompt_of(length, seed=2000 + length) for length in (21, 37, 52, 66)]
    references = [frontend.generate("aggregated", p, MAX_TOKENS) for p in prompts]
    routes = [  # (decode, prefill): 1P2D with prefill-a, 2P1D on decode-r
        ("decode-r", "prefill-a"),
        ("decode-f", "prefill-a"),
        ("decode-r", "prefill-b"),
        ("decode-r", "prefill-a"),
    ]
    sent = [
        (decode, frontend.send(decode, prompt, MAX_TOKENS, prefill_worker=prefill))
        for (decode, prefill), prompt in zip(routes, prompts, strict=True)
    ]
    for (decode, request_id), reference, (_, prefill) in zip(sent, references, routes, strict=True):
        result = frontend.result(decode, request_id)
        check_equal(result, reference)
        assert result.stats["prefill_worker"] == prefill


def test_abort_mid_stream_frees_blocks_on_both_sides(deployment: ServingFleet) -> None:
    frontend = deployment.frontend
    max_tokens = 1000
    request_id = frontend.send(
        "decode-r", prompt_of(64, seed=11), max_tokens, prefill_worker="prefill-a"
    )
    frontend.wait_chunks("decode-r", request_id, lambda chunks: len(chunks) >= 3)
    frontend.abort("decode-r", request_id)
    result = frontend.result("decode-r", request_id)
    assert result.final.finish_reason == "error"
    assert "aborted" in str(result.stats["error"])
    assert 3 <= len(result.tokens) < max_tokens
    assert wait_until(lambda: deployment.in_use_live()["decode-r"] == 0, 5.0), (
        deployment.in_use_live()
    )
    assert deployment.in_use_live()["prefill-a"] == 0
    errors = scrape(frontend.record("decode-r"))
    assert metric(errors, 'fabric_worker_errors_total{kind="aborted"}') >= 1


def test_request_larger_than_the_pool_is_refused(deployment: ServingFleet) -> None:
    frontend = deployment.frontend
    too_long = DEVICE_BLOCKS * BLOCK_SIZE  # prompt + max_tokens - 1 positions > the pool
    result = frontend.generate("decode-r", prompt_of(40, seed=12), too_long, prefill_worker="")
    assert result.final.finish_reason == "error" and result.tokens == []
    assert "does not fit" in str(result.stats["error"])
    unknown = frontend.generate("aggregated", [5000], 4)  # outside the vocabulary
    assert unknown.final.finish_reason == "error" and "vocabulary" in str(unknown.stats["error"])


def test_killed_prefill_worker_recompute_or_fail(deployment: ServingFleet) -> None:
    frontend = deployment.frontend
    prompt = prompt_of(50, seed=13)
    reference = frontend.generate("aggregated", prompt, MAX_TOKENS)
    warm = frontend.generate("decode-f", prompt_of(20, seed=14), 4, prefill_worker="prefill-b")
    assert warm.final.finish_reason == "length"  # decode-f has loaded prefill-b's metadata

    deployment.workers["prefill-b"].kill()
    recompute_id = frontend.send("decode-r", prompt, MAX_TOKENS, prefill_worker="prefill-b")
    fail_id = frontend.send("decode-f", prompt, MAX_TOKENS, prefill_worker="prefill-b")

    recomputed = frontend.result("decode-r", recompute_id)
    check_equal(recomputed, reference)
    assert "prefill-b" in str(recomputed.stats["fallback"])
    assert recomputed.stats["computed_tokens"] == 50
    failed = frontend.result("decode-f", fail_id)
    assert failed.final.finish_reason == "error" and failed.tokens == []
    assert "prefill failed" in str(failed.stats["error"])
    # A prefill worker nobody ever registered: the fallback applies at once.
    unknown = frontend.generate("decode-r", prompt, MAX_TOKENS, prefill_worker="prefill-zz")
    check_equal(unknown, reference)


def test_no_blocks_leaked_anywhere(deployment: ServingFleet) -> None:
    def idle() -> bool:
        return all(n == 0 for n in deployment.in_use_live().values())

    assert wait_until(idle, 5.0), f"{deployment.in_use_live()}\n{deployment.logs()}"
    for worker_id, worker in deployment.workers.items():
        if worker_id != "prefill-b":
            assert worker.proc.poll() is None, f"{worker_id} died:\n{worker.log_tail()}"
