"""Cross-instance prefix hits across processes, through the HTTP frontend and the ``openai``
client. A prompt computed by ``inst-a`` (no G4) is read by ``inst-b`` from ``inst-a`` over NIXL
(a peer hit the router chose from KV events); ``inst-b`` writes it through to its G4 directory;
after every worker process is stopped, a new instance on that directory serves it from G4. Each
answer equals the aggregated reference deployment's, token for token."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from e2e_harness import MODEL, Answer, Deployment, Reference, prompt_ids

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.nixl,
]

MAX_TOKENS = 8
SHARED_BLOCKS = 9


def pinned(client: openai.OpenAI, prompt: list[int], worker: str) -> Answer:
    response = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        extra_body={"fabric": {"worker": worker}},
    )
    assert response.usage is not None
    choice = response.choices[0]
    fabric = dict((response.model_extra or {})["fabric"])
    return Answer(choice.text, choice.finish_reason, response.usage.completion_tokens, fabric)


def kv_segments(answer: Answer) -> list[tuple[str, int, int, str]]:
    """The response's KV trace: (source, start, end, worker) per prompt range."""
    segments = answer.fabric["kv_trace"]["segments"]
    return [(s["source"], s["start"], s["end"], s["worker"]) for s in segments]


def test_peer_hit_then_shared_disk_hit_after_every_worker_restarted(
    etcd: EtcdServer,
    registry: EtcdRegistry,
    model_dir: Path,
    reference: Reference,
    tmp_path: Path,
) -> None:
    deployment = Deployment("sharing", etcd.endpoint, registry, model_dir, tmp_path / "logs")
    g4 = ["--shared-disk-dir", str(tmp_path / "g4"), "--shared-disk-blocks", "512"]
    shared = prompt_ids(SHARED_BLOCKS * 16, seed=31)
    first, second = shared + prompt_ids(6, seed=32), shared + prompt_ids(11, seed=33)
    try:
        deployment.spawn_frontend()
        deployment.spawn_worker("aggregated", "inst-a")  # G4 would make inst-b's hit local
        deployment.spawn_worker("aggregated", "inst-b", *g4)
        deployment.wait_workers(aggregated=2)
        client = deployment.client()

        computed = pinned(client, first, "inst-a")
        assert computed.fabric["route"] == "local" and computed.fabric["cached_tokens"] == 0
        assert computed.same_output(reference.answer(first, MAX_TOKENS))

        hit = pinned(client, second, "inst-b")  # the router names inst-a as the KV source
        assert (hit.fabric["route"], hit.fabric["prefill_worker"]) == ("peer_hit", "inst-a")
        assert hit.fabric["cached_tokens"] == SHARED_BLOCKS * 16
        assert kv_segments(hit) == [("peer", 0, len(second), "inst-a")]  # read over NIXL
        assert hit.same_output(reference.answer(second, MAX_TOKENS))
        computed_on_b = deployment.worker_metric("inst-b", "fabric_worker_computed_tokens_total")
        assert computed_on_b == 0  # inst-b computed nothing: the whole prompt came from inst-a

        for worker_id in ("inst-a", "inst-b"):
            deployment.procs[worker_id].stop()
        deployment.wait_workers(aggregated=0)
        deployment.spawn_worker("aggregated", "inst-c", *g4)
        deployment.wait_workers(aggregated=1)

        again = pinned(client, second, "inst-c")
        assert again.fabric["route"] == "local"
        assert again.fabric["cached_tokens"] == SHARED_BLOCKS * 16  # from G4, kept on disk
        assert kv_segments(again) == [
            ("g4", 0, SHARED_BLOCKS * 16, ""),
            ("recompute", SHARED_BLOCKS * 16, len(second), ""),
        ]
        assert again.same_output(hit)
        onboards = deployment.worker_metric(
            "inst-c", "fabric_kvbm_onboards_total", source="G4", target="G1"
        )
        assert onboards == SHARED_BLOCKS
        deployment.assert_no_blocks_in_use()
    finally:
        deployment.close()
