"""Worker records: what a worker publishes about itself in discovery, typed, and their wire form.

Owns ``WorkerRecord`` and its typed parts: ``Endpoints`` (how to reach the worker) and its
layout (what KV it can exchange): ``FabricLayout`` for the fabric's own workers, ``VllmLayout``
for vLLM instances running the fabric connector, told apart by ``EngineKind``.

Invariants:

* A record is valid once built, whichever way: ``worker_id`` is one key segment, ``compat_hash``
  an unsigned 64-bit value, every endpoint a non-empty address or None, every layout field of
  its declared type or None, and every layout integer (sizes and counts) positive. A record
  that breaks one raises ``ConfigError``.
* ``WorkerRecord.from_bytes`` is the one place a record is parsed; readers use the typed fields
  and never see the JSON. A record that cannot be parsed raises ``DiscoveryError`` naming its
  key (another version, bad JSON, a missing or mistyped field, an unknown engine).

Wire form (version 1), a UTF-8 JSON object::

    {"version": 1, "worker_id": str,
     "role": "prefill" | "decode" | "aggregated" | "frontend" | "node-cache",
     "endpoints": {"signal" | "http" | "metrics" | "events" | "events_replay": address},
     "agent_name": str | null, "layout": {field: int | str}, "compat_hash": u64,
     "started_at": seconds since the epoch, "node": str, "leaving": true, "draining": true,
     "node_cache": true}

Only present fields are written (``node`` only when known: the host a process runs on, which
pairs a node cache with the instances that can map it; ``leaving`` only when true: the worker
is shutting down, see ``registration``; ``draining`` only when true: the worker finishes the
requests it holds and takes no new ones, and routers stop choosing it while its connections
stay; readers that predate it ignore the key and keep routing to it, which the worker then
refuses with ``ErrorCode.UNAVAILABLE``; ``node_cache`` only when true: the worker attached to
its node's cache). A fabric worker's ``layout`` has no ``engine`` key; a vLLM
instance's has ``"engine": "vllm"``. Reading is lenient where older or newer writers differ: an
empty address is an absent one (older workers wrote ``"events_replay": ""``), and keys this build
does not know are ignored.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar

from fabric.discovery.registry import DEFAULT_NAMESPACE, Role, check_segment, worker_key
from fabric.errors import ConfigError, DiscoveryError

RECORD_VERSION = 1


class EngineKind(Enum):
    """Which engine a worker runs: the fabric's own (signals) or vLLM (served over HTTP)."""

    FABRIC = "fabric"
    VLLM = "vllm"


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoints:
    """Where a worker listens; None: it does not offer that channel.

    Attributes:
        signal: its ZeroMQ signal server (``GenerateRequest``, ``PrefillRequest``, ...).
        http: a vLLM instance's OpenAI server (base URL).
        metrics: its Prometheus endpoint (URL).
        events: its KV event stream (ZeroMQ PUB).
        events_replay: the replay socket of that stream (ZeroMQ ROUTER).
    """

    signal: str | None = None
    http: str | None = None
    metrics: str | None = None
    events: str | None = None
    events_replay: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self)
        empty = [name for name, value in _present(self).items() if not value]
        if empty:
            raise ConfigError(f"endpoint {empty[0]!r} is empty: give an address or None")

    def to_json(self) -> dict[str, str]:
        """The wire form: the present endpoints by name."""
        return {name: str(value) for name, value in _present(self).items()}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Endpoints:
        """Read the wire form; an empty address is an absent one."""
        known = _known_fields(cls, body)
        return cls(**{name: None if value == "" else value for name, value in known.items()})


