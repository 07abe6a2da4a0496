"""etcd with authentication: the ``FABRIC_ETCD_*`` settings, outsiders refused, the fabric's
own processes served (registration, keepalive, watch, directory), tokens renewed.

The Registry contract also runs over both authenticated servers (``conftest.registry``).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from discovery_harness import BOUND_S, TTL_S, USERS, cert_only, messages, record_of

from fabric.discovery import etcd_auth
from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_auth import EtcdAuth, EtcdAuthError
from fabric.discovery.etcd_certs import TlsMaterial
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.registration import WorkerDirectory, WorkerEventKind, WorkerRegistration
from fabric.discovery.registry import Role, worker_key
from fabric.errors import ConfigError, DiscoveryError

pytestmark = pytest.mark.etcd


# -- settings ------------------------------------------------------------------------------------


def test_nothing_set_is_no_authentication() -> None:
    assert EtcdAuth.from_env({}) == EtcdAuth()
    assert not EtcdAuth().has_tls_files


def test_settings_from_env(tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("s3cret\n")
    auth = EtcdAuth.from_env(
        {
            etcd_auth.ENV_USER: "fabric",
            etcd_auth.ENV_PASSWORD_FILE: str(password_file),
            etcd_auth.ENV_CA_FILE: "/ca.pem",
        }
    )
    assert (auth.user, auth.password, auth.ca_file) == ("fabric", "s3cret", Path("/ca.pem"))
    assert auth.password_source == etcd_auth.ENV_PASSWORD_FILE
    assert "s3cret" not in repr(auth)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"FABRIC_ETCD_USER": "fabric"}, ["FABRIC_ETCD_PASSWORD_FILE"]),
        ({"FABRIC_ETCD_PASSWORD": "x"}, ["FABRIC_ETCD_PASSWORD", "FABRIC_ETCD_USER"]),
        (
            {
                "FABRIC_ETCD_USER": "f",
                "FABRIC_ETCD_PASSWORD": "x",
                "FABRIC_ETCD_PASSWORD_FILE": "p",
            },
            ["FABRIC_ETCD_PASSWORD", "FABRIC_ETCD_PASSWORD_FILE"],
        ),
        ({"FABRIC_ETCD_CERT_FILE": "c.pem"}, ["FABRIC_ETCD_CERT_FILE", "FABRIC_ETCD_KEY_FILE"]),
        ({"FABRIC_ETCD_KEY_FILE": "k.pem"}, ["FABRIC_ETCD_KEY_FILE", "FABRIC_ETCD_CERT_FILE"]),
        (
            {"FABRIC_ETCD_USER": "f", "FABRIC_ETCD_PASSWORD_FILE": "/nonexistent/password"},
            ["FABRIC_ETCD_PASSWORD_FILE=/nonexistent/password"],
        ),
    ],
    ids=["user-alone", "password-alone", "both-passwords", "cert-alone", "key-alone", "no-file"],
)
def test_bad_combinations_name_the_variables(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        EtcdAuth.from_env(env)
    for name in names:
        assert name in str(caught.value)


def test_tls_files_need_https_endpoints(tls_material: TlsMaterial) -> None:
    with pytest.raises(ConfigError, match=r"FABRIC_ETCD_CA_FILE set.*use https://"):
        EtcdRegistry("http://127.0.0.1:2379", auth=EtcdAuth(ca_file=tls_material.ca))
    with pytest.raises(ConfigError, match="mix http:// and https://"):
        EtcdRegistry("https://127.0.0.1:1,http://127.0.0.1:2", auth=EtcdAuth())


def test_unreadable_or_mismatched_tls_files(tls_material: TlsMaterial, tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="FABRIC_ETCD_CA_FILE="):
        EtcdRegistry("https://127.0.0.1:2379", auth=EtcdAuth(ca_file=garbage))
    mismatched = EtcdAuth(
        ca_file=tls_material.ca,
        cert_file=tls_material.client_cert,
        key_file=tls_material.server_key,
    )
    with pytest.raises(ConfigError, match=r"FABRIC_ETCD_CERT_FILE=.*FABRIC_ETCD_KEY_FILE="):
        EtcdRegistry("https://127.0.0.1:2379", auth=mismatched)


def test_certs_cli_prints_the_exports(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fabric.discovery.etcd_certs", str(tmp_path / "tls")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert f"export FABRIC_ETCD_CA_FILE={tmp_path / 'tls' / 'ca.pem'}" in done.stdout
    assert (tmp_path / "tls" / "client-key.pem").stat().st_mode & 0o077 == 0


# -- against etcd with authentication on ------------------------------------------------------


def test_a_wrong_password_names_the_variables(auth_etcd: EtcdServer) -> None:
    wrong = EtcdAuth(user="fabric", password="wrong", password_source="FABRIC_ETCD_PASSWORD_FILE")
    registry = EtcdRegistry(auth_etcd.endpoint, timeout_s=2, auth=wrong)
    try:
        with pytest.raises(EtcdAuthError, match=r"FABRIC_ETCD_USER='fabric'.*PASSWORD_FILE"):
            registry.get("/test-x/a")
    finally:
        registry.close()
    assert "wrong" not in repr(registry)


def test_https_without_the_ca_names_the_variable(tls_etcd: EtcdServer) -> None:
    registry = EtcdRegistry(tls_etcd.endpoint, timeout_s=0.5, auth=EtcdAuth())
    try:
        with pytest.raises(ConfigError, match=r"not accepted.*set FABRIC_ETCD_CA_FILE"):
            registry.get("/test-x/a")
    finally:
        registry.close()


def test_a_missing_client_certificate_names_the_variables(tls_etcd: EtcdServer) -> None:
    auth = EtcdAuth(ca_file=tls_etcd.client_auth.ca_file)
    registry = EtcdRegistry(tls_etcd.endpoint, timeout_s=0.5, auth=auth)
    try:
        with pytest.raises(ConfigError, match="set FABRIC_ETCD_CERT_FILE and FABRIC_ETCD_KEY_FILE"):
            registry.get("/test-x/a")
    finally:
        registry.close()


def test_the_fabric_user_is_confined_to_its_prefix(auth_etcd: EtcdServer) -> None:
    registry = EtcdRegistry(auth_etcd.endpoint, timeout_s=2, auth=auth_etcd.client_auth)
    try:
        with pytest.raises(DiscoveryError, match="permission denied for user 'fabric'"):
            registry.put("/elsewhere/key", b"x")
    finally:
        registry.close()


def _outsider(server: EtcdServer) -> EtcdAuth:
    """What a process on the host holds without the deployment's secrets: the public CA only."""
    return EtcdAuth(ca_file=server.client_auth.ca_file)


