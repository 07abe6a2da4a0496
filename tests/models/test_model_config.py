"""ModelConfig: Hugging Face config.json in, unsupported features refused with their names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fabric.errors import ConfigError
from fabric.models.config import ModelConfig
from fabric.models.presets import PRESET_CONFIGS, Preset


def hf_config(**changes: Any) -> dict[str, Any]:
    data = PRESET_CONFIGS[Preset.TINY].to_hf_dict()
    data.update(changes)
    return data


@pytest.mark.parametrize("preset", list(Preset))
def test_round_trip(preset: Preset) -> None:
    config = PRESET_CONFIGS[preset]
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_reads_transformers_v5_rope_parameters_and_defaults() -> None:
    data = hf_config(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    for key in ("rope_theta", "head_dim", "num_key_value_heads", "torch_dtype"):
        del data[key]
    data["dtype"] = "bfloat16"
    config = ModelConfig.from_hf_dict(data)
    assert config.rope_theta == 500000.0
    assert (config.head_size, config.num_kv_heads, config.dtype) == (64, 4, torch.bfloat16)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"torch_dtype": "int8"}, "dtype='int8'"),
        ({"vocab_size": 0}, "vocab_size=0"),
    ],
)
def test_unsupported_configs_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(hf_config(**changes))


def test_missing_field_and_missing_file(tmp_path: Path) -> None:
    data = hf_config()
    del data["hidden_size"]
    with pytest.raises(ConfigError, match="'hidden_size'"):
        ModelConfig.from_hf_dict(data)
    with pytest.raises(ConfigError, match=r"is .* a model directory"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    assert ModelConfig.from_dir(tmp_path) == PRESET_CONFIGS[Preset.TINY]
