"""The manifests' own commands, run as pods on lab hosts: they form the deployment they describe.

One network namespace per pod (``fabric.bench.netns``), each pod's container started
by ``pod_runner`` from its template in ``deploy/k8s`` (the three etcd members of the
StatefulSet, one prefill, one decode, one frontend, the node cache), with the manifests'
secrets made here (a CURVE key pair, an API key, etcd's CA, server and client certificates:
etcd serves TLS to certificate holders only). Checked as a cluster would see it: every
readiness, liveness and startup probe passes on the address and port it names; the workers'
records advertise their pod addresses; the frontend's Service port answers a completion with
the API key and 401 without, and the prefill worker stores the prompt's blocks in the node
cache through the host directories the pods share; every scraped port serves metrics; every
pod stops with status 0 within its termination grace period on SIGTERM, the node cache
unlinking its segment.

Marked ``multihost``; skipped with the reason where network namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from k8s_checks import Manifest, all_containers, load_manifests
from pod_runner import Pod, PodRunner, http_status, probe
from prometheus_client.parser import text_string_to_metric_families

from fabric.auth import keygen
from fabric.bench.netns import Lab, LabUnavailable, check_available, sweep_stale
from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_certs import TlsMaterial, generate
from fabric.discovery.records import WorkerRecord
from fabric.discovery.registry import DEFAULT_NAMESPACE, workers_prefix
from fabric.errors import FabricError
from fabric.node.config import segment_name

pytestmark = pytest.mark.multihost

STARTUP_S = 240.0
PODS = {  # (kind, name) -> how many pods of it run here
    ("StatefulSet", "etcd"): 3,
    ("Deployment", "prefill"): 1,
    ("Deployment", "decode"): 1,
    ("Deployment", "frontend"): 1,
    ("DaemonSet", "node-cache"): 1,
}


def owner_key(manifest: Manifest) -> tuple[str, str]:
    return manifest.doc["kind"], manifest.doc["metadata"]["name"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    try:
        check_available()
    except LabUnavailable as exc:
        pytest.skip(f"no network namespaces: {exc}")
    sweep_stale()
    names = [f"{name}-{i}" for (_, name), count in PODS.items() for i in range(count)]
    lab = Lab(tmp_path_factory.mktemp("k8s-lab")).open(names)
    try:
        yield lab
    finally:
        lab.close()
        assert lab.leftovers() == []


@pytest.fixture(scope="module")
def etcd_tls(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """etcd's CA, server and client certificates, as docs/deploy.md makes them (the server's
    names, and the members' addresses: the pods reach etcd at those here)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: etcd's certificates cannot be made")
    members = [lab.hosts[f"etcd-{i}"] for i in range(PODS[("StatefulSet", "etcd")])]
    hosts = tuple(f"etcd-{i}.etcd" for i in range(len(members))) + tuple(
        member.address for member in members
    )
    return generate(tmp_path_factory.mktemp("etcd-tls"), hosts=hosts)


@pytest.fixture(scope="module")
def keys(
    etcd_tls: TlsMaterial, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, str]]:
    """The manifests' Secrets: item -> content."""
    return {
        "kv-fabric-keys": {
            "curve.key_secret": keygen(tmp_path_factory.mktemp("keys")).read_text(),
            "api-key": secrets.token_urlsafe(16),
            "etcd-ca.pem": etcd_tls.ca.read_text(),
            "etcd-client.pem": etcd_tls.client_cert.read_text(),
            "etcd-client-key.pem": etcd_tls.client_key.read_text(),
        },
        "etcd-tls": {
            "ca.pem": etcd_tls.ca.read_text(),
            "server.pem": etcd_tls.server_cert.read_text(),
            "server-key.pem": etcd_tls.server_key.read_text(),
        },
    }


@pytest.fixture(scope="module")
def node() -> str:
    """The node every pod runs on (unique: it names the node cache's shared memory segment)."""
    return f"k8s-{os.getpid()}-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def pods(
    lab: Lab,
    keys: dict[str, dict[str, str]],
    node: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Pod]]:
    """Every pod of ``PODS`` started, each ready per its readiness probe."""
    runner = PodRunner(tmp_path_factory.mktemp("k8s"), keys, node)
    for i in range(PODS[("StatefulSet", "etcd")]):
        runner.dns[f"etcd-{i}.etcd"] = lab.hosts[f"etcd-{i}"].address
    started: dict[str, Pod] = {}
    try:
        for container in all_containers(load_manifests()):
            count = PODS.get(owner_key(container.owner), 0)
            if container.init or count == 0:
                continue
            for i in range(count):
                name = f"{container.owner.doc['metadata']['name']}-{i}"
                started[name] = runner.start(container, name, lab.hosts[name])
        wait_ready(lab, list(started.values()))
        yield started
    finally:
        lab.stop_children()
        segment = Path("/dev/shm") / segment_name(DEFAULT_NAMESPACE, node)
        segment.unlink(missing_ok=True)
        segment.with_name(f"{segment.name}.owner").unlink(missing_ok=True)  # claim_segment's
        runner.cleanup()


