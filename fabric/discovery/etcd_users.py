"""The users an etcd starts with, and turning its authentication on.

``ServerUsers`` names them: ``root`` (etcd requires it before authentication can be enabled)
and the fabric's user, whose role may read and write the fabric's prefix only
(``/<namespace>/``; docs/security.md). ``enable_auth`` adds both over an admin channel and
enables authentication; on a server where it is on already (a restarted data directory) it
changes nothing.

Invariants: passwords never appear in a repr or a log; a failed step raises ``DiscoveryError``
naming the server, and authentication is only enabled after every user and role exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from pyetcd import etcdrpc
from pyetcd.etcdrpc import auth_pb2
from pyetcd.utils import prefix_range_end

from fabric.discovery.etcd_auth import EtcdAuth, authenticate
from fabric.discovery.registry import DEFAULT_NAMESPACE
from fabric.errors import DiscoveryError


@dataclass(frozen=True, slots=True)
class ServerUsers:
    """The users an ``EtcdServer`` starts with, authentication on (module docstring)."""

    root_password: str = field(repr=False)
    password: str = field(repr=False)
    user: str = "fabric"
    prefix: str = f"/{DEFAULT_NAMESPACE}/"
    """The keys the fabric's user may read and write (the fabric's namespace)."""


def enable_auth(channel: grpc.Channel, users: ServerUsers, endpoint: str, timeout_s: float) -> bool:
    """Add root and the fabric's user with its role, then turn authentication on.

    Args:
        channel: to the server, with its admin TLS files when it serves TLS.
        endpoint: the server's client URL, for messages.
        timeout_s: each call's deadline.

    Returns:
        True when this call turned it on; False when it was on already with this root password.
    """
    root = EtcdAuth(user="root", password=users.root_password)
    t = timeout_s
    try:
        if authenticate(channel, root, timeout_s, endpoint):
            return False
        stub = etcdrpc.AuthStub(channel)
        key = users.prefix.encode()
        permission = auth_pb2.Permission(
            permType=auth_pb2.Permission.READWRITE, key=key, range_end=prefix_range_end(key)
        )
        stub.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password=users.root_password), t)
        stub.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"), t)
        stub.RoleAdd(etcdrpc.AuthRoleAddRequest(name=users.user), t)
        stub.RoleGrantPermission(
            etcdrpc.AuthRoleGrantPermissionRequest(name=users.user, perm=permission), t
        )
        stub.UserAdd(etcdrpc.AuthUserAddRequest(name=users.user, password=users.password), t)
        stub.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user=users.user, role=users.user), t)
        stub.AuthEnable(etcdrpc.AuthEnableRequest(), t)
    except grpc.RpcError as exc:
        raise DiscoveryError(f"etcd at {endpoint}: turning auth on failed: {exc}") from exc
    return True