@dataclass(frozen=True, slots=True, kw_only=True)
class FabricLayout:
    """A fabric worker's KV pool: the facts peers compare, and where its model lives.

    ``block_size``, ``num_layers``, ``outer_dim``, ``inner_dim`` and ``dtype`` are the pool
    layout's compatibility facts (``LayoutSpec.compat_fields``); ``kind`` is the layout kind's
    value (``LayoutKind``), ``num_blocks`` the device pool's size; ``model`` the served model name.
    """

    engine: ClassVar[EngineKind] = EngineKind.FABRIC
    model: str | None = None
    model_path: str | None = None
    block_size: int | None = None
    num_layers: int | None = None
    outer_dim: int | None = None
    inner_dim: int | None = None
    dtype: str | None = None
    kind: str | None = None
    num_blocks: int | None = None

    def __post_init__(self) -> None:
        _check_layout(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class VllmLayout:
    """A vLLM instance's KV pages (``PageGeometry``'s facts) and its connector role.

    ``model`` is the served model name (what the frontend matches and sends upstream),
    ``model_id`` the model the compat hash was computed from; ``kv_role`` is vLLM's
    (``kv_producer``, ``kv_consumer``, ``kv_both``), ``page_format`` the fabric's page format
    version.
    """

    engine: ClassVar[EngineKind] = EngineKind.VLLM
    model: str | None = None
    model_id: str | None = None
    kv_role: str | None = None
    page_format: int | None = None
    dtype: str | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_size: int | None = None
    head_size_v: int | None = None
    block_size: int | None = None
    kv_layout: str | None = None
    page_bytes: int | None = None

    def __post_init__(self) -> None:
        _check_layout(self)


WorkerLayout = FabricLayout | VllmLayout
"""Every layout has ``engine``, ``model``, ``block_size``, ``dtype`` and ``num_layers``."""

_ENGINE_TO_LAYOUT: dict[EngineKind, type[FabricLayout] | type[VllmLayout]] = {
    EngineKind.FABRIC: FabricLayout,
    EngineKind.VLLM: VllmLayout,
}


def layout_to_json(layout: WorkerLayout) -> dict[str, int | str]:
    """The wire form of a layout: its present fields, and ``engine`` unless it is the fabric."""
    body: dict[str, int | str] = dict(_present(layout))
    if layout.engine is not EngineKind.FABRIC:
        body["engine"] = layout.engine.value
    return body


def layout_from_json(body: dict[str, Any]) -> WorkerLayout:
    """Read a layout's wire form (no ``engine``: the fabric's)."""
    engine = EngineKind(body.get("engine", EngineKind.FABRIC.value))
    cls = _ENGINE_TO_LAYOUT[engine]
    return cls(**_known_fields(cls, body))


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """What a worker publishes about itself: how to reach it and what KV it can exchange.

    ``layout`` holds the compatibility facts that ``compat_hash`` summarises; ``agent_name`` is
    the worker's NIXL agent, if it has one. ``leaving`` marks the record a worker writes just
    before it revokes its lease on shutdown: directories drop it at once instead of waiting out
    their grace (``registration.WorkerDirectory``). ``node`` names the host the process runs on
    (None: not told); a ``NODE_CACHE`` record and the workers of its host share it.
    ``node_cache`` marks a worker attached to its node's cache (``--node-cache``): it finds the
    node tier's blocks, so routers credit it with that tier's prefix; one on the node that did
    not attach is credited nothing of it.
    ``draining`` marks a worker that stopped taking new requests and finishes those it holds
    (``WorkerRegistration.drain``): still live in every directory (its open requests and holds
    are served), chosen by no router.
    """

    worker_id: str
    role: Role
    endpoints: Endpoints
    agent_name: str | None
    layout: WorkerLayout
    compat_hash: int
    started_at: float
    leaving: bool = False
    node: str | None = None
    draining: bool = False
    node_cache: bool = False

    def __post_init__(self) -> None:
        check_segment("worker_id", self.worker_id)
        if self.node is not None and not self.node:
            raise ConfigError("node is empty: give the host's name or None")
        if not 0 <= self.compat_hash < 2**64:
            raise ConfigError(f"compat_hash {self.compat_hash} is not an unsigned 64-bit value")

    def key(self, namespace: str = DEFAULT_NAMESPACE) -> str:
        return worker_key(namespace, self.role, self.worker_id)

    def to_bytes(self) -> bytes:
        body = {
            "version": RECORD_VERSION,
            "worker_id": self.worker_id,
            "role": self.role.value,
            "endpoints": self.endpoints.to_json(),
            "agent_name": self.agent_name,
            "layout": layout_to_json(self.layout),
            "compat_hash": self.compat_hash,
            "started_at": self.started_at,
        }
        if self.leaving:
            body["leaving"] = True
        if self.node is not None:
            body["node"] = self.node
        if self.draining:
            body["draining"] = True
        if self.node_cache:
            body["node_cache"] = True
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, key: str) -> WorkerRecord:
        """Decode a record read from ``key``; raises DiscoveryError naming the key."""
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DiscoveryError(f"worker record at {key!r} is not JSON: {exc}") from exc
        if not isinstance(body, dict) or body.get("version") != RECORD_VERSION:
            version = body.get("version") if isinstance(body, dict) else None
            raise DiscoveryError(
                f"worker record at {key!r} has version {version!r}; this build reads version "
                f"{RECORD_VERSION}: run the same kv-fabric version on every worker"
            )
        try:
            return cls(
                worker_id=_typed(body, "worker_id", str),
                role=Role(body["role"]),
                endpoints=Endpoints.from_json(_typed(body, "endpoints", dict)),
                agent_name=_typed(body, "agent_name", (str, type(None))),
                layout=layout_from_json(_typed(body, "layout", dict)),
                compat_hash=_typed(body, "compat_hash", int),
                started_at=float(_typed(body, "started_at", (int, float))),
                leaving=_flag(body, "leaving"),
                node=_typed(body, "node", str) if "node" in body else None,
                draining=_flag(body, "draining"),
                node_cache=_flag(body, "node_cache"),
            )
        except (KeyError, ValueError, TypeError) as exc:  # ConfigError is a ValueError
            raise DiscoveryError(f"worker record at {key!r} is malformed: {exc}") from exc


