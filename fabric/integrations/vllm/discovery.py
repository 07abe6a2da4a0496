"""What a vLLM instance publishes about itself in etcd: ``instance_record``.

One record per instance, under ``/<namespace>/workers/<role>/<worker_id>`` (``fabric.discovery``),
kept alive by a ``WorkerRegistration`` while the instance runs. Two readers use it:

* consumers (``consumer.PeerReader``) find a producer by its worker id and read its ``signal``
  endpoint and ``compat_hash`` (any role);
* the fabric's frontend (``fabric.frontend.router``) routes requests to instances that have an
  ``http`` endpoint, by role, and tells them from its own workers by ``layout["engine"]``.

Role by ``kv_role``::

    kv_producer -> prefill     endpoints: signal (+ http)       always registered
    kv_both     -> aggregated  endpoints: signal (+ http)       always registered
    kv_consumer -> decode      endpoints: http                  only with http_url (nothing else
                                                                 would read the record)

``layout``: the page geometry's compatibility facts (``engine: "vllm"``, dtype, block size, ...)
plus ``kv_role``; ``model`` is the served model name (what the frontend matches and sends), the
compat hash's model is kept as ``model_id``.
"""

from __future__ import annotations

from fabric.discovery.registry import Role, WorkerRecord
from fabric.integrations.vllm.config import ConnectorConfig, KvRole
from fabric.integrations.vllm.pages import PageGeometry

KV_ROLE_TO_ROLE = {
    KvRole.PRODUCER: Role.PREFILL,
    KvRole.BOTH: Role.AGGREGATED,
    KvRole.CONSUMER: Role.DECODE,
}


def instance_record(
    config: ConnectorConfig,
    geometry: PageGeometry,
    *,
    signal_endpoint: str | None,
    agent_name: str | None,
    started_at: float,
) -> WorkerRecord | None:
    """This instance's record, or None when nobody would read it (a consumer without http_url).

    Args:
        signal_endpoint: the producer's signal server (None for a consumer).
    """
    role = KV_ROLE_TO_ROLE[config.kv_role]
    endpoints: dict[str, str] = {}
    if signal_endpoint is not None:
        endpoints["signal"] = signal_endpoint
    if config.http_url is not None:
        endpoints["http"] = config.http_url.rstrip("/")
    if not endpoints:
        return None
    facts = geometry.compat_facts()
    layout: dict[str, int | str] = {**facts, "kv_role": config.kv_role.value}
    layout["model_id"] = facts["model"]
    layout["model"] = config.served_model_name or facts["model"]
    return WorkerRecord(
        worker_id=config.fabric_worker_id,
        role=role,
        endpoints=endpoints,
        agent_name=agent_name,
        layout=layout,
        compat_hash=geometry.compat_hash,
        started_at=started_at,
    )
