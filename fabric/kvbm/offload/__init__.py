"""The asynchronous offload / onboard manager: tier moves off the owner thread's critical path.

    manager    OffloadManager (owner-thread bookkeeping, ``step``), Onboarding, the factory
    moves      OffloadPath (one row of the table), TierMove and its states, OffloadStats
    queue      per-path priority queues with the bound on queued blocks
    copier     the one copy thread: copies on storages and ids, G4 writes
    writeback  dirty-block bookkeeping for write-back mode

Imports point one way: moves <- queue, copier, writeback <- manager; the package sits above the
``KvBlockManager`` facade and never the other way round.
"""
