"""The figures of ``bench load``: one row per (deployment, rate) from vLLM's saved JSON, and the
summary that compares P/D with the aggregated deployments.

A row (``ROW_KEYS``): ``deployment``, ``rate`` (the requested Poisson rate, req/s),
``num_prompts``, ``completed``, ``failed``, ``refused`` (requests answered 429 or 503: vLLM's
client records the HTTP reason phrase as the request's error), ``request_throughput`` and
``goodput`` (req/s, vLLM's ``request_throughput`` / ``request_goodput``: completed requests, and
those within every SLO, over the run's duration), ``slo_attainment`` (requests within every SLO
over requests sent), ``meets_slo`` (``slo_attainment >= min_attainment``), p50 / p99 of TTFT,
TPOT and ITL in ms, ``output_throughput`` (tokens/s), ``duration_s``,
``max_concurrent_requests``, ``loadavg_1m`` (this host's, as the rate started) and ``error``
(null, or why the row has no figures).

Summary (``summarize``), the headline keys first:

* the *best aggregated arm* is, of the reference engine's aggregated deployments (``agg_x2``,
  ``agg_2t``), the one with the highest rate that meets the SLOs (ties: the higher goodput
  there); that rate is ``slo_rate``;
* ``pd_goodput_vs_best_agg`` / ``pd_itl_p99_vs_best_agg``: ``1p1d``'s goodput / ITL p99 over the
  best aggregated arm's at ``slo_rate``; null with a reason when no aggregated arm meets the SLOs
  at any rate, or ``1p1d`` has no figures there;
* ``fabric_pd_goodput_vs_nixl_pd``: ``vllm_fabric_pd``'s peak goodput over ``vllm_nixl_pd``'s,
  each the highest over the rates both ran (``vllm_pd_peak_goodput``: each one's goodput and
  rate); null, with the fabric's peak in the reason, when the NixlConnector's is 0;
* ``pd_ttft_overhead_ms``: the median of (TTFT - the prefill worker's compute) of sequential
  ``1p1d`` requests (``Overhead``), or null with the reason there are none;
* besides: ``pd_slo_capacity_vs_best_agg`` (the highest SLO-meeting rate of ``1p1d`` over the
  best aggregated arm's: how much more load P/D carries within the SLOs),
  ``pd_goodput_vs_best_agg_at_top_rate`` (at the highest rate of the sweep, against the
  aggregated arm with the most goodput there), ``goals`` (the issue's bounds, each ``met`` true,
  false or null: not measured; an unbounded ``fabric_pd_goodput_vs_nixl_pd``, the fabric's
  goodput above 0 and the NixlConnector's 0, is met) and ``reasons`` (why a key is null).

Invariants: figures are only ever measured ones; a ratio whose base is 0 or missing is null with
a reason; nothing here reads the client's text or the clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

ROW_KEYS = (
    "deployment",
    "rate",
    "num_prompts",
    "completed",
    "failed",
    "refused",
    "request_throughput",
    "goodput",
    "slo_attainment",
    "meets_slo",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "tpot_ms_p99",
    "itl_ms_p50",
    "itl_ms_p99",
    "output_throughput",
    "duration_s",
    "max_concurrent_requests",
    "loadavg_1m",
    "error",
)
REFUSED_REASONS = frozenset(
    {HTTPStatus.TOO_MANY_REQUESTS.phrase, HTTPStatus.SERVICE_UNAVAILABLE.phrase}
)
"""What vLLM's client stores as the error of a request answered 429 or 503 (the reason phrase)."""
PD = "1p1d"
AGGREGATED = ("agg_x2", "agg_2t")
FABRIC_VLLM_PD = "vllm_fabric_pd"
NIXL_VLLM_PD = "vllm_nixl_pd"
GOALS: dict[str, tuple[str, float]] = {
    "pd_goodput_vs_best_agg": ("at_least", 1.5),
    "pd_itl_p99_vs_best_agg": ("at_most", 0.5),
    "fabric_pd_goodput_vs_nixl_pd": ("at_least", 2.0),
    "pd_ttft_overhead_ms": ("at_most", 5.0),
}
"""Issue 14's bounds on the headline keys."""
_PERCENTILE_KEYS = {
    "ttft_ms_p50": "p50_ttft_ms",
    "ttft_ms_p99": "p99_ttft_ms",
    "tpot_ms_p50": "p50_tpot_ms",
    "tpot_ms_p99": "p99_tpot_ms",
    "itl_ms_p50": "p50_itl_ms",
    "itl_ms_p99": "p99_itl_ms",
}
"""Row key -> the key vLLM's saved JSON holds it under (``--metric-percentiles 50,90,99``)."""


