"""Handoff signal messages and their msgpack wire codec (no pickle, ever).

Owns the control messages prefill and decode workers exchange (KV bytes never travel here: NIXL
moves them) and their validation. The ``ErrorCode`` vocabulary and the exceptions a refused message
raises live in ``fabric.signal.errors``. Imports only ``fabric.errors``, ``fabric.signal.errors``,
msgpack and the stdlib.

Invariants:

* A message object is always valid: every field's type and range is checked on construction,
  so ``encode`` never emits what ``decode`` would refuse, and ``decode`` builds messages through
  the same constructors.
* ``decode`` checks, in this order, and stops at the first failure: payload size
  (``MessageTooLarge``), msgpack well-formedness under strict length limits and UTF-8 strings
  (``MalformedMessage``), the envelope's shape and protocol version (``UnsupportedVersion``), the
  message type (``UnknownMessageType``), the compatibility hash (``IncompatiblePeer``, naming both
  hashes), then the body (``MalformedMessage``). It raises nothing else.
* The compatibility hash is checked before the body is looked at. The one exception is
  ``ErrorReply``: it carries no KV data, and a peer must be able to tell an incompatible sender
  why it was refused, so an ``ErrorReply`` is accepted whatever its compatibility hash.

Wire layout, protocol version 3 (version 1 lacked types 7 and 8, version 2 types 9 to 20; types
21 and 22 came later within version 3, see "Layer-wise handoff" below). A contract: changing it
means a new ``PROTOCOL_VERSION``::

    payload = msgpack array [version: uint, type: uint, compat_hash: uint64, body: array]

    body, by type (fields in declaration order, positional):
      1 PrefillRequest [request_id: str, token_ids: [uint32, ...], max_tokens: uint32 >= 1,
                        decode_worker: str, sampling: {str: float | int | str | bool},
                        deadline_ms: int64 >= 0 (wall clock, ms since the Unix epoch)]
      2 BlocksReady    [request_id: str, first_token: uint32, agent_name: str,
                        block_set: bin (opaque; the transfer layer owns and versions it),
                        num_tokens: uint32]
      3 TransferDone   [request_id: str, num_blocks: uint32]
      4 Abort          [request_id: str, reason: str]
      5 ErrorReply     [request_id: str | nil, code: uint (ErrorCode), message: str]
      6 Heartbeat      [worker_id: str, seq: uint64, sent_at_ms: int64 >= 0]
      7 GenerateRequest [request_id: str, token_ids: [uint32, ...], max_tokens: uint32 >= 1,
                        prefill_worker: str ("" = compute the prompt locally),
                        sampling: {str: float | int | str | bool}, deadline_ms: int64 >= 0]
      8 TokenChunk     [request_id: str, token_ids: [uint32, ...], finished: bool,
                        finish_reason: str ("" until finished), stats: {str: float | int | str
                        | bool} (timings and counts, e.g. kv_transfer_ms, cached_tokens)]

    The node KV cache's request/reply protocol (``fabric.node``; a client asks, the service
    answers; hashes are uint64 sequence hashes, slots and positions uint32, ``lease_ms`` the
    lease's remaining time in ms, ``lease_id`` uint64 or nil when nothing is held):
      9 NodeAttach     [client: str]                                        -> NodeGeometry
     10 NodeGeometry   [segment: str, layout_kind: str, num_blocks: uint32 >= 1, num_layers,
                        outer_dim, block_size, inner_dim, alignment: uint32 >= 1, dtype: str,
                        compat_hash: uint64, lease_ms: uint32 >= 1]
     11 NodeReserve    [request_id: str, sequence_hashes: [uint64], parent_hash: uint64 | nil]
                                                                            -> NodeReserved
     12 NodeReserved   [request_id: str, lease_id, positions: [uint32], slot_ids: [uint32],
                        held: [uint32], lease_ms: uint32]
     13 NodeCommit     [request_id: str, lease_id: uint64, sequence_hashes: [uint64]] -> NodeAck
     14 NodeLookup     [request_id: str, sequence_hashes: [uint64]]         -> NodePinned
     15 NodePinned     [request_id: str, lease_id, slot_ids: [uint32], lease_ms: uint32]
     16 NodeRelease    [request_id: str, lease_id: uint64]                  -> NodeAck
     17 NodeRenew      [request_id: str, lease_id: uint64]                  -> NodeAck
     18 NodeAck        [request_id: str, num_blocks: uint32, lease_ms: uint32 (0: lease ended)]
     19 NodeStatsRequest [request_id: str]                                  -> NodeStats
     20 NodeStats      [request_id: str, stats: {str: int}]

    Layer-wise handoff (prefill -> decode; sent only to a decode that asked, see below):
     21 KvStream       [request_id: str, agent_name: str, block_set: bin, num_tokens: uint32,
                        done_tokens: uint32 <= num_tokens]
     22 KvLayers       [request_id: str, done_tokens: uint32, chunk_end: uint32 >= done_tokens,
                        num_layers: uint32]

Layer-wise handoff: a decode worker that can take the prompt's KV while it is computed puts
``LAYERWISE_OPTION: True`` into its ``PrefillRequest``'s ``sampling`` map (keys under the
``fabric.`` prefix are handoff options, not sampling parameters). A prefill worker that
predates it ignores the key (it reads only the sampling keys it knows) and answers as before:
``TokenChunk`` + ``BlocksReady`` once the prompt is computed. One that supports it, and has it
enabled, answers ``KvStream`` (the block set, before computing; positions below
``done_tokens``, a cached prefix, are readable at once), then ``KvLayers`` frontiers as layers
are written (``fabric.pd.KvFrontier``), then ``TokenChunk`` + ``BlocksReady`` as before. Types 21
and 22 thus reach only peers that asked for them, which is why they did not need a new protocol
version (a version-3 peer that predates them refuses them as unknown types, and is never sent
one); any other new type still does.

Strings are msgpack str (UTF-8), ``block_set`` is msgpack bin; ``request_id``, ``decode_worker``,
``agent_name``, ``worker_id`` and sampling keys are non-empty; at most 64 sampling entries. Adding
a message type or an error code is a new protocol version.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar, TypeAlias, TypeVar

import msgpack

from fabric.errors import InvalidInput
from fabric.signal.errors import (
    ErrorCode,
    IncompatiblePeer,
    MalformedMessage,
    MessageTooLarge,
    UnknownMessageType,
    UnsupportedVersion,
)

PROTOCOL_VERSION = 3
LAYERWISE_OPTION = "fabric.kv_layerwise"
"""The ``PrefillRequest.sampling`` key by which a decode asks for a layer-wise handoff."""
DEFAULT_MAX_BYTES = 1 << 20
MAX_SAMPLING_ENTRIES = 64
_U32 = 1 << 32
_U64 = 1 << 64
_I64 = 1 << 63
_ENVELOPE_LEN = 4
_E = TypeVar("_E", bound=Enum)


class MessageType(Enum):
    """The ``type`` slot of the envelope."""

    PREFILL_REQUEST = 1
    BLOCKS_READY = 2
    TRANSFER_DONE = 3
    ABORT = 4
    ERROR_REPLY = 5
    HEARTBEAT = 6
    GENERATE_REQUEST = 7
    TOKEN_CHUNK = 8
    NODE_ATTACH = 9
    NODE_GEOMETRY = 10
    NODE_RESERVE = 11
    NODE_RESERVED = 12
    NODE_COMMIT = 13
    NODE_LOOKUP = 14
    NODE_PINNED = 15
    NODE_RELEASE = 16
    NODE_RENEW = 17
    NODE_ACK = 18
    NODE_STATS_REQUEST = 19
    NODE_STATS = 20
    KV_STREAM = 21
    KV_LAYERS = 22


# Field checks (shared by construction and decoding)
# ---------------------------------------------------------------------------------------------


def _check_str(owner: str, name: str, value: object, *, non_empty: bool = True) -> None:
    if type(value) is not str:
        raise MalformedMessage(f"{owner}.{name} must be a str, got {type(value).__name__}")
    if non_empty and not value:
        raise MalformedMessage(f"{owner}.{name} must not be empty")


def _check_int(owner: str, name: str, value: object, low: int, high: int) -> None:
    """Check ``low <= value < high``; bools are refused (they are ints in Python)."""
    if type(value) is not int:
        raise MalformedMessage(f"{owner}.{name} must be an int, got {type(value).__name__}")
    if not low <= value < high:
        raise MalformedMessage(f"{owner}.{name} must be in [{low}, {high}), got {value}")


def _check_token_ids(owner: str, value: object) -> None:
    if type(value) is not list:
        raise MalformedMessage(f"{owner}.token_ids must be a list, got {type(value).__name__}")
    if not set(map(type, value)) <= {int}:
        raise MalformedMessage(f"{owner}.token_ids must hold only ints")
    if value and not (min(value) >= 0 and max(value) < _U32):
        raise MalformedMessage(f"{owner}.token_ids must be uint32 (0 <= id < 2**32)")


def _check_sampling(owner: str, value: object, name: str = "sampling") -> None:
    """A small flat map of str -> scalar (sampling parameters, stats)."""
    if type(value) is not dict:
        raise MalformedMessage(f"{owner}.{name} must be a dict, got {type(value).__name__}")
    if len(value) > MAX_SAMPLING_ENTRIES:
        raise MalformedMessage(
            f"{owner}.{name} has {len(value)} entries, at most {MAX_SAMPLING_ENTRIES} allowed"
        )
    for key, item in value.items():
        _check_str(owner, f"{name} key", key)
        if type(item) not in (float, int, str, bool):
            raise MalformedMessage(
                f"{owner}.{name}[{key!r}] must be a float, int, str or bool, "
                f"got {type(item).__name__}"
            )
        if type(item) is int and not -_I64 <= item < _U64:
            raise MalformedMessage(f"{owner}.{name}[{key!r}] = {item} does not fit 64 bits")


# Messages
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrefillRequest:
    """Frontend -> prefill worker: compute the KV of ``token_ids`` for ``decode_worker``.

    ``sampling`` holds the sampling parameters (temperature, top_p, seed...), ``deadline_ms`` the
    wall-clock time (ms since the Unix epoch) after which the result is useless.
    """

    TYPE: ClassVar[MessageType] = MessageType.PREFILL_REQUEST
    request_id: str
    token_ids: list[int]
    max_tokens: int
    decode_worker: str
    sampling: dict[str, float | int | str | bool]
    deadline_ms: int

    def __post_init__(self) -> None:
        _check_str("PrefillRequest", "request_id", self.request_id)
        _check_token_ids("PrefillRequest", self.token_ids)
        _check_int("PrefillRequest", "max_tokens", self.max_tokens, 1, _U32)
        _check_str("PrefillRequest", "decode_worker", self.decode_worker)
        _check_sampling("PrefillRequest", self.sampling)
        _check_int("PrefillRequest", "deadline_ms", self.deadline_ms, 0, _I64)

    @property
    def wants_layerwise(self) -> bool:
        """The decode can take the KV layer by layer (``KvStream``, ``KvLayers``)."""
        return self.sampling.get(LAYERWISE_OPTION) is True


@dataclass(frozen=True, slots=True)
class BlocksReady:
    """Prefill -> decode worker: the prefill's KV blocks are registered and readable.

    ``block_set`` is opaque here: the transfer layer writes and versions it (agent metadata,
    layout, block ids or addresses).
    """

    TYPE: ClassVar[MessageType] = MessageType.BLOCKS_READY
    request_id: str
    first_token: int
    agent_name: str
    block_set: bytes
    num_tokens: int

    def __post_init__(self) -> None:
        _check_str("BlocksReady", "request_id", self.request_id)
        _check_int("BlocksReady", "first_token", self.first_token, 0, _U32)
        _check_str("BlocksReady", "agent_name", self.agent_name)
        if type(self.block_set) is not bytes:
            raise MalformedMessage(
                f"BlocksReady.block_set must be bytes, got {type(self.block_set).__name__}"
            )
        _check_int("BlocksReady", "num_tokens", self.num_tokens, 0, _U32)


@dataclass(frozen=True, slots=True)
class TransferDone:
    """Decode -> prefill worker: the blocks were read; the prefill may release its references."""

    TYPE: ClassVar[MessageType] = MessageType.TRANSFER_DONE
    request_id: str
    num_blocks: int

    def __post_init__(self) -> None:
        _check_str("TransferDone", "request_id", self.request_id)
        _check_int("TransferDone", "num_blocks", self.num_blocks, 0, _U32)


@dataclass(frozen=True, slots=True)
class Abort:
    """Either side: stop working on a request and release what it holds."""

    TYPE: ClassVar[MessageType] = MessageType.ABORT
    request_id: str
    reason: str

    def __post_init__(self) -> None:
        _check_str("Abort", "request_id", self.request_id)
        _check_str("Abort", "reason", self.reason, non_empty=False)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A refusal or failure; ``request_id`` is None when the offending message was unreadable."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR_REPLY
    request_id: str | None
    code: ErrorCode
    message: str

    def __post_init__(self) -> None:
        if self.request_id is not None:
            _check_str("ErrorReply", "request_id", self.request_id)
        if type(self.code) is not ErrorCode:
            raise MalformedMessage(f"ErrorReply.code must be an ErrorCode, got {self.code!r}")
        _check_str("ErrorReply", "message", self.message, non_empty=False)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness probe; ``sent_at_ms`` is the sender's wall clock (ms since the Unix epoch)."""

    TYPE: ClassVar[MessageType] = MessageType.HEARTBEAT
    worker_id: str
    seq: int
    sent_at_ms: int

    def __post_init__(self) -> None:
        _check_str("Heartbeat", "worker_id", self.worker_id)
        _check_int("Heartbeat", "seq", self.seq, 0, _U64)
        _check_int("Heartbeat", "sent_at_ms", self.sent_at_ms, 0, _I64)


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """Frontend -> decode (or aggregated) worker: generate up to ``max_tokens`` after the prompt.

    ``prefill_worker`` names the prefill worker whose KV to read; empty means the worker computes
    the prompt itself (aggregated serving, or a fallback). Tokens stream back as ``TokenChunk``s.
    """

    TYPE: ClassVar[MessageType] = MessageType.GENERATE_REQUEST
    request_id: str
    token_ids: list[int]
    max_tokens: int
    prefill_worker: str
    sampling: dict[str, float | int | str | bool]
    deadline_ms: int

    def __post_init__(self) -> None:
        _check_str("GenerateRequest", "request_id", self.request_id)
        _check_token_ids("GenerateRequest", self.token_ids)
        _check_int("GenerateRequest", "max_tokens", self.max_tokens, 1, _U32)
        _check_str("GenerateRequest", "prefill_worker", self.prefill_worker, non_empty=False)
        _check_sampling("GenerateRequest", self.sampling)
        _check_int("GenerateRequest", "deadline_ms", self.deadline_ms, 0, _I64)


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Worker -> frontend: the next generated tokens of a request; the last has ``finished``.

    ``finish_reason`` is empty until the last chunk ("length", "stop", ...); ``stats`` carries
    timings and counts (e.g. ``kv_transfer_ms``, ``cached_tokens``), usually on the first and
    last chunks.
    """

    TYPE: ClassVar[MessageType] = MessageType.TOKEN_CHUNK
    request_id: str
    token_ids: list[int]
    finished: bool
    finish_reason: str
    stats: dict[str, float | int | str | bool]

    def __post_init__(self) -> None:
        _check_str("TokenChunk", "request_id", self.request_id)
        _check_token_ids("TokenChunk", self.token_ids)
        if type(self.finished) is not bool:
            raise MalformedMessage(
                f"TokenChunk.finished must be a bool, got {type(self.finished).__name__}"
            )
        _check_str("TokenChunk", "finish_reason", self.finish_reason, non_empty=False)
        if self.finished != bool(self.finish_reason):
            raise MalformedMessage("TokenChunk.finish_reason is set exactly when finished")
        _check_sampling("TokenChunk", self.stats, "stats")


@dataclass(frozen=True, slots=True)
class KvStream:
    """Prefill -> decode worker that asked for a layer-wise handoff: the blocks that will hold
    the prompt's KV (``block_set``, as in ``BlocksReady``), held for it from now on; positions
    below ``done_tokens`` (a cached prefix) are readable at once, the rest as ``KvLayers`` say."""

    TYPE: ClassVar[MessageType] = MessageType.KV_STREAM
    request_id: str
    agent_name: str
    block_set: bytes
    num_tokens: int
    done_tokens: int

    def __post_init__(self) -> None:
        _check_str("KvStream", "request_id", self.request_id)
        _check_str("KvStream", "agent_name", self.agent_name)
        if type(self.block_set) is not bytes:
            raise MalformedMessage(
                f"KvStream.block_set must be bytes, got {type(self.block_set).__name__}"
            )
        _check_int("KvStream", "num_tokens", self.num_tokens, 0, _U32)
        _check_int("KvStream", "done_tokens", self.done_tokens, 0, self.num_tokens + 1)


@dataclass(frozen=True, slots=True)
class KvLayers:
    """Prefill -> decode: a frontier of the prompt's KV (``fabric.pd.KvFrontier``): every layer
    of positions below ``done_tokens``, and layers ``0 .. num_layers - 1`` of positions
    ``done_tokens .. chunk_end - 1``, are written and final."""

    TYPE: ClassVar[MessageType] = MessageType.KV_LAYERS
    request_id: str
    done_tokens: int
    chunk_end: int
    num_layers: int

    def __post_init__(self) -> None:
        _check_str("KvLayers", "request_id", self.request_id)
        _check_int("KvLayers", "done_tokens", self.done_tokens, 0, _U32)
        _check_int("KvLayers", "chunk_end", self.chunk_end, self.done_tokens, _U32)
        _check_int("KvLayers", "num_layers", self.num_layers, 0, _U32)


# Node KV cache messages (``fabric.node``)
# ---------------------------------------------------------------------------------------------


def _check_ints(owner: str, name: str, value: object, high: int) -> None:
    """A list of ints in ``[0, high)`` (hashes: uint64; slots and positions: uint32)."""
    if type(value) is not list:
        raise MalformedMessage(f"{owner}.{name} must be a list, got {type(value).__name__}")
    if not set(map(type, value)) <= {int}:
        raise MalformedMessage(f"{owner}.{name} must hold only ints")
    if value and not (min(value) >= 0 and max(value) < high):
        raise MalformedMessage(f"{owner}.{name} must hold ints in [0, {high})")


def _check_lease_id(owner: str, value: object) -> None:
    if value is not None:
        _check_int(owner, "lease_id", value, 0, _U64)


@dataclass(frozen=True, slots=True)
class NodeAttach:
    """Client -> node cache: map me in; the reply is the segment's ``NodeGeometry``. A client
    attaching again under the same identity (a restarted process) loses its old leases."""

    TYPE: ClassVar[MessageType] = MessageType.NODE_ATTACH
    client: str

    def __post_init__(self) -> None:
        _check_str("NodeAttach", "client", self.client)


@dataclass(frozen=True, slots=True)
class NodeGeometry:
    """Node cache -> client: the shared-memory segment and the layout of its blocks.

    ``layout_kind`` is a ``LayoutKind`` value; the layout fields are ``LayoutSpec``'s. A client
    whose KV has another geometry or compat hash must not attach.
    """

    TYPE: ClassVar[MessageType] = MessageType.NODE_GEOMETRY
    segment: str
    layout_kind: str
    num_blocks: int
    num_layers: int
    outer_dim: int
    block_size: int
    inner_dim: int
    alignment: int
    dtype: str
    compat_hash: int
    lease_ms: int

    def __post_init__(self) -> None:
        for name in ("segment", "layout_kind", "dtype"):
            _check_str("NodeGeometry", name, getattr(self, name))
        for name in (
            "num_blocks",
            "num_layers",
            "outer_dim",
            "block_size",
            "inner_dim",
            "alignment",
            "lease_ms",
        ):
            _check_int("NodeGeometry", name, getattr(self, name), 1, _U32)
        _check_int("NodeGeometry", "compat_hash", self.compat_hash, 0, _U64)


@dataclass(frozen=True, slots=True)
class NodeReserve:
    """Client -> node cache: slots to write the blocks of ``sequence_hashes`` into.

    ``parent_hash`` is the hash before the first block (None at a sequence start), carried in
    the ``BlockStored`` events the commit publishes.
    """

    TYPE: ClassVar[MessageType] = MessageType.NODE_RESERVE
    request_id: str
    sequence_hashes: list[int]
    parent_hash: int | None

    def __post_init__(self) -> None:
        _check_str("NodeReserve", "request_id", self.request_id)
        _check_ints("NodeReserve", "sequence_hashes", self.sequence_hashes, _U64)
        if self.parent_hash is not None:
            _check_int("NodeReserve", "parent_hash", self.parent_hash, 0, _U64)


@dataclass(frozen=True, slots=True)
class NodeReserved:
    """Node cache -> client: write hash ``positions[i]`` into slot ``slot_ids[i]``, then commit
    before the lease ends. ``held`` lists the positions the node already holds (not reserved);
    positions in neither found no room. ``lease_id`` is None when nothing was reserved."""

    TYPE: ClassVar[MessageType] = MessageType.NODE_RESERVED
    request_id: str
    lease_id: int | None
    positions: list[int]
    slot_ids: list[int]
    held: list[int]
    lease_ms: int

    def __post_init__(self) -> None:
        _check_str("NodeReserved", "request_id", self.request_id)
        _check_lease_id("NodeReserved", self.lease_id)
        for name in ("positions", "slot_ids", "held"):
            _check_ints("NodeReserved", name, getattr(self, name), _U32)
        if len(self.positions) != len(self.slot_ids):
            raise MalformedMessage("NodeReserved.positions and slot_ids must pair up")
        _check_int("NodeReserved", "lease_ms", self.lease_ms, 0, _U32)


@dataclass(frozen=True, slots=True)
class NodeCommit:
    """Client -> node cache: the reserved slots hold their blocks' bytes; register them.

    ``sequence_hashes`` repeats the reservation's (a commit of another request's hashes is
    refused)."""

    TYPE: ClassVar[MessageType] = MessageType.NODE_COMMIT
    request_id: str
    lease_id: int
    sequence_hashes: list[int]

    def __post_init__(self) -> None:
        _check_str("NodeCommit", "request_id", self.request_id)
        _check_int("NodeCommit", "lease_id", self.lease_id, 0, _U64)
        _check_ints("NodeCommit", "sequence_hashes", self.sequence_hashes, _U64)


@dataclass(frozen=True, slots=True)
class NodeLookup:
    """Client -> node cache: pin the longest held prefix of ``sequence_hashes``."""

    TYPE: ClassVar[MessageType] = MessageType.NODE_LOOKUP
    request_id: str
    sequence_hashes: list[int]

    def __post_init__(self) -> None:
        _check_str("NodeLookup", "request_id", self.request_id)
        _check_ints("NodeLookup", "sequence_hashes", self.sequence_hashes, _U64)


@dataclass(frozen=True, slots=True)
class NodePinned:
    """Node cache -> client: the prefix's slots, pinned until released or the lease ends
    (``lease_id`` None: nothing matched)."""

    TYPE: ClassVar[MessageType] = MessageType.NODE_PINNED
    request_id: str
    lease_id: int | None
    slot_ids: list[int]
    lease_ms: int

    def __post_init__(self) -> None:
        _check_str("NodePinned", "request_id", self.request_id)
        _check_lease_id("NodePinned", self.lease_id)
        _check_ints("NodePinned", "slot_ids", self.slot_ids, _U32)
        _check_int("NodePinned", "lease_ms", self.lease_ms, 0, _U32)


@dataclass(frozen=True, slots=True)
class NodeRelease:
    """Client -> node cache: end a lease: abort a reservation or unpin a lookup."""

    TYPE: ClassVar[MessageType] = MessageType.NODE_RELEASE
    request_id: str
    lease_id: int

    def __post_init__(self) -> None:
        _check_str("NodeRelease", "request_id", self.request_id)
        _check_int("NodeRelease", "lease_id", self.lease_id, 0, _U64)


@dataclass(frozen=True, slots=True)
class NodeRenew:
    """Client -> node cache: extend a live lease by the service's lease time."""

    TYPE: ClassVar[MessageType] = MessageType.NODE_RENEW
    request_id: str
    lease_id: int

    def __post_init__(self) -> None:
        _check_str("NodeRenew", "request_id", self.request_id)
        _check_int("NodeRenew", "lease_id", self.lease_id, 0, _U64)


