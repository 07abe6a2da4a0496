"""``build_worker``: wire one worker process from its role and its ``FabricConfig``.

Start-up, in order (each step logged at INFO with its duration; a failure closes what was
built, newest first, and raises)::

    CPU pinning + threads ─▶ model directory ─▶ KV block manager (device pool, host / disk
    pools when sized, G4 shared store when set, KV event publisher) ─▶ offload manager (with a
    host, disk or shared tier) ─▶ engine ─▶ NIXL agent (device pool registered once)
    ─▶ metrics HTTP endpoint (also /health/live and /health/ready: ``fabric.worker.health``)
    ─▶ worker directory (every worker, exact: no grace; decode and aggregated roles find KV
    sources in it, for remote prefills and peer hits; prefill and aggregated roles release the
    handoffs held for a worker that LEFT it: ``PrefillService.on_worker_change``)
    ─▶ node tier (with ``--node-cache``: a ``NodeLink`` attached to the manager)
    ─▶ scheduler + signal server
    ─▶ etcd registration (last: a registered worker is ready to serve)

``WorkerRuntime.drain`` (a worker's first SIGTERM) marks the record ``draining`` (routers stop
choosing the worker, its connections and holds stay served; ``/health/ready`` turns false) and
has the scheduler refuse new ``GenerateRequest``s with ``UNAVAILABLE`` (the frontend sends them to
another worker) while what it holds runs to its end (``Scheduler.wait_drained``).

``WorkerRuntime.close`` undoes it newest first: the record is revoked (no new traffic), the
signal server stops, the scheduler ends every request (releasing its blocks), then the sockets,
the agent, the offload manager and the manager close. With a host, disk or shared tier, the
offload manager (``build_offload_manager``) sees every device registration (engine and decode
handoff) and is stepped by the scheduler thread, which closes it when its loop ends; prefix
matches onboard host, disk and shared hits synchronously (``KvBlockManager.match_and_onboard``).
With a node tier (``--node-cache ENDPOINT`` or ``etcd``: this host's node cache, found by
``node`` in the directory), every device registration is also stored there
(``KvBlockManager.store_node``: reserve, one copy, commit, on the scheduler thread) and prefix
matches load what the worker's own tiers lack from it (lookup, one copy, unpin) before G4; the
link attaches on first use and again after any failure, and a node tier that cannot serve is a
miss, never a failed request. The record carries ``node`` (``FABRIC_NODE_NAME`` or the hostname).

Every server binds ``bind_host`` (127.0.0.1 by default) on an ephemeral port; the record
publishes them at the advertised host (``fabric.discovery.addresses``: the bind address, or with
a wildcard bind the route to etcd): ``signal``, ``metrics``, ``events`` and ``events_replay``,
the agent name (its UCX address on the advertised host's interface: ``UCX_NET_DEVICES`` unless
set), the layout facts plus ``model`` (the served model name) and ``model_path``, and the
manager's compatibility hash.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fabric.config import FabricConfig, KvHandoff
from fabric.discovery import metrics as etcd_metrics
from fabric.discovery.addresses import HostAddresses, resolve_addresses, ucx_net_devices
from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.records import Endpoints, WorkerRecord
from fabric.discovery.registration import WorkerDirectory, WorkerRegistration
from fabric.discovery.registry import Registry, Role
from fabric.engine import Engine
from fabric.errors import ConfigError
from fabric.kvbm import (
    ImmutableBlocks,
    KvBlockManager,
    OffloadManager,
    Tier,
    ZmqEventPublisher,
    build_kvbm,
    build_offload_manager,
    layout_record,
)
from fabric.models.config import ModelConfig
from fabric.models.presets import Preset, ensure_model
from fabric.node.link import NODE_CACHE_FROM_ETCD, NodeLink, endpoint_in, fixed_endpoint
from fabric.signal import metrics as signal_metrics
from fabric.signal.kv_trace import KvSource
from fabric.signal.server import SignalServer
from fabric.transfer import metrics as transfer_metrics
from fabric.transfer.agent import TransferAgent
from fabric.transfer.nixl_agent import NixlAgent
from fabric.worker.generation import GenerationService
from fabric.worker.handoff import DecodeHandoff, PrefillHandoff
from fabric.worker.health import WorkerHealth
from fabric.worker.metrics import MetricsServer, WorkerMetrics
from fabric.worker.prefill_service import PrefillService
from fabric.worker.remote_prefill import RemotePrefills
from fabric.worker.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    """A running worker: what tests and the CLI need to reach it, and ``close``."""

    role: Role
    record: WorkerRecord
    scheduler: Scheduler
    kvbm: KvBlockManager
    _stack: ExitStack
    offload: OffloadManager | None = None
    node: NodeLink | None = None
    """The node tier (``--node-cache``); the scheduler thread owns it."""
    registration: WorkerRegistration | None = None

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    @property
    def healthy(self) -> bool:
        return self.scheduler.alive

    def drain(self) -> None:
        """Take no new requests and finish the rest (module docstring; idempotent). Wait with
        ``scheduler.wait_drained``, then ``close``."""
        if self.registration is not None:
            self.registration.drain()  # first: routers stop choosing this worker, few refusals
        self.scheduler.drain()

    def close(self) -> None:
        """Stop everything, newest first (idempotent)."""
        self._stack.close()

    def __enter__(self) -> WorkerRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_model(model: str) -> tuple[str, Path]:
    """``(served name, directory)`` of a preset name or a model directory."""
    if model in {p.value for p in Preset}:
        return model, ensure_model(model)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--model {model!r} is neither a preset ({', '.join(p.value for p in Preset)}) nor a "
            "directory holding config.json"
        )
    return path.resolve().name, path.resolve()


def pin_process(cpus: set[int]) -> None:
    """Pin every thread of this process to ``cpus`` (threads started later inherit it).

    Raises:
        ConfigError: a CPU is not available to this process.
    """
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ConfigError(f"--cpu {sorted(cpus)}: this process may only use CPUs {sorted(allowed)}")
    task_dir = Path("/proc/self/task")
    thread_ids = [int(t) for t in os.listdir(task_dir)] if task_dir.is_dir() else [0]
    for thread_id in thread_ids:
        os.sched_setaffinity(thread_id, cpus)


_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_KEEP_HEAP_BYTES = 1 << 30
_MMAP_ABOVE_BYTES = 64 << 20


def keep_heap_warm() -> bool:
    """Stop glibc from returning and re-mapping the multi-MiB buffers of every forward step.

    A decode worker never runs a large prefill, so glibc's dynamic mmap and trim thresholds stay
    low and each step's attention buffers are mmapped, faulted in and unmapped again: measured
    here as decode steps up to 1.3x slower than an aggregated worker's at 2048-token contexts
    (``python -m fabric.bench serve``). Fixed thresholds keep such buffers in the heap.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, _KEEP_HEAP_BYTES)
    )


