"""A prefill worker SIGKILLed with requests in flight, through the real HTTP frontend.

One deployment for the module, in its own namespace: ``prefill-v`` (the victim, lease TTL 3 s),
``decode-f`` (``--prefill-fallback fail``) and ``decode-r`` (``--prefill-fallback recompute``)
behind one frontend. The victim is paused (SIGSTOP) so that two requests are certainly in flight
on it, one on each decode worker, then SIGKILLed; its lease expires, both decode workers see it
leave, and each applies its fallback: ``decode-f`` answers a clear error (HTTP 500 naming the
prefill worker), ``decode-r`` recomputes the prompt and answers exactly what the aggregated
reference answers. No block stays in use on the surviving workers, and the deployment keeps
serving without the prefill worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from e2e_harness import (
    REQUEST_S,
    Deploy,
    Deployment,
    Reference,
    Worker,
    complete,
    prompt_ids,
    wait_until,
)

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.nixl,
]

MAX_TOKENS = 16
VICTIM_TTL_S = 3  # long enough that both requests are routed to the paused victim


@pytest.fixture(scope="module")
def faulty(deploy: Deploy, reference: Reference) -> Iterator[Deployment]:
    workers = [
        Worker("prefill", "prefill-v", (f"--registration-ttl={VICTIM_TTL_S}",)),
        Worker("decode", "decode-f", ("--prefill-fallback=fail",)),
        Worker("decode", "decode-r", ("--prefill-fallback=recompute",)),
    ]
    with deploy("fault", workers) as deployment:
        yield deployment


def test_prefill_killed_mid_request_fails_or_recomputes(
    faulty: Deployment, reference: Reference
) -> None:
    """Both fallbacks at once, no leaked blocks, then serving without any prefill worker."""
    prompt = prompt_ids(60, seed=41)
    want = reference.answer(prompt, MAX_TOKENS)
    warm = complete(faulty.client(), prompt_ids(20, seed=42), MAX_TOKENS)  # connects everything
    route = (warm.fabric["prefill_worker"], warm.fabric["decode_worker"])
    assert route == ("prefill-v", "decode-f")

    def in_flight(worker_id: str, count: int) -> bool:
        return faulty.frontend_in_flight(worker_id) == count

    def remote_prefill_pending(decode: str) -> bool:
        return faulty.worker_metric(decode, "fabric_worker_active_requests") == 1

    victim = faulty.procs["prefill-v"]
    with ThreadPoolExecutor(2) as pool:
        victim.pause()
        # Decode choice is by load, ties by id: the first request goes to decode-f, the second,
        # sent while the first is in flight, to decode-r. Both wait on the paused prefill.
        failing = pool.submit(complete, faulty.client(), prompt, MAX_TOKENS)
        assert wait_until(lambda: in_flight("decode-f", 1), 5.0), faulty.logs()
        recomputed = pool.submit(complete, faulty.client(), prompt, MAX_TOKENS)
        assert wait_until(lambda: in_flight("decode-r", 1), 5.0), faulty.logs()
        assert in_flight("prefill-v", 2)
        for decode in ("decode-f", "decode-r"):
            assert wait_until(lambda d=decode: remote_prefill_pending(d), 5.0), faulty.logs()
        victim.kill()

        with pytest.raises(openai.InternalServerError) as failed:
            failing.result(timeout=REQUEST_S)
        message = str(failed.value)
        assert "decode-f" in message and "prefill failed" in message
        assert "prefill-v" in message and "left the directory" in message

        got = recomputed.result(timeout=REQUEST_S)
    assert got.same_output(want), f"recomputed {got}\n!= aggregated {want}"
    assert got.fabric["decode_worker"] == "decode-r"
    assert "prefill-v" in str(got.fabric["fallback"])
    assert (got.fabric["computed_tokens"], got.fabric["kv_transfer_ms"]) == (60, 0)

    failures = faulty.worker_metric("decode-f", "fabric_worker_errors_total", kind="prefill_failed")
    assert failures == 1
    assert faulty.worker_metric("decode-r", "fabric_worker_prefill_fallbacks_total") == 1
    faulty.assert_no_blocks_in_use()
    assert set(faulty.blocks_in_use()) == {"decode-f", "decode-r"}
    for worker_id in ("decode-f", "decode-r"):
        assert wait_until(lambda w=worker_id: in_flight(w, 0), 5.0)

    # The frontend saw the prefill worker leave; the decode workers now serve alone.
    faulty.wait_workers(prefill=0, decode=2, timeout_s=10.0)
    prompt = prompt_ids(45, seed=43)
    got = complete(faulty.client(), prompt, MAX_TOKENS)
    assert got.same_output(reference.answer(prompt, MAX_TOKENS))
    assert got.fabric["prefill_worker"] == "" and got.fabric["fallback"] == ""
    assert got.fabric["computed_tokens"] == 45
    faulty.assert_no_blocks_in_use()
