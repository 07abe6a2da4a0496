"""The arms of ``bench vllm`` (the ways of serving compared) and the workload every arm gets.

An arm is a row of ``ARMS``: a name, a kind, the ``--kv-transfer-config`` of its first server
(prefill / storing) and of its second (decode / hitting), extra environment, and a module that
must import in the vLLM environment for it to run. Strings in the configs and the environment
may hold ``{store_dir}`` and ``{etcd}``, filled in per run by ``fill``, and ``{url}``, the
server's own OpenAI URL, filled in as it starts (``servers.start_server``).

Invariants: ``ARMS[0]`` is the reference (aggregated, no connector) and always runs; a workload
depends only on (preset, prompt length, number of requests, max tokens): every arm, every run
gets the same prompts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from fabric.errors import FabricError

MAX_MODEL_LEN = 4096
"""Both presets have 4096 positions; also the batch budget, so a prompt prefills in one step."""
FIRST_TOKEN_ID = 2
"""Ids 0 and 1 are the presets' BOS / EOS; prompts draw from ``[2, vocab)``."""
PREFILL_CPU = "0"
DECODE_CPU = "1"
"""Single-engine arms sit on the decode core, as in ``fabric.bench.serve``."""

FABRIC_CONNECTOR_MODULE = "fabric.integrations.vllm.connector"
FABRIC_CONNECTOR_CLASS = "FabricConnector"
"""Where the fabric's ``KVConnectorBase_V1`` lives (``kv_connector_module_path``)."""

PLACEHOLDER = re.compile(r"\{(store_dir|etcd|url)\}")
"""Filled in per run: the arm's disk store directory and the private etcd endpoint; per server:
its own URL (``http://127.0.0.1:<port>``)."""


class ArmKind(Enum):
    AGGREGATED = "aggregated"
    PD = "pd"
    HIT = "hit"


@dataclass(frozen=True, slots=True)
class Arm:
    """One way of serving the workload.

    ``first`` / ``second`` are the ``--kv-transfer-config`` of the prefill / decode servers (P/D)
    or of the storing / hitting servers (hits); ``None`` means no connector. Strings in them and
    in ``env`` may hold ``{store_dir}`` and ``{etcd}``. ``needs_module`` is a module that must
    import in the vLLM environment for the arm to run.
    """

    name: str
    kind: ArmKind
    first: Mapping[str, Any] | None = None
    second: Mapping[str, Any] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    needs_module: str | None = None


NIXL_BASE = {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu"}
NIXL_PREFILL = NIXL_BASE | {"kv_role": "kv_producer"}
NIXL_DECODE = NIXL_BASE | {"kv_role": "kv_consumer"}
EXAMPLE_HIT = {
    "kv_connector": "ExampleConnector",
    "kv_role": "kv_both",
    "kv_connector_extra_config": {"shared_storage_path": "{store_dir}"},
}
FABRIC_BASE = {
    "kv_connector": FABRIC_CONNECTOR_CLASS,
    "kv_connector_module_path": FABRIC_CONNECTOR_MODULE,
}
FABRIC_PD_EXTRA = {"kv_connector_extra_config": {"etcd_endpoints": "{etcd}"}}
FABRIC_PD_PREFILL = FABRIC_BASE | {"kv_role": "kv_producer"} | FABRIC_PD_EXTRA
FABRIC_PD_DECODE = FABRIC_BASE | {"kv_role": "kv_consumer"} | FABRIC_PD_EXTRA
FABRIC_HIT = FABRIC_BASE | {
    "kv_role": "kv_both",
    "kv_connector_extra_config": {"disk_path": "{store_dir}"},
}

ARMS: tuple[Arm, ...] = (
    Arm("aggregated", ArmKind.AGGREGATED),
    Arm("nixl_connector_pd", ArmKind.PD, NIXL_PREFILL, NIXL_DECODE),
    Arm(
        "fabric_pd",
        ArmKind.PD,
        FABRIC_PD_PREFILL,
        FABRIC_PD_DECODE,
        needs_module=FABRIC_CONNECTOR_MODULE,
    ),
    Arm("example_connector_hit", ArmKind.HIT, EXAMPLE_HIT, EXAMPLE_HIT),
    Arm("fabric_hit", ArmKind.HIT, FABRIC_HIT, FABRIC_HIT, needs_module=FABRIC_CONNECTOR_MODULE),
)
REFERENCE = ARMS[0]
NAME_TO_ARM = {arm.name: arm for arm in ARMS}


class ArmFailed(FabricError):
    """An arm could not be measured: a server died or timed out, or a request failed."""


def fill(value: Any, values: Mapping[str, str]) -> Any:
    """``value`` with ``{store_dir}`` / ``{etcd}`` / ``{url}`` replaced in every string in it."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: values[m.group(1)], value)
    if isinstance(value, Mapping):
        return {k: fill(v, values) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [fill(v, values) for v in value]
    return value


def mentions_etcd(arm: Arm) -> bool:
    """Whether the arm's servers need the private etcd."""
    text = json.dumps([arm.first, arm.second, dict(arm.env)])
    return "{etcd}" in text


@dataclass(frozen=True, slots=True)
class Workload:
    """What every arm is sent."""

    preset: str
    model_dir: Path
    prompts: tuple[tuple[int, ...], ...]
    warmup: tuple[int, ...]
    max_tokens: int


def make_workload(preset: str, prompt_tokens: int, num_requests: int, max_tokens: int) -> Workload:
    """The preset's model directory (made if missing) and the prompts every arm gets."""
    from fabric.models.presets import PRESET_CONFIGS, Preset, ensure_model  # torch: only here

    model_dir = ensure_model(preset)
    vocab = PRESET_CONFIGS[Preset(preset)].vocab_size
    prompts = tuple(_prompt(vocab, prompt_tokens, i) for i in range(num_requests))
    return Workload(preset, model_dir, prompts, _prompt(vocab, prompt_tokens, -1), max_tokens)


def _prompt(vocab: int, num_tokens: int, index: int) -> tuple[int, ...]:
    """Deterministic random token ids, distinct per (length, index); ``index=-1``: warm-up."""
    rng = np.random.default_rng([num_tokens, index + 1, 0x7711])
    return tuple(int(t) for t in rng.integers(FIRST_TOKEN_ID, vocab, num_tokens))
