"""How the fabric authenticates to etcd: ``EtcdAuth``, read from the environment in one place.

Every process that opens an ``EtcdRegistry`` (workers, the frontend, ``fabric launch``, the vLLM
connector inside vLLM) calls ``EtcdAuth.from_env()`` through it, so one set of variables turns
authentication on everywhere (docs/security.md):

* ``FABRIC_ETCD_USER`` with ``FABRIC_ETCD_PASSWORD`` or ``FABRIC_ETCD_PASSWORD_FILE``: etcd's
  user/password authentication (a token per client, renewed when etcd refuses it).
* ``https://`` endpoints: TLS. ``FABRIC_ETCD_CA_FILE`` is the CA that signed etcd's certificate
  (without it, the system's trust store); ``FABRIC_ETCD_CERT_FILE`` + ``FABRIC_ETCD_KEY_FILE``
  a client certificate (etcd ``--client-cert-auth``; with auth on, its CN is the etcd user).

Nothing set: plain HTTP/2 without credentials, as before.

Invariants:

* Bad combinations are a ``ConfigError`` naming the variable, at construction: a user without a
  password or the reverse, both password variables, a certificate without its key, an unreadable
  or malformed file, a key that does not match its certificate, certificates with ``http://``
  endpoints. A password etcd refuses is an ``EtcdAuthError`` (a ``ConfigError`` and a
  ``DiscoveryError``) naming the variables, at the first call.
* The password and the key never appear in a repr or a log line.

The client library: ``pyetcd`` takes ``user`` / ``password`` only to authenticate once in its
constructor (a blocking call; an error without details) and never renews the token, while etcd
forgets a simple token after ``--auth-token-ttl`` (300 s) without use and on every restart. So
``EtcdRegistry`` authenticates itself (``authenticate``) and sets the token as the client's
per-call metadata (``token``), which its unary calls, its lease keepalives and the registry's
own watch streams send; a call refused for its token renews it once and is retried.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from pyetcd import etcdrpc

from fabric.errors import ConfigError, DiscoveryError

ENV_USER = "FABRIC_ETCD_USER"
ENV_PASSWORD = "FABRIC_ETCD_PASSWORD"
ENV_PASSWORD_FILE = "FABRIC_ETCD_PASSWORD_FILE"
ENV_CA_FILE = "FABRIC_ETCD_CA_FILE"
ENV_CERT_FILE = "FABRIC_ETCD_CERT_FILE"
ENV_KEY_FILE = "FABRIC_ETCD_KEY_FILE"

# What etcd answers when a request's token is missing, unknown or outdated (rpctypes).
_TOKEN_REFUSALS = (
    "invalid auth token",
    "revision of auth store is old",
    "user name is empty",
)


class EtcdAuthError(ConfigError, DiscoveryError):
    """etcd refused the configured credentials (a wrong user or password)."""


@dataclass(frozen=True, slots=True)
class EtcdAuth:
    """Credentials and TLS files for etcd; all None: no authentication, plain HTTP/2.

    Attributes:
        password_source: where the password came from, for messages (a variable's name).
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    password_source: str = ENV_PASSWORD

    def __post_init__(self) -> None:
        if self.user and self.password is None:
            raise ConfigError(
                f"{ENV_USER} is set without a password: set {ENV_PASSWORD_FILE} (or {ENV_PASSWORD})"
            )
        if self.password is not None and not self.user:
            raise ConfigError(f"{self.password_source} is set without {ENV_USER}")
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = (
                (ENV_CERT_FILE, ENV_KEY_FILE)
                if self.key_file is None
                else (ENV_KEY_FILE, ENV_CERT_FILE)
            )
            raise ConfigError(f"{given} is set without {missing}: a client certificate needs both")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EtcdAuth:
        """The ``FABRIC_ETCD_*`` settings (module docstring); ConfigError for bad ones."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(name, "").strip() or None

        password, source = get(ENV_PASSWORD), ENV_PASSWORD
        password_file = get(ENV_PASSWORD_FILE)
        if password_file is not None:
            if password is not None:
                raise ConfigError(f"set one of {ENV_PASSWORD} and {ENV_PASSWORD_FILE}, not both")
            password, source = _read_password(password_file), ENV_PASSWORD_FILE
        files = {name: None if (v := get(name)) is None else Path(v) for name in _FILE_VARS}
        return cls(
            user=get(ENV_USER),
            password=password,
            ca_file=files[ENV_CA_FILE],
            cert_file=files[ENV_CERT_FILE],
            key_file=files[ENV_KEY_FILE],
            password_source=source,
        )

    @property
    def has_tls_files(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None

    def check_scheme(self, secure: bool, endpoints: str) -> None:
        """Refuse TLS files with ``http://`` endpoints (they would be ignored)."""
        if self.has_tls_files and not secure:
            names = [ENV_CA_FILE] if self.ca_file else []
            names += [ENV_CERT_FILE] if self.cert_file else []
            raise ConfigError(
                f"{' and '.join(names)} set, but the etcd endpoints {endpoints} are http://: "
                "use https:// endpoints for TLS"
            )

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context with this CA and client certificate (ConfigError if invalid)."""
        try:
            context = ssl.create_default_context(
                cafile=None if self.ca_file is None else str(self.ca_file)
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{ENV_CA_FILE}={self.ca_file}: not a readable PEM CA: {exc}"
            ) from exc
        if self.cert_file is not None and self.key_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"{ENV_CERT_FILE}={self.cert_file} and {ENV_KEY_FILE}={self.key_file}: not a "
                    f"readable PEM certificate and its private key ({exc})"
                ) from exc
        return context

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC TLS credentials from the files (checked with ``ssl_context`` first)."""
        self.ssl_context()
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, ENV_CA_FILE),
            private_key=_read(self.key_file, ENV_KEY_FILE),
            certificate_chain=_read(self.cert_file, ENV_CERT_FILE),
        )


