"""The engine's per-layer signal (``on_layer``): called once per layer, in order, only after that
layer's K/V of every new token is in the pool and before the next layer writes; what a layer-wise
handoff announces is therefore already final. A snapshot of the pool taken inside the callback
must equal the final K/V for layers up to the one announced and still be untouched above it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fabric.engine import Engine, PrefillChunk
from fabric.kvbm import LayoutKind, SequenceBlocks

MakeEngine = Callable[..., Engine]


def _layer_pages(engine: Engine, table: list[int], layer: int, end: int) -> torch.Tensor:
    ids = torch.tensor(table)
    views = (engine.kv.keys[layer], engine.kv.values[layer])
    return torch.stack([view[ids].flatten(0, 1)[:end] for view in views]).clone()


@pytest.mark.parametrize("layout", [LayoutKind.FULLY_CONTIGUOUS, LayoutKind.LAYER_SEPARATE])
@pytest.mark.parametrize("chunks", [[(0, 70)], [(0, 30), (30, 70)]], ids=["whole", "chunks"])
def test_a_layer_is_announced_only_once_written(
    make_engine: MakeEngine, layout: LayoutKind, chunks: list[tuple[int, int]]
) -> None:
    engine = make_engine(layout=layout)
    prompt = torch.randint(2, 1024, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    num_layers = engine.config.num_layers
    with SequenceBlocks.open(engine.kvbm, prompt) as seq:
        assert seq.reserve(len(prompt))
        table = list(seq.block_table)
        snapshots: list[tuple[int, int, list[torch.Tensor]]] = []
        for start, end in chunks:

            def on_layer(layer: int, end: int = end) -> None:
                pages = [_layer_pages(engine, table, i, end) for i in range(num_layers)]
                snapshots.append((layer, end, pages))

            engine.step((), [PrefillChunk(prompt[start:end], table, start)], on_layer=on_layer)
        final = [_layer_pages(engine, table, i, len(prompt)) for i in range(num_layers)]
        seq.release()
    announced = [(layer, end) for layer, end, _ in snapshots]
    assert announced == [(layer, end) for _, end in chunks for layer in range(num_layers)]
    for layer, end, pages in snapshots:
        for i in range(num_layers):
            if i <= layer:  # announced: final up to the chunk's end
                assert torch.equal(pages[i], final[i][:, :end]), (layer, end, i)
            else:  # not announced yet: this chunk's positions not written (pool zeroed)
                start = end - next(e - s for s, e in chunks if e == end)
                assert not pages[i][:, start:end].any(), (layer, end, i)
