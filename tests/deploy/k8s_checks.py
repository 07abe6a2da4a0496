"""What a schema cannot check in ``deploy/k8s``: each check returns the problems it found.

``load_manifests`` reads every YAML document of the directory; ``schema_problems`` validates each
against the bundled JSON schemas of ``KUBERNETES_VERSION`` (``kubernetes-validate``, strict: an
unknown field is an error; no network). The other checks tie the manifests to the code:

* commands: every container of the fabric image runs ``fabric ...`` whose arguments (``$(VAR)``
  expanded as the kubelet would, downward-API values sampled) parse with ``fabric.cli``'s real
  parser, and whose worker settings load (``fabric.config.load_config``);
* probes: each names a port its container declares, and a path that port serves (a worker's
  ``fabric.worker.health`` paths on its ``--metrics-port``, the frontend's app routes left open
  by the API key, etcd's health on its metrics URL);
* services: each selects the labels of some pod template and targets a declared port;
* scrape annotations: the port named serves ``/metrics`` (and the container declares it);
* environment: every ``FABRIC_*`` / ``DYN_KVBM_*`` variable is one the code reads, every other
  variable is used by a ``$(VAR)`` reference or read by a library (``LIBRARY_PREFIXES``), every
  reference is defined before it is used, and every ``*_FILE`` variable names a file of a
  mounted secret;
* consistency: fabric processes agree on model and namespace, their etcd URLs are the
  StatefulSet's members and they carry the TLS material etcd asks for, workers share the node
  cache's host directories and node name.

Each check takes the list of manifests, so tests can break a copy and see the check fail.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from fabric.cli import build_parser
from fabric.config import ServeConfig, load_config
from fabric.discovery.registry import DEFAULT_NAMESPACE
from fabric.errors import ConfigError
from fabric.frontend.api import build_app
from fabric.frontend.api_key import is_protected
from fabric.frontend.generation import FrontendSettings
from fabric.kvbm import KvbmConfig
from fabric.worker.health import LIVE_PATH, READY_PATH

REPO = Path(__file__).resolve().parents[2]
MANIFEST_DIR = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"
"""The oldest version the manifests support (the preStop ``sleep`` action is on from 1.30)."""
FABRIC_IMAGE = "kv-fabric:"
WORKER_ROLES = ("prefill", "decode", "aggregated")
DOWNWARD_SAMPLES = {
    "metadata.name": "decode-7c9d5b8f4-x2x4q",
    "metadata.namespace": "kv-fabric",
    "status.podIP": "10.244.1.7",
    "spec.nodeName": "node-1.example",
}
"""What the kubelet would put in a ``fieldRef`` variable: one plausible value per field."""
_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_FABRIC_NAME = re.compile(r"^(FABRIC|DYN_KVBM)_[A-Z0-9_]+$")
LIBRARY_PREFIXES = ("UCX_", "NIXL_", "OMP_", "PYTHON")
"""Variables read by the libraries under the fabric (UCX, NIXL, OpenMP, Python), not by it."""

Problems = list[str]


@dataclass(frozen=True)
class Manifest:
    """One YAML document and where it came from."""

    source: str
    doc: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.source}: {self.doc.get('kind')}/{self.doc.get('metadata', {}).get('name')}"


KUSTOMIZATION = "kustomization.yaml"
"""Kustomize's list of the manifests (``kubectl apply -k``), not an object itself."""


def load_manifests(directory: Path = MANIFEST_DIR) -> list[Manifest]:
    manifests = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == KUSTOMIZATION:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                manifests.append(Manifest(path.name, doc))
    return manifests


def schema_problems(manifests: list[Manifest]) -> Problems:
    problems = []
    for manifest in manifests:
        try:
            kubernetes_validate.validate(manifest.doc, KUBERNETES_VERSION, strict=True)
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{manifest.name}: {where}: {exc.message}")
        except SchemaNotFoundError as exc:
            problems.append(f"{manifest.name}: {exc.message}")
    return problems


