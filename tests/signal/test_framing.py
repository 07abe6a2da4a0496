"""Tests for fabric.signal.framing: correlation frames and identity mapping (no sockets)."""

from __future__ import annotations

import pytest

from fabric.errors import InvalidInput
from fabric.signal.framing import (
    MAX_IDENTITY_BYTES,
    ONE_WAY,
    client_identity_bytes,
    corr_frame,
    identity_bytes,
    peer_id,
)


def test_corr_frame_is_8_bytes_big_endian_and_zero_is_one_way() -> None:
    assert corr_frame(1) == b"\0" * 7 + b"\1"
    assert corr_frame(2**64 - 1) == b"\xff" * 8
    assert ONE_WAY == corr_frame(0) == bytes(8)


@pytest.mark.parametrize("raw", [b"decode-0", "d\u00e9code".encode(), b"\xff\xfe-not-utf8"])
def test_peer_id_and_identity_bytes_round_trip_any_bytes(raw: bytes) -> None:
    assert identity_bytes(peer_id(raw)) == raw


def test_identity_bytes_refuses_a_surrogate_that_stands_for_no_byte() -> None:
    with pytest.raises(InvalidInput, match=r"'x\\ud800' cannot be encoded as UTF-8"):
        identity_bytes("x\ud800")


@pytest.mark.parametrize("identity", ["\ud800", "\udc80", "ok-\udfff"])
def test_client_identity_must_be_strict_utf8(identity: str) -> None:
    with pytest.raises(InvalidInput, match="cannot be encoded as UTF-8"):
        client_identity_bytes(identity)


def test_client_identity_limits() -> None:
    assert client_identity_bytes("d\u00e9code-0") == "d\u00e9code-0".encode()
    assert len(client_identity_bytes("x" * MAX_IDENTITY_BYTES)) == MAX_IDENTITY_BYTES
    for bad in ("", "\0x", "x" * (MAX_IDENTITY_BYTES + 1)):
        with pytest.raises(InvalidInput, match=r"must be 1\.\.255 bytes"):
            client_identity_bytes(bad)
