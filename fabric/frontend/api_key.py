"""The API key of the frontend's HTTP API (``BearerAuth``) and of the vLLM instances behind it.

Keys are read from files, never from argv (a command line is visible to every local user):

* ``FABRIC_API_KEY_FILE`` (or ``--api-key-file``, which wins): clients must send
  ``Authorization: Bearer <key>`` on every ``/v1/*`` request and on ``/metrics``; anything else
  is a 401 in OpenAI's error JSON with ``WWW-Authenticate: Bearer``. ``/health`` stays open (load
  balancers), and so do ``/docs`` and ``/openapi.json`` (the schema holds no data). Unset: open.
* ``FABRIC_UPSTREAM_API_KEY_FILE``: the key the frontend sends to vLLM instances (their
  ``--api-key``), on every upstream request (``http_connection.HttpClients``).

Invariants: the comparison is constant-time (``hmac.compare_digest``); a refused request is
answered before its body is read (the middleware is outermost); a key never appears in a repr
or a log line; a key file that is missing, unreadable or empty is a ``ConfigError`` naming it.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fabric.errors import ConfigError
from fabric.frontend.errors import unauthorized

ENV_API_KEY_FILE = "FABRIC_API_KEY_FILE"
ENV_UPSTREAM_API_KEY_FILE = "FABRIC_UPSTREAM_API_KEY_FILE"
_PROTECTED_PREFIXES = ("/v1/", "/metrics")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A bearer key (its text never in a repr)."""

    value: str = field(repr=False)

    @classmethod
    def load(cls, path: str | Path, source: str) -> ApiKey:
        """The key in ``path`` (surrounding whitespace dropped); ``source`` names the setting.

        Raises:
            ConfigError: the file cannot be read or holds no key.
        """
        try:
            value = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}={path}: cannot read the API key ({exc})") from exc
        if not value:
            raise ConfigError(f"{source}={path} is empty: write the API key into it")
        return cls(value)

    @classmethod
    def from_env(cls, variable: str) -> ApiKey | None:
        """The key in the file ``variable`` names, or None when it is unset."""
        path = os.environ.get(variable, "").strip()
        return cls.load(path, variable) if path else None

    def authorization(self) -> str:
        """The ``Authorization`` header value that carries this key."""
        return f"Bearer {self.value}"

    def admits(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries this key (constant-time)."""
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self.value.encode())


def resolve_api_key(api_key_file: str | None) -> ApiKey | None:
    """The frontend's key: ``--api-key-file`` if given, else ``FABRIC_API_KEY_FILE``, else None."""
    if api_key_file:
        return ApiKey.load(api_key_file, "--api-key-file")
    return ApiKey.from_env(ENV_API_KEY_FILE)


def is_protected(path: str) -> bool:
    """Whether requests to ``path`` need the key (``/v1/*`` and ``/metrics``)."""
    return path.startswith(_PROTECTED_PREFIXES)


class BearerAuth:
    """ASGI middleware admitting requests to protected paths only with the key (module doc)."""

    def __init__(self, app: ASGIApp, *, key: ApiKey) -> None:
        self.app = app
        self._key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        authorization = Headers(scope=scope).get("authorization")
        if self._key.admits(authorization):
            await self.app(scope, receive, send)
            return
        error = unauthorized(
            "no API key given: send 'Authorization: Bearer <key>'"
            if authorization is None
            else "the API key is not valid for this frontend"
        )
        response = JSONResponse(error.body(), status_code=error.status, headers=error.headers())
        await response(scope, receive, send)
