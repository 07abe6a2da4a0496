"""The KVBM demo: one worker's block lifecycle and tiers on real tensors, narrated.

A fake prefill writes random KV into device blocks and registers them; the blocks are offloaded
to host and disk; the device (then the host) is flooded so they are evicted; the same prompt then
matches from the host (then the disk), is onboarded, and its bytes are compared with what the
prefill wrote. Run it with ``fabric demo`` (or ``launch/quickstart.sh``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from fabric.errors import FabricError
from fabric.kvbm import (
    KvBlockManager,
    KvGeometry,
    RecordingSink,
    SequenceHash,
    TensorStorage,
    Tier,
    build_kvbm,
    load_kvbm_config,
)

T = TypeVar("T")
GEOMETRY = KvGeometry(num_layers=4, num_kv_heads=2, head_size=64, dtype=torch.float16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length (tokens)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument(
        "--disk-dir", type=Path, default=None, help="disk tier directory (default: a temp dir)"
    )


def run(args: argparse.Namespace) -> int:
    if args.prompt_tokens < args.block_size:
        raise FabricError(
            f"--prompt-tokens {args.prompt_tokens} is shorter than one block ({args.block_size})"
        )
    with tempfile.TemporaryDirectory(prefix="fabric-demo-") as tmp:
        num_blocks = args.prompt_tokens // args.block_size
        config = load_kvbm_config(
            block_size=args.block_size,
            device_blocks=num_blocks * 2,
            cpu_cache_blocks=num_blocks * 2,
            disk_cache_blocks=num_blocks * 4,
            disk_cache_dir=args.disk_dir or Path(tmp),
            disk_admit_after=1,
        )
        events = RecordingSink()
        kvbm = build_kvbm(config, GEOMETRY, events=events)
        try:
            _narrate(kvbm, args.prompt_tokens)
        finally:
            kvbm.close()
        kinds = Counter(f"{type(e).__name__}({e.tier.value})" for e in events.events)
        print(f"\nevents published: {dict(sorted(kinds.items()))}")
    return 0


def _narrate(kvbm: KvBlockManager, prompt_tokens: int) -> None:
    bs = kvbm.block_size
    print(f"KV block manager: tiers {[t.name for t in kvbm.tiers]}, {bs} tokens per block")
    for tier in kvbm.tiers:
        s = kvbm.pool(tier).stats()
        print(f"  {tier.name:<6} ({tier.value}) {s.num_blocks:>5} blocks")
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 32000, (prompt_tokens,), generator=generator).tolist()

    hashed, ms = _timed(lambda: kvbm.hash_tokens(prompt))
    hashes = hashed.sequence_hashes
    print(f"\n1. prompt of {prompt_tokens} tokens -> {len(hashes)} chained hashes in {ms:.2f} ms")
    found = kvbm.match(hashes)
    print(f"   match: {found.num_blocks} blocks cached anywhere (a cold start)")
    kvbm.release_match(found)

    written = _prefill(kvbm, prompt, hashes, generator)
    print(f"2. prefill wrote KV into {len(hashes)} device blocks and registered them")

    with kvbm.pool(Tier.DEVICE).match(hashes) as on_device:
        n, ms = _timed(lambda: kvbm.offload(on_device, Tier.HOST))
    print(f"3. offload device -> host: {n} blocks in {ms:.2f} ms")
    with kvbm.pool(Tier.HOST).match(hashes) as on_host:
        n, ms = _timed(lambda: kvbm.offload(on_host, Tier.DISK))
    print(f"   offload host -> disk:   {n} blocks in {ms:.2f} ms")

    _flood(kvbm, Tier.DEVICE)
    print("4. other requests flooded the device pool: the prompt's device blocks were evicted")
    _onboard_and_check(kvbm, hashes, written, "host")

    _flood(kvbm, Tier.DEVICE)
    _flood(kvbm, Tier.HOST)
    print("5. the device and host pools were flooded too: only the disk tier holds the prompt")
    _onboard_and_check(kvbm, hashes, written, "disk")

    print("\npool occupancy and counters:")
    for tier in kvbm.tiers:
        s = kvbm.pool(tier).stats()
        print(
            f"  {tier.name:<6} free={s.num_free:<5} cached={s.num_cached:<5} "
            f"in_use={s.num_in_use:<3} hits={s.hits:<5} evictions={s.evictions}"
        )


def _prefill(
    kvbm: KvBlockManager,
    prompt: list[int],
    hashes: list[SequenceHash],
    generator: torch.Generator,
) -> torch.Tensor:
    """Write random KV into freshly allocated device blocks; return what was written."""
    blocks = kvbm.allocate(len(hashes))
    if blocks is None:
        raise FabricError("the device pool is too small for the demo prompt")
    storage = kvbm.storage(Tier.DEVICE)
    assert isinstance(storage, TensorStorage)
    written = torch.randn(
        len(hashes), GEOMETRY.num_layers, 2, kvbm.block_size, 128, generator=generator
    )
    written = written.to(GEOMETRY.dtype)
    for i, block_id in enumerate(blocks):
        for layer in range(GEOMETRY.num_layers):
            for outer in range(2):
                storage.block_view(block_id, layer, outer).copy_(written[i, layer, outer])
    blocks.advance(blocks.capacity)
    kvbm.release(kvbm.register(blocks, hashes, token_ids=prompt[: len(hashes) * kvbm.block_size]))
    return written


def _flood(kvbm: KvBlockManager, tier: Tier) -> None:
    pool = kvbm.pool(tier)
    blocks = pool.allocate(pool.num_free)
    if blocks is not None:
        pool.release(blocks)


def _onboard_and_check(
    kvbm: KvBlockManager, hashes: list[SequenceHash], written: torch.Tensor, source: str
) -> None:
    found = kvbm.match(hashes)
    split = {t.name: found.count(t) for t in kvbm.tiers}
    kvbm.release_match(found)
    onboarded, ms = _timed(lambda: kvbm.match_and_onboard(hashes))
    storage = kvbm.storage(Tier.DEVICE)
    assert isinstance(storage, TensorStorage)
    same = all(
        torch.equal(storage.block_view(block_id, layer, outer), written[i, layer, outer])
        for i, block_id in enumerate(onboarded)
        for layer in range(GEOMETRY.num_layers)
        for outer in range(2)
    )
    n = len(onboarded)
    kvbm.release(onboarded)
    verdict = "identical to what prefill wrote" if same else "DIFFERENT from what prefill wrote"
    print(f"   same prompt again: match by tier {split}")
    print(f"   onboarded {n} blocks from {source} in {ms:.2f} ms; bytes {verdict}")
    if not same or n != len(hashes):
        raise FabricError(f"onboarding from {source} lost or corrupted KV blocks")


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - start) * 1e3
