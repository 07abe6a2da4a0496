"""Remote block reads over NIXL (UCX on loopback): our path against raw NIXL and memcpy.

With ``--hosts`` the same rows are measured between two hosts made of network namespaces
(``fabric.bench.netns``, root needed): the child runs in a namespace of its own, this process in
the root namespace, joined by veth pairs through a bridge, UCX forced onto TCP on both sides
(``UCX_TLS=tcp``, each side's interface in ``UCX_NET_DEVICES``), and the child progresses its
agent every ``POLL_S`` as a prefill worker holding blocks does (over TCP a READ needs the target
progressed). ``memcpy_gbps`` stays the in-process copy.

One child process (this module run with ``--child``, ``UCX_NET_DEVICES=lo``) fills, for every
block size, a fully contiguous host storage of ``--total-mib`` with bytes drawn from a seed,
registers it with a ``NixlAgent`` and exports a ``RemoteBlockSet`` of all its blocks in a
scattered (permuted) order; it sends them up a pipe and idles until its stdin closes. The parent
reads them into a fully contiguous storage of its own (``local_ids = 0..n-1``). Per block size:

* ``num_descriptors``: descriptors after ``plan_read``'s coalescing (scattered ids merge little);
* ``fabric_gbps``: ``fabric.pd.RemoteReader.read`` (plan + post + poll), a worker's whole path;
* ``nixl_gbps``: raw ``nixl_agent`` ``initialize_xfer`` / ``transfer`` / ``check_xfer_state``
  on the same coalesced descriptors (descriptor lists built before the clock starts);
* ``nixl_per_block_gbps``: the same raw NIXL with one descriptor per (block, layer, outer)
  chunk, uncoalesced: the naive path;
* ``memcpy_gbps``: ``np.copyto`` of the same total bytes in one process: the physical limit;
* ``fabric_vs_nixl``, ``fabric_vs_memcpy``: ratios of the above.

Each figure is ``total_bytes`` over the median of ``--rounds`` timed runs, in GB/s (1e9 B/s).
Before timing, one read is checked byte for byte against the seeded source (``verified``). The
child must exit with status 0 once its stdin closes; any other status fails the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import msgpack
import numpy as np

from fabric.bench.netns import UCX_ENV, Lab, LabUnavailable, check_available
from fabric.errors import FabricError
from fabric.supervise import describe_exit

GEOMETRY = {"num_layers": 4, "outer_dim": 2, "block_size": 16}
"""Blocks are ``4 * 2 * 16 * inner_dim`` fp16 values; ``inner_dim`` sets the block size."""
BYTES_PER_INNER = 4 * 2 * 16 * 2
COMPAT = 0xBE7C4
SEED = 7
STARTUP_S = 60.0
CHILD_LIFETIME_S = 900.0
XFER_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``transfer`` subcommand's flags."""
    parser.add_argument("--total-mib", type=int, default=64, help="bytes per read (MiB)")
    parser.add_argument("--rounds", type=int, default=10, help="timed runs per figure")
    parser.add_argument(
        "--block-kib", default="16,256,2048", help="block sizes in KiB, comma separated"
    )
    parser.add_argument(
        "--hosts",
        action="store_true",
        help="read from another host made of a network namespace, UCX over TCP on a veth link "
        "(needs root and iproute2) instead of loopback",
    )


def _layout(block_bytes: int, total_bytes: int) -> Any:
    import torch

    from fabric.kvbm import LayoutKind, LayoutSpec

    n, inner = total_bytes // block_bytes, block_bytes // BYTES_PER_INNER
    return LayoutSpec(LayoutKind.FULLY_CONTIGUOUS, n, 4, 2, 16, inner, torch.float16, 1)


def _seeded(layout: Any, seed: int) -> Any:
    """A host storage of ``layout`` holding bytes drawn from ``seed`` (both sides agree)."""
    import torch

    from fabric.kvbm import host_storage

    storage = host_storage(layout)
    raw = storage.tensors[0].view(torch.uint8).numpy().reshape(-1)
    raw[:] = np.random.default_rng(seed).integers(0, 256, raw.size, dtype=np.uint8)
    return storage


def _scattered_ids(n: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(3).permutation(n)]


def _send(out: IO[bytes], payload: bytes) -> None:
    out.write(struct.pack("<I", len(payload)) + payload)
    out.flush()


