"""Chunked prefill in the engine: a prompt computed over several steps (chunk boundaries on and
off block boundaries, after a prefix hit), alone or in one step beside decodes and other chunks,
gives the logits and the K/V of the whole-prompt prefill; blocks register only once full and
committed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from engine_reference import reference_logits

from fabric.engine import DecodeRequest, Engine, PrefillChunk, greedy
from fabric.errors import InvalidInput
from fabric.kvbm import SequenceBlocks

MakeEngine = Callable[..., Engine]
TOL = {"atol": 1e-4, "rtol": 1e-4}
BLOCK = 16


def prompt_of(length: int, seed: int = 0) -> list[int]:
    return torch.randint(2, 1024, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def chunked(tokens: list[int], start: int, size: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each chunk of ``size`` from ``start`` to the end of ``tokens``."""
    return [(s, min(s + size, len(tokens))) for s in range(start, len(tokens), size)]


def pages(engine: Engine, table: list[int], num_tokens: int) -> list[torch.Tensor]:
    """K and V of positions ``0 .. num_tokens - 1`` in ``table``, every layer."""
    out = []
    for layer in range(engine.config.num_layers):
        for views in (engine.kv.keys, engine.kv.values):
            rows = views[layer][torch.tensor(table)].flatten(0, 1)
            out.append(rows[:num_tokens].clone())
    return out


