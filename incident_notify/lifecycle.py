"""The lifecycle operations behind declare / update / resolve / reopen (`resume` is in
resume.py; the record's writer and reader of plans in journal.py; results in outcome.py).

Each sending operation runs the same steps:

1. load the playbook, contacts and opt-outs; fold the incident's state from the log;
2. plan and render everything up front (template or limit errors stop here, before
   anything is written or sent), check the health of every channel involved;
3. show the commander a `Preflight` and ask for confirmation (the CLI's callback);
4. append the lifecycle event, the rendered messages, every planned delivery and an
   ``update.planned`` marker to the audit log;
5. dispatch the pending deliveries read back from the log (so a first run and a resume
   are the same code), then append ``update.completed`` with the summary.

Long on purpose: each lifecycle operation and the sequence they share (prepare, confirm,
record, dispatch, finish) read top to bottom in one place.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from incident_notify.channel_setup import build_channels, check_health, start_health_checks
from incident_notify.channels.base import Channel, Health
from incident_notify.dispatch import Dispatcher, DispatchResult, ProgressFn
from incident_notify.errors import (
    AbortedError,
    NotFoundError,
    StateError,
    UsageError,
    no_incident,
)
from incident_notify.incident import IncidentState, apply, fold
from incident_notify.journal import (
    AuditedRouter,
    Known,
    finish_update,
    in_doubt_list,
    pending_jobs,
    sent_singles,
    write_plan,
)
from incident_notify.messages import IncidentContext, RenderedMessage
from incident_notify.outcome import ConfirmFn, Preflight, SendOutcome
from incident_notify.plan import Plan, Planner
from incident_notify.playbook import Playbook, channels_with_fallbacks, load_playbook
from incident_notify.runtime import Runtime
from incident_notify.same_address import sharing_keys

if TYPE_CHECKING:
    from incident_notify.contacts import ContactSet
    from incident_notify.optouts import OptOutStore
    from incident_notify.render import Renderer

HEALTH_MAX_AGE_S = 30.0
"""A preflight health check older than this (a slow answer at the prompt) is redone."""


# ----------------------------------------------------------------------- helpers
def load_state(rt: Runtime, incident_id: str) -> IncidentState:
    state = fold(rt.audit.records(incident=incident_id), incident_id)
    if not state.updates:
        raise no_incident(incident_id, rt.settings.audit_path())
    return state


def playbook_of(state: IncidentState, override: Path | None = None) -> Playbook:
    if override is not None:
        return load_playbook(override)  # (its own "no such playbook file" when mistyped)
    path = Path(state.playbook)
    if not path.exists():
        raise NotFoundError(f"the playbook of {state.id} ({path}) is not there any more",
                            hint="pass --playbook PATH to use its current location")
    return load_playbook(path)


def load_contact_set(rt: Runtime, pb: Playbook) -> ContactSet:
    from incident_notify.contacts import load_contacts

    paths = [*pb.contact_paths(), *rt.settings.contacts]
    return load_contacts(paths, default_region=rt.settings.default_region)


def optout_store(rt: Runtime) -> OptOutStore:
    from incident_notify.optouts import OptOutStore

    return OptOutStore(rt.settings.optouts_path(), rt.settings.default_region)


def _lock(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(path, "a+")  # noqa: SIM115 - held for the duration of the declare
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def next_incident_id(rt: Runtime, today: datetime | None = None) -> str:
    """The next free INC-YYYYMMDD-NNNN. Final only when read under `lifecycle_lock`."""
    day = (today or datetime.now(UTC)).strftime("%Y%m%d")
    prefix = f"INC-{day}-"
    highest = 0
    for incident in rt.audit.declared_ids():
        if incident.startswith(prefix):
            try:
                highest = max(highest, int(incident[len(prefix):]))
            except ValueError:
                continue
    return f"{prefix}{highest + 1:04d}"


def lifecycle_lock(rt: Runtime) -> IO[str]:
    """Held only while a lifecycle event is decided and recorded, never across a prompt:
    two commanders declaring at once get distinct ids, and two updating the same incident
    cannot both claim the same update number."""
    return _lock(Path(str(rt.settings.audit_path()) + ".lifecycle.lock"))


_LOCK_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


def sending_lock(rt: Runtime, incident_id: str, *, resume: bool = False) -> IO[str]:
    """Held by a command for as long as it sends an incident's messages. `declare`,
    `update`, `resolve` and `reopen` share it: each sends only the update it planned.
    `resume` holds it alone: it sends whatever the record says is still pending, which a
    live sender of the incident is about to send too. Never waited for: a conflict stops
    the command before it records or sends anything. The kernel drops the lock of a
    process that dies, so a resume after a crash or a kill is never refused."""
    name = incident_id if _LOCK_NAME.fullmatch(incident_id) and incident_id[0] != "." \
        else "h-" + hashlib.sha256(incident_id.encode()).hexdigest()[:32]
    directory = Path(str(rt.settings.audit_path()) + ".sending")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(directory / f"{name}.lock", "a+")  # noqa: SIM115 - held while sending
    try:
        fcntl.flock(handle, (fcntl.LOCK_EX if resume else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        if resume:
            raise StateError(
                f"{incident_id}: another incident-notify process is sending this incident's "
                "messages right now; resuming beside it would send them twice, so nothing "
                "was sent",
                hint=f"let it finish (incident-notify status {incident_id} shows how far it "
                f"is), or stop it with Ctrl-C, then run: incident-notify resume "
                f"{incident_id}") from None
        raise StateError(
            f"{incident_id}: a resume of this incident is running in another process; "
            "nothing was sent",
            hint="run this command again once the resume has finished") from None
    return handle


# ----------------------------------------------------------------------- core
@dataclass
class UpdateSpec:
    event: str
    stage: str
    message: str
    values: dict[str, str]


def make_planner(rt: Runtime, pb: Playbook, contacts: ContactSet, incident_id: str,
                  update_no: int, spec: UpdateSpec, state: IncidentState | None,
                  declared_at: str) -> Planner:
    ctx = IncidentContext(id=incident_id, stage=spec.stage, update_no=update_no,
                          declared_at=declared_at, message=spec.message)
    return Planner(pb, rt.renderer(pb), contacts, optout_store(rt), incident_id=incident_id,
                   update_no=update_no, stage=spec.stage, values=spec.values, ctx=ctx,
                   state=state)


@dataclass
class Prepared:
    """Everything an update needs, built before anything is recorded."""

    preflight: Preflight
    contacts: ContactSet
    channels: dict[str, Channel]
    """The stage's channels and their fallbacks, built once; the caller closes them."""
    planner: Planner
    plan: Plan


