"""Which address a process binds its servers to and which one it advertises to its peers.

Every endpoint a process publishes in etcd (signal, metrics, KV events, the NIXL agent's UCX
address, a vLLM instance's HTTP server) must be one its peers can reach, which on more than one
host is not 127.0.0.1. ``resolve_addresses`` decides both once per process, from two settings:

* ``bind_host`` (``--bind-host``, ``FABRIC_BIND_HOST``): the interface servers listen on;
  127.0.0.1 by default, so nothing is reachable from other hosts unless asked for. ``0.0.0.0``
  (or ``::``) listens on every interface.
* ``advertise_host`` (``--advertise-host``, ``FABRIC_ADVERTISE_HOST``): the address peers are
  told. When unset: the bind address itself when it is a single address; with a wildcard bind,
  the local address of the route to the first etcd endpoint (the interface peers, which reach
  the same etcd, most likely reach this process on too).

Invariants:

* The advertised host is never a wildcard, and never loopback unless the bind address (or an
  explicit ``advertise_host``) is loopback, or etcd itself is reached over loopback with a
  wildcard bind (a single-host deployment).
* A non-loopback ``advertise_host`` with a loopback bind is refused (``ConfigError``): peers on
  other hosts would be told an address nobody listens on.
* ``HostAddresses.advertise`` rewrites only the host of a bound endpoint (``tcp://0.0.0.0:4123``
  -> ``tcp://10.0.0.2:4123``); the port is the one the server really bound. ``published`` keeps
  an endpoint a user configured with its own host, rewriting only a wildcard.
* ``ucx_net_devices`` names the interface holding the advertised address (``lo`` on loopback),
  so the NIXL agent's UCX address carries an address its peers can reach; None where no local
  interface holds it (UCX then uses every device).

Imports only ``fabric.errors`` and the standard library.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

from fabric.errors import ConfigError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_BIND_HOST = LOOPBACK
WILDCARDS = frozenset({"0.0.0.0", "::", "*", ""})
_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in WILDCARDS


def route_source(endpoints: str) -> str:
    """The local address of the route to the first of ``endpoints`` (``http://host:port``,
    comma-separated): the address this host is seen at by whoever reaches the same place.

    No packet is sent (a UDP socket is connected, which only picks the route).

    Raises:
        ConfigError: no endpoint is given, its host does not resolve, or no route leads there.
    """
    first = endpoints.split(",", maxsplit=1)[0].strip()
    parts = urlsplit(first if "://" in first else f"http://{first}")
    if not parts.hostname:
        raise ConfigError(f"cannot find the route to {first!r}: not http://host:port")
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            parts.hostname, parts.port or 1, type=socket.SOCK_DGRAM
        )[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            return str(probe.getsockname()[0])
    except OSError as exc:
        raise ConfigError(
            f"cannot find the local address of the route to {first} ({exc}): set "
            "--advertise-host (FABRIC_ADVERTISE_HOST) to the address peers reach this host at"
        ) from exc


@dataclass(frozen=True, slots=True)
class HostAddresses:
    """Where this process's servers listen (``bind``) and what its records say (``host``)."""

    bind: str
    host: str

    def bind_endpoint(self, scheme: str = "tcp", port: int = 0) -> str:
        """A ZeroMQ endpoint to bind, e.g. ``tcp://127.0.0.1:0`` (port 0: a free one)."""
        return f"{scheme}://{_url_host(self.bind)}:{port}"

    def advertise(self, bound: str) -> str:
        """``bound`` (``scheme://host:port[/path]``, as a server reports it) with the advertised
        host in place of the bound one."""
        scheme, sep, rest = bound.partition("://")
        if not sep:
            raise ConfigError(f"endpoint {bound!r} has no scheme (scheme://host:port)")
        authority, slash, path = rest.partition("/")
        _, colon, port = authority.rpartition(":")
        if not colon or not port.isdigit():
            raise ConfigError(f"endpoint {bound!r} has no port (scheme://host:port)")
        return f"{scheme}://{_url_host(self.host)}:{port}{slash}{path}"

    def published(self, configured: str) -> str:
        """What peers are given for an endpoint a user configured with its own host: as given,
        unless that host is a wildcard (then ``advertise``)."""
        authority = configured.partition("://")[2].partition("/")[0]
        return (
            self.advertise(configured) if is_wildcard(authority.rpartition(":")[0]) else configured
        )


def resolve_addresses(
    bind_host: str | None, advertise_host: str | None, etcd_endpoints: str
) -> HostAddresses:
    """The bind and advertised hosts of one process (module docstring for the rules).

    Raises:
        ConfigError: the advertised host is a wildcard, or is not loopback while the bind
            address is; or it must come from the route to etcd and none is found.
    """
    bind = (bind_host or DEFAULT_BIND_HOST).strip()
    bind = "0.0.0.0" if bind in ("*", "") else bind
    if advertise_host:
        host = advertise_host.strip()
        if is_wildcard(host):
            raise ConfigError(
                f"advertise host {host!r} is a wildcard: give the address peers reach this "
                "host at (--advertise-host / FABRIC_ADVERTISE_HOST)"
            )
        if is_loopback(bind) and not is_loopback(host):
            raise ConfigError(
                f"servers bind {bind} but advertise {host}: peers on other hosts could not "
                f"connect; bind {host} or 0.0.0.0 (--bind-host / FABRIC_BIND_HOST)"
            )
    elif is_wildcard(bind):
        host = route_source(etcd_endpoints)
    else:
        host = bind
    logger.info("servers bind %s, advertised as %s", bind, host)
    return HostAddresses(bind=bind, host=host)


def ucx_net_devices(host: str) -> str | None:
    """The ``UCX_NET_DEVICES`` value for a process advertised at ``host``: the name of the
    interface holding that address (``lo`` for loopback), or None where none does."""
    if is_loopback(host):
        return "lo"
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == host:
            return name
    return None


def _ipv4_of(interface: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            request = struct.pack("256s", interface.encode()[:15])
            answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
        except OSError:
            return None  # no IPv4 address on it
    return socket.inet_ntoa(answer[20:24])


def _url_host(host: str) -> str:
    """``host`` as it goes in a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
