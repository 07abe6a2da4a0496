"""Embedded model presets, made offline and deterministically on first use.

``ensure_model("tiny")`` returns a directory holding a random Llama (``config.json``,
``model.safetensors``) and a byte-level BPE tokenizer (``tokenizer.json``,
``tokenizer_config.json``) trained on ``corpus.txt`` shipped with this package. ``transformers``
loads the same directory (``LlamaForCausalLM`` / ``AutoTokenizer``). Nothing is downloaded.

* ``tiny``: hidden 256, 4 layers, 4 heads / 2 KV heads, vocab 1024, init std 0.1 (with the usual
  0.02 greedy output collapses to one repeated token, which would hide corrupted KV).
* ``small``: about 92M parameters (hidden 1024, 8 layers, 16 / 4 heads, FFN 2816, vocab 1024,
  init std 0.05), where a 2048-token prefill is real work on one core; for benchmarks.

Invariants: the bytes depend only on the preset and ``RECIPE_VERSION`` (weights come from a
private ``torch.Generator`` seeded 0, drawn in a fixed order, so global RNG state is neither used
nor changed); a model directory appears only complete: it is built in a temporary sibling
directory and renamed into place, and a process that loses the race uses the winner's copy.
Bumping the recipe bumps ``RECIPE_VERSION``, which is part of the default directory name.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from enum import Enum
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from fabric.errors import ConfigError
from fabric.models.config import ModelConfig

RECIPE_VERSION = 1
SPECIAL_TOKENS = ("<s>", "</s>")  # ids 0 and 1


class Preset(Enum):
    TINY = "tiny"
    SMALL = "small"


PRESET_CONFIGS: dict[Preset, ModelConfig] = {
    Preset.TINY: ModelConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=704,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_size=64,
        max_position_embeddings=4096,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=1,
    ),
    Preset.SMALL: ModelConfig(
        vocab_size=1024,
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=8,
        num_heads=16,
        num_kv_heads=4,
        head_size=64,
        max_position_embeddings=4096,
        initializer_range=0.05,
        bos_token_id=0,
        eos_token_id=1,
    ),
}


def _stderr(message: str) -> None:
    print(f"[kv-fabric] {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kv-fabric/models`` (``~/.cache/kv-fabric/models`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kv-fabric" / "models"


def ensure_model(
    preset: Preset | str = Preset.TINY,
    path: str | Path | None = None,
    *,
    progress: Callable[[str], None] = _stderr,
) -> Path:
    """The directory of ``preset``, creating it (atomically) if it does not exist yet.

    Args:
        preset: ``"tiny"`` or ``"small"``.
        path: where the model lives; default ``default_cache_dir() / "<preset>-v<version>"``.
        progress: receives one line per long step (stderr by default).
    """
    preset = Preset(preset)
    target = Path(path) if path is not None else default_cache_dir() / _dir_name(preset)
    if (target / "config.json").is_file():
        return target
    if target.exists():
        raise ConfigError(
            f"{target} exists but holds no config.json; remove it or give another path"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        start = time.perf_counter()
        progress(f"creating the {preset.value} model in {target} (offline, deterministic)")
        write_model(preset, tmp, progress=progress)
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            progress(f"{target} was created by another process meanwhile; using it")
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            progress(f"{preset.value} model ready in {time.perf_counter() - start:.1f} s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _dir_name(preset: Preset) -> str:
    return f"{preset.value}-v{RECIPE_VERSION}"


def write_model(
    preset: Preset, directory: Path, *, progress: Callable[[str], None] = _stderr
) -> None:
    """Write the preset's files into an existing, empty ``directory`` (not atomic by itself)."""
    config = PRESET_CONFIGS[preset]
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    progress("training the byte-level BPE tokenizer")
    train_tokenizer(config.vocab_size).save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "model_max_length": config.max_position_embeddings,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    weights = random_weights(config, progress)
    num_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    progress(f"writing model.safetensors ({num_bytes / 2**20:.0f} MiB)")
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on the packaged corpus (special tokens first)."""
    corpus = resources.files("fabric.models").joinpath("corpus.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ConfigError(
            f"the tokenizer corpus yields {tokenizer.get_vocab_size()} tokens, not {vocab_size}; "
            "extend fabric/models/corpus.txt"
        )
    return tokenizer


def random_weights(
    config: ModelConfig, progress: Callable[[str], None] = _stderr
) -> dict[str, torch.Tensor]:
    """Hugging Face-named Llama weights: normal(0, initializer_range) matrices, unit norms."""
    c = config
    generator = torch.Generator().manual_seed(0)
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
    ]
    q_rows, kv_rows = c.num_heads * c.head_size, c.num_kv_heads * c.head_size
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (q_rows, c.hidden_size)),
            (p + "self_attn.k_proj.weight", (kv_rows, c.hidden_size)),
            (p + "self_attn.v_proj.weight", (kv_rows, c.hidden_size)),
            (p + "self_attn.o_proj.weight", (c.hidden_size, q_rows)),
            (p + "mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size)),
            (p + "mlp.up_proj.weight", (c.intermediate_size, c.hidden_size)),
            (p + "mlp.down_proj.weight", (c.hidden_size, c.intermediate_size)),
            (p + "input_layernorm.weight", (c.hidden_size,)),
            (p + "post_attention_layernorm.weight", (c.hidden_size,)),
        ]
    shapes += [
        ("model.norm.weight", (c.hidden_size,)),
        ("lm_head.weight", (c.vocab_size, c.hidden_size)),
    ]
    num_params = sum(torch.Size(s).numel() for _, s in shapes)
    progress(f"drawing {num_params / 1e6:.1f}M random parameters (seed 0)")
    weights: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=c.dtype)
        else:
            weights[name] = (
                torch.empty(shape, dtype=torch.float32)
                .normal_(0.0, c.initializer_range, generator=generator)
                .to(c.dtype)
            )
    return weights