def wait_ready(lab: Lab, pods: list[Pod]) -> None:
    deadline = time.monotonic() + STARTUP_S
    waiting = [pod for pod in pods if "readinessProbe" in pod.container.spec]
    while waiting:
        for pod in pods:
            if pod.child.process.poll() is not None:
                pytest.fail(
                    f"{pod.name} exited {pod.child.process.returncode}:\n{pod.child.tail()}"
                )
        waiting = [pod for pod in waiting if not probe(pod, "readinessProbe")]
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.child.tail()}" for p in waiting)
            pytest.fail(f"not ready after {STARTUP_S:.0f} s: {[p.name for p in waiting]}\n{tails}")
        time.sleep(0.5)


def test_every_probe_passes(pods: dict[str, Pod]) -> None:
    for pod in pods.values():
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            if kind in pod.container.spec:
                assert probe(pod, kind), f"{pod.name}: {kind} fails"


def test_workers_advertise_their_pod_addresses(
    pods: dict[str, Pod], etcd_tls: TlsMaterial, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoints = ",".join(f"https://{pods[f'etcd-{i}'].host.address}:2379" for i in range(3))
    monkeypatch.setenv("FABRIC_ETCD_CA_FILE", str(etcd_tls.ca))
    monkeypatch.setenv("FABRIC_ETCD_CERT_FILE", str(etcd_tls.client_cert))
    monkeypatch.setenv("FABRIC_ETCD_KEY_FILE", str(etcd_tls.client_key))
    registry = EtcdRegistry(endpoints, timeout_s=5.0)
    try:
        records = [
            WorkerRecord.from_bytes(value, key=key)
            for key, value in registry.get_prefix(workers_prefix(DEFAULT_NAMESPACE)).items()
        ]
    finally:
        registry.close()
    by_id = {record.worker_id: record for record in records}
    for name in ("prefill-0", "decode-0"):
        address = pods[name].host.address
        record = by_id[name]  # --worker-id=$(POD_NAME)
        assert f"//{address}:" in str(record.endpoints.signal), record
        assert f"//{address}:9400/" in str(record.endpoints.metrics), record
    assert any(record.role.value == "node-cache" for record in records), by_id
    # etcd serves only holders of a certificate of its CA (--client-cert-auth)
    monkeypatch.delenv("FABRIC_ETCD_CERT_FILE")
    monkeypatch.delenv("FABRIC_ETCD_KEY_FILE")
    with pytest.raises(FabricError):
        read_records(endpoints.split(",")[0])  # one member: refused within one call's bound


def read_records(endpoints: str) -> None:
    registry = EtcdRegistry(endpoints, timeout_s=3.0)
    try:
        registry.get_prefix(workers_prefix(DEFAULT_NAMESPACE))
    finally:
        registry.close()


def frontend_url(pods: dict[str, Pod]) -> str:
    (service,) = [m.doc for m in load_manifests() if owner_key(m) == ("Service", "frontend")]
    port = pods["frontend-0"].container.ports()[str(service["spec"]["ports"][0]["targetPort"])]
    return f"http://{pods['frontend-0'].host.address}:{port}"


def test_the_service_port_serves_completions_with_the_api_key(
    pods: dict[str, Pod], keys: dict[str, dict[str, str]]
) -> None:
    url = frontend_url(pods) + "/v1/completions"
    prompt = "Hello from a pod on a node with a cache. " * 8  # several full KV blocks
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 4}).encode()
    key = keys["kv-fabric-keys"]["api-key"]
    request = urllib.request.Request(
        url,
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    assert answer["choices"][0]["text"], answer
    assert answer["usage"]["completion_tokens"] == 4, answer
    anonymous = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anonymous, timeout=30)
    assert refused.value.code == 401
    # The prefill worker stored the prompt's blocks in the node cache: its socket and segment
    # are shared through the host directories as the manifests mount them.
    metrics = f"http://{pods['prefill-0'].host.address}:9400/metrics"
    assert wait_until(lambda: node_offloads(metrics) > 0, 30.0), scrape(metrics)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def node_offloads(url: str) -> float:
    """Blocks the worker at ``url`` stored in the node tier (G2N)."""
    for family in text_string_to_metric_families(scrape(url)):
        for sample in family.samples:
            if sample.name == "fabric_kvbm_offloads_total" and sample.labels.get("target") == "G2N":
                return float(sample.value)
    return 0.0


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_every_scraped_port_serves_metrics(
    pods: dict[str, Pod], keys: dict[str, dict[str, str]]
) -> None:
    key = keys["kv-fabric-keys"]["api-key"]
    for pod in pods.values():
        annotations = pod.container.pod["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        url = (
            f"http://{pod.host.address}:{annotations['prometheus.io/port']}"
            f"{annotations['prometheus.io/path']}"
        )
        headers = {"Authorization": f"Bearer {key}"}
        assert http_status(url, headers) == 200, f"{pod.name}: {url}"


def test_every_pod_stops_cleanly_within_its_grace_period(pods: dict[str, Pod], node: str) -> None:
    segment = Path("/dev/shm") / segment_name(DEFAULT_NAMESPACE, node)
    assert segment.exists()  # the node cache serves from it
    fabric = [pod for pod in pods.values() if not pod.name.startswith("etcd-")]
    for pod in fabric:  # before etcd, as the deployment's own pods are stopped first
        grace = pod.container.pod["spec"]["terminationGracePeriodSeconds"]
        pod.child.process.terminate()
        try:
            code: int | None = pod.child.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"{pod.name}: status {code} after SIGTERM\n{pod.child.tail()}"
    assert not segment.exists()  # unlinked by the node cache on SIGTERM
