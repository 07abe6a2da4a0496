"""The consumer (decode) instance's side of a P/D transfer: find, ask, read, release.

``PeerReader.read(spec)`` runs on the worker's engine thread, every wait bounded:

1. find the producer in etcd (``WorkerDirectory``, up to ``peer_timeout_s``) and check its
   compat hash;
2. ``PrefillRequest`` (the prompt, so the producer can check it holds that prompt's KV) over a
   ``SignalClient`` to the producer's signal endpoint; ``UNAVAILABLE`` (the producer has not
   seen the hold yet) is retried until ``peer_timeout_s``; the answer is ``BlocksReady`` with a
   ``RemoteBlockSet``;
3. NIXL READ of the needed slice of those blocks into the blocks vLLM allocated
   (``read_remote_blocks``: compat hash and geometry checked first, pair-coalesced regions,
   waited for up to ``read_timeout_s``);
4. ``TransferDone`` (success) or ``Abort`` (failure) one-way, so the producer frees its blocks at
   once instead of at its hold timeout.

Any failure raises a ``FabricError``; the worker turns it into load errors (vLLM recomputes).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from fabric.discovery.records import WorkerRecord
from fabric.discovery.registration import WorkerDirectory
from fabric.discovery.registry import Registry
from fabric.errors import FabricError, PeerUnavailable, ProtocolMismatch, TransferError
from fabric.integrations.vllm.metadata import PeerRead
from fabric.kvbm import RemoteBlockSet, Storage, read_remote_blocks
from fabric.signal.client import SignalClient
from fabric.signal.messages import Abort, BlocksReady, PrefillRequest, TransferDone
from fabric.transfer.agent import TransferAgent

logger = logging.getLogger(__name__)

_RETRY_S = 0.02


class PeerReader:
    """Reads held prefills from producer instances (module docstring)."""

    def __init__(
        self,
        *,
        worker_id: str,
        compat_hash: int,
        agent: TransferAgent,
        storage: Storage,
        registry: Registry,
        namespace: str,
        peer_timeout_s: float,
        read_timeout_s: float,
    ) -> None:
        self._worker_id = worker_id
        self._compat = compat_hash
        self._agent = agent
        self._storage = storage
        self._peer_timeout_s = peer_timeout_s
        self._read_timeout_s = read_timeout_s
        self._directory = WorkerDirectory(registry, namespace=namespace).start()
        self._clients: dict[str, tuple[str, SignalClient]] = {}

    def read(self, spec: PeerRead) -> int:
        """Read ``spec``'s blocks (or only release them when it names none); blocks read.

        Raises:
            PeerUnavailable / TransferError / ProtocolMismatch / FabricError: the read did not
                happen; the producer was told to free its blocks where it could be reached.
        """
        deadline = time.monotonic() + self._peer_timeout_s
        record, endpoint = self._find(spec.remote_worker_id, deadline)
        if record.compat_hash != self._compat:
            raise ProtocolMismatch(
                f"producer {record.worker_id} has compat hash {record.compat_hash:016x}, this "
                f"instance {self._compat:016x}: model or KV layout differ"
            )
        client = self._client(record.worker_id, endpoint)
        if not spec.block_ids:
            client.send(TransferDone(spec.remote_request_id, 0))
            return 0
        try:
            ready = self._ask(client, spec, deadline)
            remote = RemoteBlockSet.from_bytes(ready.block_set)
            end = spec.first_block + len(spec.block_ids)
            if len(remote.block_ids) < end:
                raise TransferError(
                    f"producer {record.worker_id} holds {len(remote.block_ids)} blocks of "
                    f"{spec.remote_request_id}; {end} are needed"
                )
            wanted = dataclasses.replace(remote, block_ids=remote.block_ids[spec.first_block : end])
            read_remote_blocks(
                self._agent,
                self._storage,
                spec.block_ids,
                wanted,
                compat_hash=self._compat,
                timeout_s=self._read_timeout_s,
            )
        except FabricError as e:
            self._release(client, Abort(spec.remote_request_id, f"read failed: {e}"))
            raise
        self._release(client, TransferDone(spec.remote_request_id, len(spec.block_ids)))
        return len(spec.block_ids)

    def _find(self, worker_id: str, deadline: float) -> tuple[WorkerRecord, str]:
        """The producer's record and signal endpoint (waiting up to ``deadline`` for it)."""
        record = self._directory.get(worker_id)
        if record is None:
            self._directory.wait_for(
                lambda workers: worker_id in workers, max(0.0, deadline - time.monotonic())
            )
            record = self._directory.get(worker_id)
        endpoint = record.endpoints.signal if record is not None else None
        if record is None or endpoint is None:
            raise PeerUnavailable(
                f"producer {worker_id} is not registered in etcd (or has no signal endpoint) "
                f"after {self._peer_timeout_s} s; is it running with the same namespace?"
            )
        return record, endpoint

    def _client(self, worker_id: str, endpoint: str) -> SignalClient:
        known = self._clients.get(worker_id)
        if known is not None and known[0] == endpoint:
            return known[1]
        if known is not None:
            known[1].close()  # the producer restarted on another port
        client = SignalClient(
            endpoint,
            identity=self._worker_id,
            compat_hash=self._compat,
            timeout_s=self._peer_timeout_s,
        )
        self._clients[worker_id] = (endpoint, client)
        return client

    def _ask(self, client: SignalClient, spec: PeerRead, deadline: float) -> BlocksReady:
        request = PrefillRequest(
            request_id=spec.remote_request_id,
            token_ids=list(spec.token_ids),
            max_tokens=1,
            decode_worker=self._worker_id,
            sampling={},
            deadline_ms=int((time.time() + self._read_timeout_s) * 1000),
        )
        while True:
            remaining = deadline - time.monotonic()
            try:
                reply = client.request(request, timeout_s=max(remaining, 0.001))
            except PeerUnavailable:  # UNAVAILABLE: the producer has not seen the hold yet
                if time.monotonic() + _RETRY_S >= deadline:
                    raise
                time.sleep(_RETRY_S)
                continue
            if not isinstance(reply, BlocksReady):
                raise TransferError(
                    f"producer answered {type(reply).__name__} to a PrefillRequest for "
                    f"{spec.remote_request_id}"
                )
            return reply

    def _release(self, client: SignalClient, message: TransferDone | Abort) -> None:
        try:
            client.send(message)
        except FabricError as e:  # the hold timeout frees the blocks instead
            logger.warning("could not tell the producer to free %s: %s", message.request_id, e)

    def close(self) -> None:
        for _, client in self._clients.values():
            client.close()
        self._clients.clear()
        self._directory.close()
