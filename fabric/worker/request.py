"""One generation request on a worker: its record, its stats, its checks, its prompt compute.

A ``WorkerRequest`` is created from a ``GenerateRequest`` and lives on the scheduler thread only::

    WAITING ──admit: blocks reserved──▶ REMOTE_PREFILL ──BlocksReady, read──▶ DECODING ──▶ end
       │                                       │ prefill failed: recompute   ▲
       │                                       ▼ (or end with an error)      │
       └──admit: blocks reserved──────────▶ PREFILLING ──prompt computed here┘
                                              (chunk by chunk, one per step)

Any phase can end early (abort, deadline, disconnect, error); ending releases the blocks.
While PREFILLING, ``seq.num_computed`` counts the prompt positions whose K/V is written (the
cached prefix, then each chunk as its step ends).

Sampling is greedy (the reference engine is deterministic, so disaggregated output equals
aggregated output token for token); of ``sampling`` only ``ignore_eos`` (bool) is read. The EOS
token, when generated, is streamed and ends the request with "stop".

``stats.kv_trace`` says where each range of the prompt's K/V came from (``fabric.signal.kv_trace``):
the cached prefix by tier (``trace_cached``, from the blocks ``SequenceBlocks.open`` found), then
the node cache, the prefill or peer worker's blocks read over NIXL, or this worker's compute;
it is rebuilt when a fallback recomputes the prompt, so it always describes the KV used.

Invariants: ``seq`` is None exactly while WAITING; a request that leaves the scheduler has
released ``seq`` (every block it matched or reserved). ``next_token`` is the last sampled token,
streamed already but not yet fed to the model (its K/V is written by the next decode step).
Blocks for the whole request (prompt + ``max_tokens - 1`` fed tokens) are reserved at admission,
so a request never runs out of blocks mid-stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from fabric.engine import Engine, greedy
from fabric.kvbm import SequenceBlocks, Tier
from fabric.models.config import ModelConfig
from fabric.signal.framing import PeerId, wall_ms
from fabric.signal.kv_trace import KvSource, KvTrace
from fabric.signal.messages import (
    LAYERWISE_OPTION,
    GenerateRequest,
    PrefillRequest,
    TokenChunk,
)

StatValue = float | int | str | bool
TIER_TO_SOURCE = {
    Tier.DEVICE: KvSource.DEVICE,
    Tier.HOST: KvSource.HOST,
    Tier.DISK: KvSource.DISK,
    Tier.SHARED: KvSource.G4,
    Tier.NODE: KvSource.NODE,
}


class Phase(Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    REMOTE_PREFILL = "remote_prefill"
    DECODING = "decoding"


class FinishReason(Enum):
    """The ``finish_reason`` of a final ``TokenChunk`` (the one finish reason on the wire)."""

    LENGTH = "length"
    STOP = "stop"
    ERROR = "error"


@dataclass(slots=True)
class RequestStats:
    """What the last chunk reports (times in ms, measured on this worker unless noted)."""

    cached_tokens: int = 0
    """Prompt positions whose K/V came from a cache (computed by no one for this request)."""
    computed_tokens: int = 0
    """Prompt positions this request computed, here or on its prefill worker."""
    local_prefix_tokens: int = 0
    """Prompt positions this worker already held (never read from the prefill worker)."""
    transferred_blocks: int = 0
    kv_transfer_ms: float = 0.0
    """Reading the prompt's KV from another worker, the whole read: a whole offer's read, or a
    layer-wise handoff's from its first READ posted to its last completed (the prefill's compute
    overlaps it). What transfer bandwidth divides by."""
    kv_wait_ms: float = 0.0
    """The part of the read TTFT waited for: after the prefill's ``BlocksReady`` came (equal to
    ``kv_transfer_ms`` for a whole offer; of a layer-wise handoff, what was left to read)."""
    kv_early_reads: int = 0
    """READs of a layer-wise handoff posted while the prefill still computed (0: none, e.g. a
    whole-prompt handoff)."""
    prefill_ms: float = 0.0
    """Prompt compute time, here (from the step of its first chunk to the end of the step of
    its last: steps shared with decodes and other prompts included) or as the prefill worker
    reported it."""
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    prefill_worker: str = ""
    """The worker that computed the prompt; empty when this worker did."""
    fallback: str = ""
    """Why the prompt was recomputed here after the prefill worker failed (empty: it did not)."""
    onboard_ms: float = 0.0
    """Matching the prompt's cached prefix over the tiers and onboarding it to the device."""
    kv_trace: KvTrace = field(default_factory=KvTrace)
    """Where each prompt range's K/V came from (``trace_cached``, then the generation service)."""

    def record_offer(
        self,
        prefill_stats: Mapping[str, StatValue],
        prefill_worker: str,
        prompt_tokens: int,
        transferred_blocks: int,
    ) -> None:
        """An offer read from ``prefill_worker``, with the stats it reported."""
        computed = prefill_stats.get("computed_tokens", 0)
        self.computed_tokens = computed if isinstance(computed, int) else 0
        self.cached_tokens = prompt_tokens - self.computed_tokens
        prefill_ms = prefill_stats.get("prefill_ms", 0.0)
        self.prefill_ms = float(prefill_ms) if isinstance(prefill_ms, int | float) else 0.0
        self.prefill_worker = prefill_worker
        self.transferred_blocks = transferred_blocks

    def as_dict(self, prompt_tokens: int, completion_tokens: int) -> dict[str, StatValue]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cached_tokens": self.cached_tokens,
            "computed_tokens": self.computed_tokens,
            "local_prefix_tokens": self.local_prefix_tokens,
            "transferred_blocks": self.transferred_blocks,
            "kv_transfer_ms": round(self.kv_transfer_ms, 3),
            "kv_wait_ms": round(self.kv_wait_ms, 3),
            "kv_early_reads": self.kv_early_reads,
            "prefill_ms": round(self.prefill_ms, 3),
            "queue_ms": round(self.queue_ms, 3),
            "ttft_ms": round(self.ttft_ms, 3),
            "prefill_worker": self.prefill_worker,
            "fallback": self.fallback,
            "onboard_ms": round(self.onboard_ms, 3),
            "kv_trace": self.kv_trace.encode(),
        }