@contextmanager
def _step(what: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    logger.info("%s (%.2f s)", what, time.perf_counter() - start)


def build_worker(
    role: Role,
    config: FabricConfig,
    *,
    registry: Registry | None = None,
    make_agent: Callable[[str], TransferAgent] = NixlAgent,
) -> WorkerRuntime:
    """Start a worker of ``role`` (PREFILL, DECODE or AGGREGATED) and register it.

    Args:
        registry: where to register and find peers; default an ``EtcdRegistry`` on
            ``config.serve.etcd_endpoint``, closed with the worker (a given one is the caller's).
        make_agent: builds the transfer agent from the worker id (tests pass a loopback one).

    Raises:
        ConfigError / DiscoveryError / FabricError: a step failed; everything built is closed.
    """
    if role is Role.FRONTEND:
        raise ConfigError("fabric serve starts prefill, decode or aggregated workers")
    began = time.perf_counter()
    cpus = config.serve.cpu_set()
    if cpus is not None:
        pin_process(cpus)
    if not keep_heap_warm():
        logger.info("not glibc: malloc thresholds left as they are")
    worker_id = config.serve.worker_id or f"{role.value}-{uuid.uuid4().hex[:8]}"
    addresses = resolve_addresses(
        config.serve.bind_host, config.serve.advertise_host, config.serve.etcd_endpoint
    )
    devices = ucx_net_devices(addresses.host)
    if devices is not None:  # the agent's UCX address: the interface peers reach
        os.environ.setdefault("UCX_NET_DEVICES", devices)
    stack = ExitStack()
    try:
        if registry is None:
            registry = EtcdRegistry(config.serve.etcd_endpoint, timeout_s=2.0)
            stack.callback(registry.close)
        return _build(
            role,
            config,
            worker_id=worker_id,
            registry=registry,
            make_agent=make_agent,
            addresses=addresses,
            stack=stack,
            began=began,
        )
    except BaseException:
        stack.close()
        raise


def _offload_manager(
    kvbm: KvBlockManager, config: FabricConfig, stack: ExitStack
) -> OffloadManager | None:
    """The offload manager when ``kvbm`` has a tier below the device, else None."""
    if kvbm.tiers == (Tier.DEVICE,):
        return None
    with _step("offload manager started"):
        offload = build_offload_manager(kvbm, config.kvbm)
        stack.callback(offload.close)  # the scheduler closes it first; idempotent
    return offload


def node_name(config: FabricConfig) -> str:
    """This host's name as node caches know it (``FABRIC_NODE_NAME``, else the hostname)."""
    return config.kvbm.node_name or socket.gethostname()


def _attach_node(
    kvbm: KvBlockManager, config: FabricConfig, directory: WorkerDirectory, worker_id: str
) -> NodeLink | None:
    """With ``node_cache`` set, attach a ``NodeLink`` to ``kvbm`` (which closes it): the given
    endpoint, or (``etcd``) the node cache registered for this host. It attaches on first use
    (on the scheduler thread, its owner) and again after any failure."""
    where = config.kvbm.node_cache
    if where is None:
        return None
    if where == NODE_CACHE_FROM_ETCD:
        resolve = endpoint_in(directory, node=node_name(config), compat_hash=kvbm.compat_hash)
        logger.info("node tier: the node cache registered for %s", node_name(config))
    else:
        resolve = fixed_endpoint(where)
        logger.info("node tier: the node cache at %s", where)
    link = NodeLink(
        resolve, identity=worker_id, compat_hash=kvbm.compat_hash, layout=kvbm.storage().layout
    )
    kvbm.attach_node(link)
    return link


def _registration_hook(
    kvbm: KvBlockManager, offload: OffloadManager | None
) -> Callable[[ImmutableBlocks], None] | None:
    """What sees every device registration: the offload manager, the node tier, both or none."""
    hooks: list[Callable[[ImmutableBlocks], object]] = []
    if offload is not None:
        hooks.append(offload.on_registered)
    if kvbm.node_attached:
        hooks.append(kvbm.store_node)
    if not hooks:
        return None

    def on_registered(blocks: ImmutableBlocks) -> None:
        for hook in hooks:
            hook(blocks)

    return on_registered


def _build(
    role: Role,
    config: FabricConfig,
    *,
    worker_id: str,
    registry: Registry,
    make_agent: Callable[[str], TransferAgent],
    addresses: HostAddresses,
    stack: ExitStack,
    began: float,
) -> WorkerRuntime:
    torch.set_num_threads(config.serve.threads)
    logger.info(
        "%s worker %s: %d compute thread(s), CPUs %s",
        role.value,
        worker_id,
        config.serve.threads,
        sorted(os.sched_getaffinity(0)),
    )
    with _step("model ready"):
        model_name, model_dir = resolve_model(config.serve.model)
        model_config = ModelConfig.from_dir(model_dir)
    with _step("KV block manager built"):
        events = ZmqEventPublisher(
            config.kvbm.events_endpoint or addresses.bind_endpoint(),
            replay_endpoint=config.kvbm.events_replay_endpoint or addresses.bind_endpoint(),
        )
        kvbm = build_kvbm(config.kvbm, model_config.kv_geometry(), events=events, device="cpu")
        stack.callback(kvbm.close)
    offload = _offload_manager(kvbm, config, stack)
    with _step(f"engine loaded from {model_dir}"):
        engine = Engine(model_dir, kvbm)
    with _step("transfer agent up, device pool registered"):
        agent = make_agent(worker_id)
        stack.callback(agent.close)
        agent.register(kvbm.storage().buffers())
    metrics = WorkerMetrics(
        kvbm.metrics.registry, role=role.value, worker_id=worker_id, model=model_name
    )
    scheduler = Scheduler(role, threads=config.serve.threads, name=f"scheduler:{worker_id}")
    health = WorkerHealth(lambda: scheduler.alive)
    for transport in (transfer_metrics.REGISTRY, signal_metrics.REGISTRY, etcd_metrics.REGISTRY):
        kvbm.metrics.registry.register(transport)  # this process's NIXL, signal and etcd errors
    metrics_server = MetricsServer(
        kvbm.metrics.registry,
        host=addresses.bind,
        port=config.serve.metrics_port,
        health=health,
    )
    stack.callback(metrics_server.close)
    server = SignalServer(
        addresses.bind_endpoint(), scheduler.handle, compat_hash=kvbm.compat_hash, name=worker_id
    )
    stack.callback(server.close)
    prefill, generation = None, None
    if role in (Role.PREFILL, Role.AGGREGATED):  # aggregated: serves peers' prefix hits too
        handoff = PrefillHandoff(kvbm, agent, hold_timeout_s=config.serve.hold_timeout_s)
        prefill = PrefillService(
            engine,
            handoff,
            server,
            metrics,
            max_waiting=config.serve.max_waiting,
            layerwise=config.serve.kv_handoff is KvHandoff.LAYERWISE,
        )
    with _step("watching workers in etcd"):
        directory = WorkerDirectory(
            registry,
            namespace=config.serve.namespace,
            on_change=prefill.on_worker_change if prefill is not None else None,
        ).start()
        stack.callback(directory.close)
    node = _attach_node(kvbm, config, directory, worker_id)
    engine.on_registered = on_registered = _registration_hook(kvbm, offload)
    if role in (Role.DECODE, Role.AGGREGATED):
        remote = RemotePrefills(
            directory,
            identity=worker_id,
            compat_hash=kvbm.compat_hash,
            timeout_s=config.serve.prefill_timeout_s,
        )
        decode_handoff = DecodeHandoff(kvbm, agent, timeout_s=config.serve.transfer_timeout_s)
        decode_handoff.on_registered = on_registered
        generation = GenerationService(
            engine,
            server,
            metrics,
            worker_id=worker_id,
            max_waiting=config.serve.max_waiting,
            remote=remote,
            handoff=decode_handoff,
            fallback=config.serve.prefill_fallback,
            max_num_batched_tokens=config.serve.max_num_batched_tokens or None,
            # with a node cache the prompt's full blocks come from the host's node tier once
            # the prefill stored them: a layer-wise read would bypass it, so ask for the whole
            layerwise=config.serve.kv_handoff is KvHandoff.LAYERWISE and not kvbm.node_attached,
            remote_source=KvSource.PEER if role is Role.AGGREGATED else KvSource.PREFILL,
        )
    scheduler.start(generation=generation, prefill=prefill, offload=offload)
    stack.callback(scheduler.close)  # before server.close: final chunks still go out
    layout = kvbm.storage().layout
    record = WorkerRecord(
        worker_id=worker_id,
        role=role,
        endpoints=Endpoints(
            signal=addresses.advertise(server.endpoint),
            metrics=addresses.advertise(metrics_server.url),
            events=addresses.advertise(events.endpoint),
            events_replay=(
                addresses.advertise(events.replay_endpoint)
                if events.replay_endpoint is not None
                else None
            ),
        ),
        agent_name=agent.name,
        layout=layout_record(layout, model=model_name, model_path=str(model_dir)),
        compat_hash=kvbm.compat_hash,
        started_at=time.time(),
        node=node_name(config),
        node_cache=config.kvbm.node_cache is not None,
    )
    with _step(f"registered in namespace {config.serve.namespace!r}"):
        registration = WorkerRegistration(
            registry,
            record,
            ttl_s=config.serve.registration_ttl_s,
            namespace=config.serve.namespace,
        ).start()
        stack.callback(registration.close)
        health.registered = lambda: registration.registered and not registration.record.draining
    logger.info(
        "%s worker %s ready in %.1f s: signal %s, metrics %s",
        role.value,
        worker_id,
        time.perf_counter() - began,
        record.endpoints.signal,
        record.endpoints.metrics,
    )
    return WorkerRuntime(role, record, scheduler, kvbm, stack, offload, node, registration)
