"""The peers' rows: each runner run with its peer's own python, one subprocess per row.

A peer lives in a virtual environment of its own (``launch/setup_peers.sh``: kvcr pins another
NIXL than ours). This module only finds that python, runs ``<runner>.py`` with
``measure.plan_flags`` under a bound, and turns its last stdout line into a row. A peer that
cannot run gives a row whose figures are None and whose ``error`` says why (no venv, a crash, a
timeout, a failed byte check): never a crash of the benchmark, never a figure it did not
measure. The runner's progress lines (``<system>: ...``) are passed on to stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric.bench.tiers_vs_peers.measure import Plan, plan_flags
from fabric.supervise import child_env

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SETUP_HINT = "run launch/setup_peers.sh"


@dataclass(frozen=True, slots=True)
class Peer:
    """One peer row kind: which runner, under which venv, for which tier."""

    system: str
    tier: str
    runner: str
    venv: str
    """Directory name under the repository root; ``FABRIC_<NAME>_VENV`` overrides it."""

    def python(self) -> Path:
        variable = f"FABRIC_{self.venv.removeprefix('.venv-').upper()}_VENV"
        venv = Path(os.environ.get(variable) or REPO / self.venv)
        return venv / "bin" / "python"


PEERS = {
    "kvcr_host": Peer("kvcr_host", "host", "kvcr_runner.py", ".venv-kvcr"),
    "kvcr_disk": Peer("kvcr_disk", "disk", "kvcr_runner.py", ".venv-kvcr"),
    "lmcache_cpu": Peer("lmcache_cpu", "host", "lmcache_runner.py", ".venv-lmcache"),
}


def peer_row(peer: Peer, plan: Plan, workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``peer``'s runner for ``plan``; its measured figures, or an error row."""
    python = peer.python()
    if not python.exists():
        return error_row(peer.system, peer.tier, plan, f"{python} is missing: {SETUP_HINT}")
    cmd = [str(python), str(HERE / peer.runner), f"--tier={peer.tier}", f"--workdir={workdir}"]
    cmd += plan_flags(plan)
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            cwd=workdir,
            env=child_env(),  # UCX on loopback, and without the module that crashes NIXL at exit
        )
    except subprocess.TimeoutExpired:
        return error_row(peer.system, peer.tier, plan, f"no result in {timeout_s:.0f} s")
    for line in proc.stderr.splitlines():
        if line.startswith(f"{peer.system}: "):
            print(f"tiers-vs-peers: {line}", file=sys.stderr, flush=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        tail = proc.stderr.strip().splitlines()[-6:]
        reason = f"{peer.runner} exited with {proc.returncode}: " + " | ".join(tail)
        row = error_row(peer.system, peer.tier, plan, reason[-1500:])
        if "VerificationFailed" in proc.stderr:
            row["verified"] = False  # a load came back with other bytes
        return row
    try:
        figures: dict[str, Any] = json.loads(lines[-1])
    except json.JSONDecodeError:
        return error_row(peer.system, peer.tier, plan, f"no JSON: {lines[-1][:200]!r}")
    return {"system": peer.system, "tier": peer.tier, **figures}


def error_row(system: str, tier: str, plan: Plan, reason: str) -> dict[str, Any]:
    """A row that measured nothing: its figures None, ``error`` the reason."""
    return {
        "system": system,
        "tier": tier,
        "block_bytes": plan.block_bytes,
        "num_blocks": plan.num_blocks,
        "store_gbps": None,
        "load_gbps": None,
        "latency_us_p50": None,
        "latency_us_p99": None,
        "store_latency_us_p50": None,
        "store_latency_us_p99": None,
        "verified": None,
        "error": reason,
    }
