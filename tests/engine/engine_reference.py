"""An unpaged reference forward: full causal attention over the whole sequence, no KV cache.

Written independently of the paged path (explicit softmax, GQA by repeating K/V heads) and used
to check that paged prefill and decode compute the same logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fabric.engine import Engine
from fabric.engine.model import apply_rope, rms_norm, rope_tables


@torch.inference_mode()
def reference_logits(engine: Engine, tokens: Sequence[int]) -> torch.Tensor:
    """``(len(tokens), vocab)`` logits of every position."""
    c, w = engine.config, engine.model.weights
    n, d, heads, kv_heads = len(tokens), c.head_size, c.num_heads, c.num_kv_heads
    cos, sin = (t[:n, None, :] for t in rope_tables(c, torch.device("cpu")))
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    x = w.embed[torch.tensor(tokens)]
    for layer in w.layers:
        h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
        q, k, v = (h @ layer.qkv.T).split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q = apply_rope(q.view(n, heads, d), cos, sin)
        k = apply_rope(k.view(n, kv_heads, d), cos, sin).repeat_interleave(heads // kv_heads, 1)
        v = v.view(n, kv_heads, d).repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * d)
        x = x + attn @ layer.o.T
        gate, up = (rms_norm(x, layer.post_norm, c.rms_norm_eps) @ layer.gate_up.T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ layer.down.T
    return rms_norm(x, w.norm, c.rms_norm_eps) @ w.lm_head.T