@pytest.mark.parametrize("size", [7, 16, 23, 48, 61])
def test_chunks_equal_whole_prefill_on_and_off_block_boundaries(
    make_engine: MakeEngine, size: int
) -> None:
    engine = make_engine()
    prompt = prompt_of(61, seed=size)
    reference = reference_logits(engine, prompt)
    whole_blocks, chunk_blocks = engine.kvbm.allocate(4), engine.kvbm.allocate(4)
    assert whole_blocks is not None and chunk_blocks is not None
    whole_table, table = whole_blocks.block_ids, chunk_blocks.block_ids
    engine.prefill(prompt, whole_table, 0)
    calls = engine.stats.num_prefill_calls
    for start, end in chunked(prompt, 0, size):
        logits = engine.step([], [PrefillChunk(prompt[start:end], table, start)])
        assert logits.shape == (1, 1024)
        torch.testing.assert_close(logits[0], reference[end - 1], **TOL)
    assert engine.stats.num_prefill_calls - calls == -(-61 // size)
    for mine, whole in zip(pages(engine, table, 61), pages(engine, whole_table, 61), strict=True):
        torch.testing.assert_close(mine, whole, **TOL)
    engine.kvbm.release(whole_blocks)
    engine.kvbm.release(chunk_blocks)


def test_one_step_mixes_decodes_and_chunks(make_engine: MakeEngine) -> None:
    """Two decodes, a chunk from 0 and a chunk continuing mid-block in one forward call equal
    each computed alone; K/V of every token lands in its own sequence's blocks."""
    engine, alone = make_engine(device_blocks=64), make_engine(device_blocks=64)
    decoding = [prompt_of(20, seed=1), prompt_of(37, seed=2)]
    fresh, continued = prompt_of(29, seed=3), prompt_of(50, seed=4)
    tables = []
    for e in (engine, alone):
        blocks = e.kvbm.allocate(16)
        assert blocks is not None
        ids = blocks.block_ids
        t = {"d0": ids[0:3], "d1": ids[3:6], "fresh": ids[6:8], "cont": ids[8:12]}
        for name, seq in (("d0", decoding[0]), ("d1", decoding[1])):
            e.prefill(seq, t[name], 0)
        e.prefill(continued[:21], t["cont"], 0)  # the first chunk: ends inside block 1
        tables.append(t)
    t = tables[0]
    decodes = [
        DecodeRequest(9, t["d0"], 20),
        DecodeRequest(11, t["d1"], 37),
    ]
    chunks = [PrefillChunk(fresh, t["fresh"], 0), PrefillChunk(continued[21:40], t["cont"], 21)]
    steps = engine.stats.num_steps
    mixed = engine.step(decodes, chunks)
    assert engine.stats.num_steps == steps + 1
    assert mixed.shape == (4, 1024)
    t = tables[1]
    expected = [
        alone.decode_step([DecodeRequest(9, t["d0"], 20)])[0],
        alone.decode_step([DecodeRequest(11, t["d1"], 37)])[0],
        alone.prefill(fresh, t["fresh"], 0),
        alone.prefill(continued[:40], t["cont"], 21),
    ]
    for row, want in zip(mixed, expected, strict=True):
        torch.testing.assert_close(row, want, **TOL)
    torch.testing.assert_close(mixed[3], reference_logits(engine, continued[:40])[-1], **TOL)
    for name, n in (("d0", 21), ("d1", 38), ("fresh", 29), ("cont", 40)):
        got, want = pages(engine, tables[0][name], n), pages(alone, tables[1][name], n)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def greedy_chunked(
    engine: Engine, prompt: list[int], size: int | None, max_tokens: int
) -> tuple[list[int], int]:
    """Greedy output of ``prompt`` prefilled in chunks of ``size`` (None: whole) through
    ``SequenceBlocks`` with a commit per chunk; also the cached prefix length at open."""
    with SequenceBlocks.open(engine.kvbm, prompt) as seq:
        cached = seq.num_computed
        assert seq.reserve(len(prompt) + max_tokens - 1)
        for start, end in chunked(prompt, cached, size or len(prompt)):
            logits = engine.step([], [PrefillChunk(prompt[start:end], seq.block_table, start)])
            seq.commit(end)
        out = greedy(logits)
        while len(out) < max_tokens:
            position = len(seq.tokens)
            seq.append(out[-1])
            out += greedy(engine.decode_step([DecodeRequest(out[-1], seq.block_table, position)]))
            seq.commit()
        return out, cached


def test_prefix_hit_then_chunks_gives_the_uncached_output(make_engine: MakeEngine) -> None:
    cached_engine, fresh_engine = make_engine(), make_engine()
    shared = prompt_of(40, seed=5)
    prompt = shared + prompt_of(45, seed=6)
    cached_engine.generate(shared, 1)  # registers the two full blocks of the shared prefix
    got, num_cached = greedy_chunked(cached_engine, prompt, 13, 12)
    want, fresh_cached = greedy_chunked(fresh_engine, prompt, None, 12)
    assert (num_cached, fresh_cached) == (32, 0)
    assert got == want
    for engine in (cached_engine, fresh_engine):
        pool = engine.kvbm.pool()
        pool.check_invariants()
        assert pool.stats().num_in_use == 0


def test_blocks_register_only_once_full_and_committed(make_engine: MakeEngine) -> None:
    engine = make_engine()
    prompt = prompt_of(50, seed=7)

    def num_cached_now() -> int:
        with SequenceBlocks.open(engine.kvbm, [*prompt, 3]) as probe:
            return probe.num_cached_tokens

    with SequenceBlocks.open(engine.kvbm, prompt) as seq:
        assert seq.reserve(50)
        engine.step([], [PrefillChunk(prompt[:20], seq.block_table, 0)])
        seq.commit(20)
        assert num_cached_now() == 16  # block 0 full; block 1 holds 4 of 16
        engine.step([], [PrefillChunk(prompt[20:31], seq.block_table, 20)])
        seq.commit(31)
        assert num_cached_now() == 16  # block 1 one position short
        with pytest.raises(InvalidInput, match="committed already"):
            seq.commit(30)
        with pytest.raises(InvalidInput, match="50 exist"):
            seq.commit(51)
        engine.step([], [PrefillChunk(prompt[31:50], seq.block_table, 31)])
        seq.commit(50)
        assert num_cached_now() == 48
    pool = engine.kvbm.pool()
    pool.check_invariants()
    assert pool.stats().num_in_use == 0


def test_a_step_without_work_or_with_an_empty_chunk_is_refused(make_engine: MakeEngine) -> None:
    engine = make_engine()
    with pytest.raises(InvalidInput, match="at least one"):
        engine.step([], [])
    with pytest.raises(InvalidInput, match="num_computed"):
        engine.step([], [PrefillChunk([], [0], 3)])