@dataclass(frozen=True, slots=True)
class NodeAck:
    """Node cache -> client: a commit, release or renewal done; ``num_blocks`` it concerned,
    ``lease_ms`` the lease's remaining time (0 once it ended)."""

    TYPE: ClassVar[MessageType] = MessageType.NODE_ACK
    request_id: str
    num_blocks: int
    lease_ms: int

    def __post_init__(self) -> None:
        _check_str("NodeAck", "request_id", self.request_id)
        _check_int("NodeAck", "num_blocks", self.num_blocks, 0, _U32)
        _check_int("NodeAck", "lease_ms", self.lease_ms, 0, _U32)


@dataclass(frozen=True, slots=True)
class NodeStatsRequest:
    """Client -> node cache: the pool's occupancy and the lease counters."""

    TYPE: ClassVar[MessageType] = MessageType.NODE_STATS_REQUEST
    request_id: str

    def __post_init__(self) -> None:
        _check_str("NodeStatsRequest", "request_id", self.request_id)


@dataclass(frozen=True, slots=True)
class NodeStats:
    """Node cache -> client: counters by name (at most ``MAX_SAMPLING_ENTRIES``)."""

    TYPE: ClassVar[MessageType] = MessageType.NODE_STATS
    request_id: str
    stats: dict[str, int]

    def __post_init__(self) -> None:
        _check_str("NodeStats", "request_id", self.request_id)
        _check_sampling("NodeStats", self.stats, "stats")
        if not set(map(type, self.stats.values())) <= {int}:
            raise MalformedMessage("NodeStats.stats must map names to ints")


