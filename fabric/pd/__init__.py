"""Prefill -> decode: the KV handoff protocol, one implementation for every engine.

A *producer* (a prefill worker, an aggregated worker serving a peer hit, a vLLM instance with
``kv_role`` producer) holds a request's blocks and offers them; a *consumer* (a decode worker, a
vLLM consumer instance) reads them over NIXL and says when it is done. The messages are
``fabric.signal``'s (``PrefillRequest``, ``BlocksReady``, ``TransferDone``, ``Abort``), the bytes
move through a ``fabric.transfer`` agent, the block descriptions are ``fabric.kvbm.remote``'s.

    holds    HoldTable: held -> lent -> done / expired, deadlines, late requests refused
    progress HoldProgress: poll the producer's agent while it holds (reads over TCP need it)
    offers   BlockExporter: BlocksReady for blocks of one registered storage
    reader   RemoteReader: slice an offer, plan, load the peer once, read, bounded
    layerwise KvFrontier / LayerwiseRead: what a producer has written so far, read while it
             computes the rest
    links    ProducerLinks: find a producer in discovery, check it, one signal link to it

Engines adapt it: ``fabric.worker.handoff`` / ``remote_prefill`` / ``prefill_service`` (the
reference engine, whose decode pushes a ``PrefillRequest`` and the prefill computes, then
offers), ``fabric.integrations.vllm.producer`` / ``consumer`` (vLLM, whose producer holds
finished prefills and lends them when a consumer asks).

Imports ``fabric.kvbm``, ``fabric.signal``, ``fabric.transfer`` and ``fabric.discovery``; is
imported by the engines' adapters only.
"""

from fabric.pd.holds import Freed, HoldCounts, HoldState, HoldTable, Refusal
from fabric.pd.layerwise import KvFrontier, LayerwiseRead, layers_ready
from fabric.pd.links import KV_SOURCE_ROLES, ProducerLinks
from fabric.pd.offers import BlockExporter
from fabric.pd.progress import HoldProgress
from fabric.pd.reader import RemoteReader

__all__ = [
    "KV_SOURCE_ROLES",
    "BlockExporter",
    "Freed",
    "HoldCounts",
    "HoldProgress",
    "HoldState",
    "HoldTable",
    "KvFrontier",
    "LayerwiseRead",
    "ProducerLinks",
    "Refusal",
    "RemoteReader",
    "layers_ready",
]