# -- pods and containers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Container:
    """A container of a pod template, with its kubelet-expanded environment."""

    owner: Manifest
    spec: dict[str, Any]
    init: bool
    pod: dict[str, Any]
    """The pod template (metadata and spec)."""

    @property
    def name(self) -> str:
        return f"{self.owner.name} container {self.spec['name']}"

    @property
    def is_fabric(self) -> bool:
        return str(self.spec.get("image", "")).startswith(FABRIC_IMAGE)

    def env(self) -> tuple[dict[str, str], Problems]:
        """Each variable's value as the kubelet sets it (references only to earlier ones)."""
        values: dict[str, str] = {}
        problems: Problems = []
        for var in self.spec.get("env", []):
            if "value" in var:
                value, missing = expand(var["value"], values)
                problems += [
                    f"{self.name}: env {var['name']} uses undefined $({m})" for m in missing
                ]
            else:
                field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                value = DOWNWARD_SAMPLES.get(field, f"<{field}>")
            values[var["name"]] = value
        return values, problems

    def argv(self) -> tuple[list[str], Problems]:
        """``command + args`` after ``$(VAR)`` expansion; the undefined references as problems."""
        env, problems = self.env()
        argv = []
        for word in [*self.spec.get("command", []), *self.spec.get("args", [])]:
            value, missing = expand(str(word), env)
            problems += [f"{self.name}: argument uses undefined $({m})" for m in missing]
            argv.append(value)
        return argv, problems

    def ports(self) -> dict[str, int]:
        """Declared container ports by name (and by their number as a string)."""
        ports = {}
        for port in self.spec.get("ports", []):
            number = int(port["containerPort"])
            ports[str(number)] = number
            if "name" in port:
                ports[port["name"]] = number
        return ports


def expand(value: str, env: dict[str, str]) -> tuple[str, list[str]]:
    """``$(VAR)`` references replaced as the kubelet does; the names it could not resolve."""
    missing = [name for name in _REFERENCE.findall(value) if name not in env]
    expanded = _REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), value)
    return expanded, missing