def child_main() -> None:
    """Export one block set per block size (args: one msgpack frame on stdin), idle until EOF."""
    import torch

    from fabric.kvbm import export_block_set
    from fabric.transfer.nixl_agent import NixlAgent
    from fabric.worker.scheduler import POLL_S

    (length,) = struct.unpack("<I", sys.stdin.buffer.read(4))
    args = msgpack.unpackb(sys.stdin.buffer.read(length))
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # NIXL logs to stdout; keep the frame pipe clean
    torch.set_num_threads(1)
    agent = NixlAgent(f"bench-prefill-{uuid.uuid4().hex[:8]}")
    storages = [_seeded(_layout(b, args["total"]), SEED) for b in args["blocks"]]
    for storage in storages:
        agent.register(storage.buffers())
    sets = [
        export_block_set(s, _scattered_ids(s.layout.num_blocks), agent, COMPAT).to_bytes()
        for s in storages
    ]
    _send(out, msgpack.packb(sets))
    stdin, deadline = sys.stdin.fileno(), time.monotonic() + CHILD_LIFETIME_S
    poll_s = POLL_S if args["progress"] else 0.05
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stdin], [], [], poll_s)
        if ready and not os.read(stdin, 1):
            break
        if args["progress"]:
            agent.notifications()  # serves the parent's READs over TCP
    agent.close()
    for storage in storages:
        storage.close()


