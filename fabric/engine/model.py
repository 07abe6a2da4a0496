"""The Llama decoder forward pass over paged KV: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Numerics follow Hugging Face's ``LlamaForCausalLM`` (RMSNorm in float32, rotate-half RoPE with
``inv_freq = theta ** -(2i / head_size)``, attention scaled by ``head_size ** -0.5``), so greedy
output matches ``transformers`` for the same weights.

One ``forward`` serves every step: prefill chunks (one sequence, many new tokens, from position
0 or continuing after K/V already in the pages), batched decode (one new token per sequence),
or both at once. The new tokens are packed on one axis, so the projections and the MLP run once
over all of them; every layer writes their K/V into the KVBM pages first, then each attention
group of the ``PagedBatch`` attends either over its fresh K/V (a chunk from position 0: causal,
nothing read back) or over its sequences' blocks gathered from the pages (continued chunks,
prefix hits and decode). Only the last token of each sequence produces logits, so the final
layer computes attention, output projection and MLP for those rows alone (K/V of every new
token are still written).

``on_layer(i)``, when given, is called right after layer ``i`` wrote the K/V of every new token
(before its attention reads anything), in layer order: from then on layer ``i`` of those
positions is final, which is what a layer-wise handoff announces (``fabric.pd.KvFrontier``).

Invariants: the forward runs under ``torch.inference_mode``; it never writes outside the batch's
write slots; the RoPE tables cover ``max_position_embeddings`` positions (callers check).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fabric.engine.paged import AttentionGroup, PagedBatch, PagedKv
from fabric.engine.weights import LayerWeights, LlamaWeights
from fabric.models.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: normalise in float32, scale in the input dtype."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(config: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(max_position_embeddings, head_size)`` in the model dtype."""
    d = config.head_size
    exponent = torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d
    inv_freq = 1.0 / (config.rope_theta**exponent)
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device, config.dtype), emb.sin().to(device, config.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``(B, Q, heads, D)``) by ``cos``/``sin`` (``(B, Q, 1, D)``)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaModel:
    """Weights plus the forward pass; the KV lives in the ``PagedKv`` passed to ``forward``."""

    def __init__(self, config: ModelConfig, weights: LlamaWeights, device: torch.device) -> None:
        self.config = config
        self.weights = weights
        self.device = device
        self._cos, self._sin = rope_tables(config, device)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        batch: PagedBatch,
        kv: PagedKv,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits ``(num_seqs, vocab)`` of each sequence's last token; writes K/V of all tokens.

        Args:
            tokens: ``(N,)`` token ids at ``batch.positions`` (packed, as the batch's groups).
            batch: the write slots, attention groups and last rows of this call.
            kv: the pages to write and read.
            on_layer: called with each layer's index once its K/V are written (module
                docstring).
        """
        c = self.config
        x = F.embedding(tokens, self.weights.embed)
        cos = self._cos[batch.positions].unsqueeze(1)
        sin = self._sin[batch.positions].unsqueeze(1)
        last = len(self.weights.layers) - 1
        for i, layer in enumerate(self.weights.layers):
            h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
            attn, x = self._attention(
                i,
                layer,
                h,
                x,
                rope=(cos, sin),
                batch=batch,
                kv=kv,
                last_only=i == last,
                on_written=on_layer,
            )
            x = x + F.linear(attn, layer.o)
            x = x + self._mlp(layer, rms_norm(x, layer.post_norm, c.rms_norm_eps))
        return F.linear(rms_norm(x, self.weights.norm, c.rms_norm_eps), self.weights.lm_head)

    def _attention(
        self,
        index: int,
        layer: LayerWeights,
        h: torch.Tensor,
        residual: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: PagedBatch,
        kv: PagedKv,
        last_only: bool,
        on_written: Callable[[int], None] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention output ``(N', heads * D)`` and the residual cut to the same rows.

        ``N'`` is ``N``, or one row per sequence (its last token) when ``last_only`` (the final
        layer needs only those). Every token's K/V is written first, then each group attends.
        """
        c = self.config
        n = h.shape[0]
        d, heads, kv_heads = c.head_size, c.num_heads, c.num_kv_heads
        q, k, v = torch.split(F.linear(h, layer.qkv), [heads * d, kv_heads * d, kv_heads * d], -1)
        q = apply_rope(q.view(n, heads, d), *rope)
        k = apply_rope(k.view(n, kv_heads, d), *rope)
        kv.write(index, batch, k.reshape(n, kv_heads * d), v)
        if on_written is not None:
            on_written(index)
        outs = []
        start = 0
        for group in batch.groups:
            rows = slice(start, start + group.num_tokens)
            start += group.num_tokens
            fresh = (q[rows], k[rows], v[rows])
            outs.append(self._group_attention(index, group, fresh, kv=kv, last_only=last_only))
        if last_only:
            residual = residual[batch.last_rows]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), residual

    def _group_attention(
        self,
        index: int,
        group: AttentionGroup,
        fresh: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        *,
        kv: PagedKv,
        last_only: bool,
    ) -> torch.Tensor:
        """One group's attention, ``(rows, heads * D)``: every query, or each sequence's last.

        ``fresh`` is the group's ``q`` ``(tokens, heads, D)``, ``k`` ``(tokens, kv_heads, D)`` and
        ``v`` ``(tokens, kv_heads * D)``, already written to the pages.
        """
        q, k, v = fresh
        c = self.config
        d, heads, kv_heads = c.head_size, c.num_heads, c.num_kv_heads
        b, q_len = group.num_seqs, group.num_queries
        queries = q.view(b, q_len, heads, d)
        mask = group.mask
        if last_only:
            queries = queries[:, -1:]
            mask = None if mask is None else mask[:, :, -1:]
        if group.tables is None:  # a prefill chunk from 0: attend over the fresh K/V
            keys = k.view(b, q_len, kv_heads, d).transpose(1, 2)
            values = v.reshape(b, q_len, kv_heads, d).transpose(1, 2)
        else:
            gk, gv = kv.gather(index, group.tables)
            keys = gk.view(b, -1, kv_heads, d).transpose(1, 2)
            values = gv.view(b, -1, kv_heads, d).transpose(1, 2)
        queries = queries.transpose(1, 2)  # (B, heads, Q', D)
        if queries.shape[2] == 1:  # one query per sequence: fold each KV head's group of query
            # heads into the query axis, so GQA needs no K/V expansion (about 2x faster on CPU)
            out = F.scaled_dot_product_attention(
                queries.reshape(b, kv_heads, heads // kv_heads, d), keys, values, attn_mask=mask
            )
            return out.reshape(b, heads * d)
        out = F.scaled_dot_product_attention(  # causal over fresh K/V, else the group's mask
            queries, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True
        )
        return out.transpose(1, 2).reshape(-1, heads * d)

    @staticmethod
    def _mlp(layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.down)
