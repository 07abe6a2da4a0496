"""``python -m fabric.node`` / ``fabric serve node-cache``: run a node KV cache until SIGINT or
SIGTERM.

Flags override the ``FABRIC_*`` / ``DYN_KVBM_*`` environment (``KvbmConfig``), which overrides the
defaults, so a node cache started in a deployment's environment shares its workers' block size,
salt and compat hash. When serving, it prints one JSON line to stdout (``endpoint``, ``metrics``,
``segment``, ``num_blocks``, ``block_bytes``, ``compat_hash``, ``lease_s``) for launchers and
tests; it sweeps expired leases four times per lease; on SIGINT / SIGTERM it stops serving and
unlinks its segment. It serves its Prometheus metrics (``fabric.node.metrics``) on
``http://<--bind-host>:<--metrics-port>/metrics`` (port 0, the default: a free one) with the
worker's ``MetricsServer``; its record advertises that URL and the event stream at the advertised
host (``fabric.discovery.addresses``, the rules workers follow: ``--advertise-host``, else the
bind host, else with 0.0.0.0 the address of the route to etcd). With ``--etcd`` it registers in
discovery (role ``node-cache``, id ``node-cache-<node>``, ``node`` = this host's name, the
metrics URL: ``node_record``), so workers started with ``--node-cache etcd`` find it, dashboards
and ``fabric status`` scrape it, and the router sees its KV events (published by default on a
free port of the bind host, with replay); the record is revoked on the way out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from fabric.discovery.addresses import HostAddresses, resolve_addresses

if TYPE_CHECKING:
    from fabric.node.config import NodeCacheConfig
    from fabric.node.service import NodeCacheService

logger = logging.getLogger("fabric.node")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the node KV cache: one host-memory pool in POSIX shared memory that every "
        "instance on this host stores blocks into and loads them from (reserve, copy, commit; "
        "lookup, copy, unpin), under leases so a killed instance leaks nothing. Flags override "
        "FABRIC_* variables, which override defaults."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at DEBUG"
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="the model whose KV is cached: tiny, small or a Hugging Face-style Llama "
        "directory (only its config.json is read) [default tiny]",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--blocks", type=int, metavar="N", help="blocks in the shared pool")
    size.add_argument("--shm-gb", type=float, metavar="GB", help="size of the shared pool (GB)")
    parser.add_argument("--block-size", type=int, metavar="TOKENS", help="tokens per KV block")
    parser.add_argument(
        "--disk-dir",
        type=Path,
        default=os.environ.get("FABRIC_NODE_CACHE_DISK_DIR") or None,
        metavar="DIR",
        help="this node's disk tier below the shared pool (block files, written through at "
        "commit, read on a pool miss; a restart with the same directory serves them) "
        "[env FABRIC_NODE_CACHE_DISK_DIR (so fabric launch --node-cache passes it); default none]",
    )
    disk = parser.add_mutually_exclusive_group()
    disk.add_argument("--disk-blocks", type=int, metavar="N", help="blocks the disk tier keeps")
    disk.add_argument(
        "--disk-gb",
        type=float,
        default=float(os.environ.get("FABRIC_NODE_CACHE_DISK_GB") or 0) or None,
        metavar="GB",
        help="size of the disk tier (GiB) [env FABRIC_NODE_CACHE_DISK_GB]",
    )
    parser.add_argument(
        "--endpoint",
        default="tcp://127.0.0.1:0",
        help="signal endpoint to bind (port 0: a free one) [default tcp://127.0.0.1:0]",
    )
    parser.add_argument(
        "--lease-s",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long a reservation or pin lives unless renewed [default 5]",
    )
    parser.add_argument("--namespace", help="discovery namespace (names the segment)")
    parser.add_argument(
        "--node",
        help="this host's name (names the segment and the record; workers of the host give the "
        "same) [env FABRIC_NODE_NAME; default the hostname]",
    )
    parser.add_argument(
        "--admit-after",
        type=int,
        default=1,
        metavar="N",
        help="store a block once its hash was seen N times [default 1: always]",
    )
    parser.add_argument("--eviction", help="priority_lru, lru or lfu [env FABRIC_EVICTION]")
    parser.add_argument(
        "--events-endpoint",
        metavar="ZMQ",
        help="publish KV events here, vLLM's wire format, replay on a free port beside it "
        "[default tcp://<bind host>:0]",
    )
    parser.add_argument(
        "--bind-host",
        default=os.environ.get("FABRIC_BIND_HOST"),
        metavar="HOST",
        help="interface the KV event stream and /metrics listen on; 0.0.0.0 for all "
        "[env FABRIC_BIND_HOST; default 127.0.0.1]",
    )
    parser.add_argument(
        "--advertise-host",
        default=os.environ.get("FABRIC_ADVERTISE_HOST"),
        metavar="HOST",
        help="address the etcd record gives for them (a pod IP, this host's address) "
        "[env FABRIC_ADVERTISE_HOST; default: the bind host, or with 0.0.0.0 the address of "
        "the route to etcd]",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="port of the /metrics HTTP endpoint (0: any free one) [default 0]",
    )
    parser.add_argument(
        "--etcd",
        metavar="URL",
        help="register in this etcd (role node-cache) so workers with --node-cache etcd find "
        "it [default: not registered; workers then need its endpoint]",
    )
    parser.add_argument(
        "--nixl",
        action="store_true",
        help="register the shared pool with a NIXL agent so workers on other hosts can read it "
        "(lookup + pin over the signal channel, one NIXL READ, unpin); with --etcd its block "
        "set is published there [default: off]",
    )
    parser.add_argument(
        "--registration-ttl", type=float, default=5.0, metavar="SECONDS", help="etcd lease TTL"
    )


def run(args: argparse.Namespace) -> int:
    from fabric.node.config import NodeCacheConfig
    from fabric.node.metrics import node_cache_registry
    from fabric.node.service import build_node_cache
    from fabric.signal import metrics as signal_metrics
    from fabric.worker.metrics import MetricsServer

    addresses = resolve_addresses(args.bind_host, args.advertise_host, args.etcd or "")
    config = NodeCacheConfig(**_config_fields(args, addresses))
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    with ExitStack() as stack:
        service = stack.enter_context(build_node_cache(config))
        registry = node_cache_registry(service.cache)
        registry.register(signal_metrics.REGISTRY)  # this process's signal errors
        metrics = MetricsServer(registry, addresses.bind, args.metrics_port)
        stack.callback(metrics.close)
        metrics_url = addresses.advertise(metrics.url)
        registered = _register(args, service, config, stack, addresses, metrics=metrics_url)
        ready = {
            "endpoint": service.endpoint,
            "metrics": metrics_url,
            "segment": service.segment,
            "num_blocks": config.num_blocks,
            "block_bytes": config.block_bytes,
            "compat_hash": config.compat_hash,
            "lease_s": config.lease_s,
            "node": config.node,
            "disk_dir": None if config.disk_dir is None else str(config.disk_dir),
            "disk_blocks": config.num_disk_blocks if config.disk_dir is not None else 0,
            "worker_id": registered,
            "agent_name": None if service.nixl is None else service.nixl.agent.name,
        }
        print(json.dumps(ready), flush=True)
        logger.info("node cache serving on %s", service.endpoint)
        while not stop.wait(config.lease_s / 4):
            service.cache.sweep()
    return 0


def _register(
    args: argparse.Namespace,
    service: NodeCacheService,
    config: NodeCacheConfig,
    stack: ExitStack,
    addresses: HostAddresses,
    *,
    metrics: str,
) -> str | None:
    """Register ``service`` in etcd when ``--etcd`` was given; its worker id (None: not)."""
    if not args.etcd:
        logger.info("not in etcd (no --etcd): workers need --node-cache %s", service.endpoint)
        return None
    from fabric.discovery.etcd import EtcdRegistry
    from fabric.discovery.registration import WorkerRegistration
    from fabric.node.service import node_record

    registry = EtcdRegistry(args.etcd, timeout_s=2.0)
    stack.callback(registry.close)
    record = node_record(service, config, model=args.model, metrics=metrics, addresses=addresses)
    registration = WorkerRegistration(
        registry, record, ttl_s=args.registration_ttl, namespace=config.namespace
    ).start()
    stack.callback(registration.close)
    logger.info("registered as %s in namespace %r", record.worker_id, config.namespace)
    if service.nixl is not None:
        key = service.nixl.publish(registry, config.namespace, config.node)
        stack.callback(registry.delete, key)
        logger.info("NIXL block set of agent %s at %s", service.nixl.agent.name, key)
    return record.worker_id


def _config_fields(args: argparse.Namespace, addresses: HostAddresses) -> dict[str, Any]:
    from fabric.discovery.registry import DEFAULT_NAMESPACE
    from fabric.kvbm import load_kvbm_config
    from fabric.models.config import ModelConfig
    from fabric.models.presets import PRESET_CONFIGS, Preset

    events = addresses.bind_endpoint() if args.events_endpoint is None else args.events_endpoint
    given = {
        "block_size": args.block_size,
        "eviction": args.eviction,
        "events_endpoint": events or None,  # "": no event stream
        "events_replay_endpoint": addresses.bind_endpoint() if events else None,
        "cpu_cache_blocks": args.blocks,
    }
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if args.shm_gb is not None:  # a size given here beats a block count in the environment
        overrides.update(cpu_cache_gb=args.shm_gb, cpu_cache_blocks=None)
    presets = {preset.value: preset for preset in Preset}
    model = (
        PRESET_CONFIGS[presets[args.model]]
        if args.model in presets
        else ModelConfig.from_dir(args.model)
    )
    kvbm = load_kvbm_config(**overrides)
    fields: dict[str, Any] = {
        "kvbm": kvbm,
        "geometry": model.kv_geometry(),
        "namespace": args.namespace or DEFAULT_NAMESPACE,
        "endpoint": args.endpoint,
        "lease_s": args.lease_s,
        "admit_after": args.admit_after,
        "disk_dir": args.disk_dir,
        "disk_blocks": args.disk_blocks or 0,
        "disk_gb": args.disk_gb or 0.0,
        "nixl": args.nixl,
    }
    node = args.node or kvbm.node_name
    if node:
        fields["node"] = node
    return fields


def main(argv: list[str] | None = None) -> int:
    from fabric.errors import FabricError

    parser = argparse.ArgumentParser(prog="python -m fabric.node")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(args)
    except FabricError as exc:
        print(f"python -m fabric.node: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