def _read_frame(proc: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    assert proc.stdout is not None
    fd, data, need = proc.stdout.fileno(), b"", 4
    deadline = time.monotonic() + timeout_s
    while len(data) < need:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise FabricError(f"transfer child sent nothing for {timeout_s} s")
        chunk = os.read(fd, need - len(data))
        if not chunk:
            raise FabricError(f"transfer child exited early with {proc.poll()}; see stderr")
        data += chunk
        if need == 4 and len(data) == 4:
            need += struct.unpack("<I", data)[0]
    return data[4:]


def _median_s(fn: Callable[[], None], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _raw_read(raw: Any, local: Any, remote: Any, peer: str) -> None:
    """One raw NIXL read: initialize, post, poll to DONE (bounded), release."""
    handle = raw.initialize_xfer("READ", local, remote, peer, b"", ["UCX"])
    try:
        state, deadline = raw.transfer(handle), time.monotonic() + XFER_TIMEOUT_S
        while state == "PROC" and time.monotonic() < deadline:
            state = raw.check_xfer_state(handle)
        if state != "DONE":
            raise FabricError(f"raw NIXL read ended in state {state!r}")
    finally:
        handle.release()


def _chunk_descs(layout: Any, base: int, ids: list[int]) -> np.ndarray:
    """``(n, 3)`` descriptors, one per (block, layer, outer) chunk of ``ids``, uncoalesced."""
    chunks = [
        layout.chunk_location(layer, outer)[1]
        for layer in range(layout.num_layers)
        for outer in range(layout.outer_dim)
    ]
    offsets = np.asarray(chunks, dtype=np.int64) * layout.chunk_bytes
    addr = base + np.asarray(ids, dtype=np.int64)[:, None] * layout.block_stride + offsets
    descs = np.zeros((addr.size, 3), dtype=np.uint64)
    descs[:, 0], descs[:, 1] = addr.reshape(-1), layout.chunk_bytes
    return descs


def _measure(agent: Any, block_set: Any, rounds: int) -> dict[str, Any]:
    """One row: read ``block_set`` every way, verify once, time each."""
    import torch

    from fabric.kvbm import host_storage, plan_read
    from fabric.pd import RemoteReader

    layout = block_set.layout
    n, total = layout.num_blocks, layout.num_blocks * layout.block_bytes
    local, expected = host_storage(layout), _seeded(layout, SEED)
    registration = agent.register(local.buffers())
    try:
        dst = local.tensors[0].view(torch.uint8).numpy().reshape(-1)
        src = expected.tensors[0].view(torch.uint8).numpy().reshape(-1)
        local_ids, remote_ids = list(range(n)), list(block_set.block_ids)
        dst[:] = 0

        reader = RemoteReader(agent, local, compat_hash=COMPAT, timeout_s=XFER_TIMEOUT_S)

        def fabric_read() -> None:
            reader.read(block_set, local_ids)

        fabric_read()
        got, want = dst.reshape(n, -1), src.reshape(n, -1)[np.asarray(remote_ids)]
        if not np.array_equal(got, want):
            raise FabricError(f"{layout.block_bytes}-byte blocks: bytes read differ from source")
        verified = True
        t_fabric = _median_s(fabric_read, rounds)
        peer, raw = block_set.agent_name, agent._agent
        local_regions, remote_regions = plan_read(local, local_ids, block_set, compat_hash=COMPAT)
        ld = raw.get_xfer_descs(local_regions.descs(), "DRAM")
        rd = raw.get_xfer_descs(remote_regions.descs(), "DRAM")
        t_nixl = _median_s(lambda: _raw_read(raw, ld, rd, peer), rounds)
        local_base, remote_base = local.buffers()[0].address, block_set.buffers[0].address
        lc = raw.get_xfer_descs(_chunk_descs(layout, local_base, local_ids), "DRAM")
        rc = raw.get_xfer_descs(_chunk_descs(layout, remote_base, remote_ids), "DRAM")
        t_per_block = _median_s(lambda: _raw_read(raw, lc, rc, peer), rounds)
        t_memcpy = _median_s(lambda: np.copyto(dst, src), rounds)
    finally:
        agent.deregister(registration)
        local.close()
        expected.close()
    gbps = {k: total / t / 1e9 for k, t in [("f", t_fabric), ("n", t_nixl), ("m", t_memcpy)]}
    return {
        "block_bytes": layout.block_bytes,
        "total_bytes": total,
        "num_blocks": n,
        "num_descriptors": len(local_regions),
        "fabric_gbps": round(gbps["f"], 3),
        "nixl_gbps": round(gbps["n"], 3),
        "nixl_per_block_gbps": round(total / t_per_block / 1e9, 3),
        "memcpy_gbps": round(gbps["m"], 3),
        "fabric_vs_nixl": round(gbps["f"] / gbps["n"], 3),
        "fabric_vs_memcpy": round(gbps["f"] / gbps["m"], 3),
        "verified": verified,
    }


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """NIXL logs to stdout; send fd 1 to stderr meanwhile so stdout carries only the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Spawn the exporting child, measure every block size (stdout kept clean)."""
    with _stdout_to_stderr():
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """Spawn the exporting child (on another host with ``--hosts``), measure every block size."""
    total = args.total_mib << 20
    blocks = [int(k) << 10 for k in str(args.block_kib).split(",") if k.strip()]
    if args.rounds < 1 or not blocks or any(b % BYTES_PER_INNER or total % b for b in blocks):
        raise FabricError(f"block sizes must divide --total-mib and be multiples of 256 B; {args}")
    with contextlib.ExitStack() as stack:
        cmd = [sys.executable, "-m", "fabric.bench.transfer", "--child"]
        if args.hosts:
            lab = stack.enter_context(_two_hosts())
            host = lab.hosts["h1"]
            cmd, child_ucx = host.command(cmd), dict(UCX_ENV)
            os.environ.update(UCX_TLS="tcp", UCX_NET_DEVICES=lab.root_link)
            link = f"tcp over veth ({lab.client_address} -> {host.address})"
        else:
            child_ucx = {"UCX_NET_DEVICES": "lo"}
            os.environ["UCX_NET_DEVICES"] = "lo"
            link = "loopback"
        rows = _read_from_child(cmd, dict(os.environ, **child_ucx), total, blocks, args)
    load = os.getloadavg()
    return {
        "rounds": args.rounds,
        "link": link,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": load},
    }


@contextlib.contextmanager
def _two_hosts() -> Iterator[Lab]:
    """A lab of one namespace host beside this (root) namespace, removed on exit."""
    try:
        check_available()
    except LabUnavailable as exc:
        raise FabricError(f"--hosts needs network namespaces: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="fabric-bench-hosts-") as log_dir:
        lab = Lab(Path(log_dir)).open(["h1"])
        try:
            yield lab
        finally:
            lab.close()


def _read_from_child(
    cmd: list[str], env: dict[str, str], total: int, blocks: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Start the exporting child, measure every block size, always reap the child."""
    from fabric.kvbm import RemoteBlockSet
    from fabric.transfer.nixl_agent import NixlAgent

    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    agent = None
    try:
        assert proc.stdin is not None
        frame = {"total": total, "blocks": blocks, "progress": bool(args.hosts)}
        _send(proc.stdin, msgpack.packb(frame))
        sets = [RemoteBlockSet.from_bytes(b) for b in msgpack.unpackb(_read_frame(proc, STARTUP_S))]
        agent = NixlAgent(f"bench-decode-{uuid.uuid4().hex[:8]}")
        rows = []
        for block_set in sets:
            print(f"transfer: {block_set.layout.block_bytes} B blocks", file=sys.stderr)
            rows.append(_measure(agent, block_set, args.rounds))
    finally:
        if agent is not None:
            agent.close()
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]
    if proc.returncode != 0:
        raise FabricError(f"the exporting child {describe_exit(proc.returncode)}")
    return rows


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child_main()
    else:
        sys.exit("run `python -m fabric.bench transfer`; --child is for its own subprocess")
