"""Where a tier's bytes live and how they move between tiers on one host.

    storage     Storage protocol; TensorStorage (device, pinned/shared host, adopted engine
                pages) and DiskStorage (G3: one preallocated file, O_DIRECT where allowed)
    block_copy  copy_blocks between any two storages of one geometry; gather/scatter staging
    copy_plan   what a copy derives from its (source, target) storage pair alone, cached per pair
    kernels     the csrc/ batched copy extension (built on first use), numpy fallback

Imports only ``fabric.kvbm.core`` and ``fabric.transfer.memory`` (buffer descriptions).
"""
