"""Serving under load: P/D against aggregated deployments, with vLLM's own benchmark client.

Each deployment of ``deployments.DEPLOYMENTS`` is started on this host the way its users start
it (the reference engine's as ``fabric launch`` does: ``1p1d``, ``agg_x2``, ``agg_2t``; vLLM-CPU
servers: ``vllm_fabric_pd``, ``vllm_nixl_pd``, ``vllm_agg``), one at a time, and driven at each
request rate of ``--rates`` by vLLM's serving benchmark client (``vllm.benchmarks.serve``, run
from the vLLM environment): Poisson arrivals, ``--num-prompts`` streamed completions of random
prompts (or vLLM's shared-prefix set), goodput under ``--goodput`` SLOs. Figures are read from
the JSON the client saves (``--save-result``), never from its text.

Printed: one JSON object with ``rows`` (one per deployment and rate: ``deployment``, ``rate``,
``request_throughput``, ``goodput``, ``ttft_ms_p50``, ``ttft_ms_p99``, ``itl_ms_p50``,
``itl_ms_p99``, ``refused`` (answered 429/503) and more, ``report.ROW_KEYS``; a deployment that
failed has rows with an ``error`` and null figures), ``summary`` (``pd_goodput_vs_best_agg``,
``pd_itl_p99_vs_best_agg``, ``fabric_pd_goodput_vs_nixl_pd``, ``pd_ttft_overhead_ms``, each
null with a reason under ``reasons`` when it cannot be measured, and the goals of issue 14),
``workload``, ``deployments`` and ``machine`` (load average before, after and the highest seen
as a rate started). ``report`` defines every figure. Progress goes to stderr.

Invariants: deployments never run two at once; every process started (servers, workers,
frontends, clients, etcd) is stopped and the temporary run directory removed on return, error,
Ctrl-C or SIGTERM; every wait is bounded. This package runs in the main environment and
imports no vLLM.

Modules: ``deployments`` (the table, starting and stopping one), ``registrar`` (etcd records
for vLLM servers that do not register themselves), ``client`` (vLLM's client at one rate),
``report`` (rows and summary), ``plot`` (the SVG), ``command`` (flags and the sweep).
"""

from fabric.bench.load.command import add_arguments, run

__all__ = ["add_arguments", "run"]
