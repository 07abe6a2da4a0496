"""Loading a Llama checkpoint's safetensors into the engine's fused weight layout.

Reads ``model.safetensors`` or the shards listed in ``model.safetensors.index.json`` (Hugging
Face names: ``model.embed_tokens.weight``, ``model.layers.N.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.N.mlp.{gate,up,down}_proj.weight``, ``...input_layernorm.weight``,
``...post_attention_layernorm.weight``, ``model.norm.weight``, ``lm_head.weight`` unless tied).

Invariants: Q, K and V are fused into one ``qkv`` matrix (rows in that order) and gate and up
into one ``gate_up`` matrix, so a layer costs three large matmuls plus the output projection; every
tensor is contiguous, in the config's dtype, on the requested device. A missing or misshaped
tensor raises ``ConfigError`` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fabric.errors import ConfigError
from fabric.models.config import ModelConfig


@dataclass(frozen=True, slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # (hidden,)
    qkv: torch.Tensor  # ((heads + 2 * kv_heads) * head_size, hidden)
    o: torch.Tensor  # (hidden, heads * head_size)
    post_norm: torch.Tensor  # (hidden,)
    gate_up: torch.Tensor  # (2 * intermediate, hidden)
    down: torch.Tensor  # (hidden, intermediate)


@dataclass(frozen=True, slots=True)
class LlamaWeights:
    embed: torch.Tensor  # (vocab, hidden)
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # (hidden,)
    lm_head: torch.Tensor  # (vocab, hidden); the embedding itself when tied


def _shard_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    raise ConfigError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")


def load_weights(
    model_dir: str | Path, config: ModelConfig, device: torch.device | str = "cpu"
) -> LlamaWeights:
    """Read and fuse the checkpoint in ``model_dir`` (see the module docstring)."""
    model_dir = Path(model_dir)
    raw: dict[str, torch.Tensor] = {}
    for path in _shard_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                raw[name] = f.get_tensor(name)

    c = config
    q_rows, kv_rows = c.num_heads * c.head_size, c.num_kv_heads * c.head_size

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = raw.get(name)
        if tensor is None:
            raise ConfigError(f"{model_dir}: the checkpoint has no tensor {name!r}")
        if tuple(tensor.shape) != shape:
            raise ConfigError(
                f"{model_dir}: {name} has shape {tuple(tensor.shape)}; config.json implies {shape}"
            )
        return tensor

    def ready(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=c.dtype).contiguous()

    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        attn = (
            take(p + "self_attn.q_proj.weight", (q_rows, c.hidden_size)),
            take(p + "self_attn.k_proj.weight", (kv_rows, c.hidden_size)),
            take(p + "self_attn.v_proj.weight", (kv_rows, c.hidden_size)),
        )
        mlp = (
            take(p + "mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size)),
            take(p + "mlp.up_proj.weight", (c.intermediate_size, c.hidden_size)),
        )
        layers.append(
            LayerWeights(
                input_norm=ready(take(p + "input_layernorm.weight", (c.hidden_size,))),
                qkv=ready(torch.cat(attn)),
                o=ready(take(p + "self_attn.o_proj.weight", (c.hidden_size, q_rows))),
                post_norm=ready(take(p + "post_attention_layernorm.weight", (c.hidden_size,))),
                gate_up=ready(torch.cat(mlp)),
                down=ready(take(p + "mlp.down_proj.weight", (c.hidden_size, c.intermediate_size))),
            )
        )
    embed = ready(take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size)))
    if "lm_head.weight" in raw:
        lm_head = ready(take("lm_head.weight", (c.vocab_size, c.hidden_size)))
    elif c.tie_word_embeddings:
        lm_head = embed
    else:
        raise ConfigError(
            f"{model_dir}: no lm_head.weight and tie_word_embeddings is false in config.json"
        )
    return LlamaWeights(
        embed=embed,
        layers=tuple(layers),
        norm=ready(take("model.norm.weight", (c.hidden_size,))),
        lm_head=lm_head,
    )
