"""Layer-wise P/D end to end: real etcd, worker processes, NIXL reads over UCX on CPU.

Workers on the tiny model in one etcd namespace: two prefill workers that grant layer-wise
handoffs (``prefill-lw``; ``prefill-k``, killed mid-stream), one that does not
(``prefill-whole``, ``--kv-handoff whole``), two decode workers that ask for them (``decode-lw``;
``decode-k``, killed mid-stream), one that does not (``decode-whole``), and an aggregated worker
for the reference outputs. This process speaks the frontend's protocol.

Checked: a layer-wise request's output equals the aggregated one token for token and its decode
read layers while the prompt was computed (``kv_early_reads`` > 0); with either side set to
``whole`` the handoff falls back to today's whole-prompt offer (no early read) with the same
output; a prefill SIGKILLed mid-stream (after the decode's first layer READs completed) is
recomputed around, the output still equal; a decode SIGKILLed mid-stream leaves no block held on
its prefill; no worker holds a block at the end. Every process is stopped in the fixture's
teardown; every wait is bounded.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness_probes import wait_until
from serving_harness import (
    ServingFleet,
    check_equal,
    prompt_of,
    scrape,
    serving_fleet,
)

pytestmark = [pytest.mark.etcd, pytest.mark.nixl]

BLOCK_SIZE = 16
DEVICE_BLOCKS = 320
MAX_TOKENS = 12
LONG = 3000  # tokens: a prefill of a few hundred ms on the tiny model, long enough to kill into
BOUND_S = 20.0
WORKERS = {
    "prefill-lw": ("prefill", []),
    "prefill-k": ("prefill", []),
    "prefill-whole": ("prefill", ["--kv-handoff=whole"]),
    "decode-lw": ("decode", []),
    "decode-k": ("decode", []),
    "decode-whole": ("decode", ["--kv-handoff=whole"]),
    "aggregated": ("aggregated", []),
}


class Deployment(ServingFleet):
    """The module's fleet, with its NIXL read counts."""

    def reads_done(self, worker_id: str) -> float:
        """NIXL READs the worker completed (``fabric_nixl_transfers_total``)."""
        text = scrape(self.frontend.record(worker_id))
        prefix = 'fabric_nixl_transfers_total{op="READ",outcome="done"} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    extra = [
        f"--device-blocks={DEVICE_BLOCKS}",
        f"--block-size={BLOCK_SIZE}",
        "--registration-ttl=1",
    ]
    with serving_fleet(tmp_path_factory.mktemp("layerwise"), WORKERS, extra) as (frontend, workers):
        yield Deployment(frontend, workers)


@pytest.mark.parametrize("length", [5, 40, 130, 1000])
def test_layerwise_output_equals_aggregated(deployment: Deployment, length: int) -> None:
    frontend = deployment.frontend
    prompt = prompt_of(length, seed=length)
    aggregated = frontend.generate("aggregated", prompt, MAX_TOKENS)
    layerwise = frontend.generate("decode-lw", prompt, MAX_TOKENS, prefill_worker="prefill-lw")
    check_equal(layerwise, aggregated)
    stats = layerwise.stats
    assert stats["prefill_worker"] == "prefill-lw" and stats["fallback"] == "", stats
    assert stats["transferred_blocks"] == -(-length // BLOCK_SIZE)
    assert int(stats["kv_early_reads"]) > 0, stats  # layers read while the prompt was computed
    # the whole read (first READ to last) includes what TTFT waited for after BlocksReady
    assert float(stats["kv_transfer_ms"]) >= float(stats["kv_wait_ms"]) > 0, stats


@pytest.mark.parametrize(
    ("decode", "prefill"),
    [("decode-whole", "prefill-lw"), ("decode-lw", "prefill-whole")],
    ids=["decode-whole", "prefill-whole"],
)
def test_either_side_whole_keeps_the_whole_prompt_handoff(
    deployment: Deployment, decode: str, prefill: str
) -> None:
    frontend = deployment.frontend
    prompt = prompt_of(130, seed=7)
    reference = frontend.generate("aggregated", prompt, MAX_TOKENS)
    result = frontend.generate(decode, prompt, MAX_TOKENS, prefill_worker=prefill)
    check_equal(result, reference)
    stats = result.stats
    assert stats["prefill_worker"] == prefill and stats["fallback"] == "", stats
    assert stats["kv_early_reads"] == 0 and stats["transferred_blocks"] == 9, stats
    assert stats["kv_transfer_ms"] == stats["kv_wait_ms"], stats  # a whole read is all waited for


def test_prefill_killed_mid_stream_is_recomputed_around(deployment: Deployment) -> None:
    frontend = deployment.frontend
    prompt = prompt_of(LONG, seed=21)
    reference = frontend.generate("aggregated", prompt, MAX_TOKENS)
    before = deployment.reads_done("decode-lw")
    request_id = frontend.send("decode-lw", prompt, MAX_TOKENS, prefill_worker="prefill-k")
    started = wait_until(lambda: deployment.reads_done("decode-lw") > before, BOUND_S, 0.005)
    assert started, deployment.logs("decode-lw", "prefill-k")
    deployment.workers["prefill-k"].kill()  # the stream has begun, the prompt is not done
    result = frontend.result("decode-lw", request_id)
    check_equal(result, reference)
    assert "prefill-k" in str(result.stats["fallback"]) or "read" in str(result.stats["fallback"])
    assert result.stats["computed_tokens"] == LONG
    assert wait_until(lambda: deployment.in_use("decode-lw") == 0, BOUND_S)


def test_decode_killed_mid_stream_releases_the_prefill(deployment: Deployment) -> None:
    frontend = deployment.frontend
    before = deployment.reads_done("decode-k")
    frontend.send("decode-k", prompt_of(LONG, seed=22), MAX_TOKENS, prefill_worker="prefill-lw")
    started = wait_until(lambda: deployment.reads_done("decode-k") > before, BOUND_S, 0.005)
    assert started, deployment.logs("decode-k", "prefill-lw")
    deployment.workers["decode-k"].kill()
    released = wait_until(lambda: deployment.in_use("prefill-lw") == 0, BOUND_S)
    assert released, deployment.logs("prefill-lw")
    # the prefill still serves
    prompt = prompt_of(40, seed=23)
    reference = frontend.generate("aggregated", prompt, MAX_TOKENS)
    check_equal(
        frontend.generate("decode-lw", prompt, MAX_TOKENS, prefill_worker="prefill-lw"), reference
    )


def test_no_blocks_leaked_anywhere(deployment: Deployment) -> None:
    live = [w for w, p in deployment.workers.items() if p.proc.poll() is None]
    assert set(WORKERS) - set(live) <= {"prefill-k", "decode-k"}
    idle = lambda: all(deployment.in_use(w) == 0 for w in live)  # noqa: E731
    assert wait_until(idle, 5.0), {w: deployment.in_use(w) for w in live}
