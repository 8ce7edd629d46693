"""`resume`: finish what a crash or Ctrl-C left. Every delivery in doubt is first settled
with its provider (`settle`), the answers recorded (``delivery.settled``), then what has no
outcome is sent through the same path as a first run. Asked to, it also sends the latest
update again to the people it did not reach (``delivery.requeued``, `retries`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from incident_notify.contacts import ContactSet
    from incident_notify.playbook import Playbook

from incident_notify.audit import AuditEntry
from incident_notify.channel_setup import build_channels, check_health
from incident_notify.channels.base import Channel, ChannelError, Delivery, OutgoingMessage
from incident_notify.dispatch import DispatchResult, ProgressFn
from incident_notify.errors import AbortedError
from incident_notify.held import HELD_S
from incident_notify.incident import DeliveryState, IncidentState, apply, seconds_between
from incident_notify.journal import (
    delivery_from_state,
    finish_update,
    in_doubt_list,
    write_plan,
)
from incident_notify.lifecycle import (
    UpdateSpec,
    close_channels,
    dispatch_update,
    load_contact_set,
    load_state,
    make_planner,
    playbook_of,
    refuse_unusable_contacts,
    sending_lock,
    stage_channels,
)
from incident_notify.outcome import ConfirmFn, Preflight, SendOutcome
from incident_notify.plan import PlanStats
from incident_notify.runtime import Runtime
from incident_notify.verdict import Verdict, verdict


@dataclass
class Settlement:
    """What a provider said about a delivery whose outcome was unknown."""

    delivery: DeliveryState
    outcome: str
    """sent (it arrived), not_sent (the provider's records show it did not: safe to send)
    or unknowable (the provider cannot say, or could not be asked)."""
    provider_id: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = self.delivery
        return {"key": d.key, "channel": d.channel, "recipient": d.recipient,
                "contact": d.contact_id or None, "outcome": self.outcome,
                "provider_id": self.provider_id, "detail": self.detail}


def _reply_target(ds: DeliveryState, state: IncidentState) -> str | None:
    part = int(ds.payload.get("part", 1))
    if part == 1:
        reply: str | None = ds.payload.get("reply_to")
        return reply
    thread = ds.key.rsplit("/", 1)[0]
    previous = state.deliveries.get(f"{thread}/{part - 1}")
    return previous.provider_id if previous is not None else None


SETTLE_GRACE_S = 5.0
"""The least time a provider is given to record a request after it arrives (an API's
slowest answers take a second or two) before `settle` trusts that it is not there; a
channel whose `timeout_s` is longer gives it that: a provider may hold a request as long as
a sender waits for its answer, and a kill can come at any moment of that wait."""


def settle(state: IncidentState, contacts: ContactSet, channels: Mapping[str, Channel],
           update_nos: list[int],
           waiting: Callable[[list[str], float], None] | None = None) -> list[Settlement]:
    """Ask each provider what became of the deliveries in doubt (attempted, no answer
    recorded). Read-only: the caller records the answers. A provider that cannot be asked
    (down, or no lookup: SMTP) leaves its deliveries unknowable, asked once per channel.

    "Not in the provider's records" is trusted only once the request has had time to get
    there: a provider still working on a request the crash cut off (slow to record it)
    would take it after the lookup, and the resend would be a second message. A delivery
    attempted less than its channel's `timeout_s` ago (at least SETTLE_GRACE_S) and not
    found is looked up again once that time has passed (`waiting` is told how long, and
    for which channels). When the record shows the provider holding the attempt (HELD_S
    without an answer), that time is the channel's whole request deadline. A provider
    that holds a request for longer still before recording it is beyond what a lookup can
    settle."""
    out: list[Settlement] = []
    unreachable: dict[str, str] = {}
    recent: list[tuple[DeliveryState, Delivery, Channel, datetime]] = []
    until = 0.0
    for upd in update_nos:
        for ds in sorted(state.in_doubt(upd), key=lambda d: d.key):
            ch = channels.get(ds.channel)
            d = delivery_from_state(ds, state, contacts, _reply_target(ds, state))
            if ch is None or d is None:
                out.append(Settlement(ds, "unknowable", detail="its channel or contact is "
                                      "no longer in the playbook"))
                continue
            try:
                since = datetime.fromisoformat((ds.attempted_at or state.declared_at)
                                               .replace("Z", "+00:00"))
            except ValueError:
                since = datetime.fromisoformat(state.declared_at.replace("Z", "+00:00"))
            found = _look_up(ch, ds, d, since, unreachable)
            if found.outcome == "not_sent" and ds.attempted_at:
                held = max(ds.held_s, 0.0 if ds.status == "unknown" else
                           seconds_between(ds.attempted_at, state.last_event_at))
                deadline = ch.request_deadline_s()
                # Seen holding it, the provider may take it as late as the deadline.
                grace = deadline if held >= HELD_S else min(
                    deadline, max(SETTLE_GRACE_S, ch.answer_timeout_s()))
                ends = since.timestamp() + grace
                if ends > time.time():
                    recent.append((ds, d, ch, since))
                    until = max(until, ends)
                    continue
            out.append(found)
    if recent:
        if waiting is not None:
            waiting(sorted({ds.channel for ds, *_ in recent}), until - time.time())
        time.sleep(max(0.0, until - time.time()))
        for ds, d, ch, since in recent:
            out.append(_look_up(ch, ds, d, since, unreachable))
    return out


def _look_up(ch: Channel, ds: DeliveryState, d: Delivery, since: datetime,
             unreachable: dict[str, str]) -> Settlement:
    if ds.channel in unreachable:
        return Settlement(ds, "unknowable", detail=unreachable[ds.channel])
    try:
        receipt = ch.find_sent(d, since)
    except ChannelError as exc:
        unreachable[ds.channel] = exc.message
        return Settlement(ds, "unknowable", detail=exc.message)
    except Exception as exc:  # a malformed answer: cannot tell
        unreachable[ds.channel] = f"unexpected answer ({type(exc).__name__})"
        return Settlement(ds, "unknowable", detail=unreachable[ds.channel])
    if receipt is None:
        return Settlement(ds, "not_sent", detail="not in the provider's records")
    return Settlement(ds, "sent", provider_id=receipt.provider_id,
                      detail="found in the provider's records")


def _waiting_notice(progress: ProgressFn | None) -> Callable[[list[str], float], None]:
    """Say on stderr (as a warning, through the progress display) why resume pauses."""
    def say(names: list[str], seconds: float) -> None:
        if progress is None:
            return
        for name in names:
            progress("warning", Delivery(key="", incident_id="", update_no=0, channel=name,
                                         recipient="", message=OutgoingMessage(text="")),
                     {"reason": "a request cut off (by a crash, or a timeout while the "
                      "provider held it) may still reach the provider; waiting "
                      f"{seconds:.0f}s before trusting that it did not"})

    return say


def _settlement_entries(state: IncidentState, settled: list[Settlement]) -> list[AuditEntry]:
    entries = []
    for s in settled:
        if s.outcome == "unknowable":
            continue
        d = s.delivery
        payload: dict[str, Any] = {"outcome": s.outcome, "detail": s.detail}
        if s.outcome == "sent":
            payload.update(provider_id=s.provider_id,
                           channel_type=d.payload.get("channel_type", ""))
        entries.append(AuditEntry("delivery.settled", incident=state.id, channel=d.channel,
                                  recipient=d.recipient, key=d.key, payload=payload))
    return entries


def _retry_entries(state: IncidentState, again: list[DeliveryState]) -> list[AuditEntry]:
    return [AuditEntry("delivery.requeued", incident=state.id, channel=d.channel,
                       recipient=d.recipient, key=d.key,
                       payload={"reason": "not reached: sent again (resume "
                                "--retry-not-reached)", "was": d.status})
            for d in again]


def _merge(verdicts: list[Verdict]) -> Verdict:
    from collections import Counter

    channels: dict[str, Counter[str]] = {}
    recipients = []
    for v in verdicts:
        for ch, c in v.channels.items():
            channels.setdefault(ch, Counter()).update(c)
        recipients += v.recipients
    return Verdict(channels, recipients)


def resume(rt: Runtime, incident_id: str, *, include_unknown: bool = False,
           dry_run: bool = False, confirm: ConfirmFn | None = None,
           progress: ProgressFn | None = None, playbook: Path | None = None,
           retry_not_reached: bool = False) -> SendOutcome:
    """Finish what a crashed or interrupted run left: settle every delivery in doubt with
    its provider first (found -> recorded sent with the provider's id; absent -> sent now),
    then send what has no outcome. What no provider can settle is listed, and re-sent only
    with `include_unknown` (email keeps its Message-ID on a resend). `retry_not_reached`:
    the people the latest update did not reach (all channels failed or down) are sent it
    again (`retries`), now that a provider may be back. Refused while another process is
    sending the incident (see `sending_lock`)."""
    sending = sending_lock(rt, incident_id, resume=True)
    try:
        return _resume(rt, incident_id, include_unknown=include_unknown, dry_run=dry_run,
                       confirm=confirm, progress=progress, playbook=playbook,
                       retry_not_reached=retry_not_reached)
    finally:
        sending.close()


def retries(state: IncidentState, pb: Playbook,
            update_no: int) -> tuple[list[DeliveryState], set[str]]:
    """For `--retry-not-reached`: the failed deliveries of an update to send again, for each
    person it did not reach (their first channel again; every channel of an internal
    audience, which is told on all of them; a public post's failed parts), and the keys of
    their other failed deliveries, which a failover may then plan again. Nobody reached,
    or in doubt, is sent anything."""
    lost = {r.who for r in verdict(state, update_no).not_reached}
    chains: dict[str, list[DeliveryState]] = {}
    for d in state.deliveries.values():  # (in the order they were planned)
        who = d.contact_id or f"public:{d.channel}"
        if d.update_no == update_no and who in lost and d.status in ("failed", "failed_over"):
            chains.setdefault(who, []).append(d)
    again: list[DeliveryState] = []
    released: set[str] = set()
    for who, chain in chains.items():
        if who.startswith("public:"):
            first = [d for d in chain if d.status == "failed"]
        else:
            audience = pb.model.audiences.get(chain[0].payload.get("audience", ""))
            first = [d for d in chain if d.payload.get("fallback_from") is None] \
                if audience is not None and audience.kind == "internal" else []
            first = first or chain[:1]
        again += first
        released.update(d.key for d in chain if d not in first)
    return again, released


def _resume(rt: Runtime, incident_id: str, *, include_unknown: bool, dry_run: bool,
            confirm: ConfirmFn | None, progress: ProgressFn | None,
            playbook: Path | None, retry_not_reached: bool = False) -> SendOutcome:
    state = load_state(rt, incident_id)
    pb = playbook_of(state, playbook)
    latest = state.updates[-1] if state.updates else None
    again, released = retries(state, pb, latest.update_no) \
        if retry_not_reached and latest is not None else ([], set())
    unfinished = [u for u in state.updates
                  if not u.completed or state.pending(u.update_no)
                  or state.in_doubt(u.update_no) or (again and u is latest)]
    if not unfinished:
        return SendOutcome(incident_id, state.stage, state.update_no, dry_run, None,
                           DispatchResult(), verdict(state, state.update_no))
    contacts = load_contact_set(rt, pb)
    for upd in unfinished:
        if not upd.planned:  # (planned from the contacts as they are now, as a declare is)
            refuse_unusable_contacts(pb, contacts, upd.stage)
    channels = build_channels(rt, pb, list(pb.model.channels))
    try:
        numbers = [u.update_no for u in unfinished]
        settled = settle(state, contacts, channels, numbers, _waiting_notice(progress))
        used = sorted({c for u in unfinished for c in stage_channels(pb, u.stage)})
        health = check_health({n: channels[n] for n in used if n in channels},
                              retry_after_s=rt.health_retry_s)
        unknowable = {s.delivery.key for s in settled if s.outcome == "unknowable"}
        sizes: dict[str, int] = {}
        for upd in unfinished:
            for ds in state.pending(upd.update_no):
                sizes[ds.channel] = sizes.get(ds.channel, 0) + 1
        for s in settled:
            if s.outcome == "not_sent" or (include_unknown and s.delivery.key in unknowable):
                sizes[s.delivery.channel] = sizes.get(s.delivery.channel, 0) + 1
        for d in again:
            sizes[d.channel] = sizes.get(d.channel, 0) + 1
        last = unfinished[-1]
        pre = Preflight(incident_id=incident_id, playbook=pb, stage=last.stage,
                        update_no=last.update_no, event="resume", messages=[],
                        audience_sizes=sizes, health=health, stats=PlanStats(), skips=[],
                        settled=[s.to_dict() for s in settled],
                        endpoints={n: channels[n].endpoint() for n in used
                                   if n in channels})
        if dry_run:
            return SendOutcome(incident_id, last.stage, last.update_no, True, pre, None)
        if confirm is not None and (sizes or settled) and not confirm(pre):
            raise AbortedError("nothing was sent or recorded: the commander declined",
                               hint="rerun when ready; --dry-run previews without asking")
        # What the providers said, and who is sent the update again: one write.
        entries = _settlement_entries(state, settled) + _retry_entries(state, again)
        for record in rt.audit.append_many(entries) if entries else []:
            apply(state, record)
        verdicts = []
        result = DispatchResult()
        in_doubt: list[dict[str, Any]] = []
        for n, upd in enumerate(unfinished, 1):
            spec = UpdateSpec(upd.event, upd.stage, upd.message, upd.variables)
            planner = make_planner(rt, pb, contacts, incident_id, upd.update_no, spec, state,
                                    state.declared_at)
            if upd is latest:
                planner.release(released)
            if not upd.planned:
                # Crashed while planning: plan again; keys already in the log are skipped.
                for written in write_plan(rt, planner, planner.plan(), incident_id,
                                          upd.update_no):
                    apply(state, written)
            result = dispatch_update(rt, pb, planner, state, contacts, upd.update_no, health,
                               progress, include_unknown=include_unknown, channels=channels)
            del planner, state  # let the fold go before the record is folded again
            if n == len(unfinished):
                del contacts  # and the contacts, once no update is left to plan
            v, state = finish_update(rt, incident_id, upd.update_no, result)
            verdicts.append(v)
            in_doubt += in_doubt_list(state, upd.update_no)
            if result.interrupted or result.fatal:
                break
        return SendOutcome(incident_id, last.stage, last.update_no, False, pre, result,
                           _merge(verdicts), in_doubt=in_doubt)
    finally:
        close_channels(channels)