def prepare(rt: Runtime, pb: Playbook, incident_id: str, update_no: int, spec: UpdateSpec,
            state: IncidentState | None, *, check: bool = True) -> Prepared:
    """Load, plan, render and check everything an update needs, before anything is
    recorded. The update is planned once: the preflight's counts, the journal's records and
    the dispatcher's jobs are that one plan."""
    if state is not None:
        rt.continuing(state.last_tweet.values())
    # The providers are asked whether they are up while the update is planned: the
    # checks wait on the network, planning on the processor.
    checked = build_channels(rt, pb, stage_channels(pb, spec.stage))
    try:
        health_of = start_health_checks(checked, retry_after_s=rt.health_retry_s) \
            if check else dict
        contacts = load_contact_set(rt, pb)
        declared_at = state.declared_at if state else datetime.now(UTC).isoformat()
        planner = make_planner(rt, pb, contacts, incident_id, update_no, spec, state,
                               declared_at)
        messages = planner.render_all()
        refuse_misleading(pb, rt.renderer(pb), contacts, spec.stage, messages, state)
        plan = planner.plan()
        health = health_of()
    except BaseException:
        close_channels(checked)
        raise
    pre = Preflight(
        incident_id=incident_id, playbook=pb, stage=spec.stage, update_no=update_no,
        event=spec.event, messages=messages, audience_sizes=dict(plan.stats.per_channel),
        health=health, stats=plan.stats, skips=plan.skips,
        invalid_contacts=contacts.invalid_records,
        contact_source_problems=len(contacts.problems) - contacts.invalid_records,
        endpoints={n: ch.endpoint() for n, ch in checked.items()},
    )
    return Prepared(pre, contacts, checked, planner, plan)


def refuse_misleading(pb: Playbook, renderer: Renderer, contacts: ContactSet, stage: str,
                       messages: list[RenderedMessage], state: IncidentState | None) -> None:
    """Stop before anything is sent when sending would mislead: internal words on a public
    path, contacts that cannot be planned from (`refuse_unusable_contacts`), or a tweet
    identical to one this incident already posted (the provider refuses it)."""
    from incident_notify.channels import channel_class
    from incident_notify.sensitivity import leak_problems

    leaks = leak_problems(pb, renderer, stage)
    if leaks:
        from incident_notify.errors import PlaybookError

        raise PlaybookError(leaks, hint="nothing was sent; incident-notify validate shows "
                            "every path")
    refuse_unusable_contacts(pb, contacts, stage)
    if state is None:
        return
    posted: dict[str, set[str]] = {}
    for d in state.deliveries.values():
        if d.status == "sent" and not d.contact_id:
            msg = state.messages.get(d.payload.get("digest", ""))
            part = int(d.payload.get("part", 1))
            if msg and part <= len(msg["parts"]):
                posted.setdefault(d.channel, set()).add(msg["parts"][part - 1])
    for m in messages:
        if not getattr(channel_class(m.channel_type), "refuses_duplicates", False):
            continue
        for text in m.parts:
            if text in posted.get(m.channel, set()):
                raise StateError(
                    f"{m.channel}: this update's post is identical to one the incident "
                    f"already posted, which {m.channel_type} refuses as a duplicate; nothing "
                    "was sent",
                    hint="say what is new with --message \"...\" (or --set changed values)")


