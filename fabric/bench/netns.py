"""Hosts without a second machine: Linux network namespaces on a private bridge.

The multi-host test suite (``tests/multihost``) and ``python -m fabric.bench transfer --hosts``
build their hosts with it. Needs root and iproute2 (``check_available`` says what is missing).

A ``Lab`` is one run's network::

    root namespace (the client host)               switch namespace <lab>-sw
      kvfx<hex> 198.18.N.1/24  ───veth───  up0 ─┐
                                                 br0 (bridge)
    host namespace <lab>-h1: eth0 198.18.N.11 ── h1 ─┤
    host namespace <lab>-h2: eth0 198.18.N.12 ── h2 ─┤
    ...                                               ┘

* Addresses are in 198.18.0.0/15 (RFC 2544's benchmarking range, never routed), one /24 per run
  not used by any interface of the root namespace. Nothing of the lab exists outside its
  namespaces but the root's veth end (and its /24 route): ``close`` deletes it (it would also go
  with the switch namespace, but asynchronously).
* Names carry the creating process's pid and a random suffix (``kvfx-<pid>-<hex>-...``), so
  parallel runs never collide; ``sweep_stale`` removes the namespaces of runs whose process is
  gone (a crashed run), killing whatever still runs in them.
* Each host's loopback is up; its processes run under ``ip netns exec`` with UCX forced onto
  TCP over its ``eth0`` (``UCX_TLS=tcp``, ``UCX_NET_DEVICES=eth0``): no shared memory or
  loopback path between hosts can hide a network bug.
* ``close`` stops every process it started (``fabric.supervise.stop_processes``), SIGKILLs
  anything left in its namespaces, and deletes them (veths and bridge go with them); it runs
  also when a test fails (the fixtures' finalizers) and is idempotent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fabric.errors import FabricError
from fabric.supervise import Child, start_process, stop_processes

PREFIX = "kvfx"
RANGE = ipaddress.IPv4Network("198.18.0.0/15")
DEVICE = "eth0"
UCX_ENV = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": DEVICE}
STOP_S = 15.0
_STALE = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-")


class LabUnavailable(FabricError):
    """Network namespaces cannot be made here (the reason says why)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip args...`` (raises CalledProcessError with its stderr when ``check``)."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, ["ip", *args], stderr=result.stderr)
    return result


def namespaces() -> list[str]:
    """The names of every network namespace (``ip netns list``)."""
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def ns_pids(netns: str) -> list[int]:
    result = ip("netns", "pids", netns, check=False)
    return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []


