"""The node tier under vLLM: this host's node KV cache (``fabric serve node-cache``) below the
connector's host and local disk tiers, through the node package's ``NodeLink`` (the reference
workers' mechanism: attach on use, again after any failure; a miss, never a failed request).

One node cache serves every process of a host whose blocks have its slots' geometry (layers,
KV heads, head size, dtype, block size, salt): the reference engine's workers and vLLM instances
of the same model. A vLLM block (one block id's page in every layer: ``2 * block_size * heads *
head_size`` elements per layer) fills one slot byte for byte, so:

* the compat hash a vLLM side attaches with is the slots' (``node_compat_hash``: what
  ``build_kvbm`` gives a reference worker of that geometry), which the node checks;
* the keys are vLLM's own sequence hashes, seeded with vLLM's layout facts
  (``PageGeometry.hash_seed``). vLLM instances of one model and layout share blocks; vLLM and the
  reference engine share the node's memory but never a block, since their seeds differ. That is
  by design: the reference engine orders a page's bytes otherwise (K and V chunks, not vLLM-CPU's
  per-head K-then-V page) and computes KV with another model implementation, so its blocks
  loaded into vLLM's pages would give other outputs than a recompute.

Per side (each owns one link, ``<worker_id>-<side>-<pid>``, on its engine thread)::

    scheduler   prefix_length: the prefix the node holds after G2 / G3, before G4 (a lookup
                whose pin is released at once: a plan, not a promise)
    worker      load into the blocks vLLM allocated, before the forward pass (lookup + pin,
                one copy out of the segment, unpin); fewer blocks than planned are load errors
                (vLLM recomputes from the first); store of each step's newly full blocks after
                the forward pass (reserve, one copy into the segment, commit)

Invariants: only pages with blocks outermost (vLLM-CPU, FlashInfer: one contiguous page per
block and layer) are presented to the node (``node_storage``); layouts that keep K and V apart
(FlashAttention) are refused with the reason, as are pages of another size than the geometry's.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from fabric.discovery.registration import WorkerDirectory
from fabric.discovery.registry import Registry, Role
from fabric.errors import ConfigError, LayoutMismatch
from fabric.integrations.vllm.config import ConnectorConfig
from fabric.integrations.vllm.pages import KvPages, PageGeometry
from fabric.kvbm import (
    KvbmConfig,
    KvGeometry,
    LayoutKind,
    LayoutSpec,
    TensorStorage,
    adopt_tensors,
    seed_for_salt,
)
from fabric.kvbm.build import compat_salt
from fabric.node.link import NODE_CACHE_FROM_ETCD, NodeLink, endpoint_in, fixed_endpoint

logger = logging.getLogger(__name__)


def node_geometry(geometry: PageGeometry) -> KvGeometry:
    """The node slots' geometry that holds vLLM's blocks of ``geometry`` byte for byte.

    Raises:
        LayoutMismatch: the pages are not ``2 * block_size * heads * head_size`` elements per
            layer (V heads of another size, a packed or quantised page).
    """
    dtype = getattr(torch, geometry.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise LayoutMismatch(f"the node tier does not know vLLM's KV dtype {geometry.dtype!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = 2 * geometry.block_size * geometry.num_kv_heads * geometry.head_size * itemsize
    if geometry.head_size_v != geometry.head_size or geometry.page_bytes != expected:
        raise LayoutMismatch(
            f"the node tier stores pages of 2 x {geometry.block_size} tokens x "
            f"{geometry.num_kv_heads} heads x {geometry.head_size} {geometry.dtype} per layer "
            f"({expected} bytes); this model's are {geometry.page_bytes} bytes (head sizes K "
            f"{geometry.head_size}, V {geometry.head_size_v}): unset node_cache"
        )
    return KvGeometry(geometry.num_layers, geometry.num_kv_heads, geometry.head_size, dtype)


def node_layout(geometry: PageGeometry, num_blocks: int) -> LayoutSpec:
    """vLLM's pages of ``geometry`` as a layer-separate layout with the node's slot geometry."""
    return node_geometry(geometry).layout(
        LayoutKind.LAYER_SEPARATE, num_blocks, geometry.block_size
    )


def node_compat_hash(kvbm: KvbmConfig, geometry: PageGeometry) -> int:
    """The compat hash of the node cache whose slots hold these pages (``build_kvbm``'s seed of a
    reference worker of that geometry, block size and salt)."""
    return seed_for_salt(compat_salt(kvbm, node_geometry(geometry)))


def node_storage(pages: KvPages) -> TensorStorage:
    """vLLM's adopted pages in the node's slot geometry (the other side of node copies).

    Raises:
        LayoutMismatch: the layout keeps K and V apart (two views per layer), or the pages are
            not the node's size (``node_geometry``).
    """
    layout = node_layout(pages.geometry, pages.num_blocks)
    if len(pages.views) != layout.num_layers:
        raise LayoutMismatch(
            f"the node tier needs vLLM pages with blocks outermost (vLLM-CPU, FlashInfer); this "
            f"KV layout keeps K and V apart ({len(pages.views)} views for {layout.num_layers} "
            "layers): unset node_cache"
        )
    return adopt_tensors(layout, [view.view(layout.dtype) for view in pages.views])


@dataclass(slots=True)
class NodeAttachment:
    """One side's node tier: its link and what finds the node cache (closed together)."""

    link: NodeLink
    where: str
    stack: ExitStack

    def close(self) -> None:
        """Detach (the node keeps what it holds) and stop watching discovery. Idempotent."""
        self.stack.close()