def refuse_unusable_contacts(pb: Playbook, contacts: ContactSet, stage: str) -> None:
    """Stop before an update is planned from contacts that did not load (people would
    silently not be told), or where an internal or customer audience selects nobody (a
    tag lost from a contacts export: "everyone was reached" would count only the others).
    Every send that plans checks it: declare, update, and resume of an update whose plan
    a crash cut short."""
    from incident_notify.errors import ContactsError

    problems = list(contacts.problems)
    for aname in pb.audiences_for(stage):
        aud = pb.model.audiences[aname]
        if aud.kind == "public":
            continue
        sel = aud.select
        if next(iter(contacts.select(groups=sel.groups, tags=sel.tags, ids=sel.ids)), None) \
                is None:
            who = "the incident team would not" if aud.kind == "internal" else "no customer would"
            problems.append(pb.source.problem(
                ("audiences", aname), f"{aud.kind} audience {aname!r} selects nobody in the "
                f"contacts: {who} be told",
                "check its groups/tags against the contact files (incident-notify contacts "
                "list)"))
    if problems:
        raise ContactsError(problems, "nothing was sent: the contacts are not what the "
                            "playbook needs", hint="fix the contact files (incident-notify "
                            "contacts check shows every problem), then run the command again")


def stage_channels(pb: Playbook, stage: str) -> list[str]:
    primary: list[str] = []
    for aname in pb.audiences_for(stage):
        primary += pb.model.audiences[aname].channels
    return channels_with_fallbacks(pb, primary)


def dispatch_update(rt: Runtime, pb: Playbook, planner: Planner, state: IncidentState,
              contacts: ContactSet, update_no: int, health: Mapping[str, Health],
              progress: ProgressFn | None, include_unknown: bool = False,
              channels: Mapping[str, Channel] | None = None) -> DispatchResult:
    from incident_notify.audit import GroupCommitWriter

    given = dict(channels or {})
    # The update's deliveries, and the fallbacks of their channels, may need a channel the
    # caller did not build (a resumed update of another stage): build those, once, and
    # close only those. A normal run needs none: the preflight built the stage's channels.
    needed = channels_with_fallbacks(pb, sorted({
        d.channel for d in state.deliveries.values()
        if d.update_no == update_no and d.channel in pb.model.channels}))
    extra = build_channels(rt, pb, [n for n in needed if n not in given])
    built = {**given, **extra}
    types = {n: pb.model.channels[n].type for n in built}
    down = {n: h.detail for n, h in health.items() if not h.ok}
    try:
        with GroupCommitWriter(rt.audit) as writer:
            router = AuditedRouter(planner, writer, state.id)
            dispatcher = Dispatcher(built, writer, router, incident_id=state.id,
                                    policy=rt.policy, on_event=progress, channel_types=types,
                                    down=down)
            dispatcher.shared.tracked = sharing_keys(state.deliveries.values(), update_no)
            if dispatcher.shared.tracked:
                for sent in sent_singles(state, contacts, update_no):  # (a resumed update)
                    dispatcher.shared.seed(*sent)
            return dispatcher.run(pending_jobs(state, contacts, update_no, include_unknown))
    finally:
        close_channels(extra)


def close_channels(channels: Mapping[str, Channel]) -> None:
    for ch in channels.values():
        try:
            ch.close()
        except Exception:
            pass


def run_update(rt: Runtime, pb: Playbook, incident_id: str, update_no: int, spec: UpdateSpec,
               state: IncidentState | None, *, dry_run: bool, confirm: ConfirmFn | None,
               progress: ProgressFn | None, lifecycle_payload: dict[str, Any]) -> SendOutcome:
    """Preflight, confirmation, then record the lifecycle event and send.

    For a declaration `incident_id` is provisional (shown in the preview); the real id is
    allocated under the lifecycle lock after confirmation.
    """
    prepared = prepare(rt, pb, incident_id, update_no, spec, state)
    try:
        if dry_run:
            return SendOutcome(incident_id, spec.stage, update_no, True, prepared.preflight,
                               None)
        return _record_and_send(rt, pb, incident_id, update_no, spec, prepared, confirm,
                                progress, lifecycle_payload)
    finally:
        close_channels(prepared.channels)


