"""The multi-turn chat workload of ``bench vllm-offload`` and the prefix it makes reusable.

``num_conversations`` conversations of ``num_turns`` turns share one system prompt. Turn ``t`` of
a conversation sends the system prompt, every earlier user message of that conversation each
followed by the model's answer to it, then a new user message; the model answers with
``max_tokens`` greedy tokens (``ignore_eos``). Requests go round-robin: turn 1 of every
conversation, then turn 2 of every conversation, and so on, so between two turns of one
conversation every other conversation is served once (this is what pushes a conversation out of
a small G1).

Invariants: prompts are token ids drawn uniformly from ``[2, vocab)``, and every user message
depends only on (its length, conversation, turn), so every arm is sent the same user messages;
the answers in a prompt are the arm's own, which equal the reference arm's exactly when its
outputs do. ``PrefixHistory.reusable`` counts, of one prompt, the longest prefix that some
earlier request of the run left in KV (its prompt and all but its last generated token, the
last never being fed back), in whole blocks, and never the last prompt token (vLLM computes
it): the most any cache could serve.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fabric.bench.vs_vllm.arms import FIRST_TOKEN_ID, MAX_MODEL_LEN, Workload
from fabric.errors import ConfigError

BLOCK_SIZE = 128
"""vLLM-CPU's default KV block size; the servers are started without ``--block-size``."""
_SEED = 0x0FF1


@dataclass(frozen=True, slots=True)
class ChatShape:
    """The sizes of the workload (the flags)."""

    num_conversations: int
    num_turns: int
    system_tokens: int
    user_tokens: int
    max_tokens: int

    def __post_init__(self) -> None:
        for name in ("num_conversations", "num_turns", "system_tokens", "user_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_tokens < 2:
            raise ConfigError(f"max_tokens={self.max_tokens} must be at least 2")
        if self.max_prompt_tokens + self.max_tokens > MAX_MODEL_LEN:
            raise ConfigError(
                f"the last turn's prompt ({self.max_prompt_tokens} tokens) plus max_tokens "
                f"({self.max_tokens}) exceeds the servers' max_model_len {MAX_MODEL_LEN}: "
                "shrink --turns, --system-tokens or --user-tokens"
            )

    def prompt_tokens(self, turn: int) -> int:
        """Prompt length of turn ``turn`` (0-based)."""
        return self.system_tokens + (turn + 1) * self.user_tokens + turn * self.max_tokens

    @property
    def max_prompt_tokens(self) -> int:
        return self.prompt_tokens(self.num_turns - 1)

    @property
    def request_blocks(self) -> int:
        """KV blocks the longest request occupies in vLLM's G1 (prompt and answer)."""
        return -(-(self.max_prompt_tokens + self.max_tokens) // BLOCK_SIZE)

    @property
    def num_workload_blocks(self) -> int:
        """Distinct full KV blocks the whole run produces (conversations and the warm-up).

        What a tier must hold to keep every conversation: the system prompt's full blocks once,
        each conversation's own full blocks, the warm-up's.
        """
        shared = self.system_tokens // BLOCK_SIZE
        final = (self.max_prompt_tokens + self.max_tokens - 1) // BLOCK_SIZE
        warmup = (self.system_tokens + self.user_tokens + self.max_tokens - 1) // BLOCK_SIZE
        return shared + self.num_conversations * (final - shared) + warmup


@dataclass(frozen=True, slots=True)
class ChatWorkload:
    """What every arm is sent (the answers excepted: each arm's own)."""

    shape: ChatShape
    preset: str
    model_dir: Path
    system: tuple[int, ...]
    users: tuple[tuple[tuple[int, ...], ...], ...]
    """``users[conversation][turn]``: the new user message of that turn."""
    warmup: tuple[int, ...]
    """A prompt sharing no block with the conversations, sent once before measuring."""

    def server_workload(self) -> Workload:
        """The ``vs_vllm`` workload its servers and client take (model, name, max tokens)."""
        return Workload(self.preset, self.model_dir, (), self.warmup, self.shape.max_tokens)

    def order(self) -> Iterator[tuple[int, int]]:
        """``(conversation, turn)`` in the order they are sent: round-robin by turn."""
        for turn in range(self.shape.num_turns):
            for conversation in range(self.shape.num_conversations):
                yield conversation, turn


def make_workload(preset: str, shape: ChatShape) -> ChatWorkload:
    """The preset's model directory (made if missing) and the token ids of every message."""
    from fabric.models.presets import PRESET_CONFIGS, Preset, ensure_model  # torch: only here

    model_dir = ensure_model(preset)
    vocab = PRESET_CONFIGS[Preset(preset)].vocab_size
    users = tuple(
        tuple(_tokens(vocab, shape.user_tokens, (c, t)) for t in range(shape.num_turns))
        for c in range(shape.num_conversations)
    )
    system = _tokens(vocab, shape.system_tokens, (-1, 0))
    warmup = _tokens(vocab, shape.system_tokens + shape.user_tokens, (-2, 0))
    return ChatWorkload(shape, preset, model_dir, system, users, warmup)


def _tokens(vocab: int, num_tokens: int, key: tuple[int, int]) -> tuple[int, ...]:
    """Deterministic random token ids for ``key`` = (conversation, turn); negative: shared."""
    rng = np.random.default_rng([num_tokens, key[0] + 2, key[1], _SEED])
    return tuple(int(t) for t in rng.integers(FIRST_TOKEN_ID, vocab, num_tokens))


@dataclass(slots=True)
class Conversation:
    """One conversation's context so far: the system prompt, then user / answer turns."""

    context: list[int]

    def prompt(self, user: Sequence[int]) -> tuple[int, ...]:
        return (*self.context, *user)

    def answered(self, prompt: Sequence[int], answer: Sequence[int]) -> None:
        self.context = [*prompt, *answer]


@dataclass(slots=True)
class PrefixHistory:
    """Token sequences whose KV earlier requests computed, to count a prompt's reusable prefix."""

    block_size: int = BLOCK_SIZE
    _computed: list[np.ndarray] = field(default_factory=list)

    def reusable(self, prompt: Sequence[int]) -> int:
        """Tokens of ``prompt`` an earlier request computed: whole blocks, never the last token."""
        tokens = np.asarray(prompt, dtype=np.int64)
        longest = 0
        for seen in self._computed:
            n = min(len(seen), len(tokens))
            differ = np.flatnonzero(seen[:n] != tokens[:n])
            longest = max(longest, int(differ[0]) if differ.size else n)
        cap = len(tokens) - 1
        return (min(longest, cap) // self.block_size) * self.block_size

    def add(self, prompt: Sequence[int], answer: Sequence[int]) -> None:
        """A request ran: its prompt and all but its last answer token now have KV."""
        self._computed.append(np.asarray([*prompt, *answer[:-1]], dtype=np.int64))
