"""The harness itself: hosts reach each other only over the bridge, each with its loopback up;
processes get UCX forced onto TCP; closing removes every namespace, link and process; stale
namespaces of a crashed run are swept."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_harness import MakeLab

from fabric.bench.netns import PREFIX, UCX_ENV, Lab, ip, namespaces, sweep_stale

pytestmark = pytest.mark.multihost

SERVE = (
    "import socket,sys;s=socket.create_server((sys.argv[1],int(sys.argv[2])));"
    "print('up',flush=True)\n"
    "while True:\n c,_=s.accept();c.sendall(c.recv(64)[::-1]);c.close()"
)
CONNECT = (
    "import socket,sys;c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=10);"
    "c.sendall(b'fabric');print(c.recv(64).decode())"
)
LOOPBACK_SELF_TEST = (
    "import socket;s=socket.create_server(('127.0.0.1',0));"
    "c=socket.create_connection(s.getsockname(),timeout=5);print('ok')"
)


def test_hosts_talk_over_the_bridge_and_not_over_loopback(make_lab: MakeLab) -> None:
    lab = make_lab(["h1", "h2"])
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    assert h1.address != h2.address
    for host in (h1, h2):  # loopback up in each namespace
        assert host.run(sys.executable, "-c", LOOPBACK_SELF_TEST).stdout.strip() == "ok"
    server = subprocess.Popen(
        h1.command([sys.executable, "-c", SERVE, h1.address, "7000"]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        # h2's own loopback has no such server: the hosts' port spaces are separate
        refused = h2.run(sys.executable, "-c", CONNECT, "127.0.0.1", "7000")
        assert refused.returncode != 0
        answer = h2.run(sys.executable, "-c", CONNECT, h1.address, "7000")
        assert answer.stdout.strip() == "cirbaf", answer.stderr
        # the root namespace (the tests' client host) reaches every host
        with socket.create_connection((h1.address, 7000), timeout=10) as client:
            client.sendall(b"root")
            assert client.recv(64) == b"toor"
    finally:
        server.kill()
        server.wait()


def test_processes_run_on_their_host_with_ucx_on_tcp(make_lab: MakeLab) -> None:
    lab = make_lab(["h1"])
    host = lab.hosts["h1"]
    child = host.start(
        "env",
        [
            sys.executable,
            "-c",
            "import os,socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            f"s.connect(('{lab.client_address}',9));"
            "print(os.environ['UCX_TLS'],os.environ['UCX_NET_DEVICES'],s.getsockname()[0])",
        ],
    )
    assert child.process.wait(timeout=30) == 0
    lab.stop_children()
    tls, devices, source = child.log_path.read_text().split()
    assert (tls, devices) == (UCX_ENV["UCX_TLS"], UCX_ENV["UCX_NET_DEVICES"])
    assert source == host.address


def test_close_removes_namespaces_links_and_processes(tmp_path: Path) -> None:
    lab = Lab(tmp_path).open(["h1", "h2"])
    child = lab.hosts["h2"].start("sleeper", ["sleep", "600"])
    assert len(lab.leftovers()) == 4  # the switch, two hosts, the root's link
    lab.close()
    assert child.process.poll() is not None
    assert lab.leftovers() == []
    assert ip("link", "show", lab.root_link, check=False).returncode != 0
    lab.close()  # idempotent


def test_stale_namespaces_of_a_dead_run_are_swept() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}-{dead.pid}-abc123-h1"
    ip("netns", "add", stale)
    try:
        assert stale in sweep_stale()
        assert stale not in namespaces()
    finally:
        ip("netns", "del", stale, check=False)
