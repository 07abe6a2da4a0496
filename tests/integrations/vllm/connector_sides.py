"""One vLLM instance's two connector sides without an engine, for the default-run tests:
vLLM-shaped pages (CPU tensors of vLLM-CPU's layout), and stand-ins for vLLM's request and
scheduler output with the attributes the connector reads."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from page_fixtures import BS, GEOMETRY, vllm_kv_caches

from fabric.integrations.vllm.config import ConnectorConfig
from fabric.integrations.vllm.connector import build_scheduler, build_worker
from fabric.integrations.vllm.metadata import FabricMetadata
from fabric.integrations.vllm.scheduler import FabricScheduler
from fabric.integrations.vllm.worker import FabricWorker

PROMPT = list(range(300, 300 + 5 * BS + 1))  # five full blocks and one token
NUM_BLOCKS = 5


class Instance:
    """One vLLM instance's two connector sides over vLLM-shaped pages."""

    def __init__(self, extra: dict[str, Any], seed: int, kv_role: str = "kv_both") -> None:
        config = ConnectorConfig.from_extra(extra, kv_role=kv_role, engine_id=f"e{seed}")
        self.scheduler: FabricScheduler = build_scheduler(config, GEOMETRY)
        self.worker: FabricWorker = build_worker(config, GEOMETRY, self.layer_names())
        if not config.pd_enabled:  # P/D would join etcd
            self.worker.register_kv_caches(vllm_kv_caches(seed))
        self.block_ids: dict[str, list[int]] = {}
        self.scheduler.bind_kv_cache_manager(
            SimpleNamespace(get_block_ids=lambda req_id: (self.block_ids[req_id],))
        )

    @property
    def pages(self) -> Any:
        return self.worker.pages

    @staticmethod
    def layer_names() -> list[str]:
        return [f"layers.{i}.attn" for i in range(GEOMETRY.num_layers)]

    def admit(
        self,
        req_id: str,
        block_ids: list[int],
        *,
        num_local: int = 0,
        params: dict[str, Any] | None = None,
    ) -> tuple[Any, int]:
        """vLLM's admission: the lookup past a local hit of ``num_local`` tokens, then the
        allocation of every block of the prompt; an asynchronous answer only for P/D."""
        request = SimpleNamespace(
            request_id=req_id,
            kv_transfer_params=params,
            num_tokens=len(PROMPT),
            num_prompt_tokens=len(PROMPT),
            all_token_ids=PROMPT,
            prompt_token_ids=PROMPT,
        )
        num_external, asynchronous = self.scheduler.get_num_new_matched_tokens(request, num_local)
        assert asynchronous == (num_external > 0 and params is not None)
        self.block_ids[req_id] = block_ids
        self.scheduler.update_state_after_alloc(request, block_ids, num_external)
        return request, num_external

    def step(self, req_id: str, num_computed: int) -> FabricMetadata:
        """One step computing the rest of the prompt: the worker's loads, forward, saves."""
        meta = self.scheduler.build_connector_meta(self.output(req_id, num_computed))
        self.worker.start_load_kv(meta)
        self.worker.wait_for_save(meta)
        return meta

    @staticmethod
    def output(req_id: str, num_computed: int) -> Any:
        """vLLM's scheduler output of a step computing the rest of ``req_id``'s prompt."""
        return SimpleNamespace(
            num_scheduled_tokens={req_id: len(PROMPT) - num_computed},
            scheduled_new_reqs=[SimpleNamespace(req_id=req_id, num_computed_tokens=num_computed)],
            scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]),
        )

    def close(self) -> None:
        self.worker.shutdown()
        self.scheduler.shutdown()