def _record_and_send(rt: Runtime, pb: Playbook, incident_id: str, update_no: int,
                     spec: UpdateSpec, prepared: Prepared, confirm: ConfirmFn | None,
                     progress: ProgressFn | None,
                     lifecycle_payload: dict[str, Any]) -> SendOutcome:
    pre, channels = prepared.preflight, prepared.channels
    asked = time.monotonic()
    if confirm is not None and not confirm(pre):
        raise AbortedError("nothing was sent: the commander declined",
                           hint="rerun when ready; --dry-run previews without asking")
    health = pre.health
    if time.monotonic() - asked > HEALTH_MAX_AGE_S:
        # The commander took a while to answer: channels may have gone down or come back.
        health = check_health(channels, retry_after_s=rt.health_retry_s)
    incident_id, sending, known = _record_lifecycle(rt, spec, incident_id, update_no,
                                                    lifecycle_payload)
    try:
        # The state read under the lock plus what this command writes: no re-reading the
        # log.
        state, contacts = known.state, prepared.contacts
        planner, plan = prepared.planner, prepared.plan
        if incident_id != pre.incident_id:
            # Another commander declared meanwhile and took the provisional id: the
            # messages name the incident, so they are planned again under the real one.
            planner = make_planner(rt, pb, contacts, incident_id, update_no, spec, state,
                                   state.declared_at)
            planner.render_all()
            plan = planner.plan()
        for written in write_plan(rt, planner, plan, incident_id, update_no, known.spans):
            apply(state, written)
        plan.jobs.clear()  # recorded: the dispatcher sends what the record says is pending
        result = dispatch_update(rt, pb, planner, state, contacts, update_no, health,
                                 progress, channels=channels)
        # (The dispatcher only read the state: the record of the sending is folded onto it.)
        v, final = finish_update(rt, incident_id, update_no, result, known)
        return SendOutcome(incident_id, spec.stage, update_no, False, pre, result, v,
                           in_doubt=in_doubt_list(final, update_no))
    finally:
        sending.close()


def _record_lifecycle(rt: Runtime, spec: UpdateSpec, incident_id: str, update_no: int,
                      payload: dict[str, Any]) -> tuple[str, IO[str], Known]:
    """Under the lifecycle lock: the incident's id (a declaration's final one), its sending
    lock (held: the caller closes it), and what the command knows of its record (the
    incident's state read under the lock, with the lifecycle event recorded and applied)."""
    handle = lifecycle_lock(rt)
    sending: IO[str] | None = None
    try:
        if spec.event == "incident.declared":
            incident_id = next_incident_id(rt)
            sending = sending_lock(rt, incident_id)
            known = Known(IncidentState(id=incident_id), 0, [])
        else:
            sending = sending_lock(rt, incident_id)
            before = rt.audit.size()
            known = Known(fold(rt.audit.records(incident=incident_id), incident_id), before,
                          [])
            current = known.state
            if current.update_no != update_no - 1:
                raise StateError(
                    f"{incident_id} was updated by someone else meanwhile (now at update "
                    f"{current.update_no}, stage {current.stage!r}); nothing was sent",
                    hint=f"review with: incident-notify status {incident_id}, then retry")
        apply(known.state, rt.audit.append(spec.event, incident=incident_id, payload=payload,
                                           spans=known.spans))
        return incident_id, sending, known
    except BaseException:
        if sending is not None:
            sending.close()
        raise
    finally:
        handle.close()


# ----------------------------------------------------------------------- commands
def declare(rt: Runtime, playbook: Path | Playbook, values: dict[str, str], *,
            message: str = "", stage: str | None = None, dry_run: bool = False,
            confirm: ConfirmFn | None = None,
            progress: ProgressFn | None = None) -> SendOutcome:
    """Open an incident. `playbook` is a path, or the playbook the caller already loaded
    (the CLI loads it once to read the variables, and passes it down)."""
    from incident_notify.messages import check_message

    check_message(message)
    pb = playbook if isinstance(playbook, Playbook) else load_playbook(playbook)
    playbook = pb.path
    first = pb.stage_named(stage)
    spec = UpdateSpec("incident.declared", first, message, values)
    provisional = next_incident_id(rt)
    payload = {"playbook": str(playbook.resolve()), "playbook_name": pb.name,
               "title": pb.model.title, "severity": pb.model.severity, "stage": first,
               "update_no": 1, "variables": values, "message": message,
               "sandbox": rt.sandbox is not None}
    return run_update(rt, pb, provisional, 1, spec, None, dry_run=dry_run, confirm=confirm,
                      progress=progress, lifecycle_payload=payload)


