"""The local KV block manager (KVBM): hashing, block lifecycle, tiered pools, layouts, events.

Importable without NIXL or CUDA: transfer agents are injected, device tensors fall back to CPU.
"""

from __future__ import annotations
