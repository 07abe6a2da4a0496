"""The producer (prefill) instance's side of a P/D transfer: holds and the signal endpoint.

After a prefill finishes, vLLM keeps its blocks (``request_finished`` returned delay-free) until
the worker reports the request in ``finished_sending``. The hold table (``fabric.pd.HoldTable``
of ``PeerHold``, shared with the reference engine) decides when: a hold is lent to a consumer
that presents the same prompt (token count and digest), released by its ``TransferDone`` /
``Abort`` and collected by the worker, or expired at its deadline. A lent hold's deadline is
pushed out by the consumer's read bound, so blocks are never freed under a read that is still
allowed to run.

``ProducerEndpoint``: a ``SignalServer`` on an ephemeral port answering ``PrefillRequest`` with
``BlocksReady`` (the held blocks, offered by a ``fabric.pd.BlockExporter`` of vLLM's pages, or
of the host tier for a hold copied there: ``PeerHold.host_ids``) and taking
``TransferDone`` / ``Abort``. Its endpoint goes into the instance's etcd record
(``discovery.instance_record``, registered by the worker).

Threads: the signal handler runs on the server thread and only touches the (thread-safe) hold
table and the exporter's immutable template (built once, with the agent metadata read at
start), never the NIXL agent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from fabric.integrations.vllm.metadata import PeerHold, token_digest
from fabric.kvbm import Storage, Tier
from fabric.pd import BlockExporter, HoldTable, Refusal
from fabric.signal.errors import ErrorCode
from fabric.signal.framing import PeerId
from fabric.signal.messages import (
    Abort,
    ErrorReply,
    Message,
    PrefillRequest,
    TransferDone,
)
from fabric.signal.server import SignalServer
from fabric.transfer.agent import TransferAgent

logger = logging.getLogger(__name__)


def hold_table(*, read_timeout_s: float) -> HoldTable[PeerHold]:
    """The producer's hold table: a lent hold outlives its deadline by the consumer's read bound
    (plus a second for the messages)."""
    return HoldTable(lend_grace_s=read_timeout_s + 1.0)


def prompt_check(token_ids: list[int]) -> Callable[[PeerHold], str | None]:
    """Lend a hold only to a consumer presenting its prompt."""

    def check(hold: PeerHold) -> str | None:
        if len(token_ids) != hold.num_tokens or token_digest(token_ids) != hold.token_digest:
            return f"holds another prompt ({hold.num_tokens} tokens)"
        return None

    return check


class ProducerEndpoint:
    """Serves this instance's held prefills to consumers (module docstring)."""

    def __init__(
        self,
        *,
        worker_id: str,
        compat_hash: int,
        agent: TransferAgent,
        storages: Mapping[Tier, Storage],
        holds: HoldTable[PeerHold],
        signal_host: str,
    ) -> None:
        """``storages``: vLLM's pages (``Tier.DEVICE``) and, for holds kept in the host tier,
        the host storage (``Tier.HOST``), each already registered with ``agent``."""
        self._holds = holds
        self._exporters = {
            tier: BlockExporter(storage, agent, compat_hash=compat_hash)
            for tier, storage in storages.items()
        }
        self._server = SignalServer(
            f"tcp://{signal_host}:0", self._handle, compat_hash=compat_hash, name=worker_id
        )
        logger.info(
            "P/D producer %s: signals on %s, NIXL agent %s",
            worker_id,
            self._server.endpoint,
            agent.name,
        )

    @property
    def endpoint(self) -> str:
        return self._server.endpoint

    def _handle(self, message: Message, peer: PeerId) -> Message | None:
        if isinstance(message, PrefillRequest):
            lent = self._holds.lend(
                message.request_id, time.monotonic(), prompt_check(message.token_ids)
            )
            if isinstance(lent, Refusal):
                return ErrorReply(message.request_id, lent.code, lent.message)
            logger.debug(
                "lending %d blocks of %s to %s", len(lent.served_ids), message.request_id, peer
            )
            exporter = self._exporters[Tier.HOST if lent.host_ids else Tier.DEVICE]
            return exporter.ready(
                lent.request_id, lent.served_ids, first_token=0, num_tokens=lent.num_tokens
            )
        if isinstance(message, TransferDone | Abort):
            if not self._holds.release(message.request_id):
                logger.debug("%s released %s, which is not held", peer, message.request_id)
            return None
        return ErrorReply(None, ErrorCode.UNKNOWN_TYPE, f"{type(message).__name__} not served here")

    def close(self) -> None:
        """Stop serving (leave etcd first: the worker closes the registration before this)."""
        self._server.close()