@pytest.mark.parametrize("server_name", ["auth_etcd", "tls_etcd"], ids=["password", "client-cert"])
def test_an_outsider_cannot_register_or_delete_a_worker(
    server_name: str, request: pytest.FixtureRequest, namespace: str, wait_until
) -> None:
    server: EtcdServer = request.getfixturevalue(server_name)
    fabric_auth = server.client_auth if server_name == "auth_etcd" else cert_only(server)
    worker_registry = EtcdRegistry(server.endpoint, timeout_s=2, auth=fabric_auth)
    router_registry = EtcdRegistry(server.endpoint, timeout_s=2, auth=fabric_auth)
    outsider = EtcdRegistry(server.endpoint, timeout_s=0.5, auth=_outsider(server))
    real = record_of("decode-real", Role.DECODE)
    fake = record_of("decode-fake", Role.DECODE, port=6666)
    registration = WorkerRegistration(worker_registry, real, ttl_s=TTL_S, namespace=namespace)
    seen: list[tuple[WorkerEventKind, str]] = []
    directory = WorkerDirectory(
        router_registry,
        namespace=namespace,
        on_change=lambda event: seen.append((event.kind, event.record.worker_id)),
    )
    try:
        registration.start()
        directory.start()
        assert directory.wait_for(lambda w: w.get("decode-real") == real, BOUND_S)
        with pytest.raises(EtcdAuthError):
            outsider.put(worker_key(namespace, Role.DECODE, "decode-fake"), fake.to_bytes())
        with pytest.raises(EtcdAuthError):
            outsider.delete(real.key(namespace))
        time.sleep(2 * TTL_S)  # what the outsider did would have reached the directory by now
        assert set(directory.workers()) == {"decode-real"}
        assert seen == [(WorkerEventKind.JOINED, "decode-real")]
        assert router_registry.get(real.key(namespace)) == real.to_bytes()
    finally:
        registration.close()
        directory.close()
        for registry in (worker_registry, router_registry, outsider):
            registry.close()


