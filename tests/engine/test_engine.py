"""Engine over the KVBM device pool: paged equals unpaged, layouts agree, prefix hits skip compute,
batched decode equals one at a time, a full pool is a clear outcome, and no block leaks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_reference import reference_logits

from fabric.engine import DecodeRequest, Engine, EngineFinish, greedy
from fabric.errors import InvalidInput, LayoutMismatch, PoolExhausted
from fabric.kvbm import (
    KvGeometry,
    LayoutKind,
    SequenceBlocks,
    TensorStorage,
    Tier,
    build_kvbm,
    load_kvbm_config,
)

MakeEngine = Callable[..., Engine]
TOL = {"atol": 1e-4, "rtol": 1e-4}


def prompt_of(length: int, seed: int = 0) -> list[int]:
    return torch.randint(2, 1024, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_no_leak(engine: Engine) -> None:
    pool = engine.kvbm.pool()
    pool.check_invariants()
    assert pool.stats().num_in_use == 0


def test_paged_prefill_and_decode_equal_unpaged_forward(make_engine: MakeEngine) -> None:
    engine = make_engine()
    blocks = engine.kvbm.allocate(4)
    assert blocks is not None
    table = blocks.block_ids[::-1]  # descending, not adjacent: exercises the block table
    seq = prompt_of(37)
    logits = engine.prefill(seq, table, 0)
    torch.testing.assert_close(logits, reference_logits(engine, seq)[-1], **TOL)
    for _ in range(12):
        (token,) = greedy(logits)
        seq.append(token)
        logits = engine.decode_step([DecodeRequest(token, table, len(seq) - 1)])[0]
        torch.testing.assert_close(logits, reference_logits(engine, seq)[-1], **TOL)
    engine.kvbm.release(blocks)


def test_prefill_continues_from_any_computed_position(make_engine: MakeEngine) -> None:
    engine = make_engine()
    blocks = engine.kvbm.allocate(3)
    assert blocks is not None
    seq = prompt_of(45, seed=1)
    reference = reference_logits(engine, seq)
    torch.testing.assert_close(engine.prefill(seq[:21], blocks.block_ids, 0), reference[20], **TOL)
    torch.testing.assert_close(engine.prefill(seq, blocks.block_ids, 21), reference[-1], **TOL)
    assert (engine.stats.num_prefill_tokens, engine.stats.num_prefill_calls) == (45, 2)
    engine.kvbm.release(blocks)


def test_fully_contiguous_and_layer_separate_layouts_agree(make_engine: MakeEngine) -> None:
    fc = make_engine(layout=LayoutKind.FULLY_CONTIGUOUS)
    ls = make_engine(layout=LayoutKind.LAYER_SEPARATE)
    prompt = prompt_of(50, seed=2)
    out_fc, out_ls = fc.generate(prompt, 20), ls.generate(prompt, 20)
    assert out_fc.tokens == out_ls.tokens
    # Both pools hold the same K/V bytes in the same blocks: the model really uses the pool.
    st_fc, st_ls = fc.kvbm.storage(Tier.DEVICE), ls.kvbm.storage(Tier.DEVICE)
    assert isinstance(st_fc, TensorStorage) and isinstance(st_ls, TensorStorage)
    num_blocks = (50 + 19) // 16
    for block in range(num_blocks):
        for layer in range(fc.config.num_layers):
            for outer in (0, 1):
                view = st_fc.block_view(block, layer, outer)
                assert view.abs().sum() > 0
                assert torch.equal(view, st_ls.block_view(block, layer, outer))


def test_second_generate_computes_only_the_uncached_suffix(make_engine: MakeEngine) -> None:
    engine = make_engine()
    prompt = prompt_of(40, seed=3)
    first = engine.generate(prompt, 10)
    assert (first.num_cached_tokens, first.num_computed_tokens) == (0, 40)
    before = engine.stats.num_prefill_tokens
    second = engine.generate(prompt, 10)
    assert second.tokens == first.tokens
    assert (second.num_cached_tokens, second.num_computed_tokens) == (32, 8)
    assert engine.stats.num_prefill_tokens - before == 8
    # Blocks completed during decode were registered too: prompt + 9 generated tokens = 49
    # tokens, 48 of them cached, and the continuation is the first run's.
    third = engine.generate(prompt + first.tokens[:9], 1)
    assert (third.num_cached_tokens, third.num_computed_tokens) == (48, 1)
    assert third.tokens == first.tokens[9:10]
    assert_no_leak(engine)


def test_fully_cached_prompt_recomputes_its_last_block(make_engine: MakeEngine) -> None:
    engine = make_engine()
    prompt = prompt_of(48, seed=4)
    first = engine.generate(prompt, 5)
    second = engine.generate(prompt, 5)
    assert (second.num_cached_tokens, second.num_computed_tokens) == (32, 16)
    assert second.tokens == first.tokens
    assert engine.kvbm.pool().stats().duplicates >= 1  # the recomputed block deduplicated
    assert_no_leak(engine)


def run_decode(
    engine: Engine, prompts: list[list[int]], steps: int, batched: bool
) -> list[torch.Tensor]:
    """Prefill each prompt, then ``steps`` decode steps; returns every step's logits rows."""
    seqs = [SequenceBlocks.open(engine.kvbm, p) for p in prompts]
    tokens: list[int] = []
    for seq in seqs:
        assert seq.reserve(len(seq.tokens) + steps)
        tokens += greedy(engine.prefill(seq.tokens, seq.block_table, seq.num_computed))
        seq.commit()
    rows = []
    for _ in range(steps):
        requests = []
        for seq, token in zip(seqs, tokens, strict=True):
            requests.append(DecodeRequest(token, seq.block_table, len(seq.tokens)))
            seq.append(token)
        if batched:
            logits = engine.decode_step(requests)
        else:
            logits = torch.cat([engine.decode_step([r]) for r in requests])
        for seq in seqs:
            seq.commit()
        rows.append(logits)
        tokens = greedy(logits)
    for seq in seqs:
        seq.release()
    return rows


