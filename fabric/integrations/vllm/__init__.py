"""KV Fabric under vLLM: a ``KVConnectorBase_V1`` loaded through ``kv_connector_module_path``.

One ``--kv-transfer-config`` puts the fabric under a vLLM instance (docs/vllm.md)::

    {"kv_connector": "FabricConnector",
     "kv_connector_module_path": "fabric.integrations.vllm.connector",
     "kv_role": "kv_both" | "kv_producer" | "kv_consumer",
     "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"cpu_cache_gb": ..., "disk_path": ..., "etcd_endpoints": ...}}

Modules (imports point down; only ``connector``, ``metadata`` and ``telemetry`` import vLLM at
module level)::

    connector.py  FabricConnector: the facade vLLM builds per role; build_scheduler/build_worker
    scheduler.py  FabricScheduler: lookups, load/save plans, holds (no KV bytes)
    saves.py      the saves planned for the blocks each step completes (node, G2 and down, G4)
    tiers.py      TierLedger: the host (G2) and local disk (G3) pools, jobs in flight
    worker.py     FabricWorker: tier and G4 loads and saves, P/D reads, completions, load errors
    mover.py      TierMover: the tiers' bytes on one rank, copies, the write-down copy thread
    node.py       the host's node cache as a tier: each side's NodeLink, pages in its geometry
    jobs.py       TierLoad / TierSave / TierWrite, NodeLoad / NodeSave and the workers'
                  JobReport (no vLLM import)
    producer.py   the P/D hold table (fabric.pd.HoldTable) and ProducerEndpoint
    discovery.py  instance_record: the etcd record (role, signal/http endpoints, layout facts)
    consumer.py   PeerReader: etcd lookup, PrefillRequest/BlocksReady, NIXL read, TransferDone
    metadata.py   FabricMetadata: the scheduler -> worker records of one step
    pages.py      PageGeometry (compat hash, hash seed) and KvPages (gather/scatter, NIXL layout)
    config.py     ConnectorConfig from kv_connector_extra_config; KvRole
    stats.py      counters of both sides
    traces.py     RequestTraces: each request's KV trace (fabric.signal.kv_trace), returned in
                  kv_transfer_params["fabric_stats"] and logged once
    telemetry.py  the NIXL agent's transfers to vLLM's KVConnectorStats and /metrics

Design.

*Blocks.* A fabric block is one vLLM block id's pages across every layer, moved as opaque bytes
(``pages.py``); its key is the fabric's chained xxh3 sequence hash of the block's token ids at
vLLM's block size, seeded with a salt of vLLM's layout facts (model, KV dtype, layers, KV heads,
head sizes, block size, KV layout, page bytes). The same facts' hash (``compat_hash``) names the
disk tier's directory and guards every signal and NIXL read, so incompatible instances never
exchange KV.

*Host and local disk tiers (G2, G3).* vLLM keeps G1. Below it the connector runs the block
manager's own pools, split the way vLLM splits a connector: the scheduler side owns them
(``TierLedger``: allocation, registration by chained hash, eviction policy, disk admission
filter) and plans every move as a job; the worker side owns the bytes (``TierMover``) and
executes the jobs, reporting them back through ``kv_connector_worker_meta``. Lookups take vLLM's
local hit, then the longest prefix in G2, G3 and G4, in that order (pinned until loaded); each
step's newly full blocks are copied out to G2 on the model thread after the forward pass (one
copy), then written down to G3 (blocks the admission filter admits) and G4 on a copy thread.

*The host's node cache (``node_cache``).* ``fabric serve node-cache`` owns one shared-memory
tier per host; each side attaches its own ``fabric.node`` ``NodeLink`` (``node``). The
scheduler counts the prefix the node holds after G2 / G3 (before G4); the worker loads it into
vLLM's pages before the forward pass (blocks gone since the lookup are load errors) and stores
each step's newly full blocks after it. vLLM attaches with the compat hash of the node's slots
(a reference worker's of that geometry) and keys its blocks with its own seed: one node cache
per host serves both engines, which never share a block. A restarted node cache is attached
again without a restart of vLLM.

*Offload and prefix hits (disk tier, G4).* The scheduler side asks the ``SharedBlockStore`` how many
leading blocks beyond vLLM's local hit it holds (``get_num_new_matched_tokens``: whole blocks,
never the last prompt token, a synchronous load); the worker side reads them into the blocks vLLM
allocated in ``start_load_kv``, before the forward pass. Every step the scheduler lists the blocks
that became full (all their tokens known and computed by the end of the step) and that the store
lacks; the worker gathers and writes them in ``wait_for_save``. Any process opening the same
directory sees them: a prompt computed by one instance is a hit in another.

*Prefill -> decode.* The producer's ``request_finished`` (for requests sent with
``kv_transfer_params: {"do_remote_decode": true}``) returns delay-free plus params naming its
fabric worker id, request id, block ids and compat hash. Its worker side adopts vLLM's KV tensors
as a fabric storage, registers them with a NIXL agent (progress thread off: the reader's polling
drives a read, and the producer polls its agent at every connector call while it holds blocks,
which reads over TCP need: ``worker``), serves a ZeroMQ ``SignalServer`` and publishes a
``WorkerRecord`` in etcd (``discovery``: every instance with ``etcd_endpoints`` registers,
except a consumer without ``http_url``; the fabric's frontend routes requests to those with an
``http`` endpoint). The consumer, given those params, answers ``get_num_new_matched_tokens`` with an
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

*Threads.* Loads, reads and the copy-out run on vLLM's model-runner thread inside the connector
calls (no overlap with compute); write-downs to disk run on the mover's copy thread; the other
threads are the signal server's (which touches the hold table alone) and discovery's. Without a
host tier, G4 saves are written on the model thread.

*Layouts.* vLLM-CPU's, FlashInfer's (blocks outermost) and FlashAttention's (K/V outermost, NHD
or HND) per-layer tensors are all read in their physical order (``pages.py``); CUDA tensors are
accepted (untested here: no GPU).

*Events.* The tiers' pools publish per-tier ``BlockStored`` / ``BlockRemoved``: to vLLM's own
stream (``take_events``) and, with ``events_endpoint``, the fabric's publisher advertised in
etcd, which the frontend indexes to route by prefix. With a host tier, a P/D producer serves its
holds from host copies (``PeerHold.host_ids``) so vLLM frees its blocks at once.

*Tensor parallel.* Each rank's worker side keeps its own shard under the ledger's block ids (G4
in a directory per rank: ``PageGeometry.shard_compat``); the ledger counts a job done once every
rank reported it. For P/D each rank has its own NIXL agent, producer endpoint and etcd record
(``discovery.rank_worker_id``) and reads from the producer's rank of the same number.

Not supported yet: P/D between different TP sizes, PP > 1, hybrid or sliding-window models
(several KV cache groups), layer-wise pipelining of loads/saves.
"""

CONNECTOR_NAME = "FabricConnector"
CONNECTOR_MODULE = "fabric.integrations.vllm.connector"
