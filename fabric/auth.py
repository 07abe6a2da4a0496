"""CURVE authentication and encryption of the fabric's ZeroMQ sockets: one switch.

Set ``FABRIC_CURVE_KEY_FILE`` to a key file made by ``python -m fabric.auth keygen DIR`` (the
same file on every process of a deployment, mode 600) and every ZeroMQ socket the fabric opens
(the signal channel's ROUTER and DEALERs, the KV event publisher's PUB and replay ROUTER, and
their subscribers) speaks CURVE: traffic is encrypted, and a server accepts only clients that
prove they hold the deployment's secret key. A peer without it never completes the handshake,
so its requests get no answer (they time out at the caller's bound) and a subscriber without it
receives no events. Unset: plain ZeroMQ, as on a trusted loopback (docs/security.md).

Invariants:

* One deployment key pair: servers use it as their CURVE identity; clients use it as theirs and
  expect it as the server's. The ZAP handler of a server's context admits exactly that public
  key (``hmac.compare_digest``); anything else is refused and logged by pyzmq at DEBUG.
* One ZAP authenticator thread per ZeroMQ context, started by the first ``secure_server`` on it
  and stopped by ``release_context`` (which a context's owner calls before terminating it).
* ``keys_from_env`` reads the file once per path: a bad file is a ``ConfigError`` naming it.

Imports only ``fabric.errors`` and pyzmq.
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from fabric.errors import ConfigError

ENV_CURVE_KEY_FILE = "FABRIC_CURVE_KEY_FILE"
_KEY_NAME = "fabric"


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """The deployment's CURVE key pair (Z85-encoded, as pyzmq takes them)."""

    public: bytes
    secret: bytes = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> CurveKeys:
        """Read a secret key file (``keygen``'s ``fabric.key_secret``).

        Raises:
            ConfigError: the file is missing, unreadable or holds no secret key.
        """
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{ENV_CURVE_KEY_FILE}={path}: cannot read a CURVE key: {e}") from e
        if public is None or secret is None:
            raise ConfigError(
                f"{ENV_CURVE_KEY_FILE}={path} holds no secret key: give the '.key_secret' file "
                "that `python -m fabric.auth keygen DIR` wrote"
            )
        return cls(public, secret)


_loaded: dict[str, CurveKeys] = {}
_lock = threading.Lock()
_authenticators: dict[int, ThreadAuthenticator] = {}


def keys_from_env() -> CurveKeys | None:
    """The keys ``FABRIC_CURVE_KEY_FILE`` names, or None when it is unset (plain ZeroMQ)."""
    path = os.environ.get(ENV_CURVE_KEY_FILE, "").strip()
    if not path:
        return None
    with _lock:
        keys = _loaded.get(path)
        if keys is None:
            keys = _loaded[path] = CurveKeys.load(Path(path))
        return keys


class _OneKey:
    """ZAP credentials provider: admits the deployment's public key only."""

    def __init__(self, public: bytes) -> None:
        self._public = public

    def callback(self, domain: str, key: bytes) -> bool:
        """``key``: the client's public key, Z85-encoded (as pyzmq passes it)."""
        return hmac.compare_digest(key, self._public)


def secure_server(sock: zmq.Socket[bytes], keys: CurveKeys | None) -> None:
    """Make ``sock`` (not yet bound) a CURVE server admitting only ``keys``' holders; no-op
    for None."""
    if keys is None:
        return
    ctx = sock.context
    with _lock:
        if id(ctx) not in _authenticators:
            auth = ThreadAuthenticator(ctx)
            auth.start()
            auth.configure_curve_callback(domain="*", credentials_provider=_OneKey(keys.public))
            _authenticators[id(ctx)] = auth
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def secure_client(sock: zmq.Socket[bytes], keys: CurveKeys | None) -> None:
    """Make ``sock`` (not yet connected) a CURVE client of the deployment; no-op for None."""
    if keys is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.public


def release_context(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """Stop ``ctx``'s ZAP authenticator, if it has one (before ``ctx.term()``)."""
    with _lock:
        auth = _authenticators.pop(id(ctx), None)
    if auth is not None:
        auth.stop()


def keygen(directory: Path) -> Path:
    """Write a new deployment key pair into ``directory``; the secret file's path (mode 600)."""
    directory.mkdir(parents=True, exist_ok=True)
    _, secret_file = zmq.auth.create_certificates(directory, _KEY_NAME)
    path = Path(secret_file)
    path.chmod(0o600)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fabric.auth",
        description="Keys for the fabric's authenticated ZeroMQ channels (docs/security.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "keygen",
        help="write a deployment CURVE key pair; point FABRIC_CURVE_KEY_FILE at the "
        "'.key_secret' file on every process",
    )
    gen.add_argument("directory", type=Path, help="where to write fabric.key / fabric.key_secret")
    args = parser.parse_args(argv)
    path = keygen(args.directory)
    print(f"export {ENV_CURVE_KEY_FILE}={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
