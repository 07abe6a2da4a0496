"""The Llama decoder forward pass over paged KV: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Numerics follow Hugging Face's ``LlamaForCausalLM`` (RMSNorm in float32, rotate-half RoPE with
``inv_freq = theta ** -(2i / head_size)``, attention scaled by ``head_size ** -0.5``), so greedy
output matches ``transformers`` for the same weights.

One ``forward`` serves prefill (one sequence, many new tokens) and batched decode (one new token
per sequence): every layer writes the new tokens' K/V into the KVBM pages first, then attends
either over the fresh K/V (prefill from position 0: causal, nothing read back) or over the
sequences' blocks gathered from the pages (prefix hits and decode). Only the last query of each
sequence produces logits, so the final layer computes attention, output projection and MLP for
that query alone (K/V of every new token are still written).

Invariants: the forward runs under ``torch.inference_mode``; it never writes outside the batch's
write slots; the RoPE tables cover ``max_position_embeddings`` positions (callers check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fabric.engine.paged import PagedBatch, PagedKv
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
    def forward(self, tokens: torch.Tensor, batch: PagedBatch, kv: PagedKv) -> torch.Tensor:
        """Logits ``(B, vocab)`` of the last query of each sequence; writes K/V of all tokens.

        Args:
            tokens: ``(B, Q)`` token ids at ``batch.positions``.
            batch: the write slots, block tables and mask of this call.
            kv: the pages to write and read.
        """
        c = self.config
        x = F.embedding(tokens, self.weights.embed)
        cos = self._cos[batch.positions].unsqueeze(2)
        sin = self._sin[batch.positions].unsqueeze(2)
        last = len(self.weights.layers) - 1
        for i, layer in enumerate(self.weights.layers):
            h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
            attn, x = self._attention(
                i, layer, h, x, rope=(cos, sin), batch=batch, kv=kv, last_only=i == last
            )
            x = x + F.linear(attn, layer.o)
            x = x + self._mlp(layer, rms_norm(x, layer.post_norm, c.rms_norm_eps))
        x = rms_norm(x[:, -1], self.weights.norm, c.rms_norm_eps)
        return F.linear(x, self.weights.lm_head)

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention output ``(B, Q', heads * D)`` and the residual cut to the same ``Q'``.

        ``Q'`` is ``Q``, or 1 when ``last_only`` (the final layer needs only the last query).
        """
        c = self.config
        b, q_len, _ = h.shape
        d, heads, kv_heads = c.head_size, c.num_heads, c.num_kv_heads
        q, k, v = torch.split(F.linear(h, layer.qkv), [heads * d, kv_heads * d, kv_heads * d], -1)
        q = apply_rope(q.view(b, q_len, heads, d), *rope)
        k = apply_rope(k.view(b, q_len, kv_heads, d), *rope)
        kv.write(index, batch, k.reshape(-1, kv_heads * d), v.reshape(-1, kv_heads * d))
        mask = batch.mask
        if last_only:
            q, residual = q[:, -1:], residual[:, -1:]
            mask = None if mask is None else mask[:, :, -1:]
        if batch.tables is None:  # prefill from 0: attend over the fresh K/V
            keys, values = k.transpose(1, 2), v.view(b, q_len, kv_heads, d).transpose(1, 2)
        else:
            gk, gv = kv.gather(index, batch.tables)
            keys = gk.view(b, -1, kv_heads, d).transpose(1, 2)
            values = gv.view(b, -1, kv_heads, d).transpose(1, 2)
        q = q.transpose(1, 2)  # (B, heads, Q', D)
        if q.shape[2] == 1:  # one query per sequence: fold each KV head's group of query heads
            # into the query axis, so GQA needs no K/V expansion (about 2x faster on CPU)
            out = F.scaled_dot_product_attention(
                q.reshape(b, kv_heads, heads // kv_heads, d), keys, values, attn_mask=mask
            )
            return out.reshape(b, 1, heads * d), residual
        out = F.scaled_dot_product_attention(  # causal over fresh K/V, else the batch's mask
            q, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True
        )
        return out.transpose(1, 2).flatten(2), residual

    @staticmethod
    def _mlp(layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.down)
