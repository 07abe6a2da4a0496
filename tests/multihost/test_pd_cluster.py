"""2P2D across three hosts on a three-member etcd cluster, through the OpenAI frontend.

One lab for the module (``conftest.make_lab``): hosts h1, h2, h3, each running an etcd member of
one cluster. h1 runs the frontend of the P/D deployment and, in a discovery namespace of its own,
the aggregated reference (one worker and its frontend); h2 runs both prefill workers, h3 both
decode workers, so every KV transfer crosses hosts, over UCX on TCP (``netns_harness.UCX_ENV``).
Every worker and frontend is given all three etcd endpoints. The workers' advertised hosts
come three ways: the route to etcd (``--bind-host=0.0.0.0``: prefill-0, decode-0), the bind
address (prefill-1) and ``--advertise-host`` (decode-1).

A third discovery namespace holds aggregated workers behind their own frontend on h1: a and b
(h2, h3), for a peer hit across hosts, and g (h3) which shares a G4 directory with the reference
worker (h1): one filesystem here, which every namespace sees, as a network filesystem would.

Checked, in order (each test leaves the deployment serving):
* every endpoint in the records is the worker's host address; outputs equal the aggregated
  worker's for each of the four prefill/decode pairs and for routed requests, with KV moved;
* a peer hit: the prefix one aggregated worker computed is read by the other across hosts, the
  output equal to the reference's;
* G4: blocks the reference wrote on h1 are prefix hits for g on h3, no peer involved;
* the etcd leader killed (SIGKILL) while requests flow: none fails, every worker keeps its
  lease (none re-registers under a new one) past twice the lease TTL, and a worker started
  afterwards is seen by the frontend and serves;
* a prefill worker killed while its prompts are queued or computed: the decode recomputes them
  (outputs equal, ``fallback`` says why) within the request deadline;
* a decode worker killed mid-request: its requests fail within the frontend's idle deadline,
  the other decode's requests complete with the reference's output, and the surviving hosts
  hold no blocks, no handoffs and no process of the killed worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from cluster_harness import Deployment, MakeLab, start_etcd_cluster
from harness_probes import metric, scrape, wait_until

from fabric.bench.netns import Host, Lab, ns_pids
from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer

pytestmark = [pytest.mark.multihost, pytest.mark.etcd, pytest.mark.nixl]

MODEL = "tiny"
MAX_TOKENS = 12
TTL_S = 5.0  # the workers' default registration TTL
G4_BLOCKS = 512
IDLE_TIMEOUT_S = 20.0  # the frontend's --idle-timeout (cluster_harness)
REQUEST_TIMEOUT_S = 60.0


def token_prompt(length: int, seed: int) -> list[int]:
    """``length`` token ids of the tiny vocabulary, never BOS (0) or EOS (1)."""
    return [(7 * i + 13 * seed + 3) % 1000 + 2 for i in range(length)]


PROMPTS: list[str | list[int]] = [
    "The fabric moves KV blocks between hosts",
    "Across three hosts the prefill runs on one and decode on another; " * 4,
    token_prompt(150, seed=0),
]


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    completion_tokens: int
    fabric: dict[str, Any]

    def output(self) -> tuple[str, str | None, int]:
        return self.text, self.finish_reason, self.completion_tokens


def complete(
    client: openai.OpenAI,
    prompt: str | list[int],
    max_tokens: int = MAX_TOKENS,
    route: dict[str, str] | None = None,
) -> Answer:
    response = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        extra_body={"fabric": route} if route else None,
    )
    assert response.usage is not None
    return Answer(
        response.choices[0].text,
        response.choices[0].finish_reason,
        response.usage.completion_tokens,
        dict((response.model_extra or {})["fabric"]),
    )


@dataclass
class Cluster:
    lab: Lab
    members: list[EtcdServer]
    registry: EtcdRegistry
    pd: Deployment
    reference: Deployment
    peer: Deployment
    shared_dir: Path
    answers: dict[tuple[str, int], Answer]

    def host(self, name: str) -> Host:
        return self.lab.hosts[name]

    def expected(self, prompt: str | list[int], max_tokens: int = MAX_TOKENS) -> Answer:
        key = (repr(prompt), max_tokens)
        if key not in self.answers:
            answer = complete(self.reference.client(), prompt, max_tokens)
            assert answer.fabric["decode_worker"] == "aggregated-0"
            self.answers[key] = answer
        return self.answers[key]


@pytest.fixture(scope="module")
def cluster(
    make_lab: MakeLab, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    lab = make_lab(["h1", "h2", "h3"])
    h1, h2, h3 = (lab.hosts[n] for n in ("h1", "h2", "h3"))
    members = start_etcd_cluster([h1, h2, h3], tmp_path_factory.mktemp("etcd"))
    shared_dir = tmp_path_factory.mktemp("g4")  # one filesystem: every namespace sees it
    g4 = [f"--shared-disk-dir={shared_dir}", f"--shared-disk-blocks={G4_BLOCKS}"]
    etcd = ",".join(m.endpoint for m in members)
    registry = EtcdRegistry(etcd, timeout_s=2.0)
    pd = Deployment(lab, etcd, tiny_dir, "pd", h1)
    reference = Deployment(lab, etcd, tiny_dir, "ref", h1)
    peer = Deployment(lab, etcd, tiny_dir, "peer", h1)
    try:
        pd.start_frontend(8000)
        reference.start_frontend(8001)
        peer.start_frontend(8002)
        pd.start_worker("prefill", "prefill-0", h2)
        pd.start_worker("prefill", "prefill-1", h2, f"--bind-host={h2.address}")
        pd.start_worker("decode", "decode-0", h3)
        pd.start_worker(
            "decode", "decode-1", h3, "--bind-host=0.0.0.0", f"--advertise-host={h3.address}"
        )
        reference.start_worker("aggregated", "aggregated-0", h1, *g4)
        peer.start_worker("aggregated", "aggregated-a", h2)
        peer.start_worker("aggregated", "aggregated-b", h3)
        peer.start_worker("aggregated", "aggregated-g", h3, *g4)
        pd.wait_ready(4)
        reference.wait_ready(1)
        peer.wait_ready(3)
        yield Cluster(lab, members, registry, pd, reference, peer, shared_dir, {})
    finally:
        registry.close()
        lab.stop_children()
        for member in members:
            member.close()


def test_2p2d_across_hosts_equals_the_aggregated_worker(cluster: Cluster) -> None:
    h2, h3 = cluster.host("h2"), cluster.host("h3")
    records = cluster.pd.records(cluster.registry)
    host_of = {"prefill-0": h2, "prefill-1": h2, "decode-0": h3, "decode-1": h3}
    assert set(records) == set(host_of)
    for worker_id, record in records.items():
        endpoints = record.endpoints
        for endpoint in (endpoints.signal, endpoints.metrics, endpoints.events):
            assert endpoint is not None and f"://{host_of[worker_id].address}:" in endpoint, (
                worker_id,
                endpoints,
            )
    client = cluster.pd.client()
    for prompt in PROMPTS:  # routed by the frontend
        got = complete(client, prompt)
        assert got.output() == cluster.expected(prompt).output(), (prompt, got.fabric)
        assert got.fabric["prefill_worker"] in ("prefill-0", "prefill-1"), got.fabric
    pairs = [(p, d) for p in ("prefill-0", "prefill-1") for d in ("decode-0", "decode-1")]
    for k, (prefill, decode) in enumerate(pairs):  # every pair: h2 -> h3 over TCP
        prompt = token_prompt(150, seed=k + 1)  # new to every worker: no local prefix hit
        got = complete(client, prompt, route={"worker": decode, "prefill_worker": prefill})
        assert got.output() == cluster.expected(prompt).output(), got.fabric
        assert (got.fabric["decode_worker"], got.fabric["prefill_worker"]) == (decode, prefill)
        assert got.fabric["transferred_blocks"] == -(-150 // 16), got.fabric  # every block read


def test_peer_hit_read_across_hosts(cluster: Cluster) -> None:
    client = cluster.peer.client()
    prefix = token_prompt(160, seed=70)
    first = complete(client, prefix, route={"worker": "aggregated-a", "prefill_worker": ""})
    assert first.output() == cluster.expected(prefix).output(), first.fabric
    assert first.fabric["decode_worker"] == "aggregated-a"
    prompt = prefix + token_prompt(20, seed=71)  # aggregated-b has none of it cached
    route = {"worker": "aggregated-b", "prefill_worker": "aggregated-a"}
    got = complete(client, prompt, route=route)
    assert got.output() == cluster.expected(prompt).output(), got.fabric
    assert got.fabric["prefill_worker"] == "aggregated-a", got.fabric  # read from h2 on h3
    assert got.fabric["transferred_blocks"] >= len(prefix) // 16, got.fabric


def test_g4_blocks_written_on_one_host_are_hits_on_another(cluster: Cluster) -> None:
    prompt = token_prompt(200, seed=90)
    expected = cluster.expected(prompt)  # the reference (h1) computes it and stores it in G4
    num_full = len(prompt) // 16

    def stored() -> int:
        return sum(1 for _ in cluster.shared_dir.rglob("*.kvb"))

    assert wait_until(lambda: stored() >= num_full, 30), stored()
    route = {"worker": "aggregated-g", "prefill_worker": ""}
    got = complete(cluster.peer.client(), prompt, route=route)
    assert got.output() == expected.output(), got.fabric
    assert got.fabric["decode_worker"] == "aggregated-g"
    assert got.fabric["prefill_worker"] == "", got.fabric  # no peer: from the shared directory
    assert got.fabric["cached_tokens"] >= num_full * 16 - 16, got.fabric


def test_etcd_leader_killed_mid_run(cluster: Cluster) -> None:
    leaders = [m for m in cluster.members if m.running and m.is_leader()]
    assert len(leaders) == 1, [m.status() for m in cluster.members]
    leader = leaders[0]
    client = cluster.pd.client()
    prompt = PROMPTS[1]
    expected = cluster.expected(prompt).output()
    results: list[tuple[float, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                got = complete(client, prompt)
                results.append((time.monotonic(), "ok" if got.output() == expected else "wrong"))
            except openai.APIError as exc:
                results.append((time.monotonic(), f"error: {exc}"))

    sender = threading.Thread(target=traffic, name="traffic")
    sender.start()
    try:
        assert wait_until(lambda: len(results) >= 2, 60), results
        leader.kill()
        killed_at = time.monotonic()
        # Keep requests flowing past twice the lease TTL: a lease that was not kept alive
        # through the election would have expired by then.
        num_records: set[int] = set()
        while time.monotonic() < killed_at + 2 * TTL_S + 1:
            num_records.add(len(cluster.pd.records(cluster.registry)))
            time.sleep(0.5)
    finally:
        stop.set()
        sender.join(REQUEST_TIMEOUT_S)
    after = [outcome for at, outcome in results if at > killed_at]
    assert after and all(outcome == "ok" for _, outcome in results), results
    assert num_records == {4}, num_records
    for name in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        log = cluster.pd.children[name].log_path.read_text(errors="replace")
        assert "(a new lease" not in log, f"{name} lost its lease:\n{log[-3000:]}"
    # The frontend's watch survived: a worker started now is seen, and serves.
    cluster.pd.start_worker("prefill", "prefill-2", cluster.host("h3"))
    assert wait_until(lambda: cluster.pd.workers_seen().get("prefill") == 3, 120), (
        cluster.pd.health(),
        cluster.pd.logs(),
    )
    fresh = token_prompt(100, seed=50)  # not cached on decode-0 yet
    got = complete(client, fresh, route={"worker": "decode-0", "prefill_worker": "prefill-2"})
    assert got.output() == cluster.expected(fresh).output()
    assert got.fabric["prefill_worker"] == "prefill-2", got.fabric
    child = cluster.pd.children.pop("prefill-2")
    child.process.terminate()
    assert child.process.wait(30) == 0
    assert wait_until(lambda: cluster.pd.workers_seen().get("prefill") == 2, 30)


def test_prefill_killed_mid_run_is_recomputed(cluster: Cluster) -> None:
    client = cluster.pd.client()
    prompts = [token_prompt(1500, seed=100 + i) for i in range(4)]
    expected = [cluster.expected(p).output() for p in prompts]
    victim = cluster.pd.children["prefill-1"]
    victim_metrics = cluster.pd.records(cluster.registry)["prefill-1"].endpoints.metrics or ""
    route = {"worker": "decode-0", "prefill_worker": "prefill-1"}

    def send(prompt: list[int]) -> tuple[Answer, float]:
        return complete(client, prompt, route=route), time.monotonic()

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(send, p) for p in prompts]
        assert wait_until(
            lambda: (
                metric(scrape(victim_metrics), "fabric_worker_requests_total", 0.0, kind="prefill")
                >= 1
            ),
            60,
        ), cluster.pd.logs()
        victim.process.kill()
        killed_at = time.monotonic()
        results = [f.result(REQUEST_TIMEOUT_S) for f in futures]
    for (got, ended_at), want in zip(results, expected, strict=True):
        assert got.output() == want, got.fabric  # recomputed on decode-0, or read before
        assert ended_at - killed_at < REQUEST_TIMEOUT_S, got.fabric
    recomputed = [got.fabric for got, _ in results if got.fabric["prefill_worker"] == ""]
    assert recomputed and all(f["fallback"] for f in recomputed), [g.fabric for g, _ in results]
    assert wait_until(lambda: cluster.pd.workers_seen().get("prefill") == 1, 3 * TTL_S)


def test_decode_killed_mid_request(cluster: Cluster) -> None:
    client = cluster.pd.client()
    prompt = PROMPTS[2]
    long_tokens = 600
    expected = cluster.expected(prompt, long_tokens).output()
    records = cluster.pd.records(cluster.registry)
    victim = cluster.pd.children["decode-1"]
    victim_metrics = records["decode-1"].endpoints.metrics or ""

    def send(decode: str) -> tuple[str, float]:
        route = {"worker": decode, "prefill_worker": "prefill-0"}
        try:
            got = complete(client, prompt, long_tokens, route=route)
        except openai.APIError as exc:
            return f"error: {type(exc).__name__}", time.monotonic()
        return ("ok" if got.output() == expected else "wrong"), time.monotonic()

    with ThreadPoolExecutor(4) as pool:
        doomed = [pool.submit(send, "decode-1") for _ in range(2)]
        kept = [pool.submit(send, "decode-0") for _ in range(2)]
        assert wait_until(
            lambda: metric(scrape(victim_metrics), "fabric_worker_active_requests", 0.0) >= 1, 60
        ), cluster.pd.logs()
        victim.process.kill()
        killed_at = time.monotonic()
        doomed_results = [f.result(REQUEST_TIMEOUT_S) for f in doomed]
        kept_results = [f.result(REQUEST_TIMEOUT_S) for f in kept]
    assert [outcome for outcome, _ in kept_results] == ["ok", "ok"], kept_results
    for outcome, ended_at in doomed_results:
        # failed (or, had it finished before the kill, correct), within the idle deadline
        assert outcome.startswith("error") or outcome == "ok", doomed_results
        assert ended_at - killed_at < IDLE_TIMEOUT_S + 10, doomed_results
    assert any(outcome.startswith("error") for outcome, _ in doomed_results), doomed_results
    # nothing leaked on the surviving hosts
    survivors = ("prefill-0", "decode-0")

    def idle() -> bool:
        for worker_id in survivors:
            text = scrape(records[worker_id].endpoints.metrics or "")
            if metric(text, "fabric_kvbm_blocks_in_use", 0.0, tier="G1") != 0:
                return False
            if metric(text, "fabric_worker_held_handoffs", 0.0) != 0:
                return False
        return True

    assert wait_until(idle, 3 * TTL_S + 10), cluster.pd.logs()
    assert wait_until(lambda: cluster.pd.workers_seen().get("decode") == 1, 3 * TTL_S)
    assert victim.process.pid not in ns_pids(cluster.host("h3").netns)
    served = complete(client, PROMPTS[0])  # the survivors still serve
    assert served.output() == cluster.expected(PROMPTS[0]).output()
    assert served.fabric["decode_worker"] == "decode-0"
