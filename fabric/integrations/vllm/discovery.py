"""What a vLLM instance publishes about itself in etcd: ``instance_record``.

One record per instance, under ``/<namespace>/workers/<role>/<worker_id>`` (``fabric.discovery``),
kept alive by a ``WorkerRegistration`` while the instance runs. Two readers use it:

* consumers (``consumer.PeerReader``) find a producer by its worker id and read its ``signal``
  endpoint and ``compat_hash`` (any role);
* the fabric's frontend (``fabric.frontend.router``) routes requests to instances that have an
  ``http`` endpoint, by role, and tells them from its own workers by their ``VllmLayout``.

Role by ``kv_role``::

    kv_producer -> prefill     endpoints: signal (+ http)       always registered
    kv_both     -> aggregated  endpoints: signal (+ http)       always registered
    kv_consumer -> decode      endpoints: http                  only with http_url (nothing else
                                                                 would read the record)

``layout`` (a ``VllmLayout``): the page geometry's compatibility facts (dtype, block size, ...)
plus ``kv_role``; ``model`` is the served model name (what the frontend matches and sends), the
compat hash's model is kept as ``model_id``.
"""

from __future__ import annotations

from fabric.discovery.records import Endpoints, VllmLayout, WorkerRecord
from fabric.discovery.registry import Role
from fabric.integrations.vllm.config import ConnectorConfig, KvRole
from fabric.integrations.vllm.pages import PAGE_FORMAT_VERSION, PageGeometry

KV_ROLE_TO_ROLE = {
    KvRole.PRODUCER: Role.PREFILL,
    KvRole.BOTH: Role.AGGREGATED,
    KvRole.CONSUMER: Role.DECODE,
}


def rank_worker_id(worker_id: str, rank: int) -> str:
    """The id tensor-parallel ``rank`` of instance ``worker_id`` registers under: the instance's
    own for rank 0 (the record the frontend routes to), ``<id>-tp<rank>`` for the others (a
    consumer's rank reads from the producer's rank of the same number)."""
    return worker_id if rank == 0 else f"{worker_id}-tp{rank}"


def instance_record(
    config: ConnectorConfig,
    geometry: PageGeometry,
    *,
    signal_endpoint: str | None,
    agent_name: str | None,
    started_at: float,
    events: tuple[str | None, str | None] = (None, None),
) -> WorkerRecord | None:
    """This instance's record, or None when nobody would read it (a consumer without http_url).

    Args:
        signal_endpoint: the producer's signal server (None for a consumer).
        events: the tiers' KV event stream and its replay endpoint, where published.
    """
    role = KV_ROLE_TO_ROLE[config.kv_role]
    http = config.http_url.rstrip("/") if config.http_url is not None else None
    if signal_endpoint is None and http is None:
        return None
    layout = VllmLayout(
        model=config.served_model_name or geometry.model,
        model_id=geometry.model,
        kv_role=config.kv_role.value,
        page_format=PAGE_FORMAT_VERSION,
        dtype=geometry.dtype,
        num_layers=geometry.num_layers,
        num_kv_heads=geometry.num_kv_heads,
        head_size=geometry.head_size,
        head_size_v=geometry.head_size_v,
        block_size=geometry.block_size,
        kv_layout=geometry.kv_layout,
        page_bytes=geometry.page_bytes,
    )
    return WorkerRecord(
        worker_id=config.fabric_worker_id,
        role=role,
        endpoints=Endpoints(
            signal=signal_endpoint, http=http, events=events[0], events_replay=events[1]
        ),
        agent_name=agent_name,
        layout=layout,
        compat_hash=geometry.compat_hash,
        started_at=started_at,
    )
