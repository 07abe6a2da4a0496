"""ModelConfig: the Llama facts the engine needs, read from a Hugging Face ``config.json``.

Only what the reference engine implements is accepted: ``model_type`` "llama", SiLU (SwiGLU) MLP,
no attention or MLP biases, default rotary embeddings (no ``rope_scaling``). Anything else raises
``ConfigError`` naming the field, so a checkpoint the engine would silently compute wrong is
refused at load time.

Invariants: a ``ModelConfig`` is immutable; ``num_heads`` is a multiple of ``num_kv_heads``;
``to_hf_dict`` round-trips through ``from_hf_dict`` and is loadable by ``transformers``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fabric.errors import ConfigError
from fabric.kvbm import KvGeometry, dtype_name

_DTYPES = {dtype_name(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A Llama decoder's shape and numerics (field names follow the engine, not HF)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    dtype: torch.dtype = torch.float32
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config: {name}={value!r} must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.dtype not in _DTYPES.values():
            raise ConfigError(f"model config: dtype {self.dtype} is not one of {sorted(_DTYPES)}")

    def kv_geometry(self) -> KvGeometry:
        """The KVBM geometry this model's KV cache needs (K and V split, the model's dtype)."""
        return KvGeometry(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            dtype=self.dtype,
            kv_split=True,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read ``<model_dir>/config.json``."""
        path = Path(model_dir) / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist; is {model_dir} a model directory?") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(data)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face Llama config dict; unsupported features raise ConfigError."""
        model_type = data.get("model_type")
        if model_type != "llama":
            raise ConfigError(f"model_type={model_type!r} is not supported; only 'llama' is")
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported; only 'silu' (SwiGLU) is")
        for flag in ("attention_bias", "mlp_bias"):
            if data.get(flag):
                raise ConfigError(f"{flag}=true is not supported by the reference engine")
        rope = data.get("rope_parameters") or {}
        scaling = data.get("rope_scaling") or rope
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ConfigError(f"rope scaling {scaling!r} is not supported; only default RoPE")
        dtype_str = data.get("dtype") or data.get("torch_dtype") or "float32"
        if dtype_str not in _DTYPES:
            raise ConfigError(f"dtype={dtype_str!r} is not supported; use one of {sorted(_DTYPES)}")
        try:
            hidden = int(data["hidden_size"])
            heads = int(data["num_attention_heads"])
            return cls(
                vocab_size=int(data["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(data["intermediate_size"]),
                num_layers=int(data["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(data.get("num_key_value_heads") or heads),
                head_size=int(data.get("head_dim") or hidden // heads),
                max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
                tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
                dtype=_DTYPES[dtype_str],
                bos_token_id=data.get("bos_token_id"),
                eos_token_id=data.get("eos_token_id"),
                initializer_range=float(data.get("initializer_range", 0.02)),
            )
        except KeyError as e:
            raise ConfigError(f"model config lacks the required field {e.args[0]!r}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` form (what ``transformers`` loads as LlamaConfig)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype_name(self.dtype),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": self.initializer_range,
        }
