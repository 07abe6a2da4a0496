"""TLS material for etcd: a private CA, a server certificate and a client certificate.

``generate(directory)`` writes, with the ``openssl`` command-line tool (present wherever etcd
runs; no Python dependency)::

    ca.pem                      the CA certificate: FABRIC_ETCD_CA_FILE, etcd --trusted-ca-file
    server.pem, server-key.pem  etcd --cert-file / --key-file (SAN: the hosts given)
    client.pem, client-key.pem  FABRIC_ETCD_CERT_FILE / FABRIC_ETCD_KEY_FILE; CN = the user

Invariants:

* Keys are ECDSA P-256; certificates are valid ``days`` days (365 by default). The CA key is
  kept (``ca-key.pem``) so ``sign`` can issue more certificates; keep it off the serving hosts.
* Every key file is mode 600; files are written in place (an existing directory's files are
  replaced).
* The client certificate's common name is an etcd user name: with ``--client-cert-auth`` and
  authentication on, etcd takes the CN as the user of requests that carry no token.

CLI: ``python -m fabric.discovery.etcd_certs DIR [--host H ...] [--user fabric]`` writes the
files and prints the exports for the fabric's processes.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fabric.errors import ConfigError

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_USER = "fabric"


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """Paths of the files ``generate`` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def generate(
    directory: Path,
    *,
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    user: str = DEFAULT_USER,
    days: int = 365,
) -> TlsMaterial:
    """Write a CA, a server certificate for ``hosts`` and a client certificate for ``user``.

    Raises:
        ConfigError: no ``openssl`` on PATH, or it failed (its message included).
    """
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    _openssl(
        "req", "-x509", *_new_key(ca_key), "-out", str(ca), "-days", str(days),
        "-subj", "/CN=kv-fabric etcd CA",
    )  # fmt: skip
    sans = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    server = sign(
        directory,
        "server",
        "etcd",
        usage="serverAuth",
        extension=f"subjectAltName={sans}",
        days=days,
    )
    client = sign(directory, "client", user, usage="clientAuth", days=days)
    return TlsMaterial(ca, server[0], server[1], client[0], client[1])


def sign(
    directory: Path,
    name: str,
    common_name: str,
    *,
    usage: str,
    extension: str | None = None,
    days: int = 365,
) -> tuple[Path, Path]:
    """A key and a certificate signed by ``directory``'s CA: ``(name.pem, name-key.pem)``."""
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    with tempfile.TemporaryDirectory(prefix="fabric-certs-") as scratch:
        csr, ext = Path(scratch) / "req.csr", Path(scratch) / "ext.cnf"
        lines = [f"extendedKeyUsage={usage}", "keyUsage=digitalSignature,keyEncipherment"]
        ext.write_text("\n".join([*lines, *([extension] if extension else [])]) + "\n")
        _openssl("req", *_new_key(key), "-out", str(csr), "-subj", f"/CN={common_name}")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(directory / "ca.pem"),
            "-CAkey", str(directory / "ca-key.pem"), "-set_serial", str(secrets.randbits(63)),
            "-out", str(cert), "-days", str(days), "-extfile", str(ext),
        )  # fmt: skip
    return cert, key


def _new_key(key: Path) -> list[str]:
    """``openssl req`` arguments that make a new P-256 key, unencrypted, into ``key``."""
    key.touch(mode=0o600)
    key.chmod(0o600)
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key)]  # fmt: skip


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise ConfigError("no `openssl` on PATH: install it to generate etcd certificates")
    done = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")


def _is_ip(host: str) -> bool:
    return host.replace(".", "").isdigit() or ":" in host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fabric.discovery.etcd_certs",
        description="Write a CA, an etcd server certificate and a client certificate "
        "(docs/security.md); prints the fabric's FABRIC_ETCD_* exports.",
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--host",
        action="append",
        help="a name or address clients reach etcd at (repeatable; default: 127.0.0.1, localhost)",
    )
    parser.add_argument("--user", default=DEFAULT_USER, help="client certificate CN (%(default)s)")
    parser.add_argument("--days", type=int, default=365, help="validity (%(default)s)")
    args = parser.parse_args(argv)
    try:
        material = generate(
            args.directory,
            hosts=tuple(args.host or DEFAULT_HOSTS),
            user=args.user,
            days=args.days,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"# etcd: --cert-file={material.server_cert} --key-file={material.server_key} "
          f"--trusted-ca-file={material.ca} --client-cert-auth")  # fmt: skip
    print(f"export FABRIC_ETCD_CA_FILE={material.ca}")
    print(f"export FABRIC_ETCD_CERT_FILE={material.client_cert}")
    print(f"export FABRIC_ETCD_KEY_FILE={material.client_key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
