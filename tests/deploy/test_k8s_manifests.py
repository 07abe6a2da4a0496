"""The Kubernetes manifests of ``deploy/k8s``: valid for the pinned Kubernetes version, and
tied to the code (``k8s_checks``: commands that parse, probes and scrapes on served ports,
services that select pods, variables the code reads, one etcd cluster).

Each check must find nothing in the shipped manifests, and must find the defect in a copy broken
on purpose (so a check that stopped looking would fail here).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from k8s_checks import (
    CHECKS,
    KUSTOMIZATION,
    MANIFEST_DIR,
    REPO,
    Manifest,
    Problems,
    all_containers,
    load_manifests,
)

MANIFESTS = load_manifests()


def test_the_deployment_is_all_there() -> None:
    kinds = {(m.doc["kind"], m.doc["metadata"]["name"]) for m in MANIFESTS}
    assert {
        ("Namespace", "kv-fabric"),
        ("Service", "etcd"),
        ("StatefulSet", "etcd"),
        ("Deployment", "prefill"),
        ("Deployment", "decode"),
        ("Deployment", "frontend"),
        ("Service", "frontend"),
        ("DaemonSet", "node-cache"),
    } <= kinds
    etcd = find(MANIFESTS, "StatefulSet", "etcd")
    assert etcd["spec"]["replicas"] == 3
    assert find(MANIFESTS, "Service", "etcd")["spec"]["clusterIP"] == "None"
    namespaced = [m for m in MANIFESTS if m.doc["kind"] != "Namespace"]
    assert {m.doc["metadata"]["namespace"] for m in namespaced} == {"kv-fabric"}
    assert len(list(MANIFEST_DIR.glob("*.yml"))) == 0, "use .yaml: the checks read *.yaml"


def test_the_image_is_the_one_the_dockerfile_builds() -> None:
    """The Dockerfile copies what exists, runs as the pods' user, and its tag (the project's
    version) is the one every fabric container runs."""
    dockerfile = (MANIFEST_DIR / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for source in line.split():
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = {c.spec["image"] for c in all_containers(MANIFESTS) if c.is_fabric}
    assert images == {f"kv-fabric:{version}"}
    (uid,) = re.findall(r"^USER (\d+)$", dockerfile, re.M)
    users = {
        c.spec.get("securityContext", {}).get("runAsUser")
        or c.pod["spec"].get("securityContext", {}).get("runAsUser")
        for c in all_containers(MANIFESTS)
        if c.is_fabric and not c.init
    }
    assert users == {int(uid)}


def test_kustomize_lists_every_manifest() -> None:
    """``kubectl apply -k deploy/k8s`` applies exactly the manifests checked here."""
    kustomization = yaml.safe_load((MANIFEST_DIR / KUSTOMIZATION).read_text())
    files = {p.name for p in MANIFEST_DIR.glob("*.yaml")} - {KUSTOMIZATION}
    assert sorted(kustomization["resources"]) == sorted(files)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_manifests_unchanged() -> None:
    """kubectl's own Kustomize renders the directory to the objects checked here."""
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(MANIFEST_DIR)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    canonical = sorted(json.dumps(doc, sort_keys=True) for doc in docs)
    assert canonical == sorted(json.dumps(m.doc, sort_keys=True) for m in MANIFESTS)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_the_manifests_pass(check: str) -> None:
    assert CHECKS[check](MANIFESTS) == []