def test_batched_decode_equals_one_sequence_at_a_time(make_engine: MakeEngine) -> None:
    prompts = [prompt_of(5, seed=5), prompt_of(21, seed=6), prompt_of(40, seed=7)]
    batched_engine, single_engine = make_engine(), make_engine()
    batched = run_decode(batched_engine, prompts, steps=14, batched=True)
    single = run_decode(single_engine, prompts, steps=14, batched=False)
    assert batched_engine.stats.num_decode_calls == 14
    assert single_engine.stats.num_decode_calls == 14 * 3
    for b, s in zip(batched, single, strict=True):
        assert b.shape == (3, 1024)
        torch.testing.assert_close(b, s, **TOL)
        assert greedy(b) == greedy(s)
    assert_no_leak(batched_engine)
    assert_no_leak(single_engine)


def test_full_device_pool_is_a_clear_outcome(make_engine: MakeEngine) -> None:
    engine = make_engine(device_blocks=6)
    prompt = prompt_of(40, seed=8)
    with pytest.raises(PoolExhausted, match="pool holds 6"):
        engine.generate(prompt, 100)  # 139 tokens need 9 blocks: can never fit
    assert_no_leak(engine)
    with SequenceBlocks.open(engine.kvbm, prompt_of(70, seed=9)) as other:
        assert other.reserve(80)  # 5 of 6 blocks held by another request
        busy = engine.generate(prompt, 10)
        assert busy.finish is EngineFinish.NO_BLOCKS and busy.tokens == []
    done = engine.generate(prompt, 10)
    assert done.finish is EngineFinish.LENGTH and len(done.tokens) == 10
    assert_no_leak(engine)


def test_pool_with_another_geometry_is_refused(tiny_dir: Path) -> None:
    config = load_kvbm_config(block_size=16, device_blocks=4)
    for geometry, message in (
        (KvGeometry(4, 2, 32, torch.float32), "inner_dim is 64, the model needs 128"),
        (KvGeometry(4, 2, 64, torch.float16), "dtype is float16"),
        (KvGeometry(4, 2, 64, torch.float32, kv_split=False), "outer_dim is 1"),
    ):
        kvbm = build_kvbm(config, geometry)
        with pytest.raises(LayoutMismatch, match=message):
            Engine(tiny_dir, kvbm)
        kvbm.close()


def test_bad_inputs_raise_invalid_input(make_engine: MakeEngine) -> None:
    engine = make_engine()
    with pytest.raises(InvalidInput, match="position 20 needs 2"):
        engine.prefill(prompt_of(21), [0], 0)
    with pytest.raises(InvalidInput, match="token ids"):
        engine.prefill([5, 1024], [0], 0)
    with pytest.raises(InvalidInput, match="out of range"):
        engine.decode_step([(5, [999], 3)])
    with pytest.raises(InvalidInput, match="max_position_embeddings"):
        engine.decode_step([(5, list(range(32)), 4096)])
    with pytest.raises(InvalidInput, match="num_computed"):
        engine.prefill([5, 6], [0], 2)
    with pytest.raises(InvalidInput, match="empty"):
        engine.generate([], 3)
