"""``python -m fabric.bench kvbm``: our side's figures, and the vLLM environment's errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

FIGURES = ("hash_mtokens_per_s", "alloc_register_kblocks_per_s", "match_us_per_1k_blocks")


def _bench(*flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fabric.bench", "kvbm", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)


def test_quick_run_without_vllm_prints_our_figures() -> None:
    done = _bench("--quick", "--no-vllm")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    for key in FIGURES:
        assert math.isfinite(result[key]) and result[key] > 0, (key, result)
    assert "vs_vllm" not in result
    assert result["params"]["trials"] == 1


def test_a_missing_vllm_python_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-venv" / "bin" / "python"
    done = _bench("--quick", "--vllm-python", str(missing))
    assert done.returncode != 0
    assert f"--vllm-python {missing} does not exist" in done.stderr
    assert done.stdout == ""