Message: TypeAlias = (
    PrefillRequest
    | BlocksReady
    | TransferDone
    | Abort
    | ErrorReply
    | Heartbeat
    | GenerateRequest
    | TokenChunk
    | NodeAttach
    | NodeGeometry
    | NodeReserve
    | NodeReserved
    | NodeCommit
    | NodeLookup
    | NodePinned
    | NodeRelease
    | NodeRenew
    | NodeAck
    | NodeStatsRequest
    | NodeStats
    | KvStream
    | KvLayers
)

_MESSAGE_CLASSES = (
    PrefillRequest,
    BlocksReady,
    TransferDone,
    Abort,
    ErrorReply,
    Heartbeat,
    GenerateRequest,
    TokenChunk,
    NodeAttach,
    NodeGeometry,
    NodeReserve,
    NodeReserved,
    NodeCommit,
    NodeLookup,
    NodePinned,
    NodeRelease,
    NodeRenew,
    NodeAck,
    NodeStatsRequest,
    NodeStats,
    KvStream,
    KvLayers,
)
_TYPE_TO_CLASS: dict[MessageType, type[Message]] = {cls.TYPE: cls for cls in _MESSAGE_CLASSES}
_TYPE_TO_FIELDS: dict[MessageType, tuple[str, ...]] = {
    message_type: tuple(field.name for field in fields(cls))
    for message_type, cls in _TYPE_TO_CLASS.items()
}


