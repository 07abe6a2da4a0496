"""Size limits of one request: its body (bytes, JSON values) and its prompt (tokens).

Owns ``BodyLimit`` (ASGI middleware in front of the whole app) and ``PromptLimit``. Each check
runs before the work it bounds, cheapest first, and answers 413 (OpenAI error JSON naming the
limit and its flag):

1. a ``Content-Length`` over ``max_bytes``: refused at once, nothing read;
2. the body read in the server's chunks (also without ``Content-Length``): refused as soon as it
   passes ``max_bytes``; the rest is never read and the connection is closed;
3. more than ``max_values`` JSON values (brackets and commas outside strings, counted on the raw
   bytes in a few ms per MiB): refused before the JSON is parsed. Parsing and validating run on
   the event loop and hold the GIL (a thread would not help), and their cost grows with the
   number of values, not bytes: 4 MiB of ``[[1],[1],...]`` held the loop for seconds;
4. a text prompt of more than ``max_tokens * max_token_chars`` characters: refused without
   tokenizing, since no token covers more characters than its vocabulary entry has
   (``max_token_chars``: the longest entry; true of byte-level BPE, SentencePiece and
   WordPiece, whose normalizers delete no characters);
5. a prompt of more than ``max_tokens`` tokens (text tokenized off the loop, or the ids given).

Starlette and FastAPI have a body limit of their own only from recent versions (not the vLLM
environment's), and it answers in plain text; hence this middleware.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fabric.frontend.errors import ApiError, body_too_large, prompt_too_large

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
VALUES_PER_PROMPT_TOKEN = 4
"""JSON values a request may hold per prompt token (ids: one each; a chat message: three)."""
VALUES_OVERHEAD = 1024


def max_json_values(max_prompt_tokens: int) -> int:
    """The JSON value limit a prompt limit implies (``BodyLimit``'s ``max_values``)."""
    return VALUES_PER_PROMPT_TOKEN * max_prompt_tokens + VALUES_OVERHEAD


def count_json_values(body: bytes) -> int:
    """Brackets and commas outside JSON strings: at least the number of values minus one."""
    bare = _JSON_STRING.sub(b"", body)
    return bare.count(b"[") + bare.count(b"{") + bare.count(b",")


RefusalHook = Callable[[str, ApiError], None]
"""Called with the request's path and the 413 before it is sent (metrics)."""


class BodyLimit:
    """ASGI middleware refusing bodies over ``max_bytes`` or ``max_values`` (module docstring).

    It reads the whole body itself (FastAPI would buffer it anyway) and hands it to the app in
    one message; later ``receive`` calls (disconnect detection) reach the server.
    """

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, max_values: int, on_refused: RefusalHook
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_values = max_values
        self._on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await self._read(scope, receive)
        if body is None:
            return  # the client left while sending
        if isinstance(body, ApiError):
            self._on_refused(scope["path"], body)
            headers = {"Connection": "close", **body.headers()}
            response = JSONResponse(body.body(), status_code=body.status, headers=headers)
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes | ApiError | None:
        """The body, the 413 refusing it, or None when the client disconnected."""
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return body_too_large(
                f"the request body has {int(declared)} bytes (Content-Length); this frontend "
                f"accepts at most {self.max_bytes} (--max-body-bytes)"
            )
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return body_too_large(
                    f"the request body has more than {self.max_bytes} bytes, the most this "
                    "frontend accepts (--max-body-bytes)"
                )
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        num_values = count_json_values(body)
        if num_values > self.max_values:
            return body_too_large(
                f"the request body holds more than {self.max_values} JSON values "
                f"({num_values} brackets and commas), more than a prompt within this frontend's "
                f"limit needs ({VALUES_PER_PROMPT_TOKEN} per token of --max-prompt-tokens, "
                f"plus {VALUES_OVERHEAD})"
            )
        return body


@dataclass(frozen=True, slots=True)
class PromptLimit:
    """At most ``max_tokens`` prompt tokens; ``max_token_chars`` is the tokenizer's longest
    vocabulary entry (module docstring, steps 4 and 5)."""

    max_tokens: int
    max_token_chars: int

    def check_text(self, text: str, param: str) -> None:
        """Refuse (413) a text too long to be ``max_tokens`` tokens, without tokenizing it."""
        if len(text) > self.max_tokens * self.max_token_chars:
            raise prompt_too_large(
                f"{param}: {len(text)} characters cannot fit in this frontend's limit of "
                f"{self.max_tokens} prompt tokens (--max-prompt-tokens; no token of this model "
                f"covers more than {self.max_token_chars} characters)",
                param,
            )

    def check_tokens(self, num_tokens: int, param: str) -> None:
        """Refuse (413) a prompt of more than ``max_tokens`` tokens."""
        if num_tokens > self.max_tokens:
            raise prompt_too_large(
                f"{param}: the prompt has {num_tokens} tokens; this frontend accepts at most "
                f"{self.max_tokens} (--max-prompt-tokens)",
                param,
            )
