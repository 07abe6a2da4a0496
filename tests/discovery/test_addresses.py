"""``fabric.discovery.addresses``: the bind and advertised hosts, endpoint rewriting, the UCX
device of an address, and the route to etcd."""

from __future__ import annotations

import socket

import pytest

from fabric.discovery.addresses import (
    HostAddresses,
    is_loopback,
    resolve_addresses,
    route_source,
    ucx_net_devices,
)
from fabric.errors import ConfigError

ETCD = "http://127.0.0.1:2379"


def test_default_binds_and_advertises_loopback() -> None:
    assert resolve_addresses(None, None, ETCD) == HostAddresses("127.0.0.1", "127.0.0.1")


def test_a_single_bind_address_is_advertised_as_is() -> None:
    assert resolve_addresses("10.1.2.3", None, ETCD) == HostAddresses("10.1.2.3", "10.1.2.3")


def test_an_explicit_advertise_host_wins() -> None:
    addresses = resolve_addresses("0.0.0.0", "node-7.example", ETCD)
    assert addresses == HostAddresses("0.0.0.0", "node-7.example")


def test_a_wildcard_bind_advertises_the_route_to_etcd() -> None:
    # etcd on loopback: the route's source is loopback too (a single-host deployment).
    assert resolve_addresses("0.0.0.0", None, "http://127.0.0.1:2379").host == "127.0.0.1"
    assert resolve_addresses("*", None, "127.0.0.5:2379") == HostAddresses("0.0.0.0", "127.0.0.1")


def test_the_route_is_taken_to_the_first_endpoint() -> None:
    assert route_source("http://127.0.0.1:1,http://192.0.2.1:2") == "127.0.0.1"


def test_route_source_refuses_what_is_not_an_endpoint() -> None:
    with pytest.raises(ConfigError, match="advertise-host"):
        route_source("http://no-such-host.invalid:2379")
    with pytest.raises(ConfigError, match="not http://host:port"):
        route_source("http://:2379")


def test_a_wildcard_is_never_advertised() -> None:
    with pytest.raises(ConfigError, match="wildcard"):
        resolve_addresses("0.0.0.0", "0.0.0.0", ETCD)


def test_advertising_another_host_while_bound_to_loopback_is_refused() -> None:
    with pytest.raises(ConfigError, match="could not connect"):
        resolve_addresses("127.0.0.1", "10.0.0.2", ETCD)
    # loopback advertised over a loopback bind is consistent
    assert resolve_addresses("127.0.0.1", "127.0.0.2", ETCD).host == "127.0.0.2"


@pytest.mark.parametrize(
    ("bound", "advertised"),
    [
        ("tcp://0.0.0.0:4123", "tcp://10.0.0.2:4123"),
        ("tcp://127.0.0.1:9", "tcp://10.0.0.2:9"),
        ("http://0.0.0.0:8080/metrics", "http://10.0.0.2:8080/metrics"),
        ("tcp://[::]:7", "tcp://10.0.0.2:7"),
    ],
)
def test_advertise_rewrites_the_host_and_keeps_port_and_path(bound: str, advertised: str) -> None:
    assert HostAddresses("0.0.0.0", "10.0.0.2").advertise(bound) == advertised


def test_ipv6_hosts_are_bracketed() -> None:
    addresses = HostAddresses("::", "fd00::2")
    assert addresses.advertise("tcp://[::]:7") == "tcp://[fd00::2]:7"
    assert addresses.bind_endpoint() == "tcp://[::]:0"


@pytest.mark.parametrize("bad", ["0.0.0.0:4123", "tcp://0.0.0.0", "tcp://0.0.0.0:http"])
def test_advertise_refuses_endpoints_without_scheme_or_port(bad: str) -> None:
    with pytest.raises(ConfigError):
        HostAddresses("0.0.0.0", "10.0.0.2").advertise(bad)


def test_bind_endpoint() -> None:
    assert HostAddresses("0.0.0.0", "10.0.0.2").bind_endpoint() == "tcp://0.0.0.0:0"
    assert HostAddresses("127.0.0.1", "127.0.0.1").bind_endpoint(port=5) == "tcp://127.0.0.1:5"


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.9.9.9") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("example.com")


def test_ucx_net_devices_names_the_interface_holding_the_address() -> None:
    assert ucx_net_devices("127.0.0.1") == "lo"
    assert ucx_net_devices("192.0.2.77") is None  # TEST-NET-1: on no interface here
    # every local IPv4 address maps back to an interface that exists
    names = {name for _, name in socket.if_nameindex()}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # the default route's source, if there is one
            local = probe.getsockname()[0]
        except OSError:
            pytest.skip("no default route on this host")
    device = ucx_net_devices(local)
    assert device in names


def test_published_rewrites_only_a_wildcard_host() -> None:
    addresses = HostAddresses("0.0.0.0", "10.0.0.2")
    assert addresses.published("tcp://0.0.0.0:5557") == "tcp://10.0.0.2:5557"
    assert addresses.published("tcp://*:5557") == "tcp://10.0.0.2:5557"
    assert addresses.published("tcp://127.0.0.1:5557") == "tcp://127.0.0.1:5557"
    assert addresses.published("tcp://10.9.9.9:5557") == "tcp://10.9.9.9:5557"
