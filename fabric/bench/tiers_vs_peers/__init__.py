"""Our host, node and disk tiers against kvcr's and LMCache's, on the same bytes (issue 13).

Stores and loads ``--total-mib`` (64 MiB) as blocks of each ``--sizes`` (256 KiB and 16 KiB),
plus single blocks one at a time for the latency p50 / p99, through six systems, one row each:

  fabric_host   kvbm G2 (host tier)              our process
  fabric_node   the node cache (fabric/node)     its own process, real POSIX shared memory
  fabric_disk   kvbm G3 (one O_DIRECT file)      our process
  kvcr_host     kvcr's local DRAM tier           .venv-kvcr (kvcr 0.1.1, NIXL 1.5.0)
  kvcr_disk     kvcr's G3 tier (POSIX backend)   .venv-kvcr
  lmcache_cpu   LMCache's engine, local_cpu      .venv-lmcache (LMCache 0.5.6)

The peers run in their own virtual environments (``launch/setup_peers.sh`` makes them; kvcr pins
another NIXL than ours), each row one subprocess of a runner script of this package that prints
JSON; a peer that is missing or fails gives a row with ``error`` and no figures. Their pythons:
``<repo>/.venv-kvcr/bin/python`` and ``<repo>/.venv-lmcache/bin/python``, or the venvs named by
``$FABRIC_KVCR_VENV`` / ``$FABRIC_LMCACHE_VENV``. A full run with the defaults took about 10
minutes at a load average of 5-14 on 2 cores (kvcr's disk tier at 16 KiB is the longest row).
Every system is driven through its public API and timed and checked by the same code
(``measure``): each load is compared byte for byte with what was stored (``verified``). What
each path includes is in ``paths`` of the JSON (``command.PATHS``). Every system copies with one
thread.

JSON: ``rows`` (``system``, ``tier``, ``block_bytes``, ``store_gbps``, ``load_gbps``,
``latency_us_p50`` / ``latency_us_p99`` of a single-block load, ``store_latency_us_*`` of a
single-block store, ``verified``, the per-repeat figures; ``error`` when it failed),
``memcpy`` (one-process ``np.copyto`` of the batch: the physical limit), ``summary`` (per tier
and block size our best against the faster peer's, ``report``), ``goals`` (store and load at
least 1.5x the faster peer's, lower single-block latency), ``paths``, ``params``, ``machine``.

Modules: ``measure`` (the driver and checker, numpy only: the runners import it too), ``ours``
(our three paths), ``kvcr_runner`` and ``lmcache_runner`` (run in the peers' venvs), ``peers``
(runs them), ``report`` (summary and goals), ``command`` (flags and the run).
"""

from fabric.bench.tiers_vs_peers.command import add_arguments, run

__all__ = ["add_arguments", "run"]
