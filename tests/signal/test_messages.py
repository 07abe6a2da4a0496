"""Tests for fabric.signal.messages: round trips, the pinned wire layout, every refusal, fuzzing."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fabric.errors import InvalidInput
from fabric.signal.errors import (
    ErrorCode,
    IncompatiblePeer,
    MalformedMessage,
    MessageTooLarge,
    SignalError,
    UnknownMessageType,
    UnsupportedVersion,
)
from fabric.signal.messages import (
    DEFAULT_MAX_BYTES,
    LAYERWISE_OPTION,
    MAX_SAMPLING_ENTRIES,
    PROTOCOL_VERSION,
    Abort,
    BlocksReady,
    ErrorReply,
    GenerateRequest,
    Heartbeat,
    KvLayers,
    KvStream,
    Message,
    MessageType,
    PrefillRequest,
    TokenChunk,
    TransferDone,
    decode,
    encode,
)

COMPAT = 0x0123_4567_89AB_CDEF
U32 = 2**32 - 1
U64 = 2**64 - 1
I64 = 2**63 - 1


def _decode(payload: bytes, *, compat: int | None = COMPAT, max_bytes: int = DEFAULT_MAX_BYTES):
    return decode(payload, expected_compat=compat, max_bytes=max_bytes)


def _raw(*envelope: Any) -> bytes:
    return msgpack.packb(list(envelope), use_bin_type=True)


# Strategies
# ---------------------------------------------------------------------------------------------

ids = st.text(min_size=1, max_size=40)
u32 = st.integers(0, U32)
sampling_values = st.one_of(
    st.floats(allow_nan=False), st.integers(-(2**63), U64), st.text(max_size=20), st.booleans()
)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        PrefillRequest,
        request_id=ids,
        token_ids=st.lists(u32, max_size=300),
        max_tokens=st.integers(1, U32),
        decode_worker=ids,
        sampling=st.dictionaries(ids, sampling_values, max_size=MAX_SAMPLING_ENTRIES),
        deadline_ms=st.integers(0, I64),
    ),
    st.builds(
        BlocksReady,
        request_id=ids,
        first_token=u32,
        agent_name=ids,
        block_set=st.binary(max_size=200),
        num_tokens=u32,
    ),
    st.builds(
        KvStream,
        request_id=ids,
        agent_name=ids,
        block_set=st.binary(max_size=200),
        num_tokens=st.just(U32 - 1),
        done_tokens=u32.filter(lambda n: n < U32),
    ),
    st.builds(KvLayers, request_id=ids, done_tokens=st.just(0), chunk_end=u32, num_layers=u32),
    st.builds(TransferDone, request_id=ids, num_blocks=u32),
    st.builds(Abort, request_id=ids, reason=st.text(max_size=40)),
    st.builds(
        ErrorReply, request_id=st.none() | ids, code=st.sampled_from(ErrorCode), message=st.text()
    ),
    st.builds(Heartbeat, worker_id=ids, seq=st.integers(0, U64), sent_at_ms=st.integers(0, I64)),
    st.builds(
        GenerateRequest,
        request_id=ids,
        token_ids=st.lists(u32, max_size=300),
        max_tokens=st.integers(1, U32),
        prefill_worker=st.text(max_size=40),
        sampling=st.dictionaries(ids, sampling_values, max_size=MAX_SAMPLING_ENTRIES),
        deadline_ms=st.integers(0, I64),
    ),
    st.one_of(
        st.builds(
            TokenChunk,
            request_id=ids,
            token_ids=st.lists(u32, max_size=50),
            finished=st.just(False),
            finish_reason=st.just(""),
            stats=st.dictionaries(ids, sampling_values, max_size=8),
        ),
        st.builds(
            TokenChunk,
            request_id=ids,
            token_ids=st.lists(u32, max_size=50),
            finished=st.just(True),
            finish_reason=ids,
            stats=st.dictionaries(ids, sampling_values, max_size=8),
        ),
    ),
)
# Any msgpack-representable value: the raw material of well-formed but wrong structures.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


def _assert_only_signal_errors(payload: bytes) -> None:
    try:
        _decode(payload, max_bytes=4096)
    except SignalError as exc:  # anything else escapes and fails the test
        assert str(exc)


# Round trips and the pinned layout
# ---------------------------------------------------------------------------------------------


@given(message=messages, compat=st.integers(0, U64))
def test_every_message_round_trips(message: Message, compat: int) -> None:
    assert _decode(encode(message, compat), compat=compat) == message


def test_golden_bytes_pin_the_wire_layout() -> None:
    message = PrefillRequest(
        request_id="r1",
        token_ids=[1, 2, 3],
        max_tokens=16,
        decode_worker="decode-0",
        sampling={"temperature": 0.5, "top_k": 4, "greedy": False},
        deadline_ms=1_700_000_000_000,
    )
    golden = bytes.fromhex(
        "94"  # array of 4: the envelope
        "03"  # protocol version 3
        "01"  # type 1 = PREFILL_REQUEST
        "cf0123456789abcdef"  # compat hash as uint64
        "96"  # body: array of 6 fields
        "a27231"  # "r1"
        "93010203"  # [1, 2, 3]
        "10"  # 16
        "a86465636f64652d30"  # "decode-0"
        "83ab74656d7065726174757265cb3fe0000000000000"  # {"temperature": 0.5,
        "a5746f705f6b04"  # "top_k": 4,
        "a6677265656479c2"  # "greedy": false}
        "cf0000018bcfe56800"  # 1_700_000_000_000
    )
    assert encode(message, COMPAT) == golden
    assert _decode(golden) == message


def test_text_that_is_not_valid_unicode_goes_out_replaced() -> None:
    """A lone surrogate (a file name decoded with surrogateescape) must not make an error
    unsendable; the receiver gets valid UTF-8 with ``?`` in its place."""
    reply = ErrorReply("r-\udc80", ErrorCode.INTERNAL, "cannot open /tmp/caf\udce9")
    assert _decode(encode(reply, COMPAT)) == ErrorReply(
        "r-?", ErrorCode.INTERNAL, "cannot open /tmp/caf?"
    )


def test_error_reply_code_is_its_int_value() -> None:
    payload = encode(ErrorReply(None, ErrorCode.INCOMPATIBLE, "no"), 1)
    assert msgpack.unpackb(payload) == [
        PROTOCOL_VERSION,
        MessageType.ERROR_REPLY.value,
        1,
        [None, 5, "no"],
    ]


# Refusals
# ---------------------------------------------------------------------------------------------


def test_size_is_checked_before_parsing() -> None:
    with pytest.raises(MessageTooLarge, match="101 bytes exceeds the 100-byte limit"):
        _decode(b"\xc1" * 101, max_bytes=100)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "not well-formed msgpack"),
        (b"\xc1", "not well-formed msgpack"),
        (b"\x94\x01", "not well-formed msgpack"),
        (b"\xa2\xff\xfe", "not well-formed msgpack"),  # invalid UTF-8 in a str
        (
            _raw(PROTOCOL_VERSION, 3, COMPAT, ["r", 1]) + b"\x00",
            "not well-formed msgpack",
        ),  # trailing bytes
        (msgpack.packb({"version": 1}), "must be a msgpack array"),
        (_raw(), "got an empty array"),
        (_raw(PROTOCOL_VERSION, 3, COMPAT), "envelope has 4 items, got 3"),
        (_raw(PROTOCOL_VERSION, 3, -1, ["r", 1]), "compat_hash must be in"),
        (
            _raw(PROTOCOL_VERSION, 3, COMPAT, {"request_id": "r"}),
            "TRANSFER_DONE body must be an array of 2 fields",
        ),
        (_raw(PROTOCOL_VERSION, 3, COMPAT, ["r"]), "got 1 fields"),
        (_raw(PROTOCOL_VERSION, 3, COMPAT, ["r", "1"]), "num_blocks must be an int, got str"),
        (_raw(PROTOCOL_VERSION, 3, COMPAT, ["r", True]), "num_blocks must be an int, got bool"),
        (_raw(PROTOCOL_VERSION, 3, COMPAT, ["r", -1]), "num_blocks must be in"),
        (_raw(PROTOCOL_VERSION, 3, COMPAT, ["", 1]), "request_id must not be empty"),
        (_raw(PROTOCOL_VERSION, 1, COMPAT, ["r", [1, 2**32], 1, "d", {}, 0]), "uint32"),
        (_raw(PROTOCOL_VERSION, 1, COMPAT, ["r", [1, 2.0], 1, "d", {}, 0]), "only ints"),
        (_raw(PROTOCOL_VERSION, 1, COMPAT, ["r", [], 0, "d", {}, 0]), "max_tokens must be in"),
        (
            _raw(PROTOCOL_VERSION, 1, COMPAT, ["r", [], 1, "d", {"t": [1]}, 0]),
            r"sampling\['t'\] must be",
        ),
        (
            _raw(PROTOCOL_VERSION, 1, COMPAT, ["r", [], 1, "d", {"t": 1}, -5]),
            "deadline_ms must be in",
        ),
        (
            _raw(PROTOCOL_VERSION, 2, COMPAT, ["r", 0, "agent", "not-bin", 1]),
            "block_set must be bytes, got str",
        ),
        (
            _raw(PROTOCOL_VERSION, 5, COMPAT, [None, 99, "x"]),
            "ErrorReply.code 99 is not a known ErrorCode",
        ),
        (
            _raw(PROTOCOL_VERSION, 6, COMPAT, ["w", 2**64 - 1, None]),
            "sent_at_ms must be an int, got NoneType",
        ),
    ],
)
def test_malformed_content_is_refused_with_a_reason(payload: bytes, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match) as info:
        _decode(payload)
    assert info.value.code is ErrorCode.MALFORMED


def test_too_many_sampling_entries_is_refused() -> None:
    sampling = {f"k{i}": i for i in range(MAX_SAMPLING_ENTRIES + 1)}
    with pytest.raises(MalformedMessage, match="not well-formed msgpack"):
        _decode(_raw(PROTOCOL_VERSION, 1, COMPAT, ["r", [], 1, "d", sampling, 0]))
    with pytest.raises(MalformedMessage, match=f"at most {MAX_SAMPLING_ENTRIES}"):
        PrefillRequest("r", [], 1, "d", sampling, 0)


@pytest.mark.parametrize("version", [0, 1, 2, 4, True, "3", None])
def test_another_version_is_a_protocol_mismatch(version: object) -> None:
    with pytest.raises(
        UnsupportedVersion, match=f"protocol version {version!r}, this peer speaks 3"
    ):
        _decode(_raw(version, 3, COMPAT, ["r", 1]))


def test_version_is_checked_before_the_envelope_shape() -> None:
    with pytest.raises(UnsupportedVersion):
        _decode(_raw(4, "a future envelope"))


@pytest.mark.parametrize("raw_type", [0, 23, 255, "TRANSFER_DONE", None])
def test_unknown_type_is_a_protocol_mismatch(raw_type: object) -> None:
    with pytest.raises(UnknownMessageType, match="unknown message type"):
        _decode(_raw(PROTOCOL_VERSION, raw_type, COMPAT, []))


def test_compat_mismatch_names_both_hashes_and_is_checked_before_the_body() -> None:
    payload = _raw(PROTOCOL_VERSION, 3, 0xBAD, "a body that would be malformed")
    with pytest.raises(IncompatiblePeer, match=r"0x0000000000000bad.*0x0123456789abcdef"):
        _decode(payload)
    assert _decode(encode(TransferDone("r", 1), 0xBAD), compat=None) == TransferDone("r", 1)


def test_error_reply_is_accepted_from_an_incompatible_peer() -> None:
    reply = ErrorReply(None, ErrorCode.INCOMPATIBLE, "your hash differs")
    assert _decode(encode(reply, 0xBAD)) == reply


# Construction and encoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: TransferDone("r", -1),
        lambda: TransferDone(b"r", 1),  # type: ignore[arg-type]
        lambda: Abort("r", None),  # type: ignore[arg-type]
        lambda: PrefillRequest("r", (1, 2), 1, "d", {}, 0),  # type: ignore[arg-type]
        lambda: PrefillRequest("r", [], 1, "d", {"big": 2**64}, 0),
        lambda: BlocksReady("r", 0, "a", bytearray(b"x"), 0),  # type: ignore[arg-type]
        lambda: ErrorReply("r", 5, "x"),  # type: ignore[arg-type]
        lambda: Heartbeat("w", 2**64, 0),
        lambda: GenerateRequest("r", [1], 0, "", {}, 0),
        lambda: TokenChunk("r", [1], True, "", {}),  # finished needs a reason
        lambda: TokenChunk("r", [1], False, "length", {}),  # a reason needs finished
        lambda: TokenChunk("r", [1], 1, "length", {}),  # type: ignore[arg-type]
        lambda: TokenChunk("r", [1], False, "", {"ms": [1]}),  # type: ignore[dict-item]
    ],
)
def test_invalid_messages_cannot_be_built(build: Any) -> None:
    with pytest.raises(MalformedMessage):
        build()


@pytest.mark.parametrize("compat", [-1, 2**64, 1.0, True])
def test_encode_refuses_a_bad_compat_hash(compat: Any) -> None:
    with pytest.raises(InvalidInput, match="compat_hash must be a uint64"):
        encode(TransferDone("r", 1), compat)


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(InvalidInput, match="not a signal message: dict"):
        encode({"request_id": "r"}, 1)  # type: ignore[arg-type]


# Fuzzing: nothing but SignalErrors (or a valid message) ever comes out of decode
# ---------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(payload=st.binary(max_size=5000))
@example(payload=b"\xdd\xff\xff\xff\xff")  # array header claiming 4 G items
@example(payload=b"\x91" * 5000)  # nesting deeper than msgpack's stack
@example(payload=b"\xd4\x01\x01")  # ext type
def test_random_bytes_raise_only_signal_errors(payload: bytes) -> None:
    _assert_only_signal_errors(payload)


@FUZZ
@given(
    version=st.sampled_from([PROTOCOL_VERSION]) | msgpack_values,
    raw_type=st.sampled_from([t.value for t in MessageType]) | msgpack_values,
    compat=st.sampled_from([COMPAT]) | msgpack_values,
    body=msgpack_values | st.lists(msgpack_values, min_size=2, max_size=6),
    extra=st.lists(msgpack_values, max_size=2),
)
def test_wrong_structures_raise_only_signal_errors(
    version: Any, raw_type: Any, compat: Any, body: Any, extra: list[Any]
) -> None:
    _assert_only_signal_errors(_raw(version, raw_type, compat, body, *extra))


@FUZZ
@given(message=messages, data=st.data())
def test_corrupted_valid_payloads_raise_only_signal_errors(message: Message, data: Any) -> None:
    payload = bytearray(encode(message, COMPAT))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    _assert_only_signal_errors(bytes(payload))


@FUZZ
@given(message=messages, data=st.data())
def test_valid_envelopes_with_one_wrong_field_raise_only_signal_errors(
    message: Message, data: Any
) -> None:
    version, raw_type, compat, body = msgpack.unpackb(encode(message, COMPAT))
    body[data.draw(st.integers(0, len(body) - 1))] = data.draw(msgpack_values)
    _assert_only_signal_errors(_raw(version, raw_type, compat, body))


def test_layerwise_option_travels_in_a_version_3_prefill_request() -> None:
    """A decode asking for a layer-wise handoff sends the same six-field PrefillRequest a peer
    that predates it decodes (the option is a sampling entry it ignores)."""
    request = PrefillRequest("r", [1, 2], 4, "decode-1", {LAYERWISE_OPTION: True}, 0)
    version, raw_type, _, body = msgpack.unpackb(encode(request, COMPAT))
    assert (version, raw_type, len(body)) == (3, MessageType.PREFILL_REQUEST.value, 6)
    decoded = _decode(encode(request, COMPAT))
    assert isinstance(decoded, PrefillRequest) and decoded.wants_layerwise
    assert not PrefillRequest("r", [1], 4, "d", {LAYERWISE_OPTION: 1}, 0).wants_layerwise
    assert not PrefillRequest("r", [1], 4, "d", {}, 0).wants_layerwise


@pytest.mark.parametrize(
    "build",
    [
        lambda: KvStream("r", "a", b"x", 10, 11),  # done past the prompt
        lambda: KvLayers("r", 8, 7, 1),  # chunk ends before what is done
        lambda: KvLayers("r", 0, 4, -1),
    ],
)
def test_invalid_layerwise_messages_cannot_be_built(build: Any) -> None:
    with pytest.raises(MalformedMessage):
        build()
