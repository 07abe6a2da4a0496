"""Greedy output of the engine equals Hugging Face transformers' LlamaForCausalLM, token for
token, on the same tiny weights (skipped only when transformers is not installed)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fabric.engine import Engine

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory; never reach for a hub
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install transformers)"
)

PROMPTS = [
    "The prefill worker computes the cache for a prompt and hands the blocks",
    "What is a token? A piece of text, often a word or part of a word, mapped to a number. "
    "What is attention? A way for each position to look at every earlier position.",
]


@pytest.mark.parametrize("text", PROMPTS, ids=["short", "long"])
def test_greedy_tokens_equal_transformers(
    text: str, tiny_dir: Path, make_engine: Callable[..., Engine]
) -> None:
    engine = make_engine()
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode(text).ids
    ours = engine.generate(prompt, 24).tokens

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.inference_mode():
        first = model(torch.tensor([ids])).logits[0, -1]
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ours == ids[len(prompt) :]
    assert len(set(ours)) > 4  # the init keeps greedy output from collapsing to one token
    blocks = engine.kvbm.allocate(-(-len(prompt) // 16))
    assert blocks is not None
    torch.testing.assert_close(
        engine.prefill(prompt, blocks.block_ids, 0), first, atol=1e-4, rtol=1e-4
    )
    engine.kvbm.release(blocks)