@dataclass(frozen=True, slots=True)
class Overhead:
    """Sequential ``1p1d`` probes, per request: client TTFT, the prefill worker's compute, the
    decode's whole KV read (``kv_transfer_ms``: of a layer-wise handoff from its first READ to
    its last, overlapping the compute) and the part of it after the prefill finished
    (``kv_wait_ms``: what TTFT waited for)."""

    preset: str
    prompt_tokens: int
    ttft_ms: tuple[float, ...]
    prefill_ms: tuple[float, ...]
    kv_transfer_ms: tuple[float, ...] = ()
    kv_wait_ms: tuple[float, ...] = ()


def _round(value: Any, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def result_row(
    deployment: str,
    rate: float,
    result: Mapping[str, Any],
    *,
    min_attainment: float,
    loadavg_1m: float | None,
) -> dict[str, Any]:
    """One row from the JSON vLLM's client saved (``--save-result --save-detailed``)."""
    num_prompts = int(result["num_prompts"])
    errors = [str(e) for e in result.get("errors") or [] if e]
    goodput = result.get("request_goodput")
    duration = float(result["duration"])
    good = round(float(goodput) * duration) if goodput is not None else 0
    attainment = good / num_prompts if num_prompts else 0.0
    row: dict[str, Any] = {
        "deployment": deployment,
        "rate": rate,
        "num_prompts": num_prompts,
        "completed": int(result["completed"]),
        "failed": int(result.get("failed", num_prompts - int(result["completed"]))),
        "refused": sum(1 for e in errors if e.strip() in REFUSED_REASONS),
        "request_throughput": _round(result["request_throughput"]),
        "goodput": _round(goodput),
        "slo_attainment": round(attainment, 3),
        "meets_slo": attainment >= min_attainment,
    }
    for key, source in _PERCENTILE_KEYS.items():
        row[key] = _round(result.get(source), 2)
    row["output_throughput"] = _round(result.get("output_throughput"), 1)
    row["duration_s"] = _round(duration, 2)
    row["max_concurrent_requests"] = result.get("max_concurrent_requests")
    row["loadavg_1m"] = loadavg_1m
    row["error"] = None
    return row


def error_row(
    deployment: str, rate: float, error: str, *, loadavg_1m: float | None = None
) -> dict[str, Any]:
    """A row without figures: ``error`` says why."""
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(deployment=deployment, rate=rate, loadavg_1m=loadavg_1m, error=error)
    return row


def _ok(row: Mapping[str, Any] | None) -> bool:
    return row is not None and row["error"] is None


def _ratio(value: Any, base: Any) -> float | None:
    if value is None or not base:
        return None
    return round(float(value) / float(base), 3)


def best_aggregated(
    by_key: Mapping[tuple[str, float], Mapping[str, Any]],
) -> tuple[str, float] | None:
    """(deployment, rate): the aggregated arm with the highest SLO-meeting rate, or None."""
    candidates = [
        (rate, row["goodput"] or 0.0, name)
        for (name, rate), row in by_key.items()
        if name in AGGREGATED and _ok(row) and row["meets_slo"]
    ]
    if not candidates:
        return None
    rate, _, name = max(candidates)
    return name, rate


def _highest_slo_rate(by_key: Mapping[tuple[str, float], Mapping[str, Any]], name: str) -> Any:
    rates = [r for (n, r), row in by_key.items() if n == name and _ok(row) and row["meets_slo"]]
    return max(rates) if rates else None


def summarize(rows: Sequence[Mapping[str, Any]], overhead: Overhead | str) -> dict[str, Any]:
    """The summary object (module docstring) of ``rows``.

    Args:
        overhead: the ``1p1d`` probes, or why there are none.
    """
    by_key = {(str(row["deployment"]), float(row["rate"])): row for row in rows}
    names = {name for name, _ in by_key}
    out: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    best = best_aggregated(by_key)
    pd_keys = ("pd_goodput_vs_best_agg", "pd_itl_p99_vs_best_agg")
    if best is None:
        ran = [n for n in AGGREGATED if n in names]
        why = (
            f"no aggregated arm ({', '.join(ran)}) meets the SLOs at any rate"
            if ran
            else f"no aggregated arm ({', '.join(AGGREGATED)}) was run"
        )
        out.update(dict.fromkeys(pd_keys), best_agg=None, slo_rate=None)
        reasons.update(dict.fromkeys(pd_keys, why))
    else:
        name, rate = best
        agg, pd = by_key[best], by_key.get((PD, rate))
        out["pd_goodput_vs_best_agg"] = _ratio(pd and pd["goodput"], agg["goodput"])
        out["pd_itl_p99_vs_best_agg"] = _ratio(pd and pd["itl_ms_p99"], agg["itl_ms_p99"])
        out["best_agg"], out["slo_rate"] = name, rate
        for key in pd_keys:
            if out[key] is None:
                reasons[key] = (
                    f"{PD} has no figures at {rate:g} req/s"
                    if not _ok(pd)
                    else f"{name}'s figure at {rate:g} req/s is 0"
                )
    out["fabric_pd_goodput_vs_nixl_pd"], out["vllm_pd_peak_goodput"] = _vllm_pd(by_key, reasons)
    out["pd_ttft_overhead_ms"] = _overhead(overhead, reasons)
    out["pd_slo_capacity_vs_best_agg"] = _capacity(by_key, best, reasons)
    out["pd_goodput_vs_best_agg_at_top_rate"] = _top_rate(by_key, reasons)
    if isinstance(overhead, Overhead):
        out["pd_ttft_overhead"] = {
            "preset": overhead.preset,
            "prompt_tokens": overhead.prompt_tokens,
            "ttft_ms": [round(t, 2) for t in overhead.ttft_ms],
            "prefill_ms": [round(p, 2) for p in overhead.prefill_ms],
            "kv_transfer_ms": [round(k, 2) for k in overhead.kv_transfer_ms],
            "kv_wait_ms": [round(k, 2) for k in overhead.kv_wait_ms],
        }
    out["goals"] = {
        key: {bound: value, "value": out[key], "met": _met(out[key], bound, value)}
        for key, (bound, value) in GOALS.items()
    }
    peaks = out["vllm_pd_peak_goodput"]
    if peaks and peaks[FABRIC_VLLM_PD]["goodput"] and not peaks[NIXL_VLLM_PD]["goodput"]:
        out["goals"]["fabric_pd_goodput_vs_nixl_pd"]["met"] = True  # unbounded: above any bound
    out["reasons"] = reasons
    return out


def _met(value: float | None, bound: str, limit: float) -> bool | None:
    if value is None:
        return None
    return value >= limit if bound == "at_least" else value <= limit


def _vllm_pd(
    by_key: Mapping[tuple[str, float], Mapping[str, Any]], reasons: dict[str, str]
) -> tuple[float | None, dict[str, Any]]:
    key = "fabric_pd_goodput_vs_nixl_pd"
    common = [
        rate
        for (name, rate), row in by_key.items()
        if name == NIXL_VLLM_PD and _ok(row) and _ok(by_key.get((FABRIC_VLLM_PD, rate)))
    ]
    if not common:
        reasons[key] = f"no rate where both {FABRIC_VLLM_PD} and {NIXL_VLLM_PD} have figures"
        return None, {}
    peaks = {}
    for name in (FABRIC_VLLM_PD, NIXL_VLLM_PD):
        goodput, rate = max((by_key[(name, r)]["goodput"] or 0.0, r) for r in common)
        peaks[name] = {"goodput": goodput, "rate": rate}
    fabric, nixl = peaks[FABRIC_VLLM_PD]["goodput"], peaks[NIXL_VLLM_PD]["goodput"]
    if not nixl:
        reasons[key] = (
            f"{NIXL_VLLM_PD}'s goodput is 0 at every rate both ran; {FABRIC_VLLM_PD}'s peak is "
            f"{fabric} req/s (at {peaks[FABRIC_VLLM_PD]['rate']:g} req/s): the ratio is unbounded"
        )
        return None, peaks
    return _ratio(fabric, nixl), peaks


def _overhead(overhead: Overhead | str, reasons: dict[str, str]) -> float | None:
    if isinstance(overhead, str):
        reasons["pd_ttft_overhead_ms"] = overhead
        return None
    diffs = [t - p for t, p in zip(overhead.ttft_ms, overhead.prefill_ms, strict=True)]
    return round(_median(diffs), 2)


def _capacity(
    by_key: Mapping[tuple[str, float], Mapping[str, Any]],
    best: tuple[str, float] | None,
    reasons: dict[str, str],
) -> float | None:
    key = "pd_slo_capacity_vs_best_agg"
    pd_rate = _highest_slo_rate(by_key, PD)
    if best is None or pd_rate is None:
        reasons[key] = f"{'no aggregated arm' if best is None else PD} meets the SLOs at no rate"
        return None
    return _ratio(pd_rate, best[1])


def _top_rate(
    by_key: Mapping[tuple[str, float], Mapping[str, Any]], reasons: dict[str, str]
) -> float | None:
    key = "pd_goodput_vs_best_agg_at_top_rate"
    rates = [rate for (name, rate) in by_key if name == PD]
    top = max(rates) if rates else None
    aggs = [
        by_key[(name, top)]["goodput"] or 0.0
        for name in AGGREGATED
        if top is not None and _ok(by_key.get((name, top)))
    ]
    pd = by_key.get((PD, top)) if top is not None else None
    if not _ok(pd) or not aggs or not max(aggs):
        reasons[key] = f"{PD} or every aggregated arm has no goodput at the highest rate"
        return None
    return _ratio(pd["goodput"] if pd else None, max(aggs))
