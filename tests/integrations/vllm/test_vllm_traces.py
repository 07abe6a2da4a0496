"""The KV trace of vLLM requests (``fabric.integrations.vllm.traces``), built by the connector's
scheduler side from what it plans and what the workers report: vLLM's own prefix hit
(``device``), a node-tier hit loaded by a real worker from a real node cache, blocks the node
lost since the lookup (cut there, recomputed, the fallback says so), a P/D read (``prefill``,
the producer named) and one that failed; each returned in ``kv_transfer_params`` as
``fabric_stats`` and logged once as the reference workers' traces are.

Runs with the .venv-vllm interpreter::

    .venv-vllm/bin/python -m pytest tests/integrations/vllm -q -m "not slow"
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from page_fixtures import BS, vllm_hashes

pytest.importorskip("vllm", reason="run with .venv-vllm (launch/setup_vllm.sh)")

from connector_sides import NUM_BLOCKS, PROMPT, Instance

from fabric.kvbm import SequenceHash
from fabric.signal.kv_trace import KvTrace

LAST = len(PROMPT)
"""The prompt's length: vLLM computes its last token (position ``LAST - 1``) itself."""


def finish(instance: Instance, request: object) -> dict[str, str]:
    """vLLM's ``request_finished``: the ``fabric_stats`` of its ``kv_transfer_params``."""
    delay_free, params = instance.scheduler.request_finished(request, [])
    assert not delay_free
    stats: dict[str, str] = params["fabric_stats"]
    KvTrace.decode(stats["kv_trace"])  # the reference workers' wire form
    return stats


def test_a_computed_prompt_then_a_node_hit_past_a_local_hit(
    instances: list[Instance], caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = instances
    request, _ = writer.admit("w", [2, 3, 4, 5, 6, 7])
    writer.step("w", 0)
    assert finish(writer, request) == {
        "kv_trace": f"recompute:0-{LAST}",
        "prefill_worker": "",
        "fallback": "",
    }
    caplog.set_level(logging.DEBUG, logger="fabric.frontend.traces")
    # vLLM holds the first block itself; the node tier the four after it.
    request, num_external = reader.admit("r", [8, 0, 1, 9, 10, 11], num_local=BS)
    assert num_external == (NUM_BLOCKS - 1) * BS
    reader.step("r", BS + num_external)
    reader.scheduler.update_connector_output(reader.worker.take_load_errors())
    stats = finish(reader, request)
    assert stats["kv_trace"] == f"device:0-{BS},node:{BS}-{NUM_BLOCKS * BS},recompute:20-{LAST}"
    assert stats["fallback"] == ""
    logged = [r for r in caplog.records if r.getMessage().startswith("request r kv: ")]
    assert len(logged) == 1 and logged[0].levelno == logging.DEBUG  # no fallback: DEBUG
    view = json.loads(logged[0].getMessage().removeprefix("request r kv: "))["kv_trace"]
    assert [(s["source"], s["start"], s["end"]) for s in view["segments"]] == [
        ("device", 0, BS),
        ("node", BS, NUM_BLOCKS * BS),
        ("recompute", NUM_BLOCKS * BS, LAST),
    ]
    assert reader.scheduler.traces.recent("r") == {"kv_trace": view}


def test_blocks_the_node_lost_are_cut_from_the_trace_and_recomputed(
    instances: list[Instance], caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = instances
    writer.admit("w", [2, 3, 4, 5, 6, 7])
    writer.step("w", 0)
    request, num_external = reader.admit("r", [8, 0, 1, 9, 10, 11])
    assert num_external == NUM_BLOCKS * BS
    meta = reader.scheduler.build_connector_meta(reader.output("r", num_external))
    # The fourth block vanished from the node between the scheduler's lookup and the load.
    hashes = vllm_hashes(PROMPT[: NUM_BLOCKS * BS])
    (load,) = meta.node_loads
    meta.node_loads[0] = dataclasses.replace(
        load, hashes=(*hashes[:3], SequenceHash(hashes[3] ^ 1), hashes[4])
    )
    reader.worker.start_load_kv(meta)
    errors = reader.worker.take_load_errors()
    assert errors == {9, 10}
    caplog.set_level(logging.INFO, logger="fabric.frontend.traces")
    reader.scheduler.update_connector_output(errors)
    stats = finish(reader, request)
    assert stats["kv_trace"] == f"node:0-{3 * BS},recompute:{3 * BS}-{LAST}"
    assert (
        stats["fallback"] == f"the node tier's load failed at token {3 * BS}; recomputed from there"
    )
    logged = [r for r in caplog.records if r.getMessage().startswith("request r kv: ")]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO  # a fallback: INFO


def consumer(kv_role: str = "kv_consumer") -> Instance:
    """A P/D consumer's connector (scheduler side; its worker would join etcd)."""
    return Instance({"etcd_endpoints": "http://127.0.0.1:9", "worker_id": "d-0"}, 3, kv_role)


def prefill_params() -> dict[str, object]:
    return {
        "do_remote_prefill": True,
        "remote_worker_id": "prefill-7",
        "remote_request_id": "p-1",
        "remote_num_tokens": len(PROMPT),
    }


def test_a_p_d_read_is_a_prefill_segment_named_by_its_producer() -> None:
    decode = consumer()
    try:
        request, num_external = decode.admit("d", [4, 5, 6, 7, 8, 9], params=prefill_params())
        assert num_external == LAST  # the whole prompt is read
        decode.scheduler.update_connector_output(set())
        # Once the read landed vLLM schedules the request again, without a lookup.
        decode.scheduler.update_state_after_alloc(request, [4, 5, 6, 7, 8, 9], 0)
        stats = finish(decode, request)
    finally:
        decode.close()
    assert stats == {
        "kv_trace": f"prefill:0-{LAST - 1},recompute:{LAST - 1}-{LAST}",
        "prefill_worker": "prefill-7",
        "fallback": "",
    }


def test_a_failed_p_d_read_is_recomputed_and_says_from_whom() -> None:
    decode = consumer("kv_both")  # an aggregated instance reads a peer's blocks: ``peer``
    try:
        request, _ = decode.admit("d", [4, 5, 6, 7, 8, 9], num_local=BS, params=prefill_params())
        assert decode.scheduler.traces.remote_source.value == "peer"
        decode.scheduler.update_connector_output({5, 6, 7, 8, 9})  # the read failed: all
        stats = finish(decode, request)
    finally:
        decode.close()
    assert stats == {
        "kv_trace": f"device:0-{BS},recompute:{BS}-{LAST}",
        "prefill_worker": "",
        "fallback": f"the read from prefill-7 failed at token {BS}; recomputed from there",
    }


def test_a_request_never_allocated_has_an_empty_trace(instances: list[Instance]) -> None:
    writer, _ = instances
    request, _ = writer.admit("w", [2, 3, 4, 5, 6, 7])
    writer.scheduler.request_finished(request, [])
    never = type(request)(**{**vars(request), "request_id": "aborted"})
    assert finish(writer, never) == {"kv_trace": "", "prefill_worker": "", "fallback": ""}