def update(rt: Runtime, incident_id: str, *, stage: str | None, sets: dict[str, str],
           message: str = "", dry_run: bool = False, confirm: ConfirmFn | None = None,
           progress: ProgressFn | None = None, playbook: Path | None = None,
           event: str = "incident.updated") -> SendOutcome:
    state = load_state(rt, incident_id)
    return _step(rt, state, playbook_of(state, playbook), stage=stage, sets=sets,
                 message=message, dry_run=dry_run, confirm=confirm, progress=progress,
                 event=event)


def _step(rt: Runtime, state: IncidentState, pb: Playbook, *, stage: str | None,
          sets: dict[str, str], message: str, dry_run: bool, confirm: ConfirmFn | None,
          progress: ProgressFn | None, event: str) -> SendOutcome:
    """One lifecycle step of an incident whose state and playbook the caller loaded."""
    from incident_notify.messages import check_message, resolve_variables

    check_message(message)

    incident_id = state.id
    if state.status == "resolved" and event != "incident.reopened":
        raise StateError(f"{incident_id} is resolved; it takes no further updates",
                         hint=f"reopen it first: incident-notify reopen {incident_id}")
    if event == "incident.reopened" and state.status != "resolved":
        raise StateError(f"{incident_id} is not resolved, so it cannot be reopened")
    target = pb.stage_named(stage or state.stage)
    if event == "incident.updated" and target != state.stage:
        allowed = pb.allowed_next(state.stage)
        if target not in allowed:
            raise StateError(
                f"{incident_id} is at {state.stage!r}; it cannot move to {target!r}",
                hint=f"allowed next: {', '.join(allowed) or '(none)'}; use 'resolve' to close")
        if target == pb.final_stage:
            event = "incident.resolved"
    if event == "incident.updated" and target == state.stage and not message and not sets:
        raise UsageError("nothing to say: same stage, no --message and no --set",
                         hint="give --stage NEXT, or --message \"...\" for a free-text update")
    values = resolve_variables(pb, {**state.variables, **sets}, mode="given")
    update_no = state.update_no + 1
    spec = UpdateSpec(event, target, message, values)
    payload = {"stage": target, "previous_stage": state.stage, "update_no": update_no,
               "variables": values, "message": message}
    return run_update(rt, pb, incident_id, update_no, spec, state, dry_run=dry_run,
                      confirm=confirm, progress=progress, lifecycle_payload=payload)


def resolve(rt: Runtime, incident_id: str, *, playbook: Path | None = None,
            **kwargs: Any) -> SendOutcome:
    state = load_state(rt, incident_id)
    pb = playbook_of(state, playbook)
    if state.status == "resolved":
        raise StateError(f"{incident_id} is already resolved",
                         hint=f"reopen it with: incident-notify reopen {incident_id}")
    return _step(rt, state, pb, stage=pb.final_stage, event="incident.resolved",
                 **_step_options(kwargs))


def reopen(rt: Runtime, incident_id: str, *, stage: str | None = None,
           playbook: Path | None = None, **kwargs: Any) -> SendOutcome:
    state = load_state(rt, incident_id)
    pb = playbook_of(state, playbook)
    return _step(rt, state, pb, stage=stage or pb.first_stage, event="incident.reopened",
                 **_step_options(kwargs))


def _step_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"sets": kwargs.get("sets", {}), "message": kwargs.get("message", ""),
            "dry_run": kwargs.get("dry_run", False), "confirm": kwargs.get("confirm"),
            "progress": kwargs.get("progress")}


def fetch_replies(rt: Runtime, incident_id: str, playbook: Path | None = None) -> int:
    """Fetch replies to the incident's public thread and record the new ones
    (``reply.received``), so the timeline shows what people answered."""
    state = load_state(rt, incident_id)
    if not state.first_tweet:
        return 0
    pb = playbook_of(state, playbook)
    seen = {r.get("id") for r in state.replies}
    new = 0
    channels = build_channels(rt, pb, [c for c in state.first_tweet if c in pb.model.channels])
    for name, channel in channels.items():
        replies = getattr(channel, "replies", None)
        if replies is None:
            continue
        for reply in reversed(replies(state.first_tweet[name])):
            if reply["id"] in seen:
                continue
            rt.audit.append("reply.received", incident=incident_id, channel=name,
                            payload=reply)
            new += 1
    return new
