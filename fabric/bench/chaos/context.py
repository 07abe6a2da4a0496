"""What every fault gets (``Context``) and gives back (``Observed``), and how it becomes a row.

A fault function injects its fault into the running deployment, drives requests around it,
restores what it broke (restarting a killed worker under the same id) and returns ``Observed``:
its requests' results, the fault's instant, notes. ``finish`` turns that into the row other tools
read (keys: ``ROW_KEYS``), after waiting for the deployment to go idle and judging every served
text against the reference deployment's.

Recovery: from the fault's instant to the completion of the first correct request sent after
the last request that was not served correctly (so a fleet that flaps after a first success
is not counted as recovered); with no such request, to the first correct completion after the
fault. A fault may give its own figure (``Observed.recovery_s``) or none (not applicable).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fabric.bench.chaos.deployment import ChaosDeployment
from fabric.bench.chaos.outcomes import Outcome, Prompt, References, Result, make_prompt, send

ROW_KEYS = (
    "fault",
    "ok",
    "failed_clearly",
    "hung",
    "wrong_outputs",
    "leaked_blocks",
    "leaked_holds",
    "recovery_s",
    "notes",
)


@dataclass(frozen=True, slots=True)
class Settings:
    """The knobs of one run (``--quick`` shrinks the counts, not the bounds)."""

    bound_s: float
    settle_s: float
    etcd_pause_s: float
    burst: int
    in_flight: int
    prompt_tokens: int
    max_tokens: int
    stream_tokens: int
    interval_s: float
    after_s: float
    malformed_rounds: int
    wire_frames: int
    big_body_bytes: int


@dataclass(slots=True)
class Context:
    deployment: ChaosDeployment
    references: References
    settings: Settings
    vocab: int

    def prompt(self, fault: str, index: int, *, max_tokens: int | None = None) -> Prompt:
        return make_prompt(
            self.vocab,
            self.settings.prompt_tokens,
            max_tokens or self.settings.max_tokens,
            fault=fault,
            index=index,
        )

    def send(self, prompt: Prompt) -> Result:
        return send(self.deployment.url, self.deployment.model, prompt, self.settings.bound_s)

    def prober(self, fault: str) -> Callable[[int], Result]:
        """Sends the fault's ``index``-th prompt (for ``Load``)."""
        return lambda index: self.send(self.prompt(fault, index))


@dataclass(slots=True)
class Observed:
    """What a fault saw; see the module docstring."""

    results: list[Result]
    fault_at: float | None
    notes: list[str] = field(default_factory=list)
    recovery_s: float | None = None
    own_recovery: bool = False
    """``recovery_s`` is the fault's own figure (or deliberately None)."""
    served_needs_pd: bool = False
    """Only requests served on the P/D path count as ``ok``."""
    extra_failed_clearly: int = 0
    extra_hung: int = 0


def finish(fault: str, context: Context, observed: Observed) -> dict[str, Any]:
    """The fault's row: counts, leaks once idle, recovery, notes."""
    deployment = context.deployment
    gauges, settle_s = deployment.wait_idle(context.settings.settle_s)
    served = [r for r in observed.results if r.outcome is Outcome.SERVED]
    prompt_to_text = context.references.texts([r.prompt for r in served])
    correct = [r for r in served if r.text == prompt_to_text[r.prompt]]
    wrong = [r for r in served if r.text != prompt_to_text[r.prompt]]
    good = [r for r in correct if r.pd_route] if observed.served_needs_pd else correct
    unclear = [r for r in observed.results if r.outcome is Outcome.UNCLEAR]
    notes = list(observed.notes)
    if observed.served_needs_pd and len(good) < len(correct):
        notes.append(f"{len(correct) - len(good)} served correctly but recomputed (not P/D)")
    failed = [r for r in observed.results if r.outcome is Outcome.FAILED_CLEARLY]
    if failed:
        statuses = Counter(str(r.status or "SSE error") for r in failed)
        notes.append(f"failed clearly: {dict(statuses)}, e.g. {failed[0].detail[:160]!r}")
    if unclear:
        notes.append(f"{len(unclear)} unclear answers, e.g. {unclear[0].detail[:120]!r}")
    if wrong:
        notes.append(f"{len(wrong)} wrong outputs, e.g. route {wrong[0].fabric.get('route')}")
    hung = [r for r in observed.results if r.outcome is Outcome.HUNG]
    if hung:
        notes.append(f"{len(hung)} hung, e.g. {hung[0].detail[:120]!r}")
    notes.append(f"idle after {settle_s:.1f} s")
    if gauges.first_nonzero:
        notes.append(f"at first {gauges.first_nonzero}")
    if not gauges.idle:
        notes.append(f"not idle: {gauges.nonzero} unreachable {gauges.unreachable}")
    recovery = observed.recovery_s
    if not observed.own_recovery and observed.fault_at is not None:
        recovery = _recovery(observed.results, set(map(id, good)), observed.fault_at)
    return {
        "fault": fault,
        "ok": len(good),
        "failed_clearly": observed.extra_failed_clearly
        + sum(r.outcome is Outcome.FAILED_CLEARLY for r in observed.results),
        "hung": observed.extra_hung + len(hung),
        "wrong_outputs": len(wrong),
        "leaked_blocks": gauges.blocks,
        "leaked_holds": gauges.holds,
        "recovery_s": None if recovery is None else round(recovery, 3),
        "notes": "; ".join(notes),
    }


def _recovery(results: list[Result], good_ids: set[int], fault_at: float) -> float | None:
    bad_sent = [r.sent_at for r in results if id(r) not in good_ids and r.done_at >= fault_at]
    after = max(bad_sent, default=fault_at)
    done = [
        r.done_at
        for r in results
        if id(r) in good_ids and r.done_at >= fault_at and (r.sent_at > after or not bad_sent)
    ]
    return min(done) - fault_at if done else None