def _typed(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"field {name!r} has type {type(value).__name__}")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    """An optional boolean field (absent: False)."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise TypeError(f"field {name!r} has type {type(value).__name__}")
    return value


_KINDS: dict[type[Any], dict[str, tuple[type, ...]]] = {}


def _field_kinds(cls: type[Any]) -> dict[str, tuple[type, ...]]:
    """``field -> the types its value may have`` of a record part (every field is Optional)."""
    kinds = _KINDS.get(cls)
    if kinds is None:
        hints = typing.get_type_hints(cls)
        kinds = _KINDS[cls] = {f.name: typing.get_args(hints[f.name]) for f in fields(cls)}
    return kinds


def _check_fields(part: Endpoints | FabricLayout | VllmLayout) -> None:
    """Raise ConfigError naming the first field whose value is not of its declared type."""
    for name, kinds in _field_kinds(type(part)).items():
        value = getattr(part, name)
        if isinstance(value, bool) or not isinstance(value, kinds):
            wanted = " or ".join("None" if kind is type(None) else kind.__name__ for kind in kinds)
            raise ConfigError(
                f"{type(part).__name__}.{name} is {value!r} ({type(value).__name__}), not {wanted}"
            )


def _check_layout(layout: FabricLayout | VllmLayout) -> None:
    _check_fields(layout)
    for name, value in _present(layout).items():
        if isinstance(value, int) and value <= 0:
            raise ConfigError(f"{type(layout).__name__}.{name} is {value}: sizes are positive")


def _present(part: Endpoints | FabricLayout | VllmLayout) -> dict[str, int | str]:
    """The fields of ``part`` that are not None."""
    values = {field.name: getattr(part, field.name) for field in fields(part)}
    return {name: value for name, value in values.items() if value is not None}


def _known_fields(cls: type, body: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``body`` that name a field of ``cls`` (others are a newer writer's)."""
    return {field.name: body[field.name] for field in fields(cls) if field.name in body}
