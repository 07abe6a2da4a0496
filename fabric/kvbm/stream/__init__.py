"""The KV event stream: blocks stored and removed, per tier, in vLLM's KV-event wire format.

``wire`` encodes and decodes event batches (map and array forms, with each event's ``medium``);
``publisher`` is the ZeroMQ PUB socket with sequence numbers and a ROUTER replay buffer. The
block manager never builds a publisher itself: whoever builds the manager (a worker, the vLLM
connector) makes one with ``publisher_for`` and passes it to ``build_kvbm(events=...)``.
"""

from __future__ import annotations

from fabric.kvbm.config import KvbmConfig
from fabric.kvbm.core.events import EventSink, NullSink
from fabric.kvbm.stream.publisher import ZmqEventPublisher


def publisher_for(config: KvbmConfig) -> EventSink:
    """A ZeroMQ publisher on ``config.events_endpoint`` (and its replay endpoint) when one is
    configured, else a sink that drops every event."""
    if not config.events_endpoint:
        return NullSink()
    return ZmqEventPublisher(config.events_endpoint, replay_endpoint=config.events_replay_endpoint)
