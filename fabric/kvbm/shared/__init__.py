"""G4, the shared disk store: checksummed block files by sequence hash on a shared directory.

    file_io  byte views of caller buffers (no copy), vectored reads and writes that loop over
             short transfers, exclusive creation, mtime stamps, quiet unlinks
    format   the block file: 64-byte header (magic, version, compat and sequence hash, lengths,
             checksums), names under the directory, verification
    store    SharedBlockStore: index (an ``LruPolicy`` over sequence hashes), atomic writes,
             verified vectored reads, rescan on start; ``store_blocks`` packs pool blocks into it

Within the package ``store`` imports ``format``, which imports ``file_io``. The package imports
``fabric.kvbm.core`` and ``fabric.kvbm.tiers``; nothing above.
"""
