"""The FabricError hierarchy.

Expected outcomes (a prefix miss, "not enough free blocks") are values, not exceptions. These
classes are for broken invariants, bad configuration and failed I/O; every message says what
happened and, where it can, what to do about it.
"""

from __future__ import annotations


class FabricError(Exception):
    """Base class of every error the fabric raises on purpose."""


class ConfigError(FabricError, ValueError):
    """A setting is missing, malformed or contradicts another one."""


class InvalidInput(FabricError, ValueError):
    """An argument has the wrong type, dtype, shape or value."""


class InvalidTransition(FabricError):
    """A block handle was used in a way its lifecycle does not allow (double release, reuse)."""


class PoolExhausted(FabricError):
    """A request can never fit: it asks for more blocks than the pool holds in total."""


class LayoutMismatch(FabricError, ValueError):
    """A layout contradicts the tensors it describes, or two layouts cannot exchange blocks."""


class StorageError(FabricError, OSError):
    """Backing storage could not be created, read or written (missing directory, disk full)."""


class TransferError(FabricError):
    """A transfer between tiers or peers failed; its blocks were returned to their pools."""


class TransferTimeout(TransferError):
    """A transfer did not complete within its deadline."""


class PeerUnavailable(TransferError):
    """The remote peer is not registered, not reachable or went away."""


class DiscoveryError(FabricError):
    """The discovery registry (etcd) could not be reached or answered badly."""


class ProtocolMismatch(FabricError):
    """A wire message or shared block carries another version or compatibility hash."""