@dataclass(slots=True)
class WorkerRequest:
    """A request being served (see the module docstring for its phases)."""

    request: GenerateRequest
    peer: PeerId
    stop_token: int | None
    arrived_at: float
    """``time.perf_counter()`` when the signal thread received it."""
    phase: Phase = Phase.WAITING
    seq: SequenceBlocks | None = None
    next_token: int = 0
    num_generated: int = 0
    prefill_began: float | None = None
    """``time.perf_counter()`` when the step computing its prompt's first chunk here began."""
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt(self) -> list[int]:
        return self.request.token_ids

    def trace_cached(self) -> KvTrace:
        """Start the request's KV trace afresh with its cached prefix, tier by tier (the
        blocks ``SequenceBlocks.open`` found); the caller adds what follows."""
        assert self.seq is not None
        trace = self.stats.kv_trace = KvTrace()
        end = 0
        for tier, num_blocks in self.seq.cached_sources:
            end += num_blocks * self.seq.block_size
            trace.add(TIER_TO_SOURCE[tier], end)
        return trace

    def expired(self, now_ms: int) -> bool:
        """Past the request's deadline (``deadline_ms`` 0 means none)."""
        return 0 < self.request.deadline_ms <= now_ms

    def prefill_request(self, decode_worker: str, *, layerwise: bool) -> PrefillRequest:
        """What to ask the prefill worker; ``layerwise``: this decode takes the KV layer by
        layer (``LAYERWISE_OPTION``, set or removed whatever the client's sampling map held)."""
        r = self.request
        sampling = {k: v for k, v in r.sampling.items() if k != LAYERWISE_OPTION}
        if layerwise:
            sampling[LAYERWISE_OPTION] = True
        return PrefillRequest(
            r.request_id, r.token_ids, r.max_tokens, decode_worker, sampling, r.deadline_ms
        )

    def chunk(self, tokens: list[int], finish: FinishReason | None) -> TokenChunk:
        """The next chunk; the first and the last carry the stats."""
        with_stats = finish is not None or self.num_generated == len(tokens)
        stats = self.stats.as_dict(len(self.prompt), self.num_generated) if with_stats else {}
        reason = "" if finish is None else finish.value
        return TokenChunk(self.request_id, tokens, finish is not None, reason, stats)

    def error_chunk(self, message: str) -> TokenChunk:
        stats = self.stats.as_dict(len(self.prompt), self.num_generated)
        return TokenChunk(
            self.request_id, [], True, FinishReason.ERROR.value, {**stats, "error": message}
        )


