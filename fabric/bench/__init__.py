"""Benchmark programs: every figure in docs/benchmarks.md comes from one of them.

Run them as ``python -m fabric.bench <subcommand>``; each prints one JSON object on stdout (see
``__main__`` for the table of subcommands). ``vllm_pool_mix.py`` is not a subcommand: it is the
vLLM side of ``kvbm``, run by the vLLM environment's python, and imports nothing of ``fabric``.
"""

from __future__ import annotations