def pod_templates(manifests: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for manifest in manifests:
        template = manifest.doc.get("spec", {}).get("template")
        if template is not None:
            yield manifest, template


def all_containers(manifests: list[Manifest]) -> Iterator[Container]:
    for manifest, template in pod_templates(manifests):
        spec = template["spec"]
        for container in spec.get("initContainers", []):
            yield Container(manifest, container, True, template)
        for container in spec.get("containers", []):
            yield Container(manifest, container, False, template)


@dataclass(frozen=True)
class FabricProcess:
    """A fabric container's parsed command line."""

    container: Container
    args: argparse.Namespace

    @property
    def role(self) -> str:
        return str(self.args.role)

    def metrics_port(self) -> int | None:
        """The port serving ``/metrics``: a worker's or node cache's metrics port, the frontend's
        HTTP port."""
        if self.role in WORKER_ROLES or self.role == "node-cache":
            return int(self.args.metrics_port) if self.args.metrics_port else None
        if self.role == "frontend":
            return int(self.args.port)
        return None


def parse_fabric(container: Container) -> tuple[FabricProcess | None, Problems]:
    """The parsed ``fabric`` command of ``container``, or the problems that prevent it."""
    argv, problems = container.argv()
    if argv[:1] != ["fabric"]:
        return None, [*problems, f"{container.name}: runs {argv[:1]}, not the fabric command"]
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        return None, [*problems, f"{container.name}: fabric rejects {argv[1:]} (see stderr)"]
    if getattr(args, "command", None) != "serve":
        return None, [*problems, f"{container.name}: runs fabric {args.command}, not fabric serve"]
    if args.role in WORKER_ROLES:  # the settings load as `fabric serve` loads them
        fields = set(KvbmConfig.model_fields) | set(ServeConfig.model_fields)
        overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
        try:
            load_config(**overrides)
        except ConfigError as exc:
            problems.append(f"{container.name}: {exc}")
    return FabricProcess(container, args), problems


def fabric_processes(manifests: list[Manifest]) -> Iterator[FabricProcess]:
    for container in all_containers(manifests):
        if container.is_fabric and not container.init:
            process, _ = parse_fabric(container)
            if process is not None:
                yield process


# -- the checks ---------------------------------------------------------------------------------


def command_problems(manifests: list[Manifest]) -> Problems:
    """Every fabric container runs a ``fabric serve`` subcommand that parses and loads."""
    problems: Problems = []
    for container in all_containers(manifests):
        if container.init:
            continue
        if container.is_fabric:
            problems += parse_fabric(container)[1]
        else:
            problems += container.argv()[1]
    return problems


def _frontend_routes() -> set[str]:
    """The frontend app's routes (built over a stand-in: only what ``build_app`` reads)."""
    stand_in = SimpleNamespace(
        settings=FrontendSettings(), prompt_limit=SimpleNamespace(max_tokens=1), metrics=None
    )
    app = build_app(stand_in)  # type: ignore[arg-type]
    return {getattr(route, "path", "") for route in app.routes}


def _etcd_metrics_port(container: Container) -> int | None:
    for word in container.argv()[0]:
        if word.startswith("--listen-metrics-urls="):
            return urlsplit(word.split("=", 1)[1].split(",")[0]).port
    return None


def _served_paths(
    container: Container, *, with_key: bool = False
) -> dict[int, Callable[[str], bool]]:
    """Which HTTP paths each port of ``container`` serves (known servers only) to a client
    without the API key (probes), or ``with_key`` (Prometheus, given the key: docs/deploy.md)."""
    if container.is_fabric and not container.init:
        process, _ = parse_fabric(container)
        if process is None:
            return {}
        port = process.metrics_port()
        if port is None:
            return {}
        if process.role in WORKER_ROLES:
            return {port: lambda path: path in {LIVE_PATH, READY_PATH, "/metrics"}}
        if process.role == "node-cache":
            return {port: lambda path: path == "/metrics"}
        routes = _frontend_routes()
        key_on = "FABRIC_API_KEY_FILE" in container.env()[0] and not with_key
        return {port: lambda path: path in routes and not (key_on and is_protected(path))}
    port = _etcd_metrics_port(container)
    if port is not None:
        return {port: lambda path: path.split("?")[0] in {"/health", "/metrics"}}
    return {}


def probe_problems(manifests: list[Manifest]) -> Problems:
    """Probes name declared ports and paths those ports serve; fabric workers probe their own
    liveness and readiness; every long-running container has liveness and readiness."""
    problems: Problems = []
    for container in all_containers(manifests):
        if container.init:
            continue
        ports = container.ports()
        served = _served_paths(container)
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.spec.get(kind)
            if probe is None:
                continue
            action = probe.get("httpGet") or probe.get("tcpSocket")
            if action is None:
                problems.append(f"{container.name}: {kind} is neither httpGet nor tcpSocket")
                continue
            port = ports.get(str(action["port"]))
            if port is None:
                problems.append(f"{container.name}: {kind} port {action['port']} not declared")
                continue
            if "httpGet" in probe:
                path = probe["httpGet"].get("path", "/")
                if port not in served or not served[port](path):
                    problems.append(f"{container.name}: {kind} {path} is not served on {port}")
        process = parse_fabric(container)[0] if container.is_fabric else None
        if process is not None and process.role in WORKER_ROLES:
            wanted = {"livenessProbe": LIVE_PATH, "readinessProbe": READY_PATH}
            for kind, path in wanted.items():
                got = container.spec.get(kind, {}).get("httpGet", {}).get("path")
                if got != path:
                    problems.append(f"{container.name}: {kind} must GET {path}, not {got}")
        has_probes = "livenessProbe" in container.spec and "readinessProbe" in container.spec
        if not has_probes:
            problems.append(f"{container.name}: no liveness and readiness probes")
    return problems


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def service_problems(manifests: list[Manifest]) -> Problems:
    """Each Service (and workload selector) selects some pod template, on declared ports."""
    problems: Problems = []
    templates = list(pod_templates(manifests))
    for manifest in manifests:
        doc = manifest.doc
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            selector = doc["spec"]["selector"].get("matchLabels", {})
            if not _labels_match(selector, doc["spec"]["template"]["metadata"]["labels"]):
                problems.append(f"{manifest.name}: selector does not match its own template")
        if doc["kind"] != "Service":
            continue
        selector = doc["spec"].get("selector", {})
        selected = [
            (owner, template)
            for owner, template in templates
            if owner.doc["metadata"].get("namespace") == doc["metadata"].get("namespace")
            and _labels_match(selector, template["metadata"].get("labels", {}))
        ]
        if not selected:
            problems.append(f"{manifest.name}: selects no pod template ({selector})")
            continue
        for port in doc["spec"].get("ports", []):
            target = str(port.get("targetPort", port["port"]))
            for owner, template in selected:
                declared = set()
                for container in template["spec"]["containers"]:
                    declared |= set(Container(owner, container, False, template).ports())
                if target not in declared:
                    problems.append(f"{manifest.name}: port {target} not declared by {owner.name}")
    return problems


def scrape_problems(manifests: list[Manifest]) -> Problems:
    """``prometheus.io/*`` annotations name a declared port that serves ``/metrics``."""
    problems: Problems = []
    for manifest, template in pod_templates(manifests):
        annotations = template["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        port = int(annotations.get("prometheus.io/port", "0"))
        path = annotations.get("prometheus.io/path", "/metrics")
        containers = [
            Container(manifest, c, False, template) for c in template["spec"]["containers"]
        ]
        served = [(c, _served_paths(c, with_key=True)) for c in containers]
        serving = [c for c, paths in served if port in paths and paths[port](path)]
        if not serving:
            problems.append(f"{manifest.name}: no container serves {path} on port {port}")
        elif not any(port in c.ports().values() for c in serving):
            problems.append(f"{manifest.name}: scraped port {port} is not declared")
    return problems


def read_variables() -> set[str]:
    """Every ``FABRIC_*`` / ``DYN_KVBM_*`` variable the fabric reads."""
    names: set[str] = set()
    for path in (REPO / "fabric").rglob("*.py"):
        names |= set(re.findall(r"\b(?:FABRIC|DYN_KVBM)_[A-Z0-9_]+\b", path.read_text()))
    for cls in (KvbmConfig, ServeConfig):  # settings: FABRIC_<FIELD> and aliases
        for info in cls.model_fields.values():
            alias = info.validation_alias
            names |= {str(choice) for choice in getattr(alias, "choices", [])}
    return {name for name in names if _FABRIC_NAME.match(name)}


def env_problems(manifests: list[Manifest]) -> Problems:
    """Variables are read by the code or used by a reference; ``*_FILE``s are mounted secrets."""
    problems: Problems = []
    known = read_variables()
    for container in all_containers(manifests):
        env, undefined = container.env()
        problems += undefined
        referenced = set(
            _REFERENCE.findall(
                " ".join(
                    [
                        *map(str, container.spec.get("command", [])),
                        *map(str, container.spec.get("args", [])),
                        *(str(v.get("value", "")) for v in container.spec.get("env", [])),
                    ]
                )
            )
        )
        for name, value in env.items():
            if _FABRIC_NAME.match(name):
                if name not in known:
                    problems.append(f"{container.name}: the fabric does not read {name}")
                if name.endswith("_FILE"):
                    problems += _secret_file_problems(container, name, value)
            elif name not in referenced and not name.startswith(LIBRARY_PREFIXES):
                problems.append(f"{container.name}: {name} is set but never used")
    return problems


def _secret_file_problems(container: Container, name: str, path: str) -> Problems:
    volumes = {v["name"]: v for v in container.pod["spec"].get("volumes", [])}
    for mount in container.spec.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        secret = volumes.get(mount["name"], {}).get("secret")
        if secret is None:
            return [f"{container.name}: {name}={path} is not in a secret volume"]
        items = {item["path"] for item in secret.get("items", [])}
        if items and path.removeprefix(prefix) not in items:
            return [f"{container.name}: {name}={path}: secret {secret['secretName']} lacks it"]
        return []
    return [f"{container.name}: {name}={path} is not under any volume mount"]


def consistency_problems(manifests: list[Manifest]) -> Problems:
    """Fabric processes share one model and namespace and reach every etcd member; workers
    reach the node cache."""
    problems: Problems = []
    processes = list(fabric_processes(manifests))
    if len({p.args.model for p in processes}) > 1:
        problems.append(
            f"fabric processes serve different models: {[p.args.model for p in processes]}"
        )
    namespaces = {p.args.namespace or DEFAULT_NAMESPACE for p in processes}
    if len(namespaces) > 1:
        problems.append(f"fabric processes use different discovery namespaces: {namespaces}")
    members = _etcd_members(manifests)
    for process in processes:
        etcd = getattr(process.args, "etcd", None) or getattr(process.args, "etcd_endpoint", None)
        if process.role == "node-cache" and etcd is None:
            continue
        urls = set(str(etcd).split(",")) if etcd else set()
        if urls != members:
            problems.append(
                f"{process.container.name}: etcd {sorted(urls)}, members {sorted(members)}"
            )
    problems += _node_cache_problems(processes)
    problems += _etcd_tls_problems(manifests, processes)
    return problems


def _host_mounts(container: Container) -> dict[str, str]:
    """``mountPath -> hostPath`` of the container's hostPath volumes."""
    volumes = {v["name"]: v for v in container.pod["spec"].get("volumes", [])}
    mounts = {}
    for mount in container.spec.get("volumeMounts", []):
        host_path = volumes.get(mount["name"], {}).get("hostPath")
        if host_path is not None:
            mounts[mount["mountPath"].rstrip("/")] = host_path["path"]
    return mounts


def _node_cache_problems(processes: list[FabricProcess]) -> Problems:
    """Workers with a node tier reach the node cache: the same node name, and the same host
    directories at the same paths for its segment (``/dev/shm``) and its ``ipc://`` socket."""
    problems: Problems = []
    caches = [p for p in processes if p.role == "node-cache"]
    users = [p for p in processes if p.role in WORKER_ROLES and p.args.node_cache]
    if users and len(caches) != 1:
        return [f"workers use a node cache, {len(caches)} node cache containers are deployed"]
    for cache in caches:
        endpoint = str(cache.args.endpoint)
        if not endpoint.startswith("ipc://"):
            problems.append(f"{cache.container.name}: {endpoint} is not a host socket (ipc://)")
            continue
        shared = {"/dev/shm", str(Path(endpoint.removeprefix("ipc://")).parent)}
        cache_mounts = _host_mounts(cache.container)
        problems += [
            f"{cache.container.name}: {path} is not a host directory"
            for path in sorted(shared - set(cache_mounts))
        ]
        for user in users:
            if user.args.node_cache not in ("etcd", endpoint):
                problems.append(f"{user.container.name}: node cache {user.args.node_cache}")
            if user.args.node_name != cache.args.node:
                problems.append(
                    f"{user.container.name}: node name {user.args.node_name}, the node cache's "
                    f"{cache.args.node}"
                )
            mounts = _host_mounts(user.container)
            for path in sorted(shared):
                if mounts.get(path) != cache_mounts.get(path):
                    problems.append(
                        f"{user.container.name}: {path} is {mounts.get(path)} on the host, the "
                        f"node cache's is {cache_mounts.get(path)}"
                    )
    return problems


def _etcd(manifests: list[Manifest]) -> tuple[dict[str, Any], Container] | None:
    """The etcd StatefulSet and its container, if the manifests have them."""
    for container in all_containers(manifests):
        doc = container.owner.doc
        if (doc["kind"], doc["metadata"]["name"]) == ("StatefulSet", "etcd"):
            return doc, container
    return None


def _etcd_members(manifests: list[Manifest]) -> set[str]:
    """The client URLs etcd's members advertise (``--advertise-client-urls`` with each member's
    pod name), when its service is the headless one that gives those names (else empty)."""
    found = _etcd(manifests)
    if found is None:
        return set()
    doc, container = found
    service = doc["spec"]["serviceName"]
    headless = any(
        m.doc["kind"] == "Service"
        and m.doc["metadata"]["name"] == service
        and m.doc["spec"].get("clusterIP") == "None"
        for m in manifests
    )
    flag = "--advertise-client-urls="
    advertised = [str(w) for w in container.spec["args"] if str(w).startswith(flag)]
    if not headless or len(advertised) != 1:
        return set()
    name, replicas = doc["metadata"]["name"], int(doc["spec"]["replicas"])
    urls = advertised[0].removeprefix(flag)
    return {urls.replace("$(POD_NAME)", f"{name}-{i}") for i in range(replicas)}


def _etcd_tls_problems(manifests: list[Manifest], processes: list[FabricProcess]) -> Problems:
    """With TLS on etcd's client port, every fabric process trusts its CA; with client
    certificate authentication, every one also has a certificate and key."""
    found = _etcd(manifests)
    if found is None:
        return []
    args = [str(w) for w in found[1].spec["args"]]
    needed = []
    if any(a.startswith("--cert-file=") for a in args):
        needed.append("FABRIC_ETCD_CA_FILE")
    if "--client-cert-auth" in args:
        needed += ["FABRIC_ETCD_CERT_FILE", "FABRIC_ETCD_KEY_FILE"]
    problems = []
    for process in processes:
        env = process.container.env()[0]
        problems += [f"{process.container.name}: etcd needs {n}" for n in needed if n not in env]
    return problems


def resource_problems(manifests: list[Manifest]) -> Problems:
    """Every container requests CPU and memory and has a memory limit; every pod of the
    fabric's image has a termination grace period."""
    problems: Problems = []
    for container in all_containers(manifests):
        resources = container.spec.get("resources", {})
        if container.init:
            continue
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        if not {"cpu", "memory"} <= set(requests) or "memory" not in limits:
            problems.append(f"{container.name}: needs cpu and memory requests, a memory limit")
        if container.is_fabric and "terminationGracePeriodSeconds" not in container.pod["spec"]:
            problems.append(f"{container.name}: no terminationGracePeriodSeconds")
    return problems


WORKER_SHUTDOWN_S = 20.0
"""A worker's stop after its drain: the record's close and the scheduler's, 10 s bounds each."""


def termination_problems(manifests: list[Manifest]) -> Problems:
    """Every worker's drain (``--drain-timeout``, else the default) and its shutdown fit in its
    pod's termination grace period: past the grace the kubelet SIGKILLs, failing what drained."""
    problems: Problems = []
    for process in fabric_processes(manifests):
        if process.role not in WORKER_ROLES:
            continue
        drain = process.args.drain_timeout_s
        drain_s = ServeConfig.model_fields["drain_timeout_s"].default if drain is None else drain
        grace = process.container.pod["spec"].get("terminationGracePeriodSeconds", 30)
        if drain_s + WORKER_SHUTDOWN_S > grace:
            problems.append(
                f"{process.container.name}: --drain-timeout {drain_s:g} s + "
                f"{WORKER_SHUTDOWN_S:g} s of shutdown exceed terminationGracePeriodSeconds {grace}"
            )
    return problems


CHECKS: dict[str, Callable[[list[Manifest]], Problems]] = {
    "schema": schema_problems,
    "commands": command_problems,
    "probes": probe_problems,
    "services": service_problems,
    "scrape": scrape_problems,
    "environment": env_problems,
    "consistency": consistency_problems,
    "resources": resource_problems,
    "termination": termination_problems,
}