def error_chunk(request_id: str, message: str) -> TokenChunk:
    """A final chunk refusing a request that never became a ``WorkerRequest``."""
    return TokenChunk(request_id, [], True, FinishReason.ERROR.value, {"error": message})


def check_prompt(token_ids: list[int], config: ModelConfig, extra_positions: int = 0) -> str | None:
    """Why the model cannot take this prompt (plus ``extra_positions`` fed tokens), or None."""
    if not token_ids:
        return "the prompt is empty; send at least one token"
    if max(token_ids) >= config.vocab_size:
        return (
            f"token id {max(token_ids)} is outside the model's vocabulary "
            f"(0..{config.vocab_size - 1})"
        )
    positions = len(token_ids) + extra_positions
    if positions > config.max_position_embeddings:
        return (
            f"prompt ({len(token_ids)} tokens) + max_tokens needs {positions} positions; the "
            f"model has {config.max_position_embeddings}"
        )
    return None


def check_fits(num_positions: int, block_size: int, num_blocks: int) -> str | None:
    """Why ``num_positions`` can never fit a device pool of ``num_blocks``, or None.

    Checked before admission: a request larger than the pool would otherwise wait forever
    (its own cached prefix can hold the blocks it lacks).
    """
    needed = -(-num_positions // block_size)
    if needed <= num_blocks:
        return None
    return (
        f"the request does not fit this worker: it needs {needed} blocks of {block_size} tokens, "
        f"the device pool holds {num_blocks}; shorten it or use a worker with more device blocks"
    )


def new_worker_request(
    request: GenerateRequest,
    peer: PeerId,
    arrived_at: float,
    config: ModelConfig,
    *,
    block_size: int,
    num_blocks: int,
) -> WorkerRequest | str:
    """A ``WorkerRequest`` for ``request``, or why it is refused (never servable here, or late)."""
    problem = check_prompt(request.token_ids, config, request.max_tokens - 1) or check_fits(
        len(request.token_ids) + request.max_tokens - 1, block_size, num_blocks
    )
    if problem is not None:
        return problem
    if 0 < request.deadline_ms <= wall_ms():
        return "the request's deadline passed before it reached the worker"
    stop = None if request.sampling.get("ignore_eos") is True else config.eos_token_id
    return WorkerRequest(request, peer, stop, arrived_at)


def compute_prompt(
    engine: Engine, seq: SequenceBlocks, on_layer: Callable[[int], None] | None = None
) -> tuple[int, int, float]:
    """Compute the prompt positions ``seq`` lacks, register its full blocks, sample greedily;
    ``on_layer`` sees each layer written (``Engine.step``).

    Returns:
        (first token, positions computed, milliseconds).
    """
    start = time.perf_counter()
    num_computed = len(seq.tokens) - seq.num_computed
    logits = engine.prefill(seq.tokens, seq.block_table, seq.num_computed, on_layer=on_layer)
    seq.commit()
    (token,) = greedy(logits)
    return token, num_computed, (time.perf_counter() - start) * 1000
