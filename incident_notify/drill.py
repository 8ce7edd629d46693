"""`drill`: rehearse a whole incident against the sandbox emulators.

Declare -> every later stage in the playbook's order -> resolve, each through the real
send path (planner, dispatcher, real clients, audit log), then report per audience what
each recipient received and the time from command to last delivery.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from incident_notify.config import Settings
from incident_notify.dispatch import ProgressFn
from incident_notify.lifecycle import SendOutcome, declare, load_contact_set, update
from incident_notify.playbook import load_playbook
from incident_notify.runtime import open_runtime

if TYPE_CHECKING:
    from incident_notify.contacts import Contact, ContactSet
    from incident_notify.playbook import Playbook
    from incident_notify.sandbox import Sandbox


@dataclass
class DrillStep:
    stage: str
    outcome: SendOutcome
    elapsed_s: float


@dataclass
class DrillReport:
    playbook: str
    incident_id: str
    audit_log: str
    steps: list[DrillStep] = field(default_factory=list)
    recipients: list[dict[str, Any]] = field(default_factory=list)
    public: list[dict[str, Any]] = field(default_factory=list)
    total_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(s.outcome.exit_code == 0 for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook, "incident": self.incident_id,
            "audit_log": self.audit_log, "ok": self.ok, "total_s": round(self.total_s, 3),
            "steps": [{"stage": s.stage, "elapsed_s": round(s.elapsed_s, 3),
                       "exit_code": int(s.outcome.exit_code),
                       "result": s.outcome.result_dict()}
                      for s in self.steps],
            "recipients": self.recipients,
            "public": self.public,
        }


def _stage_path(pb: Playbook) -> list[str]:
    """First stage, then each allowed next stage in playbook order, ending resolved."""
    path = [pb.first_stage]
    while path[-1] != pb.final_stage:
        nxt = [s for s in pb.allowed_next(path[-1]) if s not in path]
        if not nxt:
            break
        # Prefer the next stage in file order; it reaches the final stage last.
        path.append(min(nxt, key=pb.stage_names.index))
    return path


def run_drill(playbook: Path, values: Mapping[str, str], *, audit_log: Path | None = None,
              outage: list[str] | None = None, progress: ProgressFn | None = None,
              message: str = "This is a drill.") -> DrillReport:
    from incident_notify.messages import resolve_variables
    from incident_notify.sandbox import Sandbox

    pb = load_playbook(playbook)
    given = {**resolve_variables(pb, {}, mode="example"), **values}
    full = resolve_variables(pb, given, mode="given")
    log_path = audit_log or Path(tempfile.mkdtemp(prefix="incident-notify-drill-")) / "audit.jsonl"
    settings = Settings(audit_log=log_path, optouts=log_path.parent / "drill-optouts.jsonl",
                        sandbox=True)
    settings.sources["audit_log"] = "drill"
    sandbox = Sandbox().start()
    try:
        rt = open_runtime(settings, sandbox=sandbox)
        # Let DMs resolve: the emulator knows every handle in the contacts.
        contacts = load_contact_set(rt, pb)
        for person in contacts.contacts.values():
            if person.twitter:
                sandbox.twitter.add_user(person.twitter.lstrip("@"))
        for name in outage or []:
            sandbox.emulators[name].faults.update(outage=True)
        started = time.monotonic()
        report = DrillReport(playbook=str(playbook), incident_id="", audit_log=str(log_path))
        for i, stage in enumerate(_stage_path(pb)):
            t0 = time.monotonic()
            if i == 0:
                outcome = declare(rt, playbook, full, message=message, stage=stage,
                                  progress=progress)
                report.incident_id = outcome.incident_id
            else:
                outcome = update(rt, report.incident_id, stage=stage, sets={},
                                 message=message, progress=progress,
                                 event="incident.updated")
            report.steps.append(DrillStep(stage, outcome, time.monotonic() - t0))
        report.total_s = time.monotonic() - started
        report.recipients, report.public = _received(sandbox, contacts, pb)
        return report
    finally:
        sandbox.stop()


def _received(sandbox: Sandbox, contacts: ContactSet,
              pb: Playbook) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What each person got, from the emulators' own records."""
    by_phone = {c.phone: c for c in contacts.contacts.values() if c.phone}
    by_email = {c.email.lower(): c for c in contacts.contacts.values() if c.email}
    by_handle = {c.twitter.lstrip("@").lower(): c for c in contacts.contacts.values()
                 if c.twitter}
    users = {uid: name for name, uid in getattr(sandbox.twitter, "users", {}).items()}
    people: dict[str, dict[str, Any]] = {}

    def add(contact: Contact | None, channel: str, text: str) -> None:
        entry = people.setdefault(contact.id if contact else "?", {
            "contact": contact.id if contact else None,
            "name": contact.name if contact else "(unknown)",
            "groups": sorted(contact.groups) if contact else [],
            "tags": sorted(contact.tags) if contact else [],
            "received": []})
        entry["received"].append({"channel": channel, "text": text})

    for rec in sandbox.twilio.received.all():
        add(by_phone.get(str(rec.get("to", ""))), "sms", rec.get("body", ""))
    for rec in sandbox.smtp.received.all():
        for rcpt in rec.get("rcpt_tos", []):
            add(by_email.get(rcpt.lower()), "email", rec.get("subject", ""))
    public = []
    for rec in sandbox.twitter.received.all():
        if rec.get("kind") == "dm":
            handle = str(users.get(rec.get("participant_id"), "")).lower()
            add(by_handle.get(handle), "twitter_dm", rec.get("text", ""))
        elif rec.get("kind") == "tweet":
            public.append({"id": rec.get("id"), "text": rec.get("text"),
                           "in_reply_to": rec.get("in_reply_to_tweet_id")})
    return sorted(people.values(), key=lambda p: p["name"]), public