def find(manifests: list[Manifest], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [
        m.doc for m in manifests if (m.doc["kind"], m.doc["metadata"]["name"]) == (kind, name)
    ]
    return doc


def container(manifests: list[Manifest], kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(manifests, kind, name)["spec"]["template"]["spec"]["containers"][0]
    return spec


Breakage = Callable[[list[Manifest]], None]


def set_arg(kind: str, name: str, flag: str, value: str) -> Breakage:
    def breaks(manifests: list[Manifest]) -> None:
        spec = container(manifests, kind, name)
        spec["args"] = [a for a in spec["args"] if not a.startswith(flag + "=")] + [
            f"{flag}={value}"
        ]

    return breaks


def edit(kind: str, name: str, change: Callable[[dict[str, Any]], None]) -> Breakage:
    return lambda manifests: change(find(manifests, kind, name))


def worker(change: Callable[[dict[str, Any]], None]) -> Breakage:
    return lambda manifests: change(container(manifests, "Deployment", "decode"))


BREAKAGES: dict[str, tuple[str, Breakage, str]] = {  # id: (check, breakage, text in a problem)
    "unknown field": (
        "schema",
        worker(lambda c: c.update(livenessProbe={"httpGet": {"path": "/", "port": 1}, "typo": 1})),
        "typo",
    ),
    "wrong type": (
        "schema",
        edit("StatefulSet", "etcd", lambda d: d["spec"].update(replicas="3")),
        "replicas",
    ),
    "unknown flag": (
        "commands",
        set_arg("Deployment", "prefill", "--no-such-flag", "1"),
        "rejects",
    ),
    "bad setting": (
        "commands",
        set_arg("Deployment", "decode", "--prefill-fallback", "pray"),
        "rejects",
    ),
    "out of range": (
        "commands",
        set_arg("Deployment", "decode", "--metrics-port", "70000"),
        "FABRIC_METRICS_PORT",
    ),
    "not fabric": (
        "commands",
        worker(lambda c: c.update(command=["python", "-m", "fabric.cli"])),
        "not the fabric",
    ),
    "undefined reference": (
        "commands",
        set_arg("Deployment", "decode", "--worker-id", "$(POD_UID)"),
        "POD_UID",
    ),
    "probe on an undeclared port": (
        "probes",
        worker(lambda c: c["readinessProbe"]["httpGet"].update(port=9999)),
        "not declared",
    ),
    "probe on a path not served": (
        "probes",
        worker(lambda c: c["livenessProbe"]["httpGet"].update(path="/healthz")),
        "/healthz",
    ),
    "probes off the metrics port": (
        "probes",
        set_arg("Deployment", "prefill", "--metrics-port", "9500"),
        "not served on 9400",
    ),
    "frontend probe behind the API key": (
        "probes",
        lambda ms: container(ms, "Deployment", "frontend")["readinessProbe"]["httpGet"].update(
            path="/v1/models"
        ),
        "/v1/models",
    ),
    "service selects nothing": (
        "services",
        edit("Service", "frontend", lambda d: d["spec"]["selector"].update(tier="web")),
        "selects no pod",
    ),
    "service targets an undeclared port": (
        "services",
        edit("Service", "frontend", lambda d: d["spec"]["ports"][0].update(targetPort="web")),
        "port web",
    ),
    "scrape of a port without /metrics": (
        "scrape",
        edit(
            "Deployment",
            "decode",
            lambda d: d["spec"]["template"]["metadata"]["annotations"].update(
                {"prometheus.io/port": "9401"}
            ),
        ),
        "9401",
    ),
    "variable the code does not read": (
        "environment",
        worker(lambda c: c["env"].append({"name": "FABRIC_NO_SUCH_SETTING", "value": "1"})),
        "FABRIC_NO_SUCH_SETTING",
    ),
    "unused variable": (
        "environment",
        worker(lambda c: c["env"].append({"name": "DEBUG", "value": "1"})),
        "DEBUG",
    ),
    "key file outside the secret": (
        "environment",
        worker(
            lambda c: c["env"].append(
                {"name": "FABRIC_API_KEY_FILE", "value": "/etc/kv-fabric/keys/missing"}
            )
        ),
        "lacks it",
    ),
    "models differ": (
        "consistency",
        set_arg("Deployment", "frontend", "--model", "small"),
        "different models",
    ),
    "an etcd member missing": (
        "consistency",
        set_arg("Deployment", "prefill", "--etcd", "https://etcd-0.etcd:2379"),
        "members",
    ),
    "etcd over plain HTTP": (
        "consistency",
        set_arg(
            "Deployment",
            "decode",
            "--etcd",
            "http://etcd-0.etcd:2379,http://etcd-1.etcd:2379,http://etcd-2.etcd:2379",
        ),
        "members",
    ),
    "no etcd client certificate": (
        "consistency",
        lambda ms: container(ms, "Deployment", "frontend")["env"].pop(
            next(
                i
                for i, v in enumerate(container(ms, "Deployment", "frontend")["env"])
                if v["name"] == "FABRIC_ETCD_CERT_FILE"
            )
        ),
        "etcd needs FABRIC_ETCD_CERT_FILE",
    ),
    "node cache socket not shared": (
        "consistency",
        worker(lambda c: c["volumeMounts"].pop()),
        "/run/kv-fabric is None on the host",
    ),
    "another node name": (
        "consistency",
        set_arg("Deployment", "prefill", "--node-name", "node-2"),
        "node name node-2",
    ),
    "no memory limit": (
        "resources",
        worker(lambda c: c["resources"].pop("limits")),
        "memory limit",
    ),
    "drain past the grace period": (
        "termination",
        set_arg("Deployment", "decode", "--drain-timeout", "50"),
        "exceed terminationGracePeriodSeconds",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_a_broken_manifest_is_caught(case: str) -> None:
    check, breaks, needle = BREAKAGES[case]
    broken = copy.deepcopy(MANIFESTS)
    breaks(broken)
    problems: Problems = CHECKS[check](broken)
    assert any(needle in problem for problem in problems), problems
