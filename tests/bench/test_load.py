"""``python -m fabric.bench load``, fast parts: the flags, vLLM's client arguments, rows and the
summary from canned client JSON, the error path with fake deployments, the stand-in records and
the picture. No process is started; the slow end-to-end run is ``test_load_slow.py``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest

from fabric.bench.__main__ import build_parser
from fabric.bench.load import command
from fabric.bench.load.client import (
    ClientFailed,
    Dataset,
    LoadWorkload,
    client_args,
    parse_slos,
)
from fabric.bench.load.deployments import (
    DEPLOYMENTS,
    NAME_TO_DEPLOYMENT,
    Deployment,
    Setup,
    Target,
    worker_flags,
)
from fabric.bench.load.plot import load_chart
from fabric.bench.load.registrar import stand_in_record
from fabric.bench.load.report import (
    GOALS,
    ROW_KEYS,
    Overhead,
    error_row,
    result_row,
    summarize,
)
from fabric.config import setting_field
from fabric.discovery.records import EngineKind, WorkerRecord
from fabric.discovery.registry import Role
from fabric.errors import ConfigError
from fabric.supervise import ChildFailed

HEADLINE = (
    "pd_goodput_vs_best_agg",
    "pd_itl_p99_vs_best_agg",
    "fabric_pd_goodput_vs_nixl_pd",
    "pd_ttft_overhead_ms",
)


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["load", *argv])


# -- flags and the client's arguments ----------------------------------------------------------


def test_defaults_cover_every_deployment_and_the_issue_workload() -> None:
    args = _parse()
    assert [d.name for d in command.parse_deployments(args.deployments)] == [
        "1p1d",
        "agg_x2",
        "agg_2t",
        "vllm_agg",
        "vllm_fabric_pd",
        "vllm_nixl_pd",  # last: its spinning NIXL threads must not weigh on the others
    ]
    assert command.parse_rates(args.rates) == [2.0, 4.0, 8.0, 12.0]
    workload = command.make_workload(args)
    assert workload.dataset is Dataset.RANDOM and 512 <= workload.input_len <= 4096
    assert dict(workload.slos_ms) == {"ttft": 300.0, "tpot": 15.0}
    assert workload.prefix_len == 0


def test_flags_select_and_order_deployments_rates_and_slos() -> None:
    args = _parse(
        "--deployments",
        "agg_2t, 1p1d",
        "--rates",
        "8,2,2,0.5",
        "--goodput",
        "ttft:500",
        "tpot:20",
        "e2el:4000",
        "--dataset",
        "prefix_repetition",
        "--input-len",
        "2048",
        "--prefix-len",
        "1536",
        "--num-prefixes",
        "3",
    )
    assert [d.name for d in command.parse_deployments(args.deployments)] == ["1p1d", "agg_2t"]
    assert command.parse_rates(args.rates) == [0.5, 2.0, 8.0]
    workload = command.make_workload(args)
    assert dict(workload.slos_ms) == {"ttft": 500.0, "tpot": 20.0, "e2el": 4000.0}
    assert (workload.prefix_len, workload.num_prefixes) == (1536, 3)


@pytest.mark.parametrize(
    "argv",
    [
        ("--deployments", "1p1d,nope"),
        ("--deployments", ""),
        ("--rates", "0,1"),
        ("--rates", "fast"),
        ("--goodput", "itl:5"),
        ("--goodput", "ttft=300"),
        ("--goodput", "ttft:-1"),
        ("--input-len", "4090", "--output-len", "32"),
        ("--num-prompts", "0"),
        ("--dataset", "prefix_repetition", "--input-len", "512", "--prefix-len", "512"),
        ("--slo-attainment", "0"),
    ],
)
def test_bad_flags_are_refused_with_a_config_error(argv: tuple[str, ...]) -> None:
    args = _parse(*argv)
    with pytest.raises(ConfigError):
        command.parse_deployments(args.deployments)
        command.parse_rates(args.rates)
        command.make_workload(args)


def test_parse_slos_reads_vllm_goodput_syntax() -> None:
    assert parse_slos(["ttft:300", "tpot:15.5"]) == {"ttft": 300.0, "tpot": 15.5}
    for bad in ([], ["ttft"], ["ttft:x"], ["tpot:-2"], ["itl:5"]):
        with pytest.raises(ValueError):
            parse_slos(bad)


def _value(args: list[str], flag: str) -> list[str]:
    """The values after ``flag`` up to the next flag."""
    start = args.index(flag) + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    return args[start:end]


def test_client_args_ask_vllm_for_poisson_streaming_goodput_and_a_saved_result() -> None:
    workload = LoadWorkload(Dataset.RANDOM, 1024, 32, 40, {"ttft": 300.0, "tpot": 15.0})
    target = Target("http://127.0.0.1:9", "tiny")
    args = client_args(
        target, Path("/m"), workload, 2.5, seed=7, result_dir=Path("/r"), result_name="x.json"
    )
    assert _value(args, "--base-url") == ["http://127.0.0.1:9"]
    assert _value(args, "--backend") == ["openai"]
    assert _value(args, "--endpoint") == ["/v1/completions"]
    assert (_value(args, "--model"), _value(args, "--tokenizer")) == (["tiny"], ["/m"])
    assert _value(args, "--request-rate") == ["2.5"]
    assert _value(args, "--burstiness") == ["1.0"]  # Poisson
    assert _value(args, "--num-prompts") == ["40"]
    assert _value(args, "--seed") == ["7"]
    assert _value(args, "--ready-check-timeout-sec") == ["0"]  # it would re-send prompt 0
    assert _value(args, "--dataset-name") == ["random"]
    assert _value(args, "--random-input-len") == ["1024"]
    assert _value(args, "--random-output-len") == ["32"]
    assert _value(args, "--goodput") == ["ttft:300", "tpot:15"]
    assert "99" in _value(args, "--metric-percentiles")[0].split(",")
    assert {"--save-result", "--save-detailed", "--ignore-eos"} <= set(args)
    assert "--no-stream" not in args
    assert (_value(args, "--result-dir"), _value(args, "--result-filename")) == (
        ["/r"],
        ["x.json"],
    )

    shared = LoadWorkload(
        Dataset.PREFIX_REPETITION, 2048, 16, 8, {"ttft": 1.0}, prefix_len=1536, num_prefixes=3
    )
    args = client_args(
        target, Path("/m"), shared, 1, seed=0, result_dir=Path("/r"), result_name="y"
    )
    assert _value(args, "--dataset-name") == ["prefix_repetition"]
    assert _value(args, "--prefix-repetition-prefix-len") == ["1536"]
    assert _value(args, "--prefix-repetition-suffix-len") == ["512"]
    assert _value(args, "--prefix-repetition-num-prefixes") == ["3"]
    assert _value(args, "--prefix-repetition-output-len") == ["16"]


def test_every_deployment_has_a_description_and_unique_namespace() -> None:
    assert len({d.namespace for d in DEPLOYMENTS}) == len(DEPLOYMENTS)
    for deployment in DEPLOYMENTS:
        assert deployment.description and deployment.num_workers >= 1
    help_text = build_parser().format_help()
    assert "load" in help_text


def test_aggregated_arms_run_chunked_prefill_and_1p1d_keeps_its_workers_defaults() -> None:
    args = _parse("--max-num-batched-tokens", "512")
    setup = Setup("tiny", Path("/m"), "http://etcd", Path("/r"), Path("/p"), 32, 512)
    flags = {d.name: worker_flags(d, setup) for d in command.parse_deployments("1p1d,agg_x2")}
    flags["agg_2t"] = worker_flags(NAME_TO_DEPLOYMENT["agg_2t"], setup)
    assert flags == {
        "1p1d": (),
        "agg_x2": ("--max-num-batched-tokens", "512"),
        "agg_2t": ("--max-num-batched-tokens", "512"),
    }
    assert args.max_num_batched_tokens == 512
    assert _parse().max_num_batched_tokens == setting_field("max_num_batched_tokens").default > 0
    assert (
        command.describe(command.make_workload(args), [1.0], args)[
            "aggregated_max_num_batched_tokens"
        ]
        == 512
    )


# -- rows from vLLM's saved JSON -----------------------------------------------------------------


def client_json(**over: Any) -> dict[str, Any]:
    """What ``vllm/benchmarks/serve.py`` saves with --save-result --save-detailed (the keys
    ``report`` reads, and a few it does not)."""
    body: dict[str, Any] = {
        "date": "20261207-150000",
        "backend": "openai",
        "num_prompts": 10,
        "request_rate": 4.0,
        "burstiness": 1.0,
        "duration": 2.5,
        "completed": 7,
        "failed": 3,
        "total_input_tokens": 7168,
        "total_output_tokens": 224,
        "request_throughput": 2.8,
        "request_goodput": 2.4,
        "output_throughput": 89.6,
        "max_concurrent_requests": 5,
        "p50_ttft_ms": 50.0,
        "p90_ttft_ms": 80.0,
        "p99_ttft_ms": 120.456,
        "p50_tpot_ms": 3.0,
        "p99_tpot_ms": 5.0,
        "p50_itl_ms": 3.1,
        "p99_itl_ms": 11.0,
        "errors": [
            "",
            "Too Many Requests",
            "Service Unavailable",
            "Traceback (most recent call last):\n  ...\nClientConnectorError",
            "",
            "",
            "",
            "",
            "",
            "",
        ],
    }
    body.update(over)
    return body


def test_a_row_takes_vllm_figures_counts_refusals_and_judges_the_slos() -> None:
    row = result_row("1p1d", 4.0, client_json(), min_attainment=0.5, loadavg_1m=1.5)
    assert tuple(row) == ROW_KEYS
    assert row["deployment"] == "1p1d" and row["rate"] == 4.0
    assert (row["num_prompts"], row["completed"], row["failed"]) == (10, 7, 3)
    assert row["refused"] == 2  # 429 and 503; the connection error is a plain failure
    assert (row["request_throughput"], row["goodput"]) == (2.8, 2.4)
    assert row["slo_attainment"] == 0.6  # 2.4 req/s x 2.5 s = 6 good of 10 sent
    assert row["meets_slo"] is True
    assert (row["ttft_ms_p50"], row["ttft_ms_p99"]) == (50.0, 120.46)
    assert (row["itl_ms_p50"], row["itl_ms_p99"]) == (3.1, 11.0)
    assert (row["tpot_ms_p50"], row["tpot_ms_p99"]) == (3.0, 5.0)
    assert row["loadavg_1m"] == 1.5 and row["error"] is None
    strict = result_row("1p1d", 4.0, client_json(), min_attainment=0.9, loadavg_1m=None)
    assert strict["meets_slo"] is False


def test_an_error_row_has_every_key_and_no_figures() -> None:
    row = error_row("agg_x2", 8.0, "agg_x2-frontend exited with status 1")
    assert tuple(row) == ROW_KEYS
    assert row["error"] == "agg_x2-frontend exited with status 1"
    assert row["goodput"] is None and row["completed"] is None and row["refused"] is None


# -- the summary ---------------------------------------------------------------------------------


def row(name: str, rate: float, goodput: float, itl_p99: float, meets: bool) -> dict[str, Any]:
    out = error_row(name, rate, "")
    out.update(goodput=goodput, itl_ms_p99=itl_p99, meets_slo=meets, error=None)
    return out


def sweep_rows() -> list[dict[str, Any]]:
    """agg_x2 meets the SLOs up to 4 req/s, agg_2t up to 2, 1p1d up to 8."""
    return [
        row("1p1d", 2, 2.0, 10, True),
        row("1p1d", 4, 3.9, 12, True),
        row("1p1d", 8, 7.4, 29, True),
        row("agg_x2", 2, 2.0, 40, True),
        row("agg_x2", 4, 3.6, 50, True),
        row("agg_x2", 8, 5.8, 95, False),
        row("agg_2t", 2, 2.0, 30, True),
        row("agg_2t", 4, 2.0, 60, False),
        row("agg_2t", 8, 1.0, 120, False),
        row("vllm_fabric_pd", 2, 1.8, 30, True),
        row("vllm_fabric_pd", 4, 3.0, 40, False),
        row("vllm_nixl_pd", 2, 1.2, 90, False),
        row("vllm_nixl_pd", 4, 0.0, 200, False),
    ]


def test_summary_compares_pd_with_the_best_aggregated_arm_at_its_highest_slo_rate() -> None:
    overhead = Overhead("small", 2048, (3260.0, 3300.0, 3250.0), (3240.0, 3270.0, 3239.0))
    summary = summarize(sweep_rows(), overhead)
    assert list(summary)[:2] == list(HEADLINE[:2])
    assert (summary["best_agg"], summary["slo_rate"]) == ("agg_x2", 4.0)
    assert summary["pd_goodput_vs_best_agg"] == round(3.9 / 3.6, 3)
    assert summary["pd_itl_p99_vs_best_agg"] == round(12 / 50, 3)
    # peak against peak: 3.0 req/s (at 4 req/s) against 1.2 (at 2 req/s)
    assert summary["fabric_pd_goodput_vs_nixl_pd"] == 2.5
    assert summary["vllm_pd_peak_goodput"] == {
        "vllm_fabric_pd": {"goodput": 3.0, "rate": 4.0},
        "vllm_nixl_pd": {"goodput": 1.2, "rate": 2.0},
    }
    assert summary["pd_ttft_overhead_ms"] == 20.0  # median of 20, 30, 11
    assert summary["pd_slo_capacity_vs_best_agg"] == 2.0  # 8 req/s against 4
    assert summary["pd_goodput_vs_best_agg_at_top_rate"] == round(7.4 / 5.8, 3)
    assert summary["pd_ttft_overhead"]["prompt_tokens"] == 2048
    assert summary["reasons"] == {}
    goals = summary["goals"]
    assert set(goals) == set(GOALS) == set(HEADLINE)
    assert goals["pd_goodput_vs_best_agg"]["met"] is False  # 1.083 < 1.5
    assert goals["pd_itl_p99_vs_best_agg"] == {"at_most": 0.5, "value": 0.24, "met": True}
    assert goals["fabric_pd_goodput_vs_nixl_pd"]["met"] is True
    assert goals["pd_ttft_overhead_ms"]["met"] is False
    json.dumps(summary)  # serialisable


def test_a_tie_on_the_highest_slo_rate_goes_to_the_arm_with_more_goodput() -> None:
    rows = [
        row("agg_x2", 4, 3.5, 50, True),
        row("agg_2t", 4, 3.8, 40, True),
        row("1p1d", 4, 3.9, 20, True),
    ]
    summary = summarize(rows, "not measured: --overhead-probes 0")
    assert (summary["best_agg"], summary["slo_rate"]) == ("agg_2t", 4.0)
    assert summary["pd_itl_p99_vs_best_agg"] == 0.5


def test_summary_keys_are_null_with_a_reason_when_nothing_meets_the_slos() -> None:
    rows = [
        row("1p1d", 8, 5.0, 20, False),
        row("agg_x2", 8, 1.0, 200, False),
        row("agg_2t", 8, 0.0, 300, False),
    ]
    summary = summarize(rows, "not measured: --overhead-probes 0")
    for key in HEADLINE:
        assert summary[key] is None, key
        assert summary["reasons"][key], key
        assert summary["goals"][key]["met"] is None, key
    assert "meets the SLOs" in summary["reasons"]["pd_goodput_vs_best_agg"]
    assert summary["pd_goodput_vs_best_agg_at_top_rate"] == 5.0  # against agg_x2's 1.0


def test_a_nixl_goodput_of_zero_everywhere_is_an_unbounded_ratio_with_both_figures() -> None:
    rows = [
        row("vllm_fabric_pd", 2, 1.9, 30, True),
        row("vllm_fabric_pd", 4, 0.0, 90, False),
        row("vllm_nixl_pd", 2, 0.0, 400, False),
        row("vllm_nixl_pd", 4, 0.0, 900, False),
    ]
    summary = summarize(rows, "not measured: --overhead-probes 0")
    assert summary["fabric_pd_goodput_vs_nixl_pd"] is None
    reason = summary["reasons"]["fabric_pd_goodput_vs_nixl_pd"]
    assert "goodput is 0" in reason and "1.9 req/s (at 2 req/s)" in reason
    assert summary["goals"]["fabric_pd_goodput_vs_nixl_pd"]["met"] is True


def test_a_failed_pd_row_at_the_slo_rate_nulls_the_ratios_with_a_reason() -> None:
    rows = [row("agg_x2", 2, 2.0, 40, True), error_row("1p1d", 2, "1p1d-decode-1 exited")]
    summary = summarize(rows, "not measured: --overhead-probes 0")
    assert summary["pd_goodput_vs_best_agg"] is None
    assert "1p1d has no figures at 2 req/s" in summary["reasons"]["pd_goodput_vs_best_agg"]


# -- the error path ------------------------------------------------------------------------------


Point = tuple[str, float]


class FakeDeployments:
    """Stands in for ``running`` and ``run_client``: deployments named in ``fail_start`` do not
    start; a client at a (deployment, rate) of ``client_fails`` fails, at one of ``dies_at`` the
    deployment dies."""

    def __init__(self, fail_start: set[str], client_fails: set[Point], dies_at: set[Point]):
        self.fail_start, self.client_fails, self.dies_at = fail_start, client_fails, dies_at
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.seeds: list[int] = []

    @contextmanager
    def running(self, deployment: Deployment, setup: Setup) -> Iterator[Target]:
        if deployment.name in self.fail_start:
            raise ChildFailed(f"{deployment.name}-frontend exited with status 1; last lines: x")
        self.started.append(deployment.name)
        try:
            yield Target("http://127.0.0.1:9", setup.preset)
        finally:
            self.stopped.append(deployment.name)

    def run_client(
        self, python: Path, target: Target, workload: Any, rate: float, **kwargs: Any
    ) -> Any:
        point = (self.started[-1], rate)
        self.seeds.append(kwargs["seed"])
        if point in self.client_fails:
            raise ClientFailed("client-x exited with status 1 and no result")
        if point in self.dies_at:
            raise ChildFailed("agg_2t-aggregated-0 was killed by SIGKILL")
        return client_json(failed=0, errors=[""] * 10)


def test_a_failed_deployment_is_error_rows_and_the_others_still_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fakes = FakeDeployments({"1p1d"}, {("agg_x2", 2.0)}, {("agg_2t", 4.0)})
    monkeypatch.setattr(command, "running", fakes.running)
    monkeypatch.setattr(command, "run_client", fakes.run_client)
    warmed: list[str] = []
    monkeypatch.setattr(command, "stream_completion", lambda url, *a, **k: warmed.append(url))
    monkeypatch.setattr(command, "find_vllm_python", lambda explicit: Path("/vllm/python"))
    monkeypatch.setattr(command, "private_etcd", lambda run_dir: nullcontext("http://etcd"))
    monkeypatch.setattr(command, "machine", lambda python, load, run_dir: {"run_dir": str(run_dir)})
    monkeypatch.setattr("fabric.models.presets.ensure_model", lambda preset: tmp_path / preset)
    json_out = tmp_path / "out.json"
    args = _parse(
        "--deployments", "1p1d,agg_x2,agg_2t", "--rates", "1,2,4,8", "--json-out", str(json_out)
    )
    out = command.run(args)

    assert json.loads(json_out.read_text()) == json.loads(json.dumps(out))
    assert fakes.started == fakes.stopped == ["agg_x2", "agg_2t"]
    assert len(warmed) == 2  # one warm-up per deployment that started
    assert fakes.seeds == [0, 1, 2, 3, 0, 1, 2]  # a seed per rate, the same per deployment
    by_key = {(r["deployment"], r["rate"]): r for r in out["rows"]}
    assert len(by_key) == len(out["rows"]) == 12
    for rate in (1.0, 2.0, 4.0, 8.0):  # never started: every rate is an error row
        assert "1p1d-frontend exited" in by_key[("1p1d", rate)]["error"]
    assert by_key[("agg_x2", 1.0)]["error"] is None
    assert "no result" in by_key[("agg_x2", 2.0)]["error"]  # the client failed, the rest ran
    assert by_key[("agg_x2", 8.0)]["error"] is None
    assert "SIGKILL" in by_key[("agg_2t", 4.0)]["error"]  # died: the rates after it too
    assert "SIGKILL" in by_key[("agg_2t", 8.0)]["error"]
    assert by_key[("agg_2t", 2.0)]["error"] is None
    assert all(tuple(r) == ROW_KEYS for r in out["rows"])
    assert out["summary"]["pd_goodput_vs_best_agg"] is None
    assert "1p1d was not run or failed" in out["summary"]["reasons"]["pd_ttft_overhead_ms"]
    # the temporary run directory is gone
    assert not Path(out["machine"]["run_dir"]).exists()


# -- stand-in records and the picture -----------------------------------------------------------


def test_stand_in_records_read_back_as_http_vllm_instances_that_pair() -> None:
    prefill = stand_in_record("prefill-0", Role.PREFILL, "http://127.0.0.1:8100", "tiny")
    decode = stand_in_record("decode-1", Role.DECODE, "http://127.0.0.1:8200", "tiny")
    back = WorkerRecord.from_bytes(prefill.to_bytes(), key="k")
    assert back == prefill
    assert back.layout.engine is EngineKind.VLLM and back.endpoints.http == "http://127.0.0.1:8100"
    assert back.endpoints.signal is None and back.layout.model == "tiny"
    assert prefill.compat_hash == decode.compat_hash
    assert prefill.layout.block_size == decode.layout.block_size


def test_the_chart_draws_one_line_per_deployment_that_has_figures() -> None:
    rows = [*sweep_rows(), error_row("agg_2t", 16, "died")]
    svg = load_chart(rows)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    for name in ("1p1d", "agg_x2", "agg_2t", "vllm_fabric_pd"):
        assert f">{name}<" in svg
    assert svg.count("<polyline") == 2 * 5  # two panels, five deployments


def test_itl_spanning_decades_is_drawn_on_a_log_scale_and_no_figure_is_refused() -> None:
    rows = [row("1p1d", 2, 1.9, 12.0, True), row("vllm_nixl_pd", 2, 0.0, 7728.7, False)]
    svg = load_chart(rows)
    assert "ITL p99 (ms) (log scale)" in svg and "goodput (req/s)<" in svg
    with pytest.raises(ValueError):
        load_chart([error_row("1p1d", 2, "died")])
