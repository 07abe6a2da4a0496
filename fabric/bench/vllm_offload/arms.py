"""The arms of ``bench vllm-offload``: one vLLM server each, differing only in its KV connector.

Every arm is one server (``ArmKind.AGGREGATED`` in ``vs_vllm``'s terms) whose
``--kv-transfer-config`` is the arm's ``first``; ``{store_dir}`` in it is the arm's own
temporary directory. Tier sizes are in blocks of the workload (``ChatShape.num_workload_blocks``,
what keeping every conversation takes):

* ``vllm``: no connector, vLLM's own prefix cache (G1) only: the reference outputs;
* ``example_connector``: vLLM's ``ExampleConnector`` (safetensors files under ``{store_dir}``);
* ``fabric_g2``: the fabric's host tier, sized to hold every conversation;
* ``fabric_g2_g3``: a host tier of half that, over a local disk tier that holds everything
  (``disk_admit_after`` 1: every block offloaded to G2 is written down);
* ``fabric_g4``: the fabric's shared disk tier (G4) alone.

Invariants: ``ARM_NAMES[0]`` is the reference and always runs; the fabric arms load with
``kv_load_failure_policy: recompute`` (a failed load costs time, never an output).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fabric.bench.vs_vllm.arms import (
    EXAMPLE_HIT,
    FABRIC_BASE,
    FABRIC_CONNECTOR_MODULE,
    Arm,
    ArmKind,
)

ARM_NAMES = ("vllm", "example_connector", "fabric_g2", "fabric_g2_g3", "fabric_g4")
REFERENCE = ARM_NAMES[0]
FABRIC_ARMS = frozenset({"fabric_g2", "fabric_g2_g3", "fabric_g4"})
"""Arms whose connector is the fabric's (they report ``connector_ms_model_thread``)."""
G4_DEFAULT_CAPACITY_BLOCKS = 4096
"""The connector's ``disk_capacity_blocks`` default; set only when the workload needs more."""


def _fabric(extra: Mapping[str, Any]) -> dict[str, Any]:
    return FABRIC_BASE | {
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": dict(extra),
    }


def build_arms(
    num_workload_blocks: int, env: Mapping[str, str], g2_blocks: int | None = None
) -> tuple[Arm, ...]:
    """The arms, in ``ARM_NAMES`` order, for a workload of ``num_workload_blocks`` blocks.

    Args:
        env: environment every server gets on top of ``vs_vllm``'s (the logging config, the
            kernels' build directory).
        g2_blocks: ``fabric_g2``'s host tier (default ``num_workload_blocks``).
    """
    everything = num_workload_blocks
    g4: dict[str, Any] = {"disk_path": "{store_dir}"}
    if everything > G4_DEFAULT_CAPACITY_BLOCKS:
        g4["disk_capacity_blocks"] = everything
    configs: dict[str, Mapping[str, Any] | None] = {
        "vllm": None,
        "example_connector": EXAMPLE_HIT,
        "fabric_g2": _fabric({"cpu_cache_blocks": g2_blocks or everything}),
        "fabric_g2_g3": _fabric(
            {
                "cpu_cache_blocks": max(1, everything // 2),
                "disk_cache_blocks": everything,
                "disk_cache_dir": "{store_dir}",
                "disk_admit_after": 1,
            }
        ),
        "fabric_g4": _fabric(g4),
    }
    return tuple(
        Arm(
            name,
            ArmKind.AGGREGATED,
            first=configs[name],
            env=dict(env),
            needs_module=FABRIC_CONNECTOR_MODULE if name in FABRIC_ARMS else None,
        )
        for name in ARM_NAMES
    )
