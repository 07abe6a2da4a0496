"""UCX's settings for NIXL (``fabric.transfer.ucx_env``, issue 18).

With them, a process that created a NIXL UCX backend holds one libnl (the wheel's) and exits 0.
The canary runs the same process without them where the trigger exists (the system ``libefa``,
from ``ibverbs-providers``): it must still die with SIGSEGV at exit, else NIXL's wheel was fixed
and the setting can go.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import subprocess
import sys

import pytest

from fabric.transfer import ucx_env
from fabric.transfer.ucx_env import loads_efa_module, ucx_env_defaults

CHILD = """
from fabric.transfer.nixl_agent import load_nixl
api = load_nixl()
config = api.nixl_agent_config(
    enable_prog_thread=False, enable_listen_thread=False, backends=[]
)
agent = api.nixl_agent("ucx-env-test", config)
agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
with open("/proc/self/maps") as maps:
    system_libnl = "/libnl-route-3.so.200" in maps.read()
print("system libnl-route loaded" if system_libnl else "one libnl-route", flush=True)
"""


def run_child(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "UCX_MODULES"}
    return subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**base, "UCX_NET_DEVICES": "lo", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("modules", "loads"),
    [
        ("all", True),
        ("^all", True),
        ("", False),
        ("^", True),
        ("^efa", False),
        ("^EFA,cuda", False),
        ("^cu*", True),
        ("^e*", False),
        ("ib,cma", False),
        ("ib,*fa", True),
    ],
)
def test_loads_efa_module_reads_ucx_allow_lists(modules: str, loads: bool) -> None:
    assert loads_efa_module(modules) is loads


def test_defaults_leave_a_users_setting_alone() -> None:
    assert ucx_env_defaults({}) == {"UCX_MODULES": "^efa"}
    assert ucx_env_defaults({"UCX_MODULES": "all"}) == {}


def test_a_setting_that_loads_efa_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("UCX_MODULES", "all")
    ucx_env.prepare_process.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=ucx_env.__name__):
            ucx_env.prepare_process()
    finally:
        ucx_env.prepare_process.cache_clear()
    assert os.environ["UCX_MODULES"] == "all"
    assert "efa" in caplog.text and "SIGSEGV" in caplog.text


@pytest.mark.nixl
def test_a_nixl_process_holds_one_libnl_and_exits_zero() -> None:
    done = run_child()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "one libnl-route" in done.stdout


@pytest.mark.nixl
@pytest.mark.skipif(
    ctypes.util.find_library("efa") is None,
    reason="no system libefa (ibverbs-providers): the crash of issue 18 has no trigger here",
)
def test_canary_without_the_setting_nixl_still_crashes_at_exit() -> None:
    done = run_child(UCX_MODULES="all")
    assert done.returncode != 0, (
        "NIXL's wheel no longer crashes at exit with UCX's efa module loaded: NIXL fixed issue 18 "
        "upstream, and UCX_MODULES_DEFAULT in fabric/transfer/ucx_env.py may go"
    )
    assert done.returncode == -11, done.stderr[-2000:]
    assert "system libnl-route loaded" in done.stdout