@pytest.mark.parametrize("server_name", ["auth_etcd", "tls_etcd"], ids=["password", "client-cert"])
def test_the_environment_turns_authentication_on_for_every_registry(
    server_name: str,
    request: pytest.FixtureRequest,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Registration (past several TTLs of keepalives), watch and directory with the variables
    only, as a worker, the frontend and the vLLM connector open their registries."""
    server: EtcdServer = request.getfixturevalue(server_name)
    auth = server.client_auth
    if server_name == "auth_etcd":
        password_file = tmp_path / "password"
        password_file.write_text(USERS.password)
        monkeypatch.setenv(etcd_auth.ENV_USER, USERS.user)
        monkeypatch.setenv(etcd_auth.ENV_PASSWORD_FILE, str(password_file))
    else:
        monkeypatch.setenv(etcd_auth.ENV_CA_FILE, str(auth.ca_file))
        monkeypatch.setenv(etcd_auth.ENV_CERT_FILE, str(auth.cert_file))
        monkeypatch.setenv(etcd_auth.ENV_KEY_FILE, str(auth.key_file))
    worker_registry = EtcdRegistry(server.endpoint, timeout_s=2)
    router_registry = EtcdRegistry(server.endpoint, timeout_s=2)
    record = record_of("prefill-env")
    registration = WorkerRegistration(worker_registry, record, ttl_s=TTL_S, namespace=namespace)
    kinds: list[WorkerEventKind] = []
    directory = WorkerDirectory(
        router_registry, namespace=namespace, on_change=lambda event: kinds.append(event.kind)
    )
    try:
        directory.start()
        registration.start()
        assert directory.wait_for(lambda w: w.get("prefill-env") == record, BOUND_S)
        time.sleep(3 * TTL_S)  # kept alive past three TTLs
        assert registration.registered
        assert directory.get("prefill-env") == record
        registration.close()
        assert directory.wait_for(lambda w: w.get("prefill-env") is None, BOUND_S)
        assert kinds == [WorkerEventKind.JOINED, WorkerEventKind.LEFT]
    finally:
        registration.close()
        directory.close()
        worker_registry.close()
        router_registry.close()


def test_tokens_etcd_forgets_are_renewed(
    namespace: str, caplog: pytest.LogCaptureFixture, wait_until
) -> None:
    """etcd drops an unused token after --auth-token-ttl and every token when it restarts:
    calls and the watch stream authenticate again by themselves."""
    caplog.set_level(logging.INFO, logger="fabric.discovery")
    with EtcdServer(name="fabric-test-etcd-tokens", users=USERS, auth_token_ttl_s=1) as server:
        registry = EtcdRegistry(server.endpoint, timeout_s=2, auth=server.client_auth)
        prefix = f"/{namespace}/tokens/"
        events: list[str] = []
        try:
            registry.watch_prefix(prefix, lambda event: events.append(event.key))
            registry.put(prefix + "a", b"1")
            time.sleep(2.5)  # the token expires unused
            registry.put(prefix + "b", b"2")
            assert any("authenticating again" in m for m in messages(caplog, logging.INFO))
            server.restart()  # every token is gone; the watch reconnects with a new one
            registry.put(prefix + "c", b"3")
            assert wait_until(lambda: events == [prefix + "a", prefix + "b", prefix + "c"], BOUND_S)
        finally:
            registry.close()
