"""The connector's tier bytes on one vLLM worker rank, and the copies in and out of vLLM's pages.

``TierMover`` owns this rank's storages of the connector's tiers (``fabric.kvbm.tier_storage``:
host memory, pinned where CUDA is present; one file on the local disk tier), with the block ids
the scheduler's ``TierLedger`` hands out, and executes the jobs of ``jobs``:

* ``load`` (``TierLoad``) and ``save`` (``TierSave``) on the model thread, each one
  ``copy_blocks`` between a tier and vLLM's pages (adopted as a fabric storage): a save is the
  step's copy-out of its newly full blocks, the model thread's whole share of an offload;
* ``write`` (``TierWrite``: host -> local disk, host -> the G4 store) on the copy thread of the
  block manager's offload (``fabric.kvbm.offload``'s ``CopyThread``), so disk never stalls the
  model.

``report`` returns every job finished or failed since the last report, once. A write reads host
blocks the scheduler keeps pinned until it is reported, and writes blocks only it was given, so
the copy thread and the model thread never touch the same block at the same time except to read
it.

A fabric block's bytes are vLLM's pages of one block id, layer after layer; tiers keep them in
the fully contiguous layout of the same geometry, which packs to those very bytes, so a G4 file
written from the host tier equals one written from vLLM's pages.
"""

from __future__ import annotations

import dataclasses
import logging

from fabric.errors import FabricError
from fabric.integrations.vllm.jobs import JobReport, TierLoad, TierSave, TierWrite
from fabric.kvbm import (
    CopyJob,
    CopyThread,
    KvbmConfig,
    LayoutKind,
    LayoutSpec,
    OffloadPath,
    SharedBlockStore,
    Storage,
    Tier,
    copy_blocks,
    tier_storage,
)

logger = logging.getLogger(__name__)

_WRITE_PATHS = {
    Tier.DISK: OffloadPath(Tier.HOST, Tier.DISK, priority=1),
    Tier.SHARED: OffloadPath(Tier.HOST, Tier.SHARED, priority=0),
}


class TierMover:
    """This rank's tier storages and the copies of the connector's jobs (module docstring)."""

    def __init__(self, storages: dict[Tier, Storage], shared: SharedBlockStore | None) -> None:
        self._storages = storages
        self._shared = shared
        self._pages: Storage | None = None
        self._copier = CopyThread("fabric-vllm-writes")
        self._report = JobReport()
        self._writes: dict[CopyJob, int] = {}  # queued or running, by job id

    @classmethod
    def build(
        cls, config: KvbmConfig, pages: LayoutSpec, shared: SharedBlockStore | None
    ) -> TierMover | None:
        """Storages of the configured tiers for blocks of ``pages``' geometry (None: no tier)."""
        storages: dict[Tier, Storage] = {}
        try:
            for tier in (Tier.HOST, Tier.DISK):
                num_blocks = config.tier_blocks(tier, pages.block_bytes)
                if num_blocks:
                    layout = dataclasses.replace(
                        pages, kind=LayoutKind.FULLY_CONTIGUOUS, num_blocks=num_blocks
                    )
                    storages[tier] = tier_storage(config, tier, layout)
        except BaseException:
            for storage in storages.values():
                storage.close()
            raise
        return cls(storages, shared) if storages else None

    def attach(self, pages: Storage) -> None:
        """vLLM's KV pages, adopted (``KvPages.storage``): the other side of loads and saves."""
        self._pages = pages

    def storage(self, tier: Tier) -> Storage:
        return self._storages[tier]

    def load(self, load: TierLoad) -> bool:
        """Copy a hit into vLLM's blocks; False (logged, reported failed) when it failed."""
        try:
            copy_blocks(self._storages[load.tier], load.src_ids, self._need_pages(), load.block_ids)
        except (FabricError, OSError, RuntimeError, ValueError) as exc:
            logger.warning(
                "request %s: loading %d blocks from the %s tier failed: %s",
                load.request_id,
                len(load.block_ids),
                load.tier.name,
                exc,
            )
            self._report.failed.add(load.job_id)
            return False
        self._done(load.job_id)
        return True

    def save(self, save: TierSave) -> None:
        """Copy the step's newly full blocks out of vLLM's pages into the host tier."""
        copy_blocks(self._need_pages(), save.block_ids, self._storages[Tier.HOST], save.host_ids)

    def mark_done(self, job_id: int) -> None:
        """Report a job finished outside the mover (a P/D hold released or expired)."""
        self._done(job_id)

    def write(self, write: TierWrite) -> None:
        """Queue a write-down on the copy thread (after this step's saves)."""
        dst: Storage | SharedBlockStore
        if write.dst is Tier.SHARED:
            if self._shared is None:
                self._report.failed.add(write.job_id)
                return
            dst = self._shared
        else:
            dst = self._storages[write.dst]
        job = CopyJob(
            _WRITE_PATHS[write.dst],
            [],
            self._storages[write.src],
            list(write.src_ids),
            dst,
            list(write.dst_ids),
        )
        self._writes[job] = write.job_id
        self._copier.submit(job)

    def report(self) -> JobReport:
        """Jobs finished or failed since the last call (each once)."""
        for job in self._copier.collect(0):
            job_id = self._writes.pop(job)
            if job.error is not None:
                logger.warning("a %s write failed: %s", job.path.target.name, job.error)
                self._report.failed.add(job_id)
            else:
                self._done(job_id)
        report, self._report = self._report, JobReport()
        return report

    @property
    def num_writes(self) -> int:
        """Writes queued or running on the copy thread."""
        return len(self._writes)

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish queued writes (bounded), then close the storages."""
        self._copier.stop(timeout_s)
        for storage in self._storages.values():
            storage.close()
        self._storages.clear()

    def _done(self, job_id: int) -> None:
        self._report.done[job_id] = 1

    def _need_pages(self) -> Storage:
        if self._pages is None:
            raise FabricError("vLLM has not registered its KV caches with the connector yet")
        return self._pages