_FILE_VARS = (ENV_CA_FILE, ENV_CERT_FILE, ENV_KEY_FILE)


def authenticate(channel: grpc.Channel, auth: EtcdAuth, timeout_s: float, where: str) -> str:
    """A new token for ``auth``'s user ("" when etcd's authentication is off).

    Raises:
        EtcdAuthError: etcd refused the user or password.
        grpc.RpcError: any other failure (the caller maps it).
    """
    request = etcdrpc.AuthenticateRequest(name=auth.user, password=auth.password)
    try:
        response = etcdrpc.AuthStub(channel).Authenticate(request, timeout_s)
    except grpc.RpcError as exc:
        details = str(exc.details() if callable(getattr(exc, "details", None)) else exc)
        if "authentication is not enabled" in details:
            return ""
        if "authentication failed" in details:
            raise EtcdAuthError(
                f"etcd at {where} refused the user {ENV_USER}={auth.user!r} with the password of "
                f"{auth.password_source}: check both (etcdctl user get {auth.user})"
            ) from None
        raise
    token: str = response.token
    return token


def is_token_refusal(details: str) -> bool:
    """Whether etcd refused a call for its token (missing, expired, forgotten, outdated)."""
    return any(refusal in details for refusal in _TOKEN_REFUSALS)


def diagnose_tls(host: str, port: int, auth: EtcdAuth, timeout_s: float) -> str | None:
    """What stops a TLS handshake with ``host:port`` (with advice), or None if it succeeds."""
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            auth.ssl_context().wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.recv(0)  # TLS 1.3: the server's verdict on a client certificate comes here
    except ssl.SSLCertVerificationError as exc:
        if auth.ca_file is None:
            advice = f"set {ENV_CA_FILE} to the CA that signed etcd's certificate"
        else:
            advice = f"{ENV_CA_FILE}={auth.ca_file} must be the CA that signed etcd's certificate"
        return f"etcd's certificate was not accepted ({exc.verify_message}): {advice}"
    except ssl.SSLError as exc:
        if "certificate" not in str(exc).lower():
            return f"TLS handshake failed ({exc.reason})"
        if auth.cert_file is None:
            return (
                f"etcd asks for a client certificate ({exc.reason}): set {ENV_CERT_FILE} and "
                f"{ENV_KEY_FILE}"
            )
        return (
            f"etcd refused the client certificate {ENV_CERT_FILE}={auth.cert_file} ({exc.reason})"
        )
    except OSError:
        return None  # not a TLS problem: the caller's message covers an unreachable etcd
    return None


def _read(path: Path | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}={path}: cannot read it ({exc.strerror})") from exc


def _read_password(path: str) -> str:
    try:
        password = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{ENV_PASSWORD_FILE}={path}: cannot read it ({exc})") from exc
    if not password:
        raise ConfigError(f"{ENV_PASSWORD_FILE}={path} is empty")
    return password