def attach_node_tier(
    config: ConnectorConfig,
    geometry: PageGeometry,
    *,
    side: str,
    layout: LayoutSpec,
    registry: Registry | None = None,
) -> NodeAttachment | None:
    """The node tier of one side when ``node_cache`` is set (None otherwise): a ``NodeLink`` to
    the given endpoint, or (``etcd``) to the node cache registered for ``node_name`` (default
    the hostname) with the slots' compat hash in ``namespace``. It attaches on first use.

    Args:
        side: names this side in the link's identity (``scheduler``, ``rank0``).
        layout: the layout this side copies from and to (compared with the node's on attach).
        registry: discovery for ``etcd`` (default: the ``etcd_endpoints`` etcd).
    """
    kvbm = config.kvbm_config(geometry.block_size)
    where = kvbm.node_cache
    if where is None:
        return None
    compat_hash = node_compat_hash(kvbm, geometry)
    stack = ExitStack()
    try:
        if where == NODE_CACHE_FROM_ETCD:
            node = kvbm.node_name or socket.gethostname()
            if registry is None:
                from fabric.discovery.etcd import EtcdRegistry

                etcd = EtcdRegistry(config.etcd_endpoints or "", timeout_s=config.peer_timeout_s)
                stack.callback(etcd.close)
                registry = etcd
            directory = WorkerDirectory(
                registry, role=Role.NODE_CACHE, namespace=config.namespace
            ).start()
            stack.callback(directory.close)
            resolve = endpoint_in(directory, node=node, compat_hash=compat_hash)
            described = f"the node cache of {node!r} in {config.namespace!r}"
        else:
            resolve = fixed_endpoint(where)
            described = f"the node cache at {where}"
        link = NodeLink(
            resolve,
            identity=f"{config.fabric_worker_id}-{side}-{os.getpid()}",
            compat_hash=compat_hash,
            layout=layout,
        )
        stack.callback(link.close)
    except BaseException:
        stack.close()
        raise
    logger.info("%s: node tier is %s (slots' compat %016x)", side, described, compat_hash)
    return NodeAttachment(link, described, stack)


def check_node_supported(config: ConnectorConfig, world_size: int) -> None:
    """Refuse ``node_cache`` where it cannot work (before anything is built).

    Raises:
        ConfigError: tensor parallelism (every rank would store its shard under the same keys).
    """
    if config.kvbm_config(16).node_cache is not None and world_size > 1:
        raise ConfigError(
            f"node_cache is not supported with tensor parallelism (TP={world_size}): each "
            "rank's shard would need keys of its own; unset node_cache or run TP=1"
        )
