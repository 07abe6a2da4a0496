"""Text in and out: the model's ``tokenizer.json`` and the frontend's chat template.

Owns ``TextCodec`` (encode prompts, decode completions, incremental detokenization for streams),
``render_chat`` (the chat template) and ``resolve_model`` (a preset name or a model directory).

Chat template (deliberately simple, documented here and in the OpenAPI description): each
message renders as ``"<role>: <content>\\n"`` in order, then ``"assistant:"`` opens the answer::

    system: You are terse.
    user: Hello
    assistant:

The reference engine's models are not instruction-tuned, so no model-specific template exists to
honour; the rendered text is tokenized like a completion prompt.

Invariants: the codec never adds special tokens on its own (``tokenizer.json``'s post-processor
decides, as ``transformers`` does for the same directory); decoding skips special tokens (the
EOS a worker stops on is counted in ``usage`` but not shown). A stream's deltas concatenate to the
text of its tokens, except that trailing bytes of an incomplete UTF-8 character are withheld.
``encode`` releases the GIL while it tokenizes (``tokenizers`` does so in ``encode_batch`` only),
so tokenizing on another thread leaves the event loop free; its text must be valid Unicode (no
lone surrogates: ``protocol`` refuses them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from fabric.errors import ConfigError

_TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """Where the model's files are and the name clients and workers know it by."""

    name: str
    directory: Path


def resolve_model(model: str) -> ResolvedModel:
    """A model directory (holding ``tokenizer.json``), else a preset name made offline.

    The name is the directory's base name, or the preset name (``tiny``, ``small``).

    Raises:
        ConfigError: ``model`` is neither such a directory nor a preset.
    """
    directory = Path(model).expanduser()
    if (directory / _TOKENIZER_FILE).is_file():
        return ResolvedModel(directory.resolve().name, directory)
    from fabric.models.presets import Preset, ensure_model  # imports torch: only for presets

    try:
        preset = Preset(model)
    except ValueError:
        raise ConfigError(
            f"--model {model!r} is neither a directory holding {_TOKENIZER_FILE} nor a preset "
            f"({', '.join(p.value for p in Preset)})"
        ) from None
    return ResolvedModel(preset.value, ensure_model(preset))


def render_chat(messages: Sequence[tuple[str, str]]) -> str:
    """The chat template: ``"<role>: <content>\\n"`` per message, then ``"assistant:"``."""
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


class Detokenizer:
    """Incremental decoding of one completion (see ``TextCodec.detokenizer``)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_ids: Sequence[int]) -> str:
        """The text the new tokens complete ("" while a character is still incomplete)."""
        pieces = [self._stream.step(self._tokenizer, token_id) for token_id in token_ids]
        return "".join(piece for piece in pieces if piece)


class TextCodec:
    """The model's tokenizer plus the context length from ``config.json`` (when present)."""

    def __init__(self, tokenizer: Tokenizer, *, max_model_len: int | None) -> None:
        self._tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_token_chars = max(map(len, tokenizer.get_vocab(with_added_tokens=True)))
        """The longest vocabulary entry: no token covers more characters (``limits``)."""

    @classmethod
    def from_dir(cls, directory: Path) -> TextCodec:
        """Load ``tokenizer.json`` and ``config.json``'s ``max_position_embeddings``."""
        try:
            tokenizer = Tokenizer.from_file(str(directory / _TOKENIZER_FILE))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise ConfigError(f"cannot load {directory / _TOKENIZER_FILE}: {exc}") from exc
        max_model_len = None
        config = directory / "config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get("max_position_embeddings")
            max_model_len = value if isinstance(value, int) and value > 0 else None
        return cls(tokenizer, max_model_len=max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``; releases the GIL while it works (module docstring)."""
        return list(self._tokenizer.encode_batch([text])[0].ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self._tokenizer)