# Codec
# ---------------------------------------------------------------------------------------------


def encode(message: Message, compat_hash: int) -> bytes:
    """Serialize ``message`` in the protocol envelope. Text that is not valid Unicode (a lone
    surrogate, e.g. from a file name decoded with ``surrogateescape``) goes out with ``?`` in
    its place, so an error message can always be sent.

    Raises:
        InvalidInput: ``compat_hash`` is not a uint64, or ``message`` is not a signal message.
    """
    if type(compat_hash) is not int or not 0 <= compat_hash < _U64:
        raise InvalidInput(f"compat_hash must be a uint64, got {compat_hash!r}")
    if type(message) not in _MESSAGE_CLASSES:
        raise InvalidInput(f"not a signal message: {type(message).__name__}")
    message_type = message.TYPE
    body = [getattr(message, name) for name in _TYPE_TO_FIELDS[message_type]]
    if message_type is MessageType.ERROR_REPLY:
        body[1] = body[1].value
    packed: bytes = msgpack.packb(
        [PROTOCOL_VERSION, message_type.value, compat_hash, body],
        use_bin_type=True,
        unicode_errors="replace",
    )
    return packed


def decode(payload: bytes, *, expected_compat: int | None, max_bytes: int) -> Message:
    """Parse and validate one payload (checks in the order the module docstring gives).

    Args:
        expected_compat: the receiver's compatibility hash; None skips the check.
        max_bytes: the largest payload accepted.

    Raises:
        MalformedMessage: (an ``InvalidInput``) too large, not msgpack, bad envelope or body.
        ProtocolMismatch: another version (``UnsupportedVersion``), an unknown message type
            (``UnknownMessageType``) or another compatibility hash (``IncompatiblePeer``).
        All of them are ``SignalError``s, whose ``code`` is the ``ErrorCode`` to answer with.
    """
    if len(payload) > max_bytes:
        raise MessageTooLarge(f"message of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        envelope = msgpack.unpackb(
            payload,
            raw=False,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=MAX_SAMPLING_ENTRIES,
            max_ext_len=0,
        )
    except ValueError as exc:  # every msgpack parse error, and invalid UTF-8, is a ValueError
        raise MalformedMessage(f"message is not well-formed msgpack: {exc}") from exc
    if type(envelope) is not list or not envelope:
        got = "an empty array" if type(envelope) is list else type(envelope).__name__
        raise MalformedMessage(
            f"message must be a msgpack array [version, type, compat_hash, body], got {got}"
        )
    version = envelope[0]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"message has protocol version {version!r}, this peer speaks {PROTOCOL_VERSION}"
        )
    if len(envelope) != _ENVELOPE_LEN:
        raise MalformedMessage(
            f"version-{PROTOCOL_VERSION} envelope has {_ENVELOPE_LEN} items, got {len(envelope)}"
        )
    _, raw_type, compat_hash, body = envelope
    message_type = _enum_member(MessageType, raw_type)
    if message_type is None:
        raise UnknownMessageType(
            f"unknown message type {raw_type!r} (protocol version {PROTOCOL_VERSION} knows "
            f"{', '.join(f'{t.value}={t.name}' for t in MessageType)})"
        )
    _check_int("envelope", "compat_hash", compat_hash, 0, _U64)
    if (
        expected_compat is not None
        and compat_hash != expected_compat
        and message_type is not MessageType.ERROR_REPLY
    ):
        raise IncompatiblePeer(
            f"{message_type.name} has KV compatibility hash {compat_hash:#018x}, the receiver "
            f"expects {expected_compat:#018x}: model, dtype, layout or block size differ"
        )
    return _decode_body(message_type, body)


def _decode_body(message_type: MessageType, body: Any) -> Message:
    names = _TYPE_TO_FIELDS[message_type]
    if type(body) is not list or len(body) != len(names):
        got = f"{len(body)} fields" if type(body) is list else type(body).__name__
        raise MalformedMessage(
            f"{message_type.name} body must be an array of {len(names)} fields "
            f"({', '.join(names)}), got {got}"
        )
    if message_type is MessageType.ERROR_REPLY:
        code = _enum_member(ErrorCode, body[1])
        if code is None:
            raise MalformedMessage(f"ErrorReply.code {body[1]!r} is not a known ErrorCode")
        body[1] = code
    return _TYPE_TO_CLASS[message_type](*body)


def _enum_member(enum: type[_E], value: object) -> _E | None:
    """The member of ``enum`` whose value is the int ``value``, else None."""
    if type(value) is not int:
        return None
    try:
        return enum(value)
    except ValueError:
        return None
