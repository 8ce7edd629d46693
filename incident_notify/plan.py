"""Plan: (playbook, stage, variables, audiences) -> deliveries, and the failover router.

Rules (docs/audiences.md):

* internal audiences: every member on every channel the audience lists (where the member
  has an address); opt-outs do not apply.
* customers: the person's preferred order of channel kinds, restricted to the audience's
  channels, first one reachable and not opted out; opted out everywhere -> skipped.
* public: one broadcast per channel (a tweet, or a reply thread). When that channel is
  down, the people in `fallback_select` hear on its fallback channels instead.
* one delivery per person per channel instance per update, whichever audiences they are
  in; the idempotency key is ``INCIDENT/UPDATE/CHANNEL/CONTACT/PART``, so planning the same
  update twice (resume) never produces a second delivery.

Long on purpose: planning an update and re-routing its deliveries on failover share the
claimed keys and the rendered-message cache of that update: the router must see what the
plan claimed.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from incident_notify.channels.base import Delivery, OutgoingMessage
from incident_notify.dispatch import Planned
from incident_notify.messages import IncidentContext, RenderedMessage, compose
from incident_notify.playbook import Audience, Playbook

if TYPE_CHECKING:
    from incident_notify.contacts import Contact, ContactSet
    from incident_notify.incident import IncidentState
    from incident_notify.optouts import OptOutStore
    from incident_notify.render import Renderer

BROADCAST = "@public"


def delivery_key(incident: str, update_no: int, channel: str, contact: str, part: int) -> str:
    return f"{incident}/{update_no}/{channel}/{contact or BROADCAST}/{part}"


def digest(rendered: RenderedMessage) -> str:
    h = hashlib.sha256()
    for piece in (*rendered.parts, rendered.subject or "", rendered.html or ""):
        h.update(piece.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class Skip:
    key: str
    channel: str
    contact_id: str
    recipient: str | None
    audience: str
    reason: str
    opted_out: bool = False
    """Opted out of every channel that could reach them: not someone to reach."""


@dataclass
class PlanStats:
    planned: int = 0
    skipped: int = 0
    people: int = 0
    per_channel: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """One update's deliveries, planned once: what the preflight counts, what the journal
    records and what the dispatcher sends are the same objects."""

    jobs: list[list[Planned]]
    """One delivery each, or the parts of a thread."""
    skips: list[Skip]
    stats: PlanStats


class Planner:
    """Expands one update of an incident into deliveries; re-routes them on failure."""

    def __init__(
        self,
        pb: Playbook,
        renderer: Renderer,
        contacts: ContactSet,
        optouts: OptOutStore,
        *,
        incident_id: str,
        update_no: int,
        stage: str,
        values: Mapping[str, str],
        ctx: IncidentContext,
        state: IncidentState | None = None,
    ) -> None:
        self.pb = pb
        self.renderer = renderer
        self.contacts = contacts
        self.optouts = optouts
        self.incident_id = incident_id
        self.update_no = update_no
        self.stage = stage
        self.values = dict(values)
        self.ctx = ctx
        self.state = state
        self.stats = PlanStats()
        self.skips: list[Skip] = []
        self.rendered: dict[tuple[str, str, str | None], tuple[RenderedMessage, str]] = {}
        """(audience, channel, fallback_from) -> (message, digest)."""
        self.new_renders: list[dict[str, Any]] = []
        """message.rendered payloads not yet written to the audit log."""
        self._keys: set[str] = set()
        self._contracts: dict[str, tuple[str | None, str | None, str]] = {}
        """channel -> (preference kind, contact field, threading) from its type's contract."""
        self._gone: set[str] = set()
        """Keys whose delivery failed, failed over or was skipped: nobody is told there, so
        a failover coming to that channel does not count the person as told on it."""
        if state is not None:
            self._keys.update(k for k, d in state.deliveries.items() if d.update_no == update_no)
            self._gone.update(k for k, d in state.deliveries.items() if d.update_no == update_no
                              and d.status in ("failed", "failed_over", "skipped"))
        self._lock = threading.Lock()
        self.walks = 0
        """How many times the audiences were walked (once: the plan is kept)."""

    # ------------------------------------------------------------------ rendering
    def message(self, audience: str, channel: str,
                fallback_from: str | None = None) -> tuple[RenderedMessage, str]:
        key = (audience, channel, fallback_from)
        with self._lock:
            cached = self.rendered.get(key)
        if cached is not None:
            return cached
        self._refuse_internal(audience, channel, fallback_from)
        msg = compose(self.pb, self.renderer, self.stage, channel, audience, self.values,
                      self.ctx, fallback_from=fallback_from,
                      carry_message=bool(self.ctx.message.strip()))
        if msg.problems:
            from incident_notify.errors import LimitError

            raise LimitError(list(msg.problems))
        dg = digest(msg)
        with self._lock:
            if key not in self.rendered:
                self.rendered[key] = (msg, dg)
                self.new_renders.append({
                    "digest": dg, "update_no": self.update_no, "audience": audience,
                    "channel": channel, "channel_type": msg.channel_type,
                    "parts": list(msg.parts), "subject": msg.subject, "html": msg.html,
                    "fallback_from": fallback_from,
                })
            return self.rendered[key]

    def _refuse_internal(self, audience: str, channel: str, fallback_from: str | None) -> None:
        """Enforced where sends are planned: internal content never goes to a public
        channel or a public or customer audience, whatever path (a fallback, a failover)
        led here. The update stops before anything is recorded or sent."""
        from incident_notify.sensitivity import internal_reason, is_public

        if not is_public(self.pb, channel, audience):
            return
        reason = internal_reason(self.pb, self.renderer, self.stage, channel, audience,
                                 fallback_from)
        if reason is None:
            return
        from incident_notify.errors import PlaybookError

        found = self.pb.message_for(self.stage, channel, audience)
        via = f" as the fallback of {fallback_from!r}" if fallback_from else ""
        raise PlaybookError([self.pb.source.problem(
            found[1] if found else ("stages", self.stage),
            f"internal content would reach public audience/channel "
            f"{audience!r}/{channel!r}{via}: {reason}",
            "nothing was sent; fix the playbook (incident-notify validate shows every path)")])

    def render_all(self) -> list[RenderedMessage]:
        """Render every primary message of the stage up front (preview, early errors)."""
        out = []
        for aname in self.pb.audiences_for(self.stage):
            for ch in self.pb.model.audiences[aname].channels:
                out.append(self.message(aname, ch)[0])
        return out

    def take_new_renders(self) -> list[dict[str, Any]]:
        with self._lock:
            renders, self.new_renders = self.new_renders, []
        return renders

    # ------------------------------------------------------------------ planning
    def plan(self) -> Plan:
        """Walk the audiences once and keep the result (a planner plans once: a second walk
        would find every key claimed)."""
        if self.walks:
            raise RuntimeError("this planner has already planned its update")
        self.walks += 1
        self.stats.warnings.extend(self.optouts.problems())
        return Plan(jobs=list(self._jobs()), skips=self.skips, stats=self.stats)

    def _jobs(self) -> Iterator[list[Planned]]:
        """The update's jobs: one delivery each, or the parts of a thread."""
        seen_people: set[str] = set()
        order = sorted(self.pb.audiences_for(self.stage),
                       key=lambda a: {"internal": 0, "public": 1}.get(
                           self.pb.model.audiences[a].kind, 2))
        for aname in order:
            aud = self.pb.model.audiences[aname]
            if aud.kind == "public":
                for ch in aud.channels:
                    job = self._broadcast(aname, ch)
                    if job:
                        yield job
                continue
            sel = aud.select
            for person in self.contacts.select(groups=sel.groups, tags=sel.tags, ids=sel.ids):
                if person.id not in seen_people:
                    seen_people.add(person.id)
                    self.stats.people += 1
                if aud.kind == "internal":
                    yield from ([p] for p in self._internal(aname, aud, person))
                else:
                    planned = self._customer(aname, aud, person)
                    if planned is not None:
                        yield [planned]

    def _broadcast(self, audience: str, channel: str) -> list[Planned]:
        msg, dg = self.message(audience, channel)
        reply_to = self.state.last_tweet.get(channel) if self.state else None
        job = []
        for i, text in enumerate(msg.parts, start=1):
            key = delivery_key(self.incident_id, self.update_no, channel, "", i)
            if not self._claim(key):
                continue
            d = Delivery(key=key, incident_id=self.incident_id, update_no=self.update_no,
                         channel=channel, recipient="", message=OutgoingMessage(text=text),
                         audience=audience, part=i, parts=len(msg.parts),
                         reply_to=reply_to if i == 1 else None)
            job.append(self._planned(d, dg, msg.channel_type))
        return job

    def _internal(self, audience: str, aud: Audience, person: Contact) -> Iterator[Planned]:
        reached = 0
        for ch in aud.channels:
            planned = self._person_delivery(audience, ch, person, respect_optout=False)
            if planned is not None:
                reached += 1
                yield planned
            elif self._address(ch, person) is not None:
                reached += 1  # already planned through another audience: still reached
        if reached == 0:
            # On record as not reached, never silently left out.
            self._skip(audience, aud.channels[0], person,
                       "no address for any of the audience's channels")
        elif reached < aud.required_channels:
            self.stats.warnings.append(
                f"{person.id} ({audience}) is reachable on {reached} of the "
                f"{aud.required_channels} channels required")

    def _customer(self, audience: str, aud: Audience, person: Contact) -> Planned | None:
        candidates = self._preferred(aud.channels, person)
        reasons = []
        for ch in candidates:
            address = self._address(ch, person)
            if address is None:
                continue
            kind = self._kind(ch)
            if kind and self.optouts.is_opted_out(kind, address):
                reasons.append(f"opted out of {kind}")
                continue
            key = delivery_key(self.incident_id, self.update_no, ch, person.id, 1)
            if key in self._keys:
                return None  # collapsed with another audience, or planned before a crash
            return self._person_delivery(audience, ch, person, respect_optout=True)
        reachable = [c for c in candidates if self._address(c, person) is not None]
        reason = "; ".join(reasons) or "no address for any of the audience's channels"
        channel = candidates[0] if candidates else aud.channels[0]
        self._skip(audience, channel, person, reason,
                   opted_out=bool(reasons) and len(reasons) == len(reachable))
        return None

    def _contract(self, channel: str) -> tuple[str | None, str | None, str]:
        """What the channel's type declares: the preference/opt-out kind people know it
        by, the contact field that addresses it, and how its updates thread. The core never
        names a built-in type."""
        found = self._contracts.get(channel)
        if found is None:
            from incident_notify.channels import channel_class

            cls = channel_class(self.pb.model.channels[channel].type)
            found = self._contracts[channel] = (cls.preference_name(), cls.address,
                                                cls.threading)
        return found

    def _kind(self, channel: str) -> str | None:
        return self._contract(channel)[0]

    def _preferred(self, channels: list[str], person: Contact) -> list[str]:
        """The audience's channels in the person's preferred order of kinds, then the
        audience's other channels: a preference orders, it does not exclude (opting out
        does)."""
        if not person.channels:
            return list(channels)
        ordered = []
        for kind in person.channels:
            ordered += [c for c in channels if self._kind(c) == kind and c not in ordered]
        return ordered + [c for c in channels if c not in ordered]

    def _address(self, channel: str, person: Contact) -> str | None:
        field = self._contract(channel)[1]
        return person.address_for(field) if field else None

    def _person_delivery(self, audience: str, channel: str, person: Contact, *,
                         respect_optout: bool, fallback_from: str | None = None
                         ) -> Planned | None:
        address = self._address(channel, person)
        if address is None:
            return None
        if respect_optout:
            kind = self._kind(channel)
            if kind and self.optouts.is_opted_out(kind, address):
                return None
        key = delivery_key(self.incident_id, self.update_no, channel, person.id, 1)
        if not self._claim(key):
            return None
        msg, dg = self.message(audience, channel, fallback_from)
        reply_to: str | None = None
        refs: tuple[str, ...] = ()
        if self.state is not None and self._contract(channel)[2] == "references":
            previous = self.state.email_refs.get((channel, person.id), [])
            if previous:
                reply_to, refs = previous[-1], tuple(previous)
        d = Delivery(key=key, incident_id=self.incident_id, update_no=self.update_no,
                     channel=channel, recipient=address,
                     message=OutgoingMessage(text=msg.parts[0], subject=msg.subject,
                                             html=msg.html),
                     contact_id=person.id, audience=audience, reply_to=reply_to,
                     thread_refs=refs, fallback_from=fallback_from)
        return self._planned(d, dg, msg.channel_type)

    def _planned(self, d: Delivery, dg: str, channel_type: str) -> Planned:
        self.stats.planned += 1
        self.stats.per_channel[d.channel] = self.stats.per_channel.get(d.channel, 0) + 1
        payload = {
            "update_no": d.update_no, "audience": d.audience, "contact_id": d.contact_id,
            "part": d.part, "parts": d.parts, "digest": dg, "channel_type": channel_type,
            "reply_to": d.reply_to, "thread_refs": list(d.thread_refs),
            "fallback_from": d.fallback_from, "threading": self._contract(d.channel)[2],
        }
        return Planned(delivery=d, payload=payload, channel_type=channel_type)

    def release(self, keys: Iterable[str]) -> None:
        """Let these deliveries (failed ones of someone not reached, sent again by `resume
        --retry-not-reached`) be planned again when a failover comes to their channel."""
        with self._lock:
            self._keys.difference_update(keys)
            self._gone.difference_update(keys)

    def _claim(self, key: str) -> bool:
        with self._lock:
            if key in self._keys:
                return False
            self._keys.add(key)
            return True

    def _skip(self, audience: str, channel: str, person: Contact, reason: str,
              opted_out: bool = False) -> None:
        key = delivery_key(self.incident_id, self.update_no, channel, person.id, 1)
        if not self._claim(key):
            return
        with self._lock:
            self._gone.add(key)
        self.stats.skipped += 1
        self.skips.append(Skip(key, channel, person.id, self._address(channel, person),
                               audience, reason, opted_out))

    # ------------------------------------------------------------------ router
    def reroute(self, delivery: Delivery, reason: str) -> list[Planned] | None:
        """The channel of `delivery` is down: carry it on the channel's fallbacks.

        Returns None when nobody can be reached another way, or the new deliveries
        (empty when everyone concerned is already told on a fallback channel).
        """
        self._leaving(delivery)
        fallbacks = self.pb.model.channels[delivery.channel].fallback
        if not fallbacks:
            return None
        aud = self.pb.model.audiences.get(delivery.audience)
        if delivery.contact_id == "":
            if aud is None or aud.fallback_select.is_empty():
                return None
            sel = aud.fallback_select
            people = self.contacts.select(groups=sel.groups, tags=sel.tags, ids=sel.ids)
        else:
            person = self.contacts.contacts.get(delivery.contact_id)
            people = iter([person] if person else [])
        respect = aud is None or aud.kind != "internal"
        return self._first_reachable(people, fallbacks, delivery.audience, respect,
                                     fallback_from=delivery.channel)

    def next_channel(self, delivery: Delivery) -> list[Planned] | None:
        """A permanent recipient error: try the person's next channel in this audience,
        then the channel's fallbacks (an audience told on one channel that falls back to
        another: the person whose number is refused hears on the fallback)."""
        self._leaving(delivery)
        person = self.contacts.contacts.get(delivery.contact_id)
        aud = self.pb.model.audiences.get(delivery.audience)
        if person is None or aud is None or aud.kind == "public":
            return None
        candidates = self._preferred(aud.channels, person)
        after = (candidates[candidates.index(delivery.channel) + 1:]
                 if delivery.channel in candidates else candidates)
        respect = aud.kind != "internal"
        found = self._first_reachable(iter([person]), after, delivery.audience, respect)
        if found is None:  # (no fallback left: None, as for no next channel)
            fallbacks = [c for c in self.pb.model.channels[delivery.channel].fallback
                         if c not in candidates]
            found = self._first_reachable(iter([person]), fallbacks, delivery.audience,
                                          respect, fallback_from=delivery.channel)
        return found

    def _leaving(self, delivery: Delivery) -> None:
        """`delivery` is being moved off its channel (down, or it was refused there)."""
        with self._lock:
            self._gone.add(delivery.key)

    def _first_reachable(self, people: Iterator[Contact], channels: list[str], audience: str,
                         respect_optout: bool, fallback_from: str | None = None
                         ) -> list[Planned] | None:
        """For each person, a delivery on the first of `channels` that reaches them."""
        out: list[Planned] = []
        covered = False
        for person in people:
            for ch in channels:
                planned = self._person_delivery(audience, ch, person,
                                                respect_optout=respect_optout,
                                                fallback_from=fallback_from)
                if planned is not None:
                    out.append(planned)
                    break
                key = delivery_key(self.incident_id, self.update_no, ch, person.id, 1)
                if self._address(ch, person) is not None and key in self._keys \
                        and key not in self._gone:
                    covered = True  # already told (or being told) on this channel
                    break
        return out if (out or covered) else None

    def opted_out(self, delivery: Delivery) -> None:
        kind = self._kind(delivery.channel)
        if kind and delivery.recipient:
            self.optouts.add(kind, delivery.recipient, "provider-opt-out")
