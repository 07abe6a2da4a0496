"""Engine: the reference Llama engine whose KV cache is the KVBM device pool.

A worker owns one ``Engine`` and one ``KvBlockManager``; the engine computes, the manager decides
which blocks a request uses. The entry points:

* ``step(decodes, chunks)``: one forward call over decodes (one new token each, continuous
  batching) and prefill chunks (``PrefillChunk``: positions ``start ..`` of one sequence, over
  the K/V of positions ``< start`` already in its blocks) together; this is what a scheduler
  with a per-step token budget runs (chunked prefill: a long prompt over several steps, its
  chunks beside the running decodes). Returns one logits row per decode, then one per chunk
  (its last position's).
* ``prefill(tokens, block_table, num_computed)``: one sequence; computes positions
  ``>= num_computed`` and reuses the K/V already in the table's blocks for the rest (a prefix hit
  skips its compute). Returns the last position's logits. A ``step`` of one chunk.
* ``decode_step(batch)``: one new token for each of several sequences, each with its own block
  table and position. Returns ``(B, vocab)`` logits. A ``step`` of decodes only.
* ``generate(prompt, max_tokens)``: greedy generation of one request through
  ``SequenceBlocks`` (match, reserve, register full blocks, release). A full device pool is the
  value ``EngineFinish.NO_BLOCKS``, not an exception.

Invariants: the engine checks at construction that the pool's geometry (layers, KV heads, head
size, dtype, K/V split) is the model's, and raises ``LayoutMismatch`` naming the difference;
``stats`` counts every position computed (prefill and decode), which is how tests see prefix hits
skip compute. Not thread-safe: one owner thread, like the manager.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Tokenizer

from fabric.engine.model import LlamaModel
from fabric.engine.paged import PagedBatch, PagedKv, decode_batch, pack, prefill_batch
from fabric.engine.weights import load_weights
from fabric.errors import InvalidInput, LayoutMismatch
from fabric.kvbm import ImmutableBlocks, KvBlockManager, SequenceBlocks, TensorStorage, Tier
from fabric.models.config import ModelConfig

logger = logging.getLogger(__name__)


class DecodeRequest(NamedTuple):
    """One sequence's decode input: ``token`` goes at ``position`` (its K/V is written there)."""

    token: int
    block_table: Sequence[int]
    position: int


class PrefillChunk(NamedTuple):
    """Prompt tokens at positions ``start .. start + len(tokens) - 1`` of one sequence.

    ``block_table`` must cover the chunk's last position and hold the K/V of positions
    ``0 .. start - 1`` (a cached prefix, earlier chunks); the chunk's K/V is written after them.
    """

    tokens: Sequence[int]
    block_table: Sequence[int]
    start: int


class EngineFinish(Enum):
    """Why ``generate`` stopped (not the wire's ``finish_reason``: see ``worker.request``)."""

    LENGTH = "length"
    NO_BLOCKS = "no_blocks"
    """The device pool had no room for the request now; nothing was generated."""


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """What ``generate`` produced and how much of the prompt came from the cache."""

    tokens: list[int]
    finish: EngineFinish
    num_cached_tokens: int
    num_computed_tokens: int
    """Positions computed by this request's prefill (prompt length minus the cached prefix)."""


@dataclass(slots=True)
class EngineStats:
    """Lifetime counters (positions, not calls, except the ``*_calls`` fields)."""

    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_prefill_calls: int = 0
    """Prefill chunks computed (a whole prompt is one chunk)."""
    num_decode_calls: int = 0
    """Steps that decoded at least one sequence."""
    num_steps: int = 0
    """Forward calls; a step mixing decodes and chunks is one."""


def greedy(logits: torch.Tensor) -> list[int]:
    """The argmax token of each row of ``logits`` (``(vocab,)`` or ``(B, vocab)``)."""
    return logits.reshape(-1, logits.shape[-1]).argmax(dim=-1).tolist()


