"""KvTrace: where each part of one request's prompt KV came from, and its compact wire form.

A serving worker builds one ``KvTrace`` per request (``fabric.worker``) from what it already
computes (the manager's onboarded prefix per tier, the node-tier load, the NIXL read of the
prefill or peer worker's offer, the positions it computed) and sends it to the frontend as one
string in ``TokenChunk.stats["kv_trace"]``; the frontend decodes it into the response's
``fabric.kv_trace`` (``fabric.frontend.traces``). The wire stays a flat scalar map, so neither
the message layout nor ``PROTOCOL_VERSION`` changes: a frontend that does not know the key shows
the string, a worker that does not send it leaves the trace empty.

Wire form: segments in prompt order, ``,``-separated, each ``<source>:<start>-<end>`` (token
positions, end exclusive), e.g. ``host:0-64,prefill:64-100``. No free text travels in it: the
worker of a ``peer`` or ``prefill`` segment is the chunk's ``prefill_worker`` stat.

Invariants: segments are contiguous from position 0 (each starts where the previous ended),
non-empty, and adjacent segments of one source are merged; ``decode`` refuses anything else
(``ValueError`` naming the part), so ``decode(encode(t)) == t``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

MAX_SEGMENTS = 32
"""More segments than any route makes (at most one per source): a bound on what decode reads."""


class KvSource(Enum):
    """Where a prompt range's K/V came from."""

    DEVICE = "device"
    """The serving worker's own device (G1) prefix cache."""
    HOST = "host"
    """Its host tier (G2), onboarded to the device."""
    DISK = "disk"
    """Its disk tier (G3), onboarded."""
    G4 = "g4"
    """The shared disk store (G4), read and verified."""
    NODE = "node"
    """Its host's node cache (``--node-cache``)."""
    PEER = "peer"
    """Read over NIXL from an aggregated worker that held it (a peer hit)."""
    PREFILL = "prefill"
    """Read over NIXL from the P/D prefill worker that computed (or held) it."""
    RECOMPUTE = "recompute"
    """Computed by the serving worker for this request."""


@dataclass(frozen=True, slots=True)
class KvSegment:
    """Prompt positions ``start .. end - 1`` came from ``source``."""

    source: KvSource
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class KvTrace:
    """The segments of one prompt so far, in order (module docstring)."""

    segments: list[KvSegment] = field(default_factory=list)

    @property
    def end(self) -> int:
        """The first position no segment covers yet."""
        return self.segments[-1].end if self.segments else 0

    def add(self, source: KvSource, end: int) -> None:
        """Say that positions ``self.end .. end - 1`` came from ``source`` (nothing if empty)."""
        start = self.end
        if end <= start:
            return
        if self.segments and self.segments[-1].source is source:
            self.segments[-1] = KvSegment(source, self.segments[-1].start, end)
        else:
            self.segments.append(KvSegment(source, start, end))

    def encode(self) -> str:
        return ",".join(f"{s.source.value}:{s.start}-{s.end}" for s in self.segments)

    @classmethod
    def decode(cls, text: str) -> KvTrace:
        """The trace ``encode`` wrote.

        Raises:
            ValueError: ``text`` is not a trace (the message names the offending part).
        """
        trace = cls()
        if not text:
            return trace
        parts = text.split(",")
        if len(parts) > MAX_SEGMENTS:
            raise ValueError(f"kv_trace has {len(parts)} segments, at most {MAX_SEGMENTS}")
        for part in parts:
            source, _, span = part.partition(":")
            start, _, end = span.partition("-")
            try:
                segment = KvSegment(KvSource(source), int(start), int(end))
            except ValueError:
                raise ValueError(
                    f"kv_trace segment {part!r} is not <source>:<start>-<end>"
                ) from None
            if segment.start != trace.end or segment.end <= segment.start:
                raise ValueError(
                    f"kv_trace segment {part!r} does not continue at position {trace.end}"
                )
            if trace.segments and trace.segments[-1].source is segment.source:
                raise ValueError(f"kv_trace segment {part!r} repeats the previous source")
            trace.segments.append(segment)
        return trace
