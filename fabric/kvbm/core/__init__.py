"""The block manager's core: ids, hashes, block handles, one tier's pool, eviction, layouts, events.

Nothing here moves bytes or knows about other tiers, files or processes (but ``extension``'s
build cache and lock)::

    types      BlockId, SequenceHash, BlockHash (NewType); Tier (G1..G4)
    hashing    chained salted xxh3-64 sequence hashes of token blocks (native when loaded)
    extension  builds (into ~/.cache) and loads the csrc/ extension: prompt hashes, block copies
    block      block records and the MutableBlocks / ImmutableBlocks handles (lifecycle as types)
    pool       BlockPool: reset list, registry, refcounts; allocate / register / match / release
    eviction   EvictionPolicy protocol and policies (LRU, priority+LRU, LFU); disk admission filter
    layout     LayoutSpec (fully contiguous / layer separate) and KvGeometry
    events     BlockStored / BlockRemoved / AllCleared records and sinks

Imports point one way inside: extension, types <- hashing, eviction, layout, events <- block <-
pool.
"""
