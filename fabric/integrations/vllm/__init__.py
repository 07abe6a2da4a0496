"""KV Fabric under vLLM: a ``KVConnectorBase_V1`` loaded through ``kv_connector_module_path``.

One ``--kv-transfer-config`` puts the fabric under a vLLM instance (docs/vllm.md)::

    {"kv_connector": "FabricConnector",
     "kv_connector_module_path": "fabric.integrations.vllm.connector",
     "kv_role": "kv_both" | "kv_producer" | "kv_consumer",
     "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"disk_path": ..., "etcd_endpoints": ...}}

Modules (imports point down; only ``connector`` and ``metadata`` import vLLM at module level)::

    connector.py  FabricConnector: the facade vLLM builds per role; build_scheduler/build_worker
    scheduler.py  FabricScheduler: lookups, load/save plans, holds (no KV bytes)
    worker.py     FabricWorker: disk loads and saves, P/D reads, completions, load errors
    producer.py   HoldTable + ProducerEndpoint: held prefills, signal server
    discovery.py  instance_record: the etcd record (role, signal/http endpoints, layout facts)
    consumer.py   PeerReader: etcd lookup, PrefillRequest/BlocksReady, NIXL read, TransferDone
    metadata.py   FabricMetadata: the scheduler -> worker records of one step
    pages.py      PageGeometry (compat hash, hash seed) and KvPages (gather/scatter, NIXL layout)
    config.py     ConnectorConfig from kv_connector_extra_config; KvRole
    stats.py      counters of both sides

Design.

*Blocks.* A fabric block is one vLLM block id's pages across every layer, moved as opaque bytes
(``pages.py``); its key is the fabric's chained xxh3 sequence hash of the block's token ids at
vLLM's block size, seeded with a salt of vLLM's layout facts (model, KV dtype, layers, KV heads,
head sizes, block size, KV layout, page bytes). The same facts' hash (``compat_hash``) names the
disk tier's directory and guards every signal and NIXL read, so incompatible instances never
exchange KV.

*Offload and prefix hits (disk tier).* The scheduler side asks the ``SharedBlockStore`` how many
leading blocks beyond vLLM's local hit it holds (``get_num_new_matched_tokens``: whole blocks,
never the last prompt token, a synchronous load); the worker side reads them into the blocks vLLM
allocated in ``start_load_kv``, before the forward pass. Every step the scheduler lists the blocks
that became full (all their tokens known and computed by the end of the step) and that the store
lacks; the worker gathers and writes them in ``wait_for_save``. Any process opening the same
directory sees them: a prompt computed by one instance is a hit in another.

*Prefill -> decode.* The producer's ``request_finished`` (for requests sent with
``kv_transfer_params: {"do_remote_decode": true}``) returns delay-free plus params naming its
fabric worker id, request id, block ids and compat hash. Its worker side adopts vLLM's KV tensors
as a fabric storage, registers them with a NIXL agent (progress thread off: reads are driven by
the reader's polling), serves a ZeroMQ ``SignalServer`` and publishes a ``WorkerRecord`` in
etcd (``discovery``: every instance with ``etcd_endpoints`` registers, except a consumer
without ``http_url``; the fabric's frontend routes requests to those with an ``http``
endpoint). The consumer, given those params, answers ``get_num_new_matched_tokens`` with an
asynchronous load of the prompt beyond its local hit; its worker finds the producer through a
``WorkerDirectory``, sends ``PrefillRequest`` (with the prompt, checked against the hold's
digest), gets ``BlocksReady`` (a ``RemoteBlockSet``), reads with NIXL into the allocated blocks
and sends ``TransferDone``; the producer's ``get_finished`` then reports the request sent and
vLLM frees the blocks. A hold nobody releases expires after ``hold_timeout_s``.

*Failures.* A disk miss, a corrupt block file (checksummed by the store) or a failed P/D read
(producer gone, timeout, refused) makes the affected block ids load errors
(``get_block_ids_with_load_errors``); with ``kv_load_failure_policy: recompute`` vLLM recomputes
from the first failed block. Every wait is bounded (``peer_timeout_s``, ``read_timeout_s``,
etcd and signal timeouts); a full or unwritable disk only drops offloads.

*Threads.* Loads, reads and saves run on vLLM's model-runner thread inside the connector calls
(no overlap with compute); the only other threads are the signal server's (which touches the
hold table alone) and discovery's.

Not supported: TP/PP > 1, hybrid or sliding-window models (several KV cache groups), GPU KV
layouts with K/V outermost, layer-wise pipelining of loads/saves, host-memory (G2) tiers.
"""

CONNECTOR_NAME = "FabricConnector"
CONNECTOR_MODULE = "fabric.integrations.vllm.connector"
