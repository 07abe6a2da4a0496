"""``fabric launch --secure``: fresh authentication material for every channel, and the
environment that turns each switch on (docs/security.md).

``DeploymentSecrets.generate`` writes, under ``<run-dir>/secrets`` (mode 700, files 600): a CA
and etcd's certificate, the fabric user's etcd password, the ZeroMQ CURVE key pair, the API key
and the G4 MAC key; ``env`` gives the ``FABRIC_*`` variables that use them, which every child
gets and ``environment`` sets in this process for its own requests.

Invariants: nothing secret goes on a command line or in a log; existing material is never
overwritten; ``environment`` restores this process's variables on exit.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fabric.errors import FabricError

if TYPE_CHECKING:
    from fabric.discovery.etcd_certs import TlsMaterial
    from fabric.discovery.etcd_users import ServerUsers


@dataclass(frozen=True, slots=True)
class DeploymentSecrets:
    """What ``--secure`` generates (module docstring): every file under ``directory``."""

    directory: Path
    tls: TlsMaterial
    users: ServerUsers
    password_file: Path
    curve_key_file: Path
    api_key_file: Path
    g4_key_file: Path

    @classmethod
    def generate(cls, directory: Path) -> DeploymentSecrets:
        """Fresh material in ``directory`` (created mode 700; files mode 600).

        Raises:
            FabricError: ``directory`` already holds secrets (never overwritten), or openssl
                failed (``ConfigError``).
        """
        from fabric.auth import keygen
        from fabric.discovery.etcd_certs import generate
        from fabric.discovery.etcd_users import ServerUsers

        if directory.exists() and any(directory.iterdir()):
            raise FabricError(f"{directory} already holds secrets; use a new --run-dir")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        users = ServerUsers(root_password=secrets.token_hex(16), password=secrets.token_hex(16))
        tls = generate(directory / "etcd-tls")
        return cls(
            directory=directory,
            tls=tls,
            users=users,
            password_file=_secret_file(directory / "etcd-password", users.password),
            curve_key_file=keygen(directory / "curve"),
            api_key_file=_secret_file(directory / "api-key", secrets.token_urlsafe(32)),
            g4_key_file=_secret_file(directory / "g4-key", secrets.token_hex(32)),
        )

    def env(self) -> dict[str, str]:
        """The ``FABRIC_*`` variables that turn every switch on with this material."""
        return {
            "FABRIC_ETCD_USER": self.users.user,
            "FABRIC_ETCD_PASSWORD_FILE": str(self.password_file),
            "FABRIC_ETCD_CA_FILE": str(self.tls.ca),
            "FABRIC_CURVE_KEY_FILE": str(self.curve_key_file),
            "FABRIC_API_KEY_FILE": str(self.api_key_file),
            "FABRIC_SHARED_DISK_KEY_FILE": str(self.g4_key_file),
        }


def _secret_file(path: Path, value: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in this process's environment, restored on exit."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
