"""`status` and `timeline`: the incident's record, read back from the audit log."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from incident_notify.runtime import Runtime

from incident_notify.errors import no_incident
from incident_notify.incident import IncidentState, age, fold, list_incidents


def summary(state: IncidentState, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    return {
        "id": state.id,
        "title": state.title,
        "playbook": state.playbook_name,
        "severity": state.severity,
        "stage": state.stage,
        "status": state.status,
        "declared_at": state.declared_at,
        "declared_by": state.actor,
        "age": age(state.declared_at, now),
        "last_event_at": state.last_event_at,
        "updates": len(state.updates),
        "channels": state.counts(),
        "failovers": [f for f in state.failovers if f.get("event") == "delivery.failover"
                      and f.get("to_channels")],
        "pending": len(state.pending()),
        "in_doubt": len(state.in_doubt()),
        "last_tweet": state.last_tweet,
    }


def incident_summaries(rt: Runtime, incident: str | None,
                       include_resolved: bool = False) -> list[dict[str, Any]]:
    if incident:
        state = fold(rt.audit.records(incident=incident), incident)
        if not state.updates:
            raise no_incident(incident, rt.settings.audit_path())
        return [summary(state)]
    if include_resolved:
        states = list_incidents(rt.audit.records())
    else:
        # The index beside the log knows each incident's last lifecycle event (a fold
        # says "resolved" exactly when that is incident.resolved): only the open ones are
        # read and folded.
        open_ids = rt.audit.open_incidents()
        states = list_incidents(rt.audit.records(incidents=open_ids)) if open_ids else {}
    rows = [summary(s) for s in states.values()
            if s.updates and (include_resolved or s.status != "resolved")]
    return sorted(rows, key=lambda r: r["declared_at"])


_TITLES = {
    "incident.declared": "declared",
    "incident.updated": "updated",
    "incident.resolved": "resolved",
    "incident.reopened": "reopened",
}


def timeline_entries(rt: Runtime, incident: str, deliveries: bool = False) -> list[dict[str, Any]]:
    """Readable events: lifecycle, what was said per channel, outcomes, failovers."""
    records = list(rt.audit.records(incident=incident))
    if not records:
        raise no_incident(incident, rt.settings.audit_path())
    entries: list[dict[str, Any]] = []
    outcomes: dict[int, Counter[str]] = {}
    update_of: dict[str, int] = {}
    for rec in records:
        p = rec.payload or {}
        base = {"ts": rec.ts, "event": rec.event, "seq": rec.seq, "actor": rec.actor}
        if rec.event in _TITLES:
            lines = [f"by {rec.actor}"]
            if p.get("message"):
                lines.append(f"message: {p['message']}")
            entries.append({**base, "what": f"{_TITLES[rec.event]} at stage {p.get('stage')} "
                            f"(update {p.get('update_no')})", "lines": lines})
        elif rec.event == "message.rendered":
            parts = p.get("parts", [])
            head = f"message for {rec.channel} -> {p.get('audience')}"
            if p.get("fallback_from"):
                head += f" (fallback for {p['fallback_from']})"
            lines = []
            if p.get("subject"):
                lines.append(f"Subject: {p['subject']}")
            for i, part in enumerate(parts, 1):
                prefix = f"[{i}/{len(parts)}] " if len(parts) > 1 else ""
                lines += [prefix + line for line in str(part).splitlines()]
            entries.append({**base, "what": head, "lines": lines, "channel": rec.channel,
                            "text": parts})
        elif rec.event == "delivery.planned" and rec.key:
            update_of[rec.key] = int(p.get("update_no", 0))
        elif rec.event in ("delivery.sent", "delivery.failed", "delivery.unknown",
                           "delivery.skipped", "delivery.failover"):
            upd = update_of.get(rec.key or "", 0)
            outcomes.setdefault(upd, Counter())[f"{rec.channel}:{rec.event[9:]}"] += 1
            if rec.event == "delivery.failover" and p.get("to_channels"):
                entries.append({**base, "what": f"failover {rec.channel} -> "
                                f"{', '.join(p['to_channels'])}",
                                "lines": [str(p.get("reason", ""))]})
            if deliveries:
                detail = p.get("provider_id") or p.get("error") or p.get("reason") or ""
                entries.append({**base, "what": f"{rec.event[9:]} {rec.channel} -> "
                                f"{rec.recipient or 'public'}", "lines": [str(detail)]})
        elif rec.event == "delivery.requeued":
            last = entries[-1] if entries else None
            if last is not None and last["event"] == rec.event and last["ts"] == rec.ts:
                last["count"] += 1  # (one retry writes its deliveries at once)
            else:
                last = {**base, "count": 1, "lines": [str(p.get("reason", ""))]}
                entries.append(last)
            last["what"] = f"sent again to people not reached: {last['count']} deliveries"
        elif rec.event.startswith("channel."):
            entries.append({**base, "what": f"{rec.channel}: "
                            f"{'DOWN' if rec.event.endswith('open') else 'recovered'}",
                            "lines": [str(p.get("reason", ""))]})
        elif rec.event == "update.completed":
            upd = int(p.get("update_no", 0))
            counts = outcomes.get(upd, Counter())
            lines = [f"{k}: {v}" for k, v in sorted(counts.items())]
            entries.append({**base, "what": f"update {upd} delivered", "lines": lines,
                            "counts": dict(counts)})
        elif rec.event == "reply.received":
            entries.append({**base, "what": f"reply on {rec.channel} from @{p.get('author')}",
                            "lines": str(p.get("text", "")).splitlines(), "channel": rec.channel,
                            "text": p.get("text")})
        elif rec.event == "optout.added":
            entries.append({**base, "what": f"opt-out recorded on {rec.channel}",
                            "lines": [str(p.get("reason", "")),
                                      *([str(p["list_error"])] if p.get("list_error") else [])]})
    return entries
