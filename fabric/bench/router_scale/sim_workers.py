"""The simulated workers' process of ``router-scale``: one ZeroMQ PUB per worker, on command.

Runs ``serve`` in a child process of its own, so the measured (router) process holds nothing but
what the frontend holds. It builds the whole ``workload.Plan`` first (nothing is encoded while
the router is timed), binds one PUB per simulated worker on ``tcp://127.0.0.1`` (port 0,
``SNDHWM`` 0: a slow subscriber makes the PUB queue, never drop), then answers the router
process over ``control`` (a ``multiprocessing`` pipe):

* ``("probe",)``: send batch 0 (no events) on every PUB (the router repeats it until every
  subscriber has one: a SUB's subscription takes a moment to reach its PUB); answer ``("probed",)``.
* ``("stage", i)``: send stage ``i``'s payloads in rounds (round ``r``: every worker's ``r``-th
  payload, sequence numbers continuing per worker); after each round send ``("round", r)`` and
  before round ``r + 1`` wait for ``("ack", r - LAG_ROUNDS)``, so at most ``LAG_ROUNDS + 1``
  rounds are on the wire (a window that bounds the router's receive queues, whose memory would
  otherwise count as the index's); then ``("done", num_rounds)``.
* ``("stop",)``: close and exit.

Topic and framing are the publisher's (``fabric.kvbm.stream.publisher``): ``[topic, seq as
8-byte big-endian, payload]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.connection import Connection

import zmq

from fabric.bench.router_scale.workload import Plan, RoutedPrompt, build_plan
from fabric.kvbm import encode_event_batch

TOPIC = b"kv-events"
LAG_ROUNDS = 2


@dataclass(frozen=True, slots=True)
class StageInfo:
    """What the router process learns of one stage (everything but the payloads)."""

    cached_blocks: int
    num_payloads: list[int]
    num_event_blocks: int
    expected_blocks: list[int]
    prompts: dict[int, list[RoutedPrompt]]


@dataclass(frozen=True, slots=True)
class FleetParams:
    num_workers: int
    stages: list[int]
    prompt_tokens: list[int]
    num_prompts: int
    churn: float
    seed: int


def serve(control: Connection, params: FleetParams) -> None:
    """The child process's body (see the module docstring)."""
    plan = build_plan(
        num_workers=params.num_workers,
        stages=params.stages,
        prompt_tokens=params.prompt_tokens,
        num_prompts=params.num_prompts,
        churn=params.churn,
        seed=params.seed,
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pubs = []
    try:
        for _ in plan.worker_ids:
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, 0)
            pub.bind("tcp://127.0.0.1:0")
            pubs.append(pub)
        endpoints = [pub.getsockopt_string(zmq.LAST_ENDPOINT) for pub in pubs]
        control.send(("ready", plan.worker_ids, endpoints, _infos(plan)))
        _answer(control, plan, pubs)
    finally:
        for pub in pubs:
            pub.close(linger=0)
        ctx.term()


def _infos(plan: Plan) -> list[StageInfo]:
    return [
        StageInfo(
            stage.cached_blocks,
            [len(payloads) for payloads in stage.payloads],
            stage.num_event_blocks,
            stage.expected_blocks,
            stage.prompts,
        )
        for stage in plan.stages
    ]


def _answer(control: Connection, plan: Plan, pubs: list[zmq.Socket[bytes]]) -> None:
    probe = encode_event_batch([], ts=0.0)
    next_seq = [1] * len(pubs)
    while True:
        command = control.recv()
        if command[0] == "probe":
            for pub in pubs:
                pub.send_multipart((TOPIC, (0).to_bytes(8, "big"), probe))
            control.send(("probed",))
        elif command[0] == "stage":
            stage = plan.stages[command[1]]
            num_rounds = max(len(payloads) for payloads in stage.payloads)
            acked = -1
            for r in range(num_rounds):
                while acked < r - 1 - LAG_ROUNDS:
                    acked = control.recv()[1]
                for w, payloads in enumerate(stage.payloads):
                    if r < len(payloads):
                        seq = next_seq[w].to_bytes(8, "big")
                        pubs[w].send_multipart((TOPIC, seq, payloads[r]))
                        next_seq[w] += 1
                control.send(("round", r))
            while acked < num_rounds - 1:
                acked = control.recv()[1]
            control.send(("done", num_rounds))
        else:
            return
