"""The block manager's core: ids, hashes, block handles, one tier's pool, eviction, layouts, events.

Nothing here moves bytes or knows about other tiers, files or processes::

    types      BlockId, SequenceHash, BlockHash (NewType); Tier (G1..G4)
    hashing    chained salted xxh3-64 sequence hashes of token blocks
    block      block records and the MutableBlocks / ImmutableBlocks handles (lifecycle as types)
    pool       BlockPool: reset list, registry, refcounts; allocate / register / match / release
    eviction   EvictionPolicy protocol and policies (LRU, priority+LRU, LFU); disk admission filter
    layout     LayoutSpec (fully contiguous / layer separate) and KvGeometry
    events     BlockStored / BlockRemoved / AllCleared records and sinks

Imports point one way inside: types <- hashing, eviction, layout, events <- block <- pool.
"""