class Engine:
    """A Llama model over the device pool of ``kvbm``.

    Args:
        model_dir: a Hugging Face-style directory (config.json, model.safetensors,
            tokenizer.json optional); nothing is downloaded.
        kvbm: the worker's block manager; its device pool must have the model's KV geometry
            (build it with ``ModelConfig.from_dir(model_dir).kv_geometry()``).
        device: where to compute; defaults to (and must equal) the device pool's device.
    """

    def __init__(
        self,
        model_dir: str | Path,
        kvbm: KvBlockManager,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.config = ModelConfig.from_dir(self.model_dir)
        self.kvbm = kvbm
        storage = kvbm.storage(Tier.DEVICE)
        if not isinstance(storage, TensorStorage):
            raise LayoutMismatch(f"the device tier is a {type(storage).__name__}, not tensors")
        layout = storage.layout
        wanted = self.config.kv_geometry().layout(layout.kind, layout.num_blocks, layout.block_size)
        diff = layout.geometry_diff(wanted)
        if diff:
            raise LayoutMismatch(
                f"the device pool's KV geometry differs from {self.model_dir}'s: "
                + ", ".join(
                    f"{k} is {mine}, the model needs {model}" for k, (mine, model) in diff.items()
                )
                + "; build the manager with ModelConfig.kv_geometry()"
            )
        pool_device = storage.tensors[0].device
        if device is not None and torch.device(device) != pool_device:
            raise InvalidInput(f"device={device} but the device pool lives on {pool_device}")
        self.device = pool_device
        self.kv = PagedKv(storage)
        self.model = LlamaModel(
            self.config, load_weights(self.model_dir, self.config, pool_device), pool_device
        )
        tokenizer_path = self.model_dir / "tokenizer.json"
        self.tokenizer = (
            Tokenizer.from_file(str(tokenizer_path)) if tokenizer_path.is_file() else None
        )
        self.stats = EngineStats()
        self.on_registered: Callable[[ImmutableBlocks], None] | None = None
        """Called with every device block handle a request registers (a worker sets its offload
        manager's ``on_registered`` here); ``SequenceBlocks.open`` callers pass it on."""
        logger.info(
            "engine: %s, %d layers, hidden %d, %d blocks of %d tokens on %s",
            self.model_dir,
            self.config.num_layers,
            self.config.hidden_size,
            layout.num_blocks,
            layout.block_size,
            pool_device,
        )

    def step(
        self,
        decodes: Sequence[DecodeRequest],
        chunks: Sequence[PrefillChunk] = (),
        *,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """One forward call over ``decodes`` and prefill ``chunks`` (see the module docstring).

        Args:
            on_layer: called with each layer's index as soon as that layer's K/V of every new
                token is in the pool (``LlamaModel.forward``): a layer-wise handoff's signal.

        Returns:
            ``(len(decodes) + len(chunks), vocab)`` logits: each decode's, then the last
            position's of each chunk.
        """
        if not decodes and not chunks:
            raise InvalidInput("a step needs at least one decode or prefill chunk")
        ends = [r.position + 1 for r in decodes] + [c.start + len(c.tokens) for c in chunks]
        self._check_positions(max(ends) - 1)
        parts: list[PagedBatch] = []
        tokens: list[int] = []
        if decodes:
            positions = [r.position for r in decodes]
            parts.append(decode_batch(self.kv, [r.block_table for r in decodes], positions))
            tokens += [r.token for r in decodes]
        for chunk in chunks:
            end = chunk.start + len(chunk.tokens)
            parts.append(prefill_batch(self.kv, chunk.block_table, chunk.start, end))
            tokens += chunk.tokens
        logits = self.model.forward(self._token_tensor(tokens), pack(parts), self.kv, on_layer)
        stats = self.stats
        stats.num_steps += 1
        stats.num_decode_tokens += len(decodes)
        stats.num_decode_calls += 1 if decodes else 0
        stats.num_prefill_tokens += len(tokens) - len(decodes)
        stats.num_prefill_calls += len(chunks)
        return logits

    def prefill(
        self,
        tokens: Sequence[int],
        block_table: Sequence[int],
        num_computed: int,
        *,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Compute positions ``num_computed ..`` of ``tokens``; return the last one's logits.

        Args:
            tokens: the whole sequence so far (prefix included).
            block_table: the sequence's device blocks in order, covering ``len(tokens)`` tokens;
                blocks before ``num_computed`` must already hold that prefix's K/V.
            num_computed: positions whose K/V is already in the blocks (0 .. len(tokens) - 1).
            on_layer: as ``step``'s.

        Returns:
            ``(vocab,)`` logits of position ``len(tokens) - 1``.
        """
        if not 0 <= num_computed < len(tokens):
            raise InvalidInput(
                f"num_computed={num_computed} must be in 0..{len(tokens) - 1} for "
                f"{len(tokens)} tokens"
            )
        chunk = PrefillChunk(tokens[num_computed:], block_table, num_computed)
        return self.step((), (chunk,), on_layer=on_layer)[0]

    def decode_step(
        self, batch: Sequence[DecodeRequest | tuple[int, Sequence[int], int]]
    ) -> torch.Tensor:
        """One token for each sequence of ``batch``; returns ``(len(batch), vocab)`` logits.

        Each entry's ``block_table`` must cover ``position`` and hold the K/V of positions
        ``0 .. position - 1``; the token's K/V is written at ``position``.
        """
        if not batch:
            raise InvalidInput("decode_step needs at least one sequence")
        return self.step([DecodeRequest(*entry) for entry in batch])

    def generate(self, prompt_tokens: Sequence[int], max_tokens: int) -> EngineOutput:
        """Greedy-generate ``max_tokens`` tokens, reusing and registering cached blocks."""
        if max_tokens < 1:
            raise InvalidInput(f"max_tokens={max_tokens} must be at least 1")
        with SequenceBlocks.open(self.kvbm, prompt_tokens, on_registered=self.on_registered) as seq:
            num_cached = seq.num_computed
            if not seq.reserve(len(prompt_tokens) + max_tokens - 1):
                logger.warning(
                    "generate: the device pool has no room for %d + %d tokens now",
                    len(prompt_tokens),
                    max_tokens,
                )
                return EngineOutput([], EngineFinish.NO_BLOCKS, num_cached, 0)
            logits = self.prefill(seq.tokens, seq.block_table, num_cached)
            seq.commit()
            out = greedy(logits)
            while len(out) < max_tokens:
                position = len(seq.tokens)
                seq.append(out[-1])
                logits = self.decode_step([DecodeRequest(out[-1], seq.block_table, position)])
                seq.commit()
                out.extend(greedy(logits))
            num_computed = len(prompt_tokens) - num_cached
            logger.debug(
                "generate: %d cached, %d computed, %d out", num_cached, num_computed, len(out)
            )
            return EngineOutput(out, EngineFinish.LENGTH, num_cached, num_computed)

    def _check_positions(self, last_position: int) -> None:
        limit = self.config.max_position_embeddings
        if last_position >= limit:
            raise InvalidInput(
                f"position {last_position} exceeds the model's max_position_embeddings={limit}"
            )

    def _token_tensor(self, tokens: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise InvalidInput(f"token ids must be in 0..{self.config.vocab_size - 1}")
        return ids.to(self.device)
