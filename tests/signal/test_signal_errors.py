"""Tests for fabric.signal.errors and ``client.error_from_reply``: every ErrorCode maps to a
FabricError a client can raise."""

from __future__ import annotations

import pytest

from fabric.errors import FabricError, PeerUnavailable, TransferTimeout
from fabric.signal.client import error_from_reply
from fabric.signal.errors import ERROR_CODE_TO_EXCEPTION, ErrorCode, RemoteError
from fabric.signal.messages import ErrorReply


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_maps_to_a_fabric_error(code: ErrorCode) -> None:
    error = error_from_reply(ErrorReply("req-9", code, "remote words"), peer="tcp://peer:1")
    assert isinstance(error, ERROR_CODE_TO_EXCEPTION[code])
    assert isinstance(error, FabricError)
    assert str(error) == f"tcp://peer:1 answered {code.name} about request 'req-9': remote words"


def test_error_code_mapping_highlights() -> None:
    assert ERROR_CODE_TO_EXCEPTION[ErrorCode.INTERNAL] is RemoteError
    assert ERROR_CODE_TO_EXCEPTION[ErrorCode.UNAVAILABLE] is PeerUnavailable
    assert ERROR_CODE_TO_EXCEPTION[ErrorCode.DEADLINE_EXCEEDED] is TransferTimeout


def test_error_reply_without_a_request_id_is_named_plainly() -> None:
    error = error_from_reply(ErrorReply(None, ErrorCode.MALFORMED, "bad"), peer="tcp://peer:1")
    assert str(error) == "tcp://peer:1 answered MALFORMED: bad"
