"""G4, the shared disk store: checksummed block files by sequence hash on a shared directory.

    format  the block file: 64-byte header (magic, version, compat and sequence hash, lengths,
            checksums), names under the directory, verification
    store   SharedBlockStore: index (an ``EvictionPolicy`` over sequence hashes), atomic writes,
            verified vectored reads, rescan on start; ``store_blocks`` packs pool blocks into it

Imports ``fabric.kvbm.core`` and ``fabric.kvbm.tiers``; nothing above.
"""
