"""What a sending command shows and returns: the `Preflight` (before confirmation) and the
`SendOutcome` (after), with the exit-code policy read from the verdict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from incident_notify.channels.base import Health
from incident_notify.dispatch import DispatchResult
from incident_notify.exit_codes import ExitCode
from incident_notify.messages import RenderedMessage
from incident_notify.plan import PlanStats, Skip
from incident_notify.playbook import Playbook
from incident_notify.verdict import Verdict


# ----------------------------------------------------------------------- results
@dataclass
class Preflight:
    incident_id: str
    playbook: Playbook
    stage: str
    update_no: int
    event: str
    messages: list[RenderedMessage]
    audience_sizes: dict[str, int]
    """channel -> planned deliveries."""
    health: dict[str, Health]
    stats: PlanStats
    skips: list[Skip]
    invalid_contacts: int = 0
    """Contact records left out as invalid."""
    contact_source_problems: int = 0
    """Other problems in the contact sources (an ignored column, a missing file)."""
    settled: list[dict[str, Any]] = field(default_factory=list)
    """`resume`: what the providers said of each delivery in doubt."""
    endpoints: dict[str, str] = field(default_factory=dict)
    """channel -> where its requests (and credentials) go."""

    @property
    def unhealthy(self) -> list[str]:
        return [name for name, h in self.health.items() if not h.ok]

    def to_dict(self) -> dict[str, Any]:
        from incident_notify.preview import message_to_dict

        return {
            "incident": self.incident_id, "playbook": self.playbook.name,
            "stage": self.stage, "update_no": self.update_no, "event": self.event,
            "messages": [message_to_dict(m) for m in self.messages],
            "deliveries_per_channel": self.audience_sizes,
            "health": {n: {"ok": h.ok, "detail": h.detail} for n, h in self.health.items()},
            "skipped": [{"contact": s.contact_id, "channel": s.channel, "reason": s.reason}
                        for s in self.skips],
            "warnings": self.stats.warnings,
            "invalid_contacts": self.invalid_contacts,
            "contact_source_problems": self.contact_source_problems,
            "settled": self.settled,
            "endpoints": self.endpoints,
        }


@dataclass
class SendOutcome:
    incident_id: str
    stage: str
    update_no: int
    dry_run: bool
    preflight: Preflight | None
    result: DispatchResult | None
    verdict: Verdict | None = None
    """Who was reached, from the record (None for a dry run or nothing to do)."""
    in_doubt: list[dict[str, Any]] = field(default_factory=list)
    """Deliveries still unknown after settling with the providers: key, channel, recipient,
    contact, attempts."""
    sandbox: bool = False
    """Sent to the local emulators: a rehearsal, not a notification."""

    @property
    def exit_code(self) -> ExitCode:
        r = self.result
        if r is None:
            return ExitCode.OK
        if r.fatal:
            return ExitCode.AUDIT_INVALID if r.fatal_kind == "audit" else ExitCode.ERROR
        if r.interrupted:
            return ExitCode.INTERRUPTED
        v = self.verdict
        if v is None or (v.complete and not self.in_doubt):
            return ExitCode.OK
        if v.count("reached") == 0 and v.count("not_reached") > 0:
            return ExitCode.DELIVERY_FAILED
        return ExitCode.PARTIAL_DELIVERY

    def result_dict(self) -> dict[str, Any] | None:
        r, v = self.result, self.verdict
        if r is None:
            return None
        body = v.to_dict() if v is not None else {}
        failures = [x.to_dict() for x in (v.not_reached + v.in_doubt if v else [])]
        return {
            "channels": body.get("channels", {}), "totals": body.get("totals", {}),
            "people": body.get("people", {}), "failures": failures[:500],
            "failovers": r.failovers, "interrupted": r.interrupted, "fatal": r.fatal,
            "complete": self.exit_code == ExitCode.OK, "elapsed_s": round(r.elapsed_s, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "incident": self.incident_id, "stage": self.stage, "update_no": self.update_no,
            "dry_run": self.dry_run,
            "preflight": self.preflight.to_dict() if self.preflight else None,
            "result": self.result_dict(),
            "in_doubt": self.in_doubt,
            "sandbox": self.sandbox,
        }


ConfirmFn = Callable[[Preflight], bool]
