"""The consumer (decode) instance's side of a P/D transfer: find, ask, read, release.

``PeerReader.read(spec)`` runs on the worker's engine thread, every wait bounded:

1. find the producer in etcd (``fabric.pd.ProducerLinks``: a ``WorkerDirectory``, waited on up
   to ``peer_timeout_s``) and check its role and compat hash;
2. ``PrefillRequest`` (the prompt, so the producer can check it holds that prompt's KV) over a
   ``SignalClient`` to the producer's signal endpoint; ``UNAVAILABLE`` (the producer has not
   seen the hold yet) is retried until ``peer_timeout_s``; the answer is ``BlocksReady`` with a
   ``RemoteBlockSet``;
3. NIXL READ of the needed slice of those blocks into the blocks vLLM allocated
   (``fabric.pd.RemoteReader``: compat hash and geometry checked first, pair-coalesced regions,
   the producer's metadata loaded once, waited for up to ``read_timeout_s``);
4. ``TransferDone`` (success) or ``Abort`` (failure) one-way, so the producer frees its blocks at
   once instead of at its hold timeout.

Any failure raises a ``FabricError``; the worker turns it into load errors (vLLM recomputes).
"""

from __future__ import annotations

import logging
import time

from fabric.discovery.registration import WorkerDirectory
from fabric.discovery.registry import Registry
from fabric.errors import FabricError, PeerUnavailable, TransferError
from fabric.integrations.vllm.discovery import rank_worker_id
from fabric.integrations.vllm.metadata import PeerRead
from fabric.kvbm import Storage
from fabric.pd import ProducerLinks, RemoteReader
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
        rank: int = 0,
    ) -> None:
        """``rank``: this worker's tensor-parallel rank; it reads the producer's same rank."""
        self._worker_id = worker_id
        self._rank = rank
        self._peer_timeout_s = peer_timeout_s
        self._read_timeout_s = read_timeout_s
        self._reader = RemoteReader(
            agent, storage, compat_hash=compat_hash, timeout_s=read_timeout_s
        )
        self._directory = WorkerDirectory(registry, namespace=namespace).start()
        self._links = ProducerLinks(
            self._directory,
            identity=worker_id,
            compat_hash=compat_hash,
            request_timeout_s=peer_timeout_s,
        )

    def read(self, spec: PeerRead) -> int:
        """Read ``spec``'s blocks (or only release them when it names none); blocks read.

        Raises:
            PeerUnavailable / TransferError / ProtocolMismatch / FabricError: the read did not
                happen; the producer was told to free its blocks where it could be reached.
        """
        deadline = time.monotonic() + self._peer_timeout_s
        producer = rank_worker_id(spec.remote_worker_id, self._rank)
        self._links.wait_for(producer, self._peer_timeout_s)
        client = self._links.link(producer)
        if not spec.block_ids:
            self._links.send(producer, TransferDone(spec.remote_request_id, 0))
            return 0
        try:
            ready = self._ask(client, spec, deadline)
            remote = self._reader.block_set(ready)
            end = spec.first_block + len(spec.block_ids)
            if len(remote.block_ids) < end:
                raise TransferError(
                    f"producer {producer} holds {len(remote.block_ids)} blocks of "
                    f"{spec.remote_request_id}; {end} are needed"
                )
            self._reader.read(remote, spec.block_ids, start=spec.first_block)
        except FabricError as e:
            self._links.send(producer, Abort(spec.remote_request_id, f"read failed: {e}"))
            raise
        self._links.send(producer, TransferDone(spec.remote_request_id, len(spec.block_ids)))
        return len(spec.block_ids)

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

    def close(self) -> None:
        self._links.close()
        self._directory.close()
