"""Config: FABRIC_* and DYN_KVBM_* names, precedence, clear errors, tier sizing, sections."""

from __future__ import annotations

import pytest

from fabric.config import PrefillFallback, load_config, setting_field
from fabric.errors import ConfigError
from fabric.kvbm import EvictionKind, LayoutKind, Tier


def test_defaults() -> None:
    config = load_config()
    assert config.kvbm.block_size == 16 and config.kvbm.eviction is EvictionKind.PRIORITY_LRU
    assert config.kvbm.tier_blocks(Tier.HOST, 1024) == 0  # host tier off by default


def test_dynamo_names_are_accepted_and_fabric_names_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "2")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", "/data/kv")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "77")
    config = load_config()
    assert config.kvbm.cpu_cache_gb == 2.0 and str(config.kvbm.disk_cache_dir) == "/data/kv"
    assert config.kvbm.tier_blocks(Tier.HOST, 1 << 20) == 2048
    assert config.kvbm.tier_blocks(Tier.DISK, 1 << 20) == 77  # the block count override wins
    monkeypatch.setenv("FABRIC_CPU_CACHE_GB", "1")
    assert load_config().kvbm.cpu_cache_gb == 1.0


def test_enums_by_name_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_LAYOUT", "LAYER_SEPARATE")
    monkeypatch.setenv("FABRIC_EVICTION", "lfu")
    config = load_config()
    assert (
        config.kvbm.layout is LayoutKind.LAYER_SEPARATE and config.kvbm.eviction is EvictionKind.LFU
    )


def test_overrides_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_BLOCK_SIZE", "64")
    assert load_config(block_size=32).kvbm.block_size == 32


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("FABRIC_BLOCK_SIZE", "0", "FABRIC_BLOCK_SIZE: Input should be greater than 0"),
        ("FABRIC_DEVICE_BLOCKS", "many", "FABRIC_DEVICE_BLOCKS: Input should be a valid integer"),
        (
            "DYN_KVBM_CPU_CACHE_GB",
            "-1",
            "FABRIC_CPU_CACHE_GB / DYN_KVBM_CPU_CACHE_GB: Input should be greater",
        ),
        ("FABRIC_EVICTION", "fifo", "FABRIC_EVICTION: Input should be 'lru', 'priority_lru'"),
    ],
)
def test_bad_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        load_config()
    assert needle in str(info.value)
    assert repr(value) in str(info.value)


def test_overrides_go_to_the_section_that_owns_them() -> None:
    config = load_config(block_size=32, hold_timeout_s=3.0, prefill_fallback="fail")
    assert config.kvbm.block_size == 32 and config.serve.hold_timeout_s == 3.0
    assert config.serve.prefill_fallback is PrefillFallback.FAIL
    assert setting_field("cpu_cache_gb").default == 0.0
    assert setting_field("namespace").default == "kv-fabric"


def test_unknown_settings_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="unknown settings: blok_size"):
        load_config(blok_size=32)
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        setting_field("nope")


def test_problems_of_both_sections_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_BLOCK_SIZE", "0")
    monkeypatch.setenv("FABRIC_THREADS", "0")
    with pytest.raises(ConfigError) as info:
        load_config()
    assert "FABRIC_BLOCK_SIZE" in str(info.value) and "FABRIC_THREADS" in str(info.value)