def delete_namespace(netns: str) -> None:
    """SIGKILL everything running in ``netns``, then delete it (bounded)."""
    deadline = time.monotonic() + STOP_S
    while (pids := ns_pids(netns)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    ip("netns", "del", netns, check=False)


def stale_namespaces() -> list[str]:
    """The namespaces of labs whose creating process is gone (a crashed run's)."""
    return [
        netns
        for netns in namespaces()
        if (match := _STALE.match(netns)) is not None and not _alive(int(match.group(1)))
    ]


def sweep_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose process is gone; returns their names."""
    swept = stale_namespaces()
    for netns in swept:
        delete_namespace(netns)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_available() -> None:
    """Raise ``LabUnavailable`` unless namespaces, veths and bridges can be made here."""
    if not sys.platform.startswith("linux"):
        raise LabUnavailable("network namespaces are Linux-only")
    if os.geteuid() != 0:
        raise LabUnavailable("network namespaces need root")
    if shutil.which("ip") is None:
        raise LabUnavailable("the `ip` command (iproute2) is not installed")
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}-probe"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "add", "name", "br0", "type", "bridge")
        ip("-n", probe, "link", "add", "name", "pa", "type", "veth", "peer", "name", "pb")
    except (subprocess.CalledProcessError, OSError) as exc:
        stderr = getattr(exc, "stderr", "") or ""
        raise LabUnavailable(f"cannot create a network namespace here: {exc} {stderr}") from exc
    finally:
        ip("netns", "del", probe, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of ``RANGE`` that no interface of this namespace has an address in."""
    used = {
        ipaddress.ip_interface(word).network
        for line in ip("-o", "-4", "addr", "show").stdout.splitlines()
        for word in line.split()[3:4]
    }
    candidates = [
        net for net in RANGE.subnets(new_prefix=24) if not any(net.overlaps(u) for u in used)
    ]
    if not candidates:
        raise LabUnavailable(f"every /24 of {RANGE} is in use here")
    return candidates[secrets.randbelow(len(candidates))]


@dataclass
class Host:
    """One host: a network namespace with ``eth0`` on the lab's bridge."""

    name: str
    netns: str
    address: str
    lab: Lab

    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run on this host."""
        return ["ip", "netns", "exec", self.netns, *cmd]

    def run(self, *cmd: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` here to completion (output captured)."""
        return subprocess.run(
            self.command(cmd), capture_output=True, text=True, timeout=timeout_s, check=False
        )

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> Child:
        """Start ``cmd`` on this host, supervised by the lab (log ``<log_dir>/<name>.log``),
        with UCX forced onto TCP over ``eth0``."""
        child = start_process(
            name,
            self.command(cmd),
            self.lab.log_dir,
            progress=self.lab.progress,
            env={**UCX_ENV, **(env or {})},
        )
        self.lab.children.append(child)
        return child


@dataclass
class Lab:
    """One run's hosts, bridge and processes (module docstring)."""

    log_dir: Path
    progress: Callable[[str], None] = lambda _: None
    tag: str = field(default_factory=lambda: f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}")
    hosts: dict[str, Host] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    client_address: str = ""
    _subnet: ipaddress.IPv4Network | None = None
    _namespaces: list[str] = field(default_factory=list)

    _root_link_made: bool = False

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    @property
    def root_link(self) -> str:
        """The root namespace's end of its veth to the switch (15 characters at most)."""
        return f"{PREFIX}{self.tag.rsplit('-', 1)[1]}"

    def open(self, host_names: Sequence[str]) -> Lab:
        """Make the switch, connect the root namespace to it, then one host per name."""
        try:
            self._subnet = _free_subnet()
            self._add_namespace(self.switch)
            ip("-n", self.switch, "link", "add", "name", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
            root_end = self.root_link
            ip("link", "add", "name", root_end, "type", "veth", "peer", "name", "up0",
               "netns", self.switch)  # fmt: skip
            self._root_link_made = True
            ip("-n", self.switch, "link", "set", "up0", "master", "br0", "up")
            self.client_address = str(self._subnet[1])
            ip("addr", "add", f"{self.client_address}/24", "dev", root_end)
            ip("link", "set", root_end, "up")
            for i, name in enumerate(host_names):
                self._add_host(name, str(self._subnet[11 + i]))
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, netns: str) -> None:
        ip("netns", "add", netns)
        self._namespaces.append(netns)
        ip("-n", netns, "link", "set", "lo", "up")

    def _add_host(self, name: str, address: str) -> None:
        netns = f"{self.tag}-{name}"
        self._add_namespace(netns)
        ip("-n", self.switch, "link", "add", "name", name, "type", "veth", "peer", "name", DEVICE,
           "netns", netns)  # fmt: skip
        ip("-n", self.switch, "link", "set", name, "master", "br0", "up")
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", DEVICE)
        ip("-n", netns, "link", "set", DEVICE, "up")
        self.hosts[name] = Host(name, netns, address, self)

    def stop_children(self) -> dict[str, int]:
        """Stop every process started on the lab's hosts (SIGTERM, then SIGKILL)."""
        children, self.children = self.children, []
        return stop_processes(children, progress=self.progress, timeout_s=STOP_S)

    def close(self) -> None:
        """Stop every process, then delete every namespace (idempotent)."""
        self.stop_children()
        if self._root_link_made:  # at once: a deleted namespace's veths go asynchronously
            ip("link", "del", self.root_link, check=False)
            self._root_link_made = False
        for netns in reversed(self._namespaces):
            delete_namespace(netns)
        self._namespaces.clear()

    def leftovers(self) -> list[str]:
        """This lab's namespaces and root link that still exist (empty after ``close``)."""
        left = [n for n in namespaces() if n.startswith(self.tag)]
        if ip("link", "show", self.root_link, check=False).returncode == 0:
            left.append(self.root_link)
        return left
