"""KV Fabric: a disaggregated prefill/decode KV-cache transfer fabric.

Packages, top to bottom (imports point down only; see docs/architecture.md):
``kvbm`` the per-worker KV block manager, ``bench`` the benchmark programs.
"""

from __future__ import annotations

__version__ = "0.1.0"
