"""Delivery under provider faults, each reproduced by an emulator fault and driven through
the real tweepy / twilio / smtplib clients: a hanging provider, an answer lost after the
provider accepted, a far rate-limit reset, a thread cut mid-way, and what `resume` then
settles with the providers' own records."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from incident_notify.flow import CircuitBreaker, RetryPolicy, TokenBucket
from incident_notify.lifecycle import declare, update
from incident_notify.resume import resume
from tests.conftest import (
    PLAYBOOKS,
    UnreachablePort,
    json_doc,
    mail_to,
    make_fanout_playbook,
    run_cli,
    sandbox_runtime,
    sms_to,
)

FAST = RetryPolicy(max_attempts=4, base_delay_s=0.05, max_delay_s=0.2, deadline_s=20,
                   breaker_threshold=3, breaker_cooldown_s=60)
SUBSCRIBERS = {f"+1415555{i:04d}" for i in range(3)}


def runtime(tmp_path: Path, sandbox: Any) -> Any:
    return sandbox_runtime(tmp_path, sandbox, FAST)


def tweets(sandbox: Any) -> list[dict[str, Any]]:
    return [r for r in sandbox.twitter.received.all() if r["kind"] == "tweet"]


def events(rt: Any, prefix: str, channel: str | None = None) -> list[Any]:
    return [r for r in rt.audit.records(event_prefix=prefix)
            if channel is None or r.channel == channel]


def _time_out(pb: Path, sender: str, seconds: int) -> None:
    """Give the channel of `sender` in playbook `pb` a `timeout_s`."""
    pb.write_text(pb.read_text().replace(f"sender: {sender}\n",
                                         f"sender: {sender}\n    timeout_s: {seconds}\n"))


def after_confirmation(action: Any) -> Any:
    def confirm(_: Any) -> bool:
        action()
        return True
    return confirm


# ------------------------------------------------------------------ a hanging provider
def test_provider_answering_after_25s_fails_over_within_bounded_time(
        tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 2, twitter=True, subscribers=3)
    sandbox.twitter.faults.update(latency_ms=25_000)
    rt = runtime(tmp_path, sandbox)
    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"})
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"the health check must be bounded (took {elapsed:.1f}s)"
    assert outcome.preflight is not None
    assert not outcome.preflight.health["status_twitter"].ok
    assert "no answer within" in outcome.preflight.health["status_twitter"].detail
    assert outcome.exit_code == 0, outcome.to_dict()["result"]
    assert set(sms_to(sandbox)) >= SUBSCRIBERS
    assert events(rt, "delivery.attempt", "status_twitter") == []


def test_health_checks_run_while_the_update_is_planned(tmp_path: Path, sandbox: Any) -> None:
    """The providers are asked whether they are up while the contacts load and the
    messages render, not after: a provider slow to answer its check does not add its wait
    to the planning's, and planning that fails (a contact that does not load) says so at
    once rather than after the slowest check."""
    from incident_notify.errors import ContactsError

    pb = make_fanout_playbook(tmp_path / "pb", 2, twitter=True, subscribers=1)
    with (tmp_path / "pb" / "people.csv").open("a") as rows:
        rows.write("p9,Broken,broken@example.com,+1 555,,sms,team,\n")
    sandbox.twitter.faults.update(latency_ms=3_000)
    rt = runtime(tmp_path, sandbox)
    started = time.monotonic()
    with pytest.raises(ContactsError):
        declare(rt, pb, {"site": "LON-2"})
    assert time.monotonic() - started < 2.5, "planning waited for the slow health check"
    until = time.monotonic() + 5  # (started, its request may still be on its way)
    while not sandbox.twitter.hits and time.monotonic() < until:
        time.sleep(0.01)
    assert sum(sandbox.twitter.hits.values()) >= 1, "the checks had not started"
    assert sandbox.twitter.received.all() == []


@pytest.mark.parametrize("service", ["twilio", "smtp"])
def test_answer_dribbled_after_accept_is_unknown_in_bounded_time_never_resent(
        tmp_path: Path, sandbox: Any, service: str) -> None:
    """The provider takes each message, then sends its answer a byte at a time, each byte
    well within the socket timeout, so no read ever times out: a request is bounded only
    by its channel's deadline for the whole request (3x its `timeout_s` of 1 s). Each
    send is recorded unknown in bounded time, the other channel still reaches everyone,
    nothing is sent twice, and resume settles the SMS against Twilio's records (SMTP keeps
    none: the emails are listed)."""
    pb = make_fanout_playbook(tmp_path / "pb", 2)
    for sender in ('"+15005550006"', '"Ops <ops@acme.example>"'):
        _time_out(pb, sender, 1)
    getattr(sandbox, service).faults.update(dribble_ms=400)
    rt = runtime(tmp_path, sandbox)
    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"})
    took = time.monotonic() - started
    channel = "team_sms" if service == "twilio" else "team_email"
    assert took < 12, f"a dribbled answer held the update for {took:.0f}s"
    unknown = events(rt, "delivery.unknown", channel)
    assert len(unknown) == 2 and {u.payload["code"] for u in unknown} == {"timeout"}
    assert "within 3s" in unknown[0].payload["error"]
    assert outcome.exit_code == 5 and len(outcome.in_doubt) == 2
    assert set(sms_to(sandbox).values()) == {1} and set(mail_to(sandbox).values()) == {1}
    getattr(sandbox, service).faults.update(dribble_ms=0)
    settled = resume(rt, outcome.incident_id)
    assert set(sms_to(sandbox).values()) == {1} and set(mail_to(sandbox).values()) == {1}
    assert settled.exit_code == (0 if service == "twilio" else 5)


# ------------------------------------------------------------------ a door that drops
@pytest.fixture
def hung_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A name whose lookup hangs, as when the outage took the name servers: the system
    resolver (`getaddrinfo`) is outside every socket timeout. Released at the end."""
    import socket

    release = threading.Event()
    real = socket.getaddrinfo

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hung.example":
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    yield "hung.example"
    release.set()


@pytest.mark.parametrize("door", ["drops", "resolver-hangs"])
@pytest.mark.parametrize("kind", ["sms", "email", "twitter"])
def test_a_provider_whose_address_drops_connection_requests_fails_fast_never_sent(
        kind: str, door: str, request: Any) -> None:
    """A firewall, or a route lost in the outage, drops the connection requests to the
    provider: the connect waits, unanswered. The SMS and email channels waited their
    whole `timeout_s` (20 s) for each connection, and the request deadline cannot cut a
    connection that has no socket yet. Or the name servers went with the outage, and the
    name lookup hangs, outside every timeout (30 s and more per connection here). A
    connection now has 5 s (CONNECT_TIMEOUT_S) to open, lookup included; nothing was
    sent, so the delivery is retried or fails over, never left in doubt."""
    from incident_notify.channels._http import CONNECT_TIMEOUT_S
    from incident_notify.channels.base import (
        ChannelSpec,
        Delivery,
        NoAttempt,
        OutgoingMessage,
        TransientChannelError,
    )
    from incident_notify.channels.email import EmailChannel
    from incident_notify.channels.sms import SMSChannel
    from incident_notify.channels.twitter import TwitterChannel
    from incident_notify.sandbox import SANDBOX_CREDENTIALS

    with UnreachablePort() as closed:
        if door == "drops":
            url, smtp = f"http://127.0.0.1:{closed.port}", f"smtp://127.0.0.1:{closed.port}"
        else:
            host = request.getfixturevalue("hung_resolver")
            url, smtp = f"https://{host}", f"smtps://{host}:465"
        secrets = {**SANDBOX_CREDENTIALS, "INCIDENT_NOTIFY_TWILIO_API_BASE": url,
                   "INCIDENT_NOTIFY_TWITTER_API_BASE": url, "INCIDENT_NOTIFY_SMTP_URL": smtp}
        channel = {"sms": lambda: SMSChannel(ChannelSpec("c", "sms", "+15005550006"), secrets),
                   "email": lambda: EmailChannel(ChannelSpec("c", "email", "ops@acme.example"),
                                                 secrets),
                   "twitter": lambda: TwitterChannel(ChannelSpec("c", "twitter"), secrets),
                   }[kind]()
        recipient = {"sms": "+12025550100", "email": "a@example.org", "twitter": ""}[kind]
        started = time.monotonic()
        with pytest.raises(TransientChannelError) as info:
            channel.send(Delivery(key="INC-1/1/c/p/1", incident_id="INC-1", update_no=1,
                                  channel="c", recipient=recipient,
                                  message=OutgoingMessage(text="Power lost.", subject="s")),
                         NoAttempt())
        took = time.monotonic() - started
    assert info.value.code == "connection" and not info.value.maybe_delivered, info.value
    assert CONNECT_TIMEOUT_S - 0.5 < took < CONNECT_TIMEOUT_S + 3, took


@pytest.mark.parametrize("kind", ["sms", "email", "twitter"])
def test_a_provider_name_whose_first_address_drops_connections_is_reached_at_the_next(
        kind: str, sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider's name resolves to several addresses; the first two drop connection
    requests (an edge of the provider down, IPv6 routes that are gone). The connect bound
    added for hung name lookups covered the lookup and every address together, 6 s: the
    first two addresses took all of it, the live one was never tried, and the provider
    was unreachable on every retry, where before it was reached 10 s late. Each address
    now has the connect timeout of its own, after a lookup bounded on its own, and the
    next address is tried beside a silent one after a quarter of a second (RFC 8305), so
    the live one answers within a second, not two connect timeouts later: the health
    check (8 s) called such a provider down, though sending reached it."""
    import socket

    from incident_notify.channel_setup import check_health
    from incident_notify.channels._deadline import STAGGER_S
    from incident_notify.channels._http import CONNECT_TIMEOUT_S
    from incident_notify.channels.base import ChannelSpec, Delivery, NoAttempt, OutgoingMessage
    from incident_notify.channels.email import EmailChannel
    from incident_notify.channels.sms import SMSChannel
    from incident_notify.channels.twitter import TwitterChannel
    from incident_notify.sandbox import SANDBOX_CREDENTIALS

    emulator = {"sms": sandbox.twilio, "email": sandbox.smtp, "twitter": sandbox.twitter}[kind]
    port = emulator.port
    real = socket.getaddrinfo

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "localhost":  # (the dead addresses first, then the live one)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.1")]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    # ("localhost": plain HTTP and SMTP may go there only; its addresses are the test's.)
    secrets = {**SANDBOX_CREDENTIALS,
               "INCIDENT_NOTIFY_TWILIO_API_BASE": f"http://localhost:{port}",
               "INCIDENT_NOTIFY_TWITTER_API_BASE": f"http://localhost:{port}",
               "INCIDENT_NOTIFY_SMTP_URL": f"smtp://localhost:{port}"}
    channel = {"sms": lambda: SMSChannel(ChannelSpec("c", "sms", "+15005550006"), secrets),
               "email": lambda: EmailChannel(ChannelSpec("c", "email", "ops@acme.example"),
                                             secrets),
               "twitter": lambda: TwitterChannel(ChannelSpec("c", "twitter"), secrets)}[kind]()
    recipient = {"sms": "+12025550100", "email": "a@example.org", "twitter": ""}[kind]
    with UnreachablePort("127.0.0.2", port), UnreachablePort("127.0.0.3", port):
        started = time.monotonic()
        receipt = channel.send(Delivery(key="INC-1/1/c/p/1", incident_id="INC-1",
                                        update_no=1, channel="c", recipient=recipient,
                                        message=OutgoingMessage(text="Power lost.",
                                                                subject="s")), NoAttempt())
        took = time.monotonic() - started
        channel.close()
        health = check_health({"c": channel})["c"]  # (all of it within HEALTH_DEADLINE_S)
    channel.close()
    assert receipt.provider_id and len(emulator.received.all()) == 1
    assert took < 2 * STAGGER_S + 1.5 < CONNECT_TIMEOUT_S, took
    assert health.ok, health


def test_connecting_tries_the_next_address_beside_a_silent_one_and_closes_late_winners(
        ) -> None:
    """`first_to_open`, the order and timing it keeps with addresses that are silent,
    refuse at once, open late or open fast: the next is started after STAGGER_S beside a
    silent one and at once after a refusal; one that opens after the winner is closed;
    when none opens, the last failure is raised; an error that is no connection failure
    is raised as it is."""
    import threading

    from incident_notify.channels._deadline import STAGGER_S, first_to_open

    closed: list[str] = []
    done = threading.Event()

    class Opened:
        def __init__(self, address: str) -> None:
            self.address = address

        def close(self) -> None:
            closed.append(self.address)
            done.set()

    def open_at(address: str) -> Opened:
        kind, _, seconds = address.partition(":")
        time.sleep(float(seconds or 0))
        if kind == "silent":
            raise TimeoutError(address)
        if kind == "refused":
            raise ConnectionRefusedError(address)
        if kind == "bug":
            raise ValueError(address)
        return Opened(address)

    def timed(found: list[str]) -> tuple[Any, float]:
        started = time.monotonic()
        try:
            return first_to_open(found, open_at, (OSError,)), time.monotonic() - started
        except Exception as exc:
            return exc, time.monotonic() - started

    won, took = timed(["silent:2", "silent:2", "open"])
    assert won.address == "open" and 2 * STAGGER_S <= took < 2 * STAGGER_S + 0.3
    won, took = timed(["refused", "refused", "open"])
    assert won.address == "open" and took < STAGGER_S
    won, took = timed(["open:0.6", "open:0.05"])
    assert won.address == "open:0.05" and took < 0.6
    assert done.wait(2) and closed == ["open:0.6"]
    failed, took = timed(["silent:0.3", "refused:0.5"])
    assert isinstance(failed, ConnectionRefusedError) and took < 1
    failed, _ = timed(["bug", "open:0.3"])
    assert isinstance(failed, ValueError)


@pytest.mark.parametrize("fault", ["none", "drop-after-accept", "refused"])
def test_contacts_sharing_an_address_get_one_message_and_each_is_reached(
        tmp_path: Path, sandbox: Any, fault: str) -> None:
    """Two on-call engineers carry one phone; two people are listed with one mailbox. The
    phone buzzed twice and the mailbox got two identical emails for every update. Now
    the address gets the message once and each person is recorded reached with it; when
    the answer to it is lost, both are in doubt and `resume` settles both from the one
    message Twilio has; when the number is refused, each is tried on their own, so each
    fails over as their own person."""
    people = 6
    # (One SMS at a time: the first is the shared phone's, the one whose answer is lost.)
    pb = make_fanout_playbook(tmp_path / "pb", people, concurrency=1)
    csv = tmp_path / "pb" / "people.csv"
    csv.write_text(csv.read_text().replace("+12025550001", "+12025550000")
                   .replace("person3@example.com", "person2@example.com"))
    rt = runtime(tmp_path, sandbox)
    if fault == "refused":
        sandbox.twilio.faults.update(bad_recipients=["+12025550000"])
    confirm = after_confirmation(lambda: sandbox.twilio.faults.update(drop_after_accept=1)) \
        if fault == "drop-after-accept" else None
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=confirm)
    sms, mail = sms_to(sandbox), mail_to(sandbox)
    assert mail == {f"person{i}@example.com": 1 for i in (0, 1, 2, 4, 5)}
    assert outcome.verdict is not None and outcome.verdict.count("not_reached") == 0
    shared = [r for r in events(rt, "delivery.sent")
              if r.payload.get("detail", {}).get("same_message_as")]
    if fault == "refused":
        assert "+12025550000" not in sms
        refused = [r for r in events(rt, "delivery.failover", "team_sms")
                   if r.recipient == "+12025550000"]
        assert len(refused) == 2, "each person's SMS refused on its own"
        assert len(shared) == 1  # (the shared mailbox)
        return
    if fault == "drop-after-accept":
        doubt = [r.key for r in events(rt, "delivery.unknown", "team_sms")]
        assert sorted(k.split("/")[3] for k in doubt) == ["p00000", "p00001"], doubt
        resume(rt, outcome.incident_id)
        assert sms_to(sandbox) == sms, "settled from Twilio's record, never sent again"
    assert sms == {f"+1202555{i:04d}": 1 for i in (0, 2, 3, 4, 5)}
    final = resume(rt, outcome.incident_id)
    assert final.exit_code == 0 and not final.in_doubt
    assert final.verdict is not None and final.verdict.count("reached") == people


def _declare_killed_when(pb: Path, sandbox: Any, tmp_path: Path,
                         ready: Any) -> dict[str, str]:
    """`declare --yes --sandbox` of `pb` in a process of its own, SIGKILLed as soon as
    `ready()` (within a minute); the environment that finds its record again."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    sandbox.write_state()
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "incident_notify", "declare", str(pb), "--set", "site=LON-2",
         "--yes", "--sandbox"], cwd=ROOT, env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return env


def test_a_resume_right_after_a_kill_waits_for_what_the_provider_is_still_taking(
        tmp_path: Path, sandbox: Any) -> None:
    """SIGKILL while an SMS is on its way to a slow Twilio (it records a message 4 s
    after the request arrives), then `resume` at once. The lookup found nothing yet, so
    the SMS was sent again, and Twilio then took the first one too: two messages. A
    delivery attempted less than SETTLE_GRACE_S (5 s) ago and not found is looked up
    again once that time has passed."""
    pb = make_fanout_playbook(tmp_path / "pb", 3, concurrency=1, timeout_s=2)
    sandbox.twilio.faults.update(send_latency_ms=4000)
    sends = f"/2010-04-01/Accounts/{sandbox.twilio.account_sid}/Messages.json"
    # (Killed once the request has reached Twilio, which sleeps before it records it.)
    env = _declare_killed_when(pb, sandbox, tmp_path, lambda: bool(sandbox.twilio.hits[sends]))
    killed = time.monotonic()
    assert not sms_to(sandbox), "killed while the first SMS was on its way"
    sandbox.twilio.faults.update(send_latency_ms=0)  # (the one on its way still takes 4 s)
    [incident] = json_doc(run_cli("status", "--json", env=env))["data"]["incidents"]
    started = time.monotonic()
    resumed = run_cli("resume", incident["id"], "--yes", "--sandbox", "--json", env=env)
    # (An email the kill caught mid-send stays in doubt: SMTP keeps no record to ask.)
    doubt = {d["channel"] for d in json_doc(resumed)["data"]["in_doubt"]}
    assert resumed.returncode in (0, 5) and doubt <= {"team_email"}, resumed.stderr
    assert "may still reach the provider" in resumed.stderr
    assert time.monotonic() - started < 3 * 2 + 5
    time.sleep(max(0.0, killed + 4.5 - time.monotonic()))  # (Twilio has taken the first)
    assert sms_to(sandbox) == {f"+1202555{i:04d}": 1 for i in range(3)}


def test_a_resume_after_a_kill_does_not_send_a_shared_address_what_it_already_got(
        tmp_path: Path, sandbox: Any) -> None:
    """The first person of a shared phone was sent the SMS, then the process was killed
    before the second person's turn. `resume` records the second reached with the
    message the phone already has, and sends it nothing."""
    people = 6
    pb = make_fanout_playbook(tmp_path / "pb", people, concurrency=1, timeout_s=2)
    csv = tmp_path / "pb" / "people.csv"
    csv.write_text(csv.read_text().replace("+12025550005", "+12025550000"))
    sandbox.twilio.faults.update(latency_ms=300)
    audit = tmp_path / "audit.jsonl"

    def first_sms_sent() -> bool:
        text = audit.read_text() if audit.exists() else ""
        return any('"delivery.sent"' in line and "team_sms/p00000" in line
                   for line in text.splitlines())

    env = _declare_killed_when(pb, sandbox, tmp_path, first_sms_sent)
    assert sms_to(sandbox) == {"+12025550000": 1}, "killed after the first SMS"
    sandbox.twilio.faults.update(latency_ms=0)
    [incident] = json_doc(run_cli("status", "--json", env=env))["data"]["incidents"]
    resumed = run_cli("resume", incident["id"], "--yes", "--sandbox", "--json", env=env)
    # (An email the kill caught mid-send stays in doubt: SMTP keeps no record to ask.)
    doubt = {d["channel"] for d in json_doc(resumed)["data"]["in_doubt"]}
    assert resumed.returncode in (0, 5) and doubt <= {"team_email"}, resumed.stderr
    assert sms_to(sandbox) == {f"+1202555{i:04d}": 1 for i in range(5)}


def test_a_resume_right_after_a_kill_gives_a_provider_as_long_as_a_sender_waits(
        tmp_path: Path, sandbox: Any) -> None:
    """SIGKILL the moment the SMS reaches a Twilio that holds it 8 s before recording it
    (well within the channel's 10 s `timeout_s`: a live sender would have waited for it),
    then `resume` at once. Nothing in the record says Twilio was holding it, and resume
    trusted "not there" after 5 s: it sent the SMS again, and Twilio then recorded both.
    "Not there" is now trusted once the provider has had the channel's `timeout_s`."""
    pb = _falling_back(tmp_path / "pb", 1, "team_sms", "team_email")
    _time_out(pb, '"+15005550006"', 10)
    sandbox.twilio.faults.update(send_latency_ms=8_000)
    sends = f"/2010-04-01/Accounts/{sandbox.twilio.account_sid}/Messages.json"
    env = _declare_killed_when(pb, sandbox, tmp_path, lambda: bool(sandbox.twilio.hits[sends]))
    killed = time.monotonic()
    sandbox.twilio.faults.update(send_latency_ms=0)
    [incident] = json_doc(run_cli("status", "--json", env=env))["data"]["incidents"]
    resumed = run_cli("resume", incident["id"], "--yes", "--sandbox", "--json", env=env)
    time.sleep(max(0.0, killed + 8.5 - time.monotonic()))  # (the held request is recorded)
    assert sms_to(sandbox) == {"+12025550000": 1}, resumed.stderr
    assert resumed.returncode == 0 and time.monotonic() - killed < 10 + 8


def test_a_resume_after_a_kill_while_twilio_held_the_sms_waits_for_it(
        tmp_path: Path, sandbox: Any) -> None:
    """Twilio holds the send 7 s before it records the message; the process is killed 3 s
    into that wait, and `resume` runs at once. The record ended at the attempt, so resume
    trusted "not at Twilio" 5 s after it and sent the SMS again; Twilio then recorded the
    first one too. While a request is held, the dispatcher now records `delivery.held`;
    resume then waits for the channel's request deadline and finds the message."""
    pb = _falling_back(tmp_path / "pb", 1, "team_sms", "team_email")
    _time_out(pb, '"+15005550006"', 10)  # (no timeout before Twilio's 7 s)
    sandbox.twilio.faults.update(send_latency_ms=7_000)
    audit = tmp_path / "audit.jsonl"
    attempted: list[float] = []

    def held_for_3s() -> bool:
        if not attempted:
            if '"delivery.attempt"' in (audit.read_text() if audit.exists() else ""):
                attempted.append(time.monotonic())
            return False
        return time.monotonic() - attempted[0] >= 3

    started = time.monotonic()
    env = _declare_killed_when(pb, sandbox, tmp_path, held_for_3s)
    assert '"delivery.held"' in audit.read_text()
    assert sms_to(sandbox) == {}, "killed while Twilio held the SMS"
    sandbox.twilio.faults.update(send_latency_ms=0)
    [incident] = json_doc(run_cli("status", "--json", env=env))["data"]["incidents"]
    resumed = run_cli("resume", incident["id"], "--yes", "--sandbox", "--json", env=env)
    time.sleep(max(0.0, started + 10 - time.monotonic()))  # (the held request is recorded)
    assert sms_to(sandbox) == {"+12025550000": 1}, resumed.stderr
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "may still reach the provider; waiting" in resumed.stderr


# ------------------------------------------------------------------ accepted, then dropped
# skew: Twilio's clock an hour behind this machine's (a laptop whose clock drifted ahead):
# a message it created "before" the attempt, on this clock, is still the attempt's.
@pytest.mark.parametrize("skew", [0, -3600], ids=["same-clock", "laptop-an-hour-ahead"])
def test_sms_dropped_after_accept_is_unknown_never_resent_then_settled(
        tmp_path: Path, sandbox: Any, skew: float) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: sandbox.twilio.faults.update(drop_after_accept=1, clock_skew_s=skew)))
    sms = sms_to(sandbox)
    assert len(sms) == 3 and set(sms.values()) == {1}, "a lost answer must not be retried"
    unknown = events(rt, "delivery.unknown", "team_sms")
    assert len(unknown) == 1 and unknown[0].payload["code"] == "dropped"
    # The person was still reached by email: everyone was reached, one SMS is in doubt.
    assert outcome.in_doubt and outcome.in_doubt[0]["channel"] == "team_sms"
    assert outcome.exit_code == 5

    settled = resume(rt, outcome.incident_id)
    assert sms_to(sandbox) == sms, "settled against Twilio's records, not sent again"
    records = events(rt, "delivery.settled")
    assert [r.payload["outcome"] for r in records] == ["sent"]
    assert records[0].payload["provider_id"].startswith("SM")
    assert settled.exit_code == 0 and not settled.in_doubt


def test_once_a_provider_is_back_the_people_an_update_missed_are_reached_and_nobody_else(
        tmp_path: Path, sandbox: Any) -> None:
    """Twilio was down and two people's mail servers refused them: the update reached the
    others by email and not those two (exit 5). Nothing could reach them afterwards but a
    new update to everyone. `resume --retry-not-reached` sends the update again to the
    people it missed, on their channels, once Twilio is back; nobody reached is sent
    anything, and a second retry has nothing left to do."""
    people = 6
    pb = make_fanout_playbook(tmp_path / "pb", people)
    rt = runtime(tmp_path, sandbox)
    refused = ["person0@example.com", "person1@example.com"]
    sandbox.twilio.faults.update(outage=True)
    sandbox.smtp.faults.update(bad_recipients=refused)
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert outcome.exit_code == 5 and not sms_to(sandbox)
    assert sorted(r.who for r in outcome.verdict.not_reached) == ["p00000", "p00001"]
    mail = mail_to(sandbox)
    assert len(mail) == people - 2

    sandbox.twilio.faults.update(outage=False)
    plain = resume(rt, outcome.incident_id)  # (without asking: nothing is sent again)
    assert plain.exit_code == 5 and not sms_to(sandbox)
    retried = resume(rt, outcome.incident_id, retry_not_reached=True)
    assert retried.exit_code == 0, retried.verdict
    assert sms_to(sandbox) == {"+12025550000": 1, "+12025550001": 1}
    assert mail_to(sandbox) == mail, "nobody reached is sent anything again"
    requeued = events(rt, "delivery.requeued")
    assert sorted(r.recipient for r in requeued) == [
        "+12025550000", "+12025550001", *refused]  # (a team is told on every channel)
    again = resume(rt, outcome.incident_id, retry_not_reached=True)
    assert again.exit_code == 0 and sms_to(sandbox) == {"+12025550000": 1,
                                                          "+12025550001": 1}
    assert len(events(rt, "delivery.requeued")) == len(requeued)
    log = str(rt.settings.audit_path())
    assert run_cli("audit", "verify", "--audit-log", log).returncode == 0
    timeline = run_cli("timeline", outcome.incident_id, "--audit-log", log)
    assert "sent again to people not reached: 4 deliveries" in timeline.stdout, timeline.stdout


def test_a_customer_whose_sms_is_in_doubt_hears_by_email_now_and_never_twice_by_sms(
        tmp_path: Path, sandbox: Any) -> None:
    """Twilio takes every message and the line drops before each answer (a proxy in the
    way failing). Each SMS is in doubt: never re-sent blindly. The customers those SMS
    were for used to wait, told nothing more, until someone ran `resume`; the ones queued
    behind them heard by email once the channel was taken down. Now a person whose
    delivery is in doubt hears on their next channel at once, as the public's fallback
    audience does for a tweet in doubt: maybe twice on two channels, never twice on one.
    `resume` then settles each SMS from Twilio's records and sends nothing more."""
    from incident_notify.contacts import load_contacts

    pb = PLAYBOOKS / "dc-power-failure.yaml"
    rt = runtime(tmp_path, sandbox)
    values = {"site": "LON-2", "services": "compute", "eta": "14:00 UTC",
              "status_url": "https://status.acme.example/i/1"}
    outcome = declare(rt, pb, values, confirm=after_confirmation(
        lambda: sandbox.twilio.faults.update(drop_after_accept=1000)))
    people = load_contacts([PLAYBOOKS / "contacts" / "customers.csv"]).contacts
    unknown = [r for r in events(rt, "delivery.unknown", "customer_sms")]
    assert unknown, "the fault must leave customer SMS in doubt"
    mail = mail_to(sandbox)
    for record in unknown:
        person = people[record.key.split("/")[3]]
        assert mail[person.email] == 1, f"{person.id}: in doubt by SMS, not told by email"
    assert set(sms_to(sandbox).values()) == {1}, "an SMS in doubt must never be re-sent"
    assert outcome.verdict is not None and outcome.verdict.count("in_doubt") == 0
    assert outcome.in_doubt and outcome.exit_code == 5  # (the SMS still to settle)
    # The team, told on every channel anyway, is not covered where it already is: no
    # failover of nothing for a delivery in doubt. (One queued behind the opened circuit
    # does move, to where its person is told already: that is the channel-down path.)
    assert outcome.result is not None and outcome.result.failovers
    covers = [f for f in outcome.result.failovers if f["reason"].startswith("outcome unknown")]
    assert covers and all(f["deliveries"] for f in covers), outcome.result.failovers

    sandbox.twilio.faults.update(drop_after_accept=0)
    sms, emails = sms_to(sandbox), mail_to(sandbox)
    settled = resume(rt, outcome.incident_id)
    assert sms_to(sandbox) == sms and mail_to(sandbox) == emails, "settled, not re-sent"
    assert {r.payload["outcome"] for r in events(rt, "delivery.settled")} == {"sent"}
    assert settled.exit_code == 0 and not settled.in_doubt


def _serve_control(sandbox: Any, request: Any) -> None:
    """Serve `sandbox`'s control API and name it in the state file, as `incident-notify
    sandbox` does, so that `sandbox fault` and its kin reach it."""
    from incident_notify.sandbox.control import ControlServer

    control = ControlServer(sandbox).start()
    request.addfinalizer(control.stop)
    sandbox.write_state(control_url=control.url)


def test_a_commander_rehearsing_sets_every_fault_from_the_command_line(
        tmp_path: Path, sandbox: Any, isolated_home: Path, request: Any) -> None:
    # A drill of "Twilio took the message and the line went dead", with no test code: the
    # fault is set on the running sandbox by `sandbox fault`, then the real twilio client
    # meets it.
    _serve_control(sandbox, request)
    doc = json_doc(run_cli("sandbox", "fault", "twilio", "--drop-after-accept", "1",
                           "--outage-after", "7", "--send-latency-ms", "1", "--rate-limit",
                           "50", "--rate-window-s", "60", "--json"))
    faults = doc["data"]["faults"]
    assert (faults["drop_after_accept"], faults["outage_after"], faults["send_latency_ms"],
            faults["rate_limit"], faults["rate_window_s"]) == (1, 7, 1.0, 50, 60.0)
    said = run_cli("sandbox", "fault", "smtp", "--dribble-ms", "0.5")
    assert said.returncode == 0 and said.stdout.strip() == "smtp: dribble ms 0.5"
    assert sandbox.smtp.faults.dribble_ms == 0.5
    run_cli("sandbox", "fault", "smtp", "--dribble-ms", "0")
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    proc = run_cli("declare", str(pb), "--set", "site=LON-2", "--yes", "--sandbox", "--json")
    assert proc.returncode == 5, proc.stderr
    assert [d["channel"] for d in json_doc(proc)["data"]["in_doubt"]] == ["team_sms"]
    assert len(sms_to(sandbox)) == 3 and set(sms_to(sandbox).values()) == {1}
    # What the emulator cannot do, or a value no provider gives, is refused plainly.
    for args in (["twilio", "--dribble-ms", "-1"], ["smtp", "--error-after-accept", "1"],
                 ["twitter", "--error-status", "404"], ["smtp", "--idless-after-accept", "1"],
                 ["twilio", "--locked"], ["twitter", "--messages-per-connection", "1"],
                 ["smtp", "--daily-limit", "5"]):
        refused = run_cli("sandbox", "fault", *args)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, args
    assert sandbox.smtp.faults.error_after_accept == 0
    said = run_cli("sandbox", "fault", "twitter", "--error-after-accept", "2",
                   "--error-status", "504")
    assert said.stdout.strip() == "twitter: error after accept 2, error status 504"
    said = run_cli("sandbox", "fault", "twitter", "--locked")
    assert said.stdout.strip().startswith("twitter: locked on") and sandbox.twitter.faults.locked
    run_cli("sandbox", "fault", "twitter", "--no-locked", "--no-dm-permission")
    assert sandbox.twitter.faults.no_dm_permission and not sandbox.twitter.faults.locked
    run_cli("sandbox", "fault", "twitter", "--dm-permission")
    said = run_cli("sandbox", "fault", "smtp", "--messages-per-connection", "30")
    assert sandbox.smtp.faults.messages_per_connection == 30 and said.returncode == 0
    run_cli("sandbox", "fault", "smtp", "--messages-per-connection", "0")
    run_cli("sandbox", "fault", "twilio", "--sender-queue-full")
    assert sandbox.twilio.faults.sender_queue_full
    run_cli("sandbox", "fault", "twilio", "--no-sender-queue-full")
    run_cli("sandbox", "fault", "smtp", "--busy-logins", "2")
    assert sandbox.smtp.faults.busy_logins == 2
    run_cli("sandbox", "fault", "smtp", "--busy-logins", "0", "--deferred-recipient",
            "a@example.org")
    assert sandbox.smtp.faults.deferred_recipients == ["a@example.org"]
    run_cli("sandbox", "fault", "smtp", "--full-mailbox", "b@example.org")
    assert sandbox.smtp.faults.full_mailboxes == ["b@example.org"]
    run_cli("sandbox", "fault", "smtp", "--throttled-connections", "3")
    assert sandbox.smtp.faults.throttled_connections == 3
    run_cli("sandbox", "fault", "smtp", "--throttled-connections", "0")
    run_cli("sandbox", "fault", "twitter", "--daily-limit", "50")
    assert sandbox.twitter.faults.daily_limit == 50
    run_cli("sandbox", "fault", "twitter", "--daily-limit", "-1")
    assert sandbox.twitter.faults.daily_limit is None
    said = run_cli("sandbox", "fault", "twitter", "--daily-limit", "0")
    assert sandbox.twitter.faults.daily_limit == 0 and "daily limit 0" in said.stdout
    said = run_cli("sandbox", "fault", "twilio", "--account-status", "")
    assert sandbox.twilio.faults.account_status == "" and "account status left out" in said.stdout
    run_cli("sandbox", "fault", "twilio", "--account-status", "active")
    said = run_cli("sandbox", "fault", "smtp", "--unknown-command", "EHLO")
    assert sandbox.smtp.faults.unknown_commands == ["EHLO"] and said.returncode == 0
    assert run_cli("sandbox", "fault", "twilio", "--unknown-command", "NOOP").returncode == 2
    assert not sandbox.twitter.faults.locked
    said = run_cli("sandbox", "fault", "twilio", "--idless-after-accept", "3")
    assert sandbox.twilio.faults.idless_after_accept == 3 and said.returncode == 0
    run_cli("sandbox", "fault", "smtp", "--bad-sender", "ops@acme.example", "--no-extension",
            "SMTPUTF8", "--no-extension", "AUTH")
    run_cli("sandbox", "fault", "twilio", "--failed-recipient", "+12025550002")
    said = run_cli("sandbox", "fault", "twitter", "--rate-limited-path", "/2/users/me",
                   "--rate-limited-path", "/2/tweets/search")
    assert "rate limited paths /2/users/me /2/tweets/search," in said.stdout
    assert sandbox.twitter.faults.rate_limited_paths == ["/2/users/me", "/2/tweets/search"]
    assert (sandbox.smtp.faults.bad_senders, sandbox.smtp.faults.no_extensions,
            sandbox.twilio.faults.failed_recipients) == (
        ["ops@acme.example"], ["SMTPUTF8", "AUTH"], ["+12025550002"])


@pytest.mark.parametrize(("service", "answer"), [
    ("twilio", "garbled"), ("twitter", "garbled"), ("twilio", "idless"),
    ("twitter", "idless"), ("twilio", 500), ("twilio", 504), ("twitter", 500),
    ("twitter", 502)])
def test_answer_garbled_or_a_server_error_after_accept_is_unknown_never_resent_then_settled(
        tmp_path: Path, sandbox: Any, service: str, answer: str | int) -> None:
    """The provider takes the message, then something in the way answers 200 with an HTML
    page, or the answer comes without the message's id (it was recorded sent with the id
    "None", and a thread's next part replied to tweet "None"), or the provider answers
    with a server error (Twilio documents that a 500 to a send may hide a message it
    sent; a gateway's 502 or 504 may too). The delivery is
    unknown, never retried blindly; resume finds it in the provider's records and records
    it sent. (A 503 says the request was not taken: it is retried, as in the retry
    tests.)"""
    pb = make_fanout_playbook(tmp_path / "pb", 3, twitter=service == "twitter")
    rt = runtime(tmp_path, sandbox)
    emulator = getattr(sandbox, service)
    fault = {"garble_after_accept": 1} if answer == "garbled" else \
        {"idless_after_accept": 1} if answer == "idless" else \
        {"error_after_accept": 1, "error_status": answer}
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: emulator.faults.update(**fault)))
    channel = "team_sms" if service == "twilio" else "status_twitter"
    sent_first = len(emulator.received.all())
    unknown = events(rt, "delivery.unknown")
    assert [u.channel for u in unknown] == [channel] and outcome.exit_code == 5
    assert outcome.in_doubt and outcome.in_doubt[0]["channel"] == unknown[0].channel

    settled = resume(rt, outcome.incident_id)
    assert len(emulator.received.all()) == sent_first, "settled, not sent again"
    assert [r.payload["outcome"] for r in events(rt, "delivery.settled")] == ["sent"]
    assert settled.exit_code == 0 and not settled.in_doubt


@pytest.mark.parametrize("code", [21219, 21211])
def test_a_customer_whose_sms_twilio_refuses_with_any_code_hears_by_email(
        tmp_path: Path, sandbox: Any, code: int) -> None:
    """Twilio refuses one customer's SMS with a code of its own (21219: a trial account may
    only text numbers it verified; the tool knows a few codes, Twilio has hundreds). Only
    the codes the tool knew as the recipient's moved the customer to their next channel;
    any other refusal of that one message left them failed, told nothing, though they
    have email. A refusal of one delivery now always tries the person's next channel."""
    pb = PLAYBOOKS / "dc-power-failure.yaml"
    rt = runtime(tmp_path, sandbox)
    sandbox.twilio.faults.update(bad_recipients=["+14155550010"], bad_recipient_code=code)
    outcome = declare(rt, pb, {"site": "LON-2", "services": "compute", "eta": "14:00 UTC",
                               "status_url": "https://status.acme.example/i/1"})
    [moved] = [r for r in events(rt, "delivery.failover", "customer_sms")
               if r.key.split("/")[3] == "cust-001"]
    assert moved.payload["code"] == str(code) and moved.payload["permanent"]
    assert mail_to(sandbox)["carol.mendes@customer1.example.org"] == 1
    assert outcome.exit_code == 0 and outcome.verdict is not None
    assert outcome.verdict.count("not_reached") == 0


def test_a_tweet_x_refuses_as_a_duplicate_of_an_older_incident_reaches_the_subscribers(
        tmp_path: Path, sandbox: Any) -> None:
    """A new incident's first tweet reads word for word like last week's (same stage, same
    site), and X refuses it as a duplicate. The tweet was recorded failed and the public
    told nothing: only a channel refused as a whole (credentials, a locked account) moved
    the public audience to its fallback. A refused public post now does the same."""
    pb = make_fanout_playbook(tmp_path / "pb", 2, twitter=True, subscribers=3)
    rt = runtime(tmp_path, sandbox)
    first = declare(rt, pb, {"site": "LON-2"})
    assert first.exit_code == 0 and len(tweets(sandbox)) == 1
    before = sms_to(sandbox)
    second = declare(rt, pb, {"site": "LON-2"})
    assert len(tweets(sandbox)) == 1, "X refused the second, identical tweet"
    [moved] = [r for r in events(rt, "delivery.failover", "status_twitter")
               if r.incident == second.incident_id]
    assert moved.payload["code"] == "duplicate" and moved.payload["permanent"]
    told = sms_to(sandbox) - before
    assert all(told[number] == 1 for number in SUBSCRIBERS), told
    assert second.exit_code == 0


def test_an_sms_twilio_takes_as_already_failed_is_not_counted_as_reached(
        tmp_path: Path, sandbox: Any) -> None:
    """Twilio answers 201, but with the message's status already "failed" (a carrier
    filter, or a stricter fake): the SMS did not reach its person. It is not counted sent,
    not sent again on SMS, and moves on with Twilio's error code to the person's next
    channel."""
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    rt = runtime(tmp_path, sandbox)
    number = "+12025550001"
    sandbox.twilio.faults.update(failed_recipients=[number])
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert [m["to"] for m in sandbox.twilio.messages].count(number) == 1
    # (Failed over: the person's email, already planned, carries the update.)
    [failed] = events(rt, "delivery.failover", "team_sms")
    assert failed.payload["code"] == "30003" and "failed" in failed.payload["error"]
    assert failed.payload["permanent"] and failed.payload["to"] == []
    assert len(events(rt, "delivery.sent", "team_sms")) == 2
    assert outcome.verdict is not None and outcome.verdict.total("sent") == 5
    assert outcome.exit_code == 0


def test_the_summary_of_an_sms_in_doubt_says_who_was_reached_and_how_to_settle_it(
        tmp_path: Path, sandbox: Any, isolated_home: Path) -> None:
    """Everyone was reached (each by email too), one SMS is in doubt: exit 5, and the
    summary says so, not "not everyone was reached"; it points at plain `resume`, which
    asks Twilio, and resume then settles it."""
    sandbox.write_state()
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    sandbox.twilio.faults.update(error_after_accept=1)
    proc = run_cli("declare", str(pb), "--set", "site=LON-2", "--yes", "--sandbox")
    assert proc.returncode == 5, proc.stderr
    incident = json_doc(run_cli("status", "--sandbox", "--json"))["data"]["incidents"][0]["id"]
    assert ("Everyone was reached, with deliveries in doubt: 3 recipient(s), 1 delivery in "
            "doubt") in proc.stdout
    assert f"incident-notify resume {incident} asks the providers" in proc.stdout
    assert "Not everyone" not in proc.stdout
    resumed = run_cli("resume", incident, "--yes", "--sandbox")
    assert resumed.returncode == 0 and "Everyone was reached" in resumed.stdout
    assert len(sms_to(sandbox)) == 3 and set(sms_to(sandbox).values()) == {1}


@pytest.mark.parametrize("fault", [{"drop_after_accept": 1},
                                   {"error_after_accept": 1, "error_status": 500},
                                   {"drop_after_accept": 1, "clock_skew_s": -3600}],
                         ids=["dropped", "500", "dropped-laptop-an-hour-ahead"])
def test_a_dm_dropped_after_accept_is_unknown_then_settled_from_the_conversation(
        tmp_path: Path, sandbox: Any, fault: dict[str, int]) -> None:
    """Twitter takes a DM, then the line drops or a 500 comes back: unknown, never sent
    again; resume finds it in the conversation with that person and records it sent."""
    pb = tmp_path / "pb" / "dms.yaml"
    pb.parent.mkdir()
    (pb.parent / "people.csv").write_text("id,name,twitter,groups\n"
                                          "a,Alice,@oncall_alice,team\nb,Bob,@oncall_bob,team\n")
    pb.write_text("name: dms\ntitle: DM test\nseverity: sev2\ncontacts: [people.csv]\n"
                  "variables:\n  site: {example: LON-2, max_length: 12}\n"
                  "channels:\n  team_dm:\n    type: twitter_dm\n    sender: '@acme_status'\n"
                  "audiences:\n  team:\n    kind: internal\n    select: {groups: [team]}\n"
                  "    channels: [team_dm]\n"
                  "stages:\n  investigating:\n    messages:\n"
                  "      twitter_dm: 'Power problem at {{ site }}.'\n")
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: sandbox.twitter.faults.update(**fault)))
    dms = [r for r in sandbox.twitter.received.all() if r["kind"] == "dm"]
    assert len(dms) == 2 and outcome.exit_code == 5
    assert [u.channel for u in events(rt, "delivery.unknown")] == ["team_dm"]
    settled = resume(rt, outcome.incident_id)
    assert settled.exit_code == 0 and not settled.in_doubt
    assert len([r for r in sandbox.twitter.received.all() if r["kind"] == "dm"]) == 2
    assert [r.payload["outcome"] for r in events(rt, "delivery.settled")] == ["sent"]


@pytest.mark.parametrize("skew", [0, -3600], ids=["same-clock", "laptop-an-hour-ahead"])
def test_tweet_dropped_after_accept_is_settled_and_the_thread_continues(
        tmp_path: Path, sandbox: Any, skew: float) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=1)
    rt = runtime(tmp_path, sandbox)
    first = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: sandbox.twitter.faults.update(drop_after_accept=1, clock_skew_s=skew)))
    assert len(tweets(sandbox)) == 1
    assert events(rt, "delivery.unknown", "status_twitter")
    assert first.exit_code == 5

    settled = resume(rt, first.incident_id)
    assert settled.exit_code == 0
    assert len(tweets(sandbox)) == 1, "no duplicate tweet (and no 403 duplicate)"
    [record] = events(rt, "delivery.settled")
    assert record.payload["outcome"] == "sent"
    assert record.payload["provider_id"] == tweets(sandbox)[0]["id"]

    second = update(rt, first.incident_id, stage="identified", sets={})
    assert second.exit_code == 0
    assert tweets(sandbox)[1]["in_reply_to_tweet_id"] == tweets(sandbox)[0]["id"]


def test_a_retried_tweet_refused_as_a_duplicate_of_itself_is_sent(tmp_path: Path,
                                                                  sandbox: Any) -> None:
    """Twitter posts the tweet but answers 503 (which says it was not taken): the retry is
    refused as duplicate content. The tweet is on the timeline with the same text and reply
    target: it is recorded sent with its id, the thread goes on, and nobody is told twice."""
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=2)
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: sandbox.twitter.faults.update(error_after_accept=1, error_status=503)))
    [tweet] = tweets(sandbox)
    [sent] = events(rt, "delivery.sent", "status_twitter")
    assert sent.payload["provider_id"] == tweet["id"] and sent.payload["detail"]["settled"]
    assert not set(sms_to(sandbox)) & SUBSCRIBERS, "the public was not told twice"
    assert outcome.exit_code == 0
    second = update(rt, outcome.incident_id, stage="identified", sets={})
    assert second.exit_code == 0 and tweets(sandbox)[1]["in_reply_to_tweet_id"] == tweet["id"]


def test_an_update_whose_earlier_tweet_vanished_starts_a_new_thread(
        tmp_path: Path, sandbox: Any, isolated_home: Path, request: Any) -> None:
    """The incident's last tweet was deleted (by a moderator, a colleague, or Twitter):
    X refuses a reply to it (403, "deleted or not visible"). The account is fine and the
    public must still hear: the update is posted as a new tweet, the next one replies to
    it, and the SMS fallback is not used."""
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=2)
    rt = runtime(tmp_path, sandbox)
    first = declare(rt, pb, {"site": "LON-2"})
    [gone] = tweets(sandbox)
    # (As a commander rehearsing it would: from the command line, on the running sandbox.)
    _serve_control(sandbox, request)
    assert run_cli("sandbox", "delete-tweet", "1234").returncode == 9
    said = run_cli("sandbox", "delete-tweet", gone["id"])
    assert said.returncode == 0 and said.stdout.strip() == f"tweet {gone['id']} deleted."
    second = update(rt, first.incident_id, stage="identified", sets={})
    assert second.exit_code == 0
    posted = tweets(sandbox)[1]
    assert posted["in_reply_to_tweet_id"] is None and "Identified" in posted["text"]
    [sent] = [e for e in events(rt, "delivery.sent", "status_twitter")
              if e.payload["provider_id"] == posted["id"]]
    assert sent.payload["detail"] == {"in_reply_to": None, "reply_target_gone": gone["id"]}
    assert not set(sms_to(sandbox)) & SUBSCRIBERS, "the public heard on Twitter"
    third = update(rt, first.incident_id, stage="monitoring", sets={})
    assert third.exit_code == 0 and tweets(sandbox)[2]["in_reply_to_tweet_id"] == posted["id"]


def test_a_new_thread_whose_answer_was_lost_is_settled_from_the_timeline(
        tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True)
    rt = runtime(tmp_path, sandbox)
    first = declare(rt, pb, {"site": "LON-2"})
    sandbox.twitter.delete_tweet(tweets(sandbox)[0]["id"])
    sandbox.twitter.faults.update(drop_after_accept=1)  # (the reply is refused, not taken)
    second = update(rt, first.incident_id, stage="identified", sets={})
    assert second.exit_code == 5 and len(tweets(sandbox)) == 2
    settled = resume(rt, first.incident_id)
    assert settled.exit_code == 0 and len(tweets(sandbox)) == 2, "not posted again"
    [record] = events(rt, "delivery.settled")
    assert record.payload["provider_id"] == tweets(sandbox)[1]["id"]


@pytest.mark.parametrize("fault", ["drop_after_accept", "garble_after_accept"])
def test_email_dropped_or_garbled_after_data_is_unknown_listed_and_resent_only_when_asked(
        tmp_path: Path, sandbox: Any, fault: str) -> None:
    """The server takes the message, then the line drops, or its reply to the end of the
    data has no reply code ("Queued as ..."): either way nobody can tell whether it took
    responsibility. Unknown, never retried blindly."""
    pb = make_fanout_playbook(tmp_path / "pb", 2)
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: sandbox.smtp.faults.update(**{fault: 1})))
    mail = mail_to(sandbox)
    assert len(mail) == 2 and set(mail.values()) == {1}
    assert len(outcome.in_doubt) == 1
    assert [e.payload["code"] for e in events(rt, "delivery.unknown")] == [
        "dropped" if fault == "drop_after_accept" else "unreadable"]

    listed = resume(rt, outcome.incident_id)
    assert listed.exit_code == 5 and len(listed.in_doubt) == 1
    assert mail_to(sandbox) == mail, "SMTP cannot be asked: not re-sent unless asked"
    assert listed.preflight is not None
    assert [s["outcome"] for s in listed.preflight.settled] == ["unknowable"]

    resent = resume(rt, outcome.incident_id, include_unknown=True)
    assert resent.exit_code == 0
    twice = [r for r in sandbox.smtp.received.all()
             if r["rcpt_tos"] == [outcome.in_doubt[0]["recipient"]]]
    assert len(twice) == 2 and twice[0]["message_id"] == twice[1]["message_id"], \
        "a resend keeps the Message-ID, so mail systems drop the duplicate"


def _falling_back(directory: Path, people: int, channel: str, fallback: str) -> Path:
    """The fan-out playbook whose team hears on `channel` alone, which falls back to
    `fallback` when it is down (one request at a time)."""
    pb = make_fanout_playbook(directory, people, concurrency=1)
    sender = {"team_sms": 'sender: "+15005550006"\n',
              "team_email": 'sender: "Ops <ops@acme.example>"\n'}[channel]
    pb.write_text(pb.read_text().replace(
        "    channels: [team_sms, team_email]\n", f"    channels: [{channel}]\n").replace(
        sender, f"{sender}    fallback: [{fallback}]\n"))
    return pb


@pytest.mark.parametrize("audience", ["internal", "customers"])
def test_a_person_whose_number_is_refused_hears_on_the_channels_fallback(
        tmp_path: Path, sandbox: Any, audience: str) -> None:
    """The team hears by SMS alone, and the SMS channel falls back to email. Twilio refuses
    one engineer's number (21211: not a valid phone number; a landline, a number since
    ported). The refusal tried only the next channel of the audience, which has none: that
    engineer was failed, told nothing, though the playbook says SMS falls back to email
    and their email is on file. The channel's fallback is now tried after the audience's
    own channels, as it is when the whole channel is down."""
    pb = _falling_back(tmp_path / "pb", 4, "team_sms", "team_email")
    if audience == "customers":
        pb.write_text(pb.read_text().replace("kind: internal", "kind: customers"))
    rt = runtime(tmp_path, sandbox)
    sandbox.twilio.faults.update(bad_recipients=["+12025550001"])
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert set(sms_to(sandbox)) == {"+12025550000", "+12025550002", "+12025550003"}
    assert mail_to(sandbox) == {"person1@example.com": 1}
    [moved] = events(rt, "delivery.failover", "team_sms")
    assert moved.recipient == "+12025550001" and moved.payload["permanent"]
    assert moved.payload["to_channels"] == ["team_email"]
    assert outcome.exit_code == 0 and outcome.verdict is not None
    assert outcome.verdict.count("reached") == 4


def test_a_person_refused_on_the_fallback_of_a_channel_down_is_recorded_failed(
        tmp_path: Path, sandbox: Any) -> None:
    """SMS and email fall back to each other. Twilio is down, so the team's SMS fail over
    to email, and one engineer's mailbox refuses it. The refusal looked for another
    channel, found the SMS key already there and recorded a failover "to" nothing, which
    reads as "already told by SMS" though that SMS had failed over itself. The verdict
    was right (not reached, exit 5); the record now says it too: the email failed."""
    pb = _falling_back(tmp_path / "pb", 3, "team_sms", "team_email")
    pb.write_text(pb.read_text().replace(
        'sender: "Ops <ops@acme.example>"\n',
        'sender: "Ops <ops@acme.example>"\n    fallback: [team_sms]\n'))
    rt = runtime(tmp_path, sandbox)
    sandbox.twilio.faults.update(outage=True)
    sandbox.smtp.faults.update(bad_recipients=["person1@example.com"])
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert mail_to(sandbox) == {"person0@example.com": 1, "person2@example.com": 1}
    [failed] = events(rt, "delivery.failed", "team_email")
    assert failed.recipient == "person1@example.com" and failed.payload["permanent"]
    assert not [r for r in events(rt, "delivery.failover", "team_email")]
    assert outcome.exit_code == 5 and outcome.verdict is not None
    assert outcome.verdict.count("not_reached") == 1


@pytest.mark.parametrize("outage", [True, False], ids=["down", "down-mid-run"])
def test_people_sharing_a_mailbox_whose_sms_fail_over_get_one_email(
        tmp_path: Path, sandbox: Any, outage: bool) -> None:
    """Two people hear by SMS, each on their own phone, and share a mailbox they hear on
    when SMS fails. With Twilio down (from the start, or once it refuses the From number),
    each failover planned its own email to that mailbox, and it got the same email twice:
    the dispatcher only knew of the addresses shared when the update was planned. Both
    are reached by one."""
    pb = _falling_back(tmp_path / "pb", 4, "team_sms", "team_email")
    people = pb.parent / "people.csv"
    people.write_text(people.read_text().replace("person1@example.com", "person0@example.com"))
    rt = runtime(tmp_path, sandbox)
    if outage:
        sandbox.twilio.faults.update(outage=True)
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=None if outage else
                      after_confirmation(lambda: sandbox.twilio.faults.update(
                          bad_senders=["+15005550006"])))
    assert mail_to(sandbox) == {"person0@example.com": 1, "person2@example.com": 1,
                                "person3@example.com": 1}
    assert outcome.exit_code == 0
    assert outcome.verdict is not None and outcome.verdict.count("reached") == 4
    [shared] = [r for r in events(rt, "delivery.sent", "team_email")
                if r.payload.get("detail", {}).get("same_message_as")]
    assert shared.recipient == "person0@example.com"
    final = resume(rt, outcome.incident_id)
    assert final.exit_code == 0 and len(sandbox.smtp.received.all()) == 3


@pytest.mark.parametrize(("fault", "reason"), [
    ({"bad_senders": ["ops@acme.example"]}, "553"),
    ({"no_extensions": ["AUTH"]}, "does not offer")], ids=["sender-refused", "no-auth"])
def test_a_relay_that_refuses_the_sender_takes_email_down_and_everyone_hears_by_sms(
        tmp_path: Path, sandbox: Any, fault: dict[str, Any], reason: str) -> None:
    """The relay answers MAIL FROM with 553 (the login may not send as that address), or
    offers no AUTH for the login: no email can go to anyone. That is the channel down, not
    each person's problem: the deliveries fail over to SMS after one refusal, none is
    failed, nothing is retried."""
    pb = _falling_back(tmp_path / "pb", 4, "team_email", "team_sms")
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: sandbox.smtp.faults.update(**fault)))
    assert mail_to(sandbox) == {} and len(sms_to(sandbox)) == 4
    [opened] = events(rt, "channel.circuit_open", "team_email")
    assert reason in opened.payload["reason"]
    assert len(events(rt, "delivery.attempt", "team_email")) == 0  # (refused before DATA)
    assert not events(rt, "delivery.failed") and not events(rt, "delivery.retry")
    assert outcome.exit_code == 0


@pytest.mark.parametrize("service", ["smtp", "twilio"])
def test_a_customer_whose_message_is_refused_after_sending_hears_on_their_next_channel(
        tmp_path: Path, sandbox: Any, service: str) -> None:
    """A mailbox's filter refuses the email at the end of the data (554), or Twilio takes
    the SMS as already failed: that customer did not hear, and their next channel is
    tried; the others are untouched."""
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    first, then = ("email", "sms") if service == "smtp" else ("sms", "email")
    pb.write_text(pb.read_text().replace("kind: internal", "kind: customers").replace(
        "    channels: [team_sms, team_email]\n", f"    channels: [team_{first}, team_{then}]\n"))
    people = pb.parent / "people.csv"
    people.write_text(people.read_text().replace(",sms;email,team,", f",{first};{then},team,"))
    rt = runtime(tmp_path, sandbox)
    refused = "person1@example.com" if service == "smtp" else "+12025550001"
    getattr(sandbox, service).faults.update(failed_recipients=[refused])
    outcome = declare(rt, pb, {"site": "LON-2"})
    sms = {m["to"] for m in sandbox.twilio.messages if m["status"] != "failed"}
    heard_first = set(mail_to(sandbox)) if service == "smtp" else sms
    heard_then = sms if service == "smtp" else set(mail_to(sandbox))
    assert refused not in heard_first and len(heard_first) == 2
    assert heard_then == {"+12025550001" if service == "smtp" else "person1@example.com"}
    assert outcome.exit_code == 0


def test_twilio_refusing_the_from_number_takes_sms_down_and_everyone_hears_by_email(
        tmp_path: Path, sandbox: Any) -> None:
    """21606: the From number is not one of the account's. No SMS can go to anyone: the
    channel is down and its deliveries fail over to email after one refusal."""
    pb = _falling_back(tmp_path / "pb", 4, "team_sms", "team_email")
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: sandbox.twilio.faults.update(bad_senders=["+15005550006"])))
    assert sms_to(sandbox) == {} and len(mail_to(sandbox)) == 4
    [opened] = events(rt, "channel.circuit_open", "team_sms")
    assert "21606" in opened.payload["reason"]
    assert len(events(rt, "delivery.attempt", "team_sms")) == 1
    assert not events(rt, "delivery.failed") and outcome.exit_code == 0


def test_a_relay_without_smtputf8_refuses_only_the_unicode_address(
        tmp_path: Path, sandbox: Any) -> None:
    pb = _falling_back(tmp_path / "pb", 3, "team_email", "team_sms")
    people = pb.parent / "people.csv"
    people.write_text(people.read_text().replace("person1@example.com", "pérson1@example.com"))
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: sandbox.smtp.faults.update(no_extensions=["SMTPUTF8"])))
    # The address is the problem, not the relay: the others get their email, the channel
    # stays up, and that person (whose audience has no other channel) hears on the email
    # channel's fallback, SMS.
    assert set(mail_to(sandbox)) == {"person0@example.com", "person2@example.com"}
    assert sms_to(sandbox) == {"+12025550001": 1} and not events(rt, "channel.circuit_open")
    [moved] = events(rt, "delivery.failover", "team_email")
    assert moved.payload["code"] == "smtputf8" and moved.payload["permanent"]
    assert outcome.exit_code == 0


def _declare_with_hanging_sends(tmp_path: Path, sandbox: Any, pb: Path, sender: str,
                                service: str, latency_ms: int) -> tuple[Any, Any, float]:
    """Declare with the channel of `sender` timing out after 2 s and `service`'s sends
    hanging for `latency_ms` (its health check still answers at once): the runtime, the
    outcome and the seconds it took."""
    _time_out(pb, sender, 2)
    getattr(sandbox, service).faults.update(send_latency_ms=latency_ms)
    rt = runtime(tmp_path, sandbox)
    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"})
    return rt, outcome, time.monotonic() - started


def test_email_server_that_hangs_after_accepting_is_unknown_in_bounded_time_never_resent(
        tmp_path: Path, sandbox: Any) -> None:
    """The SMTP server takes each message, then hangs before saying so (after a healthy
    check). Each email times out after the channel's 2 s: recorded unknown, listed in
    doubt, the run bounded; the SMS still go out; resume does not send the emails again
    (SMTP keeps no record to ask), and they did arrive exactly once."""
    people = 4
    rt, outcome, took = _declare_with_hanging_sends(
        tmp_path, sandbox, make_fanout_playbook(tmp_path / "pb", people),
        '"Ops <ops@acme.example>"', "smtp", 4_000)
    assert took < 12, "each email waits one timeout, never retried"
    assert outcome.preflight is not None and outcome.preflight.health["team_email"].ok
    assert len(events(rt, "delivery.unknown", "team_email")) == people
    assert events(rt, "delivery.sent", "team_email") == []
    assert set(sms_to(sandbox).values()) == {1} and len(sms_to(sandbox)) == people
    assert outcome.exit_code == 5 and len(outcome.in_doubt) == people

    time.sleep(3)  # the server finally answers the messages it was holding
    sandbox.smtp.faults.update(send_latency_ms=0)
    listed = resume(rt, outcome.incident_id)
    assert listed.exit_code == 5 and len(listed.in_doubt) == people
    mail = mail_to(sandbox)
    assert len(mail) == people and set(mail.values()) == {1}, "none sent twice"


def test_a_resume_at_once_after_sms_timed_out_waits_for_the_twilio_that_held_them(
        tmp_path: Path, sandbox: Any) -> None:
    """Twilio holds each send 7 s before it records the message (a provider that hangs,
    then takes it). The SMS channel gives up after its 3 s timeout: the SMS is in doubt and
    the person hears by email. A resume run at once looked the SMS up 5 s after its
    attempt, did not find it, and sent it again; Twilio then recorded the first one too:
    two SMS. The record shows that Twilio held the request 3 s without an answer, so
    "not found" is now trusted only once the channel's request deadline (9 s) has passed
    since the attempt: the lookup finds the message, and nothing is sent again."""
    pb = _falling_back(tmp_path / "pb", 1, "team_sms", "team_email")
    _time_out(pb, '"+15005550006"', 3)
    sandbox.twilio.faults.update(send_latency_ms=7_000)
    rt = runtime(tmp_path, sandbox)
    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert outcome.exit_code == 5 and mail_to(sandbox) == {"person0@example.com": 1}
    sandbox.twilio.faults.update(send_latency_ms=0)
    final = resume(rt, outcome.incident_id)
    time.sleep(max(0.0, started + 9 - time.monotonic()))  # (the held request is recorded)
    assert sms_to(sandbox) == {"+12025550000": 1}
    [settled] = events(rt, "delivery.settled", "team_sms")
    assert settled.payload["outcome"] == "sent"
    assert final.exit_code == 0 and not final.in_doubt
    [held] = events(rt, "delivery.held", "team_sms")  # (recorded while Twilio held it)
    assert 1 <= held.payload["held_s"] < 3 and rt.audit.verify().ok


# ------------------------------------------------------------------ far rate limits
def test_a_rate_limited_health_check_does_not_take_twitter_down(tmp_path: Path,
                                                                sandbox: Any) -> None:
    """X limits each endpoint on its own: the account lookup the health check makes
    (75 per 15 minutes) can run out while posting still works. A 429 there proves the
    credentials and the service answer: the tweet goes out, nobody is moved to SMS."""
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=3)
    rt = runtime(tmp_path, sandbox)
    sandbox.twitter.faults.update(rate_limit=0, rate_window_s=900,
                                  rate_limited_paths=["/2/users/me"])
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert len(tweets(sandbox)) == 1 and not set(sms_to(sandbox)) & SUBSCRIBERS
    assert outcome.preflight is not None
    health = outcome.preflight.health["status_twitter"]
    assert health.ok and "rate limited" in health.detail
    assert outcome.exit_code == 0 and not events(rt, "channel.circuit_open")


def test_a_rate_limited_health_check_does_not_take_sms_down(tmp_path: Path,
                                                            sandbox: Any) -> None:
    """Twilio answers 429 when an account has too many requests at once (another system
    sending on it). The health check's account lookup met one and took SMS down for the
    update: every SMS went to email, and a person with a phone only was not told. A 429
    proves the credentials and the service answer: the SMS go out (a send that meets the
    limit pauses then)."""
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    rt = runtime(tmp_path, sandbox)
    sid = sandbox.twilio.account_sid
    sandbox.twilio.faults.update(rate_limit=0, rate_window_s=900,
                                 rate_limited_paths=[f"/2010-04-01/Accounts/{sid}.json"])
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert len(sms_to(sandbox)) == 3 and set(sms_to(sandbox).values()) == {1}
    assert outcome.preflight is not None
    health = outcome.preflight.health["team_sms"]
    assert health.ok and "rate limited" in health.detail
    assert outcome.exit_code == 0 and not events(rt, "channel.circuit_open")


@pytest.mark.parametrize(("status", "sms_up"), [
    ("", True), ("suspended", False), ("closed", False)])
def test_twilio_account_lookup_without_a_status_does_not_take_sms_down(
        tmp_path: Path, sandbox: Any, status: str, sms_up: bool) -> None:
    """The health check read SMS as up only when the account lookup said "active". A
    lookup that answers these credentials with no status (a minimal fake of the API, a
    restricted view) took SMS down for the update: every SMS went to email. Only an
    account Twilio calls suspended or closed is down."""
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    rt = runtime(tmp_path, sandbox)
    sandbox.twilio.faults.update(account_status=status)
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert outcome.preflight is not None
    health = outcome.preflight.health["team_sms"]
    assert health.ok is sms_up, health
    assert outcome.exit_code == 0, outcome.verdict  # (email reaches the team either way)
    if sms_up:
        assert set(sms_to(sandbox)) and set(sms_to(sandbox).values()) == {1}
        assert not events(rt, "channel.circuit_open")
    else:
        assert not sms_to(sandbox) and status in health.detail
        assert len(mail_to(sandbox)) == 3


@pytest.mark.parametrize("service", ["twitter", "twilio"])
def test_429_with_a_15_minute_reset_pauses_the_channel_once_and_fails_over(
        tmp_path: Path, sandbox: Any, service: str) -> None:
    """A 429 whose reset is 15 minutes away (Twitter's x-rate-limit-reset, Twilio's
    Retry-After): the channel is asked once, then paused and its deliveries failed over,
    with no retry storm and no wait."""
    twitter = service == "twitter"
    pb = make_fanout_playbook(tmp_path / "pb", 2 if twitter else 4, twitter=twitter,
                              subscribers=3 if twitter else 0, concurrency=1)
    rt = runtime(tmp_path, sandbox)
    emulator = getattr(sandbox, service)

    def far_reset() -> None:
        emulator.hits.clear()
        emulator.faults.update(rate_limit=0, rate_window_s=900)

    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(far_reset))
    assert time.monotonic() - started < 10
    assert sum(emulator.hits.values()) == 1, "one request, then the channel is paused"
    [opened] = events(rt, "channel.circuit_open", "status_twitter" if twitter else "team_sms")
    assert re.search(r"rate limited until (89\d|900)s", opened.payload["reason"])
    assert outcome.exit_code == 0
    if twitter:
        assert set(sms_to(sandbox)) >= SUBSCRIBERS
    else:
        assert sms_to(sandbox) == {} and len(mail_to(sandbox)) == 4  # (heard by email)


@pytest.mark.parametrize("skew", [3600, -3600])
def test_a_rate_limit_reset_is_read_on_the_providers_clock(tmp_path: Path, sandbox: Any,
                                                           skew: float) -> None:
    """x-rate-limit-reset is a time on X's clock. Read on a commander's laptop whose clock
    is an hour behind, a reset 3 s away looked an hour away: Twitter was taken down and the
    public heard by SMS only. An hour ahead, a 15-minute reset looked past: the channel
    was asked again and again. The provider's Date header sets the clock now."""
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=2,
                              concurrency=1)
    rt = runtime(tmp_path, sandbox)
    emulator = sandbox.twitter
    window = 3 if skew > 0 else 900

    def limited() -> None:
        emulator.faults.update(rate_limit=1, rate_window_s=window, clock_skew_s=skew,
                               rate_limited_paths=["/2/tweets"])
        emulator.rate.reset()
        emulator.rate.hit(1, window)  # this window's one request: spent
        emulator.hits.clear()

    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(limited))
    elapsed = time.monotonic() - started
    if skew > 0:  # (3 s away: waited for, then posted)
        assert len(tweets(sandbox)) == 1 and not events(rt, "channel.circuit_open")
        assert 2 <= elapsed < 15 and outcome.exit_code == 0
        return
    assert sum(emulator.hits.values()) == 1, "asked once, then paused"
    [opened] = events(rt, "channel.circuit_open", "status_twitter")
    assert re.search(r"rate limited until (89\d|900)s", opened.payload["reason"])
    assert elapsed < 10 and outcome.exit_code == 0 and not tweets(sandbox)
    assert set(sms_to(sandbox)) >= {"+14155550000", "+14155550001"}


def test_a_spent_daily_cap_fails_twitter_over_at_once_though_the_window_resets_soon(
        tmp_path: Path, sandbox: Any) -> None:
    """X caps the posts of an account per 24 hours. Past the cap it answers 429 with the
    15-minute window not spent (`x-rate-limit-remaining` above 0, its reset seconds away)
    and the daily cap spent (`x-user-limit-24hour-remaining: 0`, reset hours away). Only
    the window's reset was read: the tweet waited for it and was refused again, and
    again, until its deadline (5 minutes by default) before the public heard by SMS. The
    latest reset among the limits said spent is the one that counts."""
    from incident_notify.flow import RetryPolicy

    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=3, concurrency=1)
    rt = runtime(tmp_path, sandbox)
    rt.policy = RetryPolicy(deadline_s=20.0)  # (the old wait, cut short for the test)
    sandbox.twitter.faults.update(daily_limit=0, rate_window_s=2)
    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"})
    elapsed = time.monotonic() - started
    assert sandbox.twitter.hits["/2/tweets"] == 1, "asked once, then failed over"
    [opened] = events(rt, "channel.circuit_open", "status_twitter")
    assert re.search(r"rate limited until \d{5}s", opened.payload["reason"])
    assert elapsed < 10 and outcome.exit_code == 0 and not tweets(sandbox)
    assert set(sms_to(sandbox)) >= SUBSCRIBERS


# ------------------------------------------------------------------ a thread cut mid-way
def test_thread_cut_after_part_one_fails_over_and_counts_as_reached(
        tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=2)
    rt = runtime(tmp_path, sandbox)
    long_words = " ".join(["Generators are starting and storage is coming back."] * 5)
    outcome = declare(rt, pb, {"site": "LON-2"}, message=long_words,
                      confirm=after_confirmation(
                          lambda: sandbox.twitter.faults.update(outage_after=1)))
    assert len(tweets(sandbox)) == 1
    statuses = {r.key.rsplit("/", 1)[1]: r.event for r in rt.audit.records()
                if r.channel == "status_twitter" and r.event in
                ("delivery.sent", "delivery.failover", "delivery.failed")}
    assert statuses["1"] == "delivery.sent"
    assert set(statuses.values()) == {"delivery.sent", "delivery.failover"}
    assert set(sms_to(sandbox)) >= {"+14155550000", "+14155550001"}
    assert outcome.exit_code == 0, outcome.to_dict()["result"]


def test_summary_after_faults_and_a_record_written_meanwhile_is_the_records(
        tmp_path: Path, sandbox: Any) -> None:
    """After sending, the command folds only what was appended after its own plan onto
    the state it holds. Through a thread cut mid-way (failover), an SMS whose answer was
    lost (unknown), an email refused (failed) and a record another commander wrote
    during the sending, the verdict, the exit code and `update.completed` must be those
    of the incident folded whole from the log."""
    from incident_notify.audit import AuditLog
    from incident_notify.incident import fold
    from incident_notify.verdict import verdict

    pb = make_fanout_playbook(tmp_path / "pb", 4, twitter=True, subscribers=2)
    rt = runtime(tmp_path, sandbox)
    other = AuditLog(rt.audit.path, actor="someone-else")
    wrote: list[str] = []

    def meanwhile(kind: str, delivery: Any, info: Any) -> None:
        if kind == "sent" and not wrote:
            wrote.append(delivery.incident_id)
            other.append("reply.received", incident=delivery.incident_id,
                         channel="status_twitter", payload={"id": "r1", "text": "ok?"})

    def faults() -> None:
        sandbox.twitter.faults.update(outage_after=1)
        sandbox.twilio.faults.update(drop_after_accept=1)
        sandbox.smtp.faults.update(bad_recipients=["person2@example.com"])

    long_words = " ".join(["Generators are starting and storage is coming back."] * 5)
    outcome = declare(rt, pb, {"site": "LON-2"}, message=long_words,
                      confirm=after_confirmation(faults), progress=meanwhile)
    assert wrote, "nothing was sent"
    whole = fold(rt.audit.records(incident=outcome.incident_id), outcome.incident_id)
    expected = verdict(whole, 1)
    assert outcome.verdict is not None
    assert outcome.verdict.to_dict() == expected.to_dict()
    totals = expected.to_dict()["totals"]
    assert totals["unknown"] >= 1 and totals["failed"] >= 1 and totals["failed_over"] >= 1, \
        totals
    [completed] = events(rt, "update.completed")
    summary = completed.payload["summary"]
    assert summary["totals"] == totals
    assert summary["people"] == expected.to_dict()["people"]
    assert len(whole.replies) == 1


# ------------------------------------------------------------------ primitives
def test_breaker_probe_is_released_whatever_the_probe_ends_in() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cooldown_s=10, clock=lambda: now[0])
    assert breaker.allow()
    breaker.failure()
    assert breaker.failure() and breaker.is_open and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow() and not breaker.allow(), "one probe at a time"
    breaker.release()  # the probe ended in a permanent recipient error
    assert breaker.allow(), "a released probe lets the next one through"
    assert not breaker.hold(300)  # already open: not a new opening, but...
    now[0] = 200.0
    assert not breaker.allow(), "no probe before the rate limit resets"
    now[0] = 311.0
    assert breaker.allow()
    assert breaker.success() and not breaker.is_open and breaker.allow()


def test_breaker_hold_opens_a_closed_channel() -> None:
    breaker = CircuitBreaker(threshold=5, cooldown_s=0, clock=lambda: 0.0)
    assert breaker.hold(900) is True and not breaker.allow()


def test_backoff_is_full_jitter() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=8.0)
    draws = [policy.backoff(4) for _ in range(2000)]
    assert min(draws) < 0.5 and max(draws) <= 8.0
    assert 3.0 < sum(draws) / len(draws) < 5.0


def test_token_bucket_rate_and_burst() -> None:
    import threading

    bucket = TokenBucket(rate=50.0, burst=5)
    stop = threading.Event()
    started = time.monotonic()
    for _ in range(5):
        assert bucket.acquire(stop)
    assert time.monotonic() - started < 0.05, "the burst goes at once"
    for _ in range(10):
        assert bucket.acquire(stop)
    assert time.monotonic() - started >= 10 / 50 * 0.9, "then the rate holds"
    stop.set()
    empty = TokenBucket(rate=0.001, burst=1)
    assert empty.acquire(stop) and not empty.acquire(stop), "a stop ends the wait"


@pytest.mark.parametrize("event", ["failure", "release", "success"])
def test_every_probe_outcome_leaves_the_breaker_usable(event: str) -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=1, cooldown_s=1, clock=lambda: now[0])
    breaker.failure()
    now[0] = 1.0
    assert breaker.allow()
    getattr(breaker, event)()
    now[0] = 2.5
    assert breaker.allow()


def _declare_in_background(tmp_path: Path, sandbox: Any, pb: Path, latency_ms: int
                           ) -> tuple[Any, dict[str, str]]:
    """`declare --yes --sandbox --json` of `pb` in another process, recording in tmp_path,
    with every emulator answering after `latency_ms`: the process and the environment
    that names its audit log."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    for emulator in (sandbox.twilio, sandbox.smtp, sandbox.twitter):
        emulator.faults.update(latency_ms=latency_ms)
    sandbox.write_state()
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "incident_notify", "declare", str(pb), "--set", "site=LON-2",
         "--yes", "--sandbox", "--json"], cwd=ROOT, env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, env


# ------------------------------------------------------------------ SIGKILL, then resume
@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 40, 160])
def test_sigkill_at_several_points_then_resume_reaches_everyone_once(
        tmp_path: Path, sandbox: Any, kill_after: int) -> None:
    """Kill the sender while requests are in flight (the emulators are slow, so many are
    between their attempt record and their answer); `resume` settles SMS and tweets
    against the emulators' records: every number gets exactly one SMS, no tweet twice, and
    an email in doubt is listed, never silently lost or sent twice."""
    import os
    import signal

    from tests.conftest import json_doc, run_cli

    pb = make_fanout_playbook(tmp_path / "pb", 120, twitter=True, subscribers=0, rate=2000,
                              concurrency=4)
    proc, env = _declare_in_background(tmp_path, sandbox, pb, 40)
    deadline = time.monotonic() + 60
    while len(sandbox.twilio.received) + len(sandbox.smtp.received) < kill_after:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for emulator in (sandbox.twilio, sandbox.smtp, sandbox.twitter):
        emulator.faults.update(latency_ms=0)
    time.sleep(0.2)  # requests the killed process left in flight land at the emulators

    incident = json_doc(run_cli("status", "--json", env=env))["data"]["incidents"][0]["id"]
    resumed = run_cli("resume", incident, "--yes", "--sandbox", "--json", env=env)
    doc = json_doc(resumed)
    assert resumed.returncode in (0, 5), resumed.stdout + resumed.stderr
    in_doubt = {d["recipient"] for d in doc["data"]["in_doubt"]}
    assert all(d["channel"] == "team_email" for d in doc["data"]["in_doubt"])
    sms, mail = sms_to(sandbox), mail_to(sandbox)
    assert set(sms.values()) == {1} and set(sms) == {f"+1202555{i:04d}" for i in range(120)}
    assert set(mail.values()) <= {1}
    assert {f"person{i}@example.com" for i in range(120)} - set(mail) <= in_doubt
    assert len(tweets(sandbox)) == 1
    assert resumed.returncode == (5 if in_doubt else 0)
    assert run_cli("audit", "verify", env=env).returncode == 0


def test_resume_beside_a_live_sender_is_refused_and_nothing_goes_twice(
        tmp_path: Path, sandbox: Any) -> None:
    """A commander whose terminal froze runs `resume` while the first process is still
    sending. Resuming beside it would send what it is about to send (both read the same
    pending deliveries): the resume is refused (exit 10, nothing sent), the first process
    finishes, each person gets each message once, and a resume afterwards has nothing
    to do."""

    from tests.conftest import json_doc, run_cli

    pb = make_fanout_playbook(tmp_path / "pb", 60, rate=2000, concurrency=2)
    proc, env = _declare_in_background(tmp_path, sandbox, pb, 120)
    deadline = time.monotonic() + 60
    while len(sandbox.twilio.received) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    incident = json_doc(run_cli("status", "--json", env=env))["data"]["incidents"][0]["id"]
    beside = run_cli("resume", incident, "--yes", "--sandbox", env=env)
    assert beside.returncode == 10, beside.stdout + beside.stderr
    assert proc.poll() is None, "the first process ended before the resume was tried"
    assert "another incident-notify process is sending" in beside.stderr
    assert "Traceback" not in beside.stderr
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    sms, mail = sms_to(sandbox), mail_to(sandbox)
    assert set(sms.values()) == {1} and len(sms) == 60
    assert set(mail.values()) == {1} and len(mail) == 60
    after = run_cli("resume", incident, "--yes", "--sandbox", "--json", env=env)
    assert after.returncode == 0, after.stdout + after.stderr
    assert sms_to(sandbox) == sms and mail_to(sandbox) == mail
    assert run_cli("audit", "verify", env=env).returncode == 0


def test_settling_never_takes_someone_elses_message_for_ours(sandbox: Any) -> None:
    """A provider list that ignores its filters must not make a lost SMS look delivered."""
    from datetime import UTC, datetime, timedelta

    from incident_notify.channels.base import ChannelSpec, Delivery, NoAttempt, OutgoingMessage
    from incident_notify.channels.sms import SMSChannel

    ch = SMSChannel(ChannelSpec("sms", "sms", "+15005550006"), sandbox.env())
    since = datetime.now(UTC) - timedelta(seconds=1)

    def to(number: str) -> Delivery:
        return Delivery(key=f"k/{number}", incident_id="I", update_no=1, channel="sms",
                        recipient=number, message=OutgoingMessage(text="Power is back."))

    sent = ch.send(to("+12025550101"), NoAttempt())
    sandbox.twilio.honour_list_filters = False
    assert ch.find_sent(to("+12025550102"), since) is None
    found = ch.find_sent(to("+12025550101"), since)
    assert found is not None and found.provider_id == sent.provider_id


def test_tweet_that_hangs_after_a_healthy_check_is_unknown_and_the_public_still_hears(
        tmp_path: Path, sandbox: Any) -> None:
    rt, outcome, took = _declare_with_hanging_sends(
        tmp_path, sandbox, make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=3),
        '"@acme_status"', "twitter", 5_000)
    assert took < 10, "one read timeout, no retry"
    assert outcome.preflight is not None and outcome.preflight.health["status_twitter"].ok
    assert [r.channel for r in events(rt, "delivery.unknown")] == ["status_twitter"]
    assert set(sms_to(sandbox)) >= SUBSCRIBERS, "subscribers hear on the fallback"
    assert outcome.exit_code == 5 and outcome.verdict is not None
    assert [r.who for r in outcome.verdict.in_doubt] == ["public:status_twitter"]

    time.sleep(4)  # the emulator finally posts the tweet it was holding
    sandbox.twitter.faults.update(send_latency_ms=0)
    settled = resume(rt, outcome.incident_id)
    assert settled.exit_code == 0
    assert len(tweets(sandbox)) == 1, "found on the timeline, not posted again"


def test_a_running_resume_holds_off_other_senders_of_its_incident(
        tmp_path: Path, sandbox: Any) -> None:
    """While a resume of an incident runs (its lock held, as another process would hold
    it), a second resume and an update of that incident are refused before recording or
    sending anything; another incident is not held up; once the resume ends, both go."""
    from incident_notify.errors import StateError
    from incident_notify.lifecycle import sending_lock

    pb = make_fanout_playbook(tmp_path / "pb", 2)
    rt = runtime(tmp_path, sandbox)
    first = declare(rt, pb, {"site": "LON-2"})
    other = declare(rt, pb, {"site": "AMS-1"})
    sent = len(sandbox.twilio.received)
    records = len(list(rt.audit.records()))
    held = sending_lock(rt, first.incident_id, resume=True)
    try:
        with pytest.raises(StateError, match="another incident-notify process is sending"):
            resume(rt, first.incident_id)
        with pytest.raises(StateError, match="a resume of this incident is running"):
            update(rt, first.incident_id, stage="identified", sets={})
        assert len(sandbox.twilio.received) == sent
        assert len(list(rt.audit.records())) == records
        assert update(rt, other.incident_id, stage="identified", sets={}).exit_code == 0
    finally:
        held.close()
    assert update(rt, first.incident_id, stage="identified", sets={}).exit_code == 0
    assert resume(rt, first.incident_id).exit_code == 0


@pytest.mark.parametrize("fault", ["locked", "no_dm_permission"])
def test_a_locked_x_account_fails_its_dms_over_at_once_not_one_refusal_per_customer(
        tmp_path: Path, sandbox: Any, fault: str) -> None:
    """X locks the account (code 326, "this account is temporarily locked"): every post
    and DM is refused with 403 while reads still answer, so the health check says up. The
    tweet's refusal took its channel down, but each DM's refusal was read as about its
    recipient: every customer on DMs was tried in turn at the DM rate (1 a second here, as
    by default) before hearing by email, a minute for 60 customers, an hour for 3,600. The
    first refusal now takes the DM channel down and its deliveries fail over at once. So
    does an app X allows to post but not to send DMs (v2 problem `oauth1-permissions`)."""
    customers = 12
    pb = tmp_path / "pb" / "dms.yaml"
    pb.parent.mkdir()
    rows = ["id,name,email,twitter,channels,tags"]
    rows += [f"c{i},Customer {i},c{i}@example.org,@customer_{i},twitter_dm;email,customer"
             for i in range(customers)]
    (pb.parent / "people.csv").write_text("\n".join(rows) + "\n")
    pb.write_text(
        "name: dms\ntitle: DM test\nseverity: sev2\ncontacts: [people.csv]\n"
        "variables:\n  site: {example: LON-2, max_length: 12}\n"
        "channels:\n"
        "  status_twitter:\n    type: twitter\n    sender: '@acme_status'\n"
        "    fallback: [customer_email]\n"
        "  customer_dm:\n    type: twitter_dm\n    sender: '@acme_status'\n"
        "    rate_per_second: 1\n    burst: 1\n    fallback: [customer_email]\n"
        "  customer_email:\n    type: email\n    sender: 'Acme <status@acme.example>'\n"
        "audiences:\n"
        "  customers:\n    kind: customers\n    select: {tags: [customer]}\n"
        "    channels: [customer_dm, customer_email]\n"
        "  public:\n    kind: public\n    channels: [status_twitter]\n"
        "    fallback_select: {tags: [customer]}\n"
        "stages:\n  investigating:\n    messages:\n"
        "      twitter: 'Power problem at {{ site }}.'\n"
        "      twitter_dm: 'Power problem at {{ site }}.'\n"
        "      email:\n        subject: 'Power problem at {{ site }}'\n"
        "        text: 'Power problem at {{ site }}.'\n")
    sandbox.twitter.faults.update(**{fault: True})
    rt = runtime(tmp_path, sandbox)
    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"})
    elapsed = time.monotonic() - started
    assert outcome.exit_code == 0, outcome.verdict
    dm_requests = sum(n for path, n in sandbox.twitter.hits.items()
                      if "/dm_conversations/" in path)
    assert 1 <= dm_requests <= 2, sandbox.twitter.hits
    mailed = {to for r in sandbox.smtp.received.all() for to in r["rcpt_tos"]}
    assert mailed == {f"c{i}@example.org" for i in range(customers)}
    posted = [r["kind"] for r in sandbox.twitter.received.all()]
    assert posted == ([] if fault == "locked" else ["tweet"]), "no DM is sent on X"
    assert elapsed < 8, f"{elapsed:.1f}s: the DMs were refused one by one"
    down = [r for r in events(rt, "delivery.failover", "customer_dm")]
    assert down and "X refuses the account or app" in down[0].payload["reason"]


def test_a_mail_server_that_hangs_up_after_each_message_still_gets_every_email(
        tmp_path: Path, sandbox: Any) -> None:
    """Mail servers limit the messages of one connection (Exchange Online: 30; some relays:
    1) and answer the next MAIL "421 ... closing". The pooled connection's 421 was taken
    for the server being unavailable: the delivery was retried on another pooled
    connection, spent as well, until it gave up. With one message per connection, 4 of
    40 emails went out (one per connection), the rest "failed over" to the SMS the team
    already had, exit 0.
    A 421 on a pooled connection is now a closed connection: nothing was sent on it, and
    the message goes on a new one, with no retry counted and no failover."""
    people = 40
    pb = make_fanout_playbook(tmp_path / "pb", people, concurrency=4)
    sandbox.smtp.faults.update(messages_per_connection=1)
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert outcome.exit_code == 0, outcome.verdict
    mailed = sorted(to for r in sandbox.smtp.received.all() for to in r["rcpt_tos"])
    assert mailed == sorted(f"person{i}@example.com" for i in range(people))
    assert not events(rt, "delivery.failover") and not events(rt, "delivery.failed")
    assert len(events(rt, "delivery.attempt", "team_email")) == people


@pytest.mark.parametrize(("window_s", "all_by_email"), [(1.0, True), (900.0, False)],
                         ids=["slow-down", "far-reset"])
def test_a_mail_server_that_asks_to_slow_down_is_rate_limiting_not_down(
        tmp_path: Path, sandbox: Any, window_s: float, all_by_email: bool) -> None:
    """The server takes 10 messages per window, then answers MAIL "452 4.5.3 Too many
    messages, slow down" (with "try again in N seconds" when the wait is long). That was
    read as a failure: five quick retries, then the delivery gave up. 10 of 40 emails went
    out in about a second and the team, who also had SMS, counted as reached. It is now a
    rate limit, as a 429 is: the channel pauses and every email goes out at the server's
    pace; a wait longer than a rate limit may be fails over at once, as a far 429 does."""
    people = 40
    pb = make_fanout_playbook(tmp_path / "pb", people, concurrency=4)
    sandbox.smtp.faults.update(rate_limit=10, rate_window_s=window_s)
    rt = runtime(tmp_path, sandbox)
    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"})
    elapsed = time.monotonic() - started
    assert outcome.exit_code == 0, outcome.verdict
    mailed = {to for r in sandbox.smtp.received.all() for to in r["rcpt_tos"]}
    if all_by_email:
        assert mailed == {f"person{i}@example.com" for i in range(people)}
        assert not events(rt, "delivery.failover") and not events(rt, "delivery.failed")
    else:
        assert len(mailed) == 10 and elapsed < 30, f"{elapsed:.0f}s waiting on a far reset"
        # (team_email has no fallback: the team heard by SMS.)
        given_up = events(rt, "delivery.failed", "team_email")
        assert len(given_up) == people - 10
        assert all("rate limited until" in r.payload["error"] for r in given_up)
    assert len(sms_to(sandbox)) == people


def test_a_twilio_sender_whose_queue_is_full_takes_sms_down_at_once(
        tmp_path: Path, sandbox: Any) -> None:
    """Twilio refuses sends from a number whose queue holds hours of messages (21611,
    another system sending from it). The refusal was read as about each recipient: every
    person was tried in turn at the SMS rate before their next channel. The queue is the
    sender's, so the first refusal takes the channel down and the rest fail over."""
    people = 30
    pb = make_fanout_playbook(tmp_path / "pb", people, concurrency=1)
    sandbox.twilio.faults.update(sender_queue_full=True)
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert outcome.exit_code == 0, outcome.verdict  # (the team heard by email)
    sends = sum(n for path, n in sandbox.twilio.hits.items() if path.endswith("/Messages.json"))
    assert sends == 1, sandbox.twilio.hits
    [opened] = events(rt, "channel.circuit_open", "team_sms")
    assert "queue for this sender is full" in opened.payload["reason"]
    assert len(mail_to(sandbox)) == people


def test_a_mail_server_too_busy_for_logins_is_busy_not_refusing_the_credentials(
        tmp_path: Path, sandbox: Any) -> None:
    """Logging in on several connections at once, a server answers some "454 4.7.0 Too
    many login attempts, please try again later" (Gmail, Exchange). That was read as the
    credentials rejected: the health check took email down for the update, or mid-send
    the circuit opened and the emails queued behind it failed over ("rejected the
    login", 7 of 100 not sent). A 4xx to the login is the server asking to wait: the
    check counts it up, and a send waits and logs in again."""
    people = 60
    pb = make_fanout_playbook(tmp_path / "pb", people, concurrency=8)
    rt = runtime(tmp_path, sandbox)
    # (smtplib tries each AUTH mechanism offered, PLAIN then LOGIN: 4 refusals are the
    # health check's two logins, its first try and its one retry.)
    sandbox.smtp.faults.update(busy_logins=4)
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: sandbox.smtp.faults.update(busy_logins=4)))
    assert outcome.exit_code == 0, outcome.verdict
    assert len(mail_to(sandbox)) == people and sandbox.smtp.faults.busy_logins == 0
    assert not events(rt, "channel.circuit_open") and not events(rt, "delivery.failed")
    assert not events(rt, "delivery.failover")


@pytest.mark.parametrize(("fault", "said"), [("deferred_recipients", "Greylisted"),
                                             ("full_mailboxes", "Mailbox full")],
                         ids=["greylisted-at-rcpt", "mailbox-full-after-data"])
def test_a_greylisted_recipient_is_theirs_alone_and_never_takes_email_down(
        tmp_path: Path, sandbox: Any, fault: str, said: str) -> None:
    """A customer's mail server greylists ("450 4.7.1 Greylisted, try again in 300
    seconds" at RCPT), and the contacts list puts that company's people first. Each
    deferral counted against the email channel: five in a row opened its circuit and
    every email of the update failed over, none sent (exit 0 here only because the team
    also had SMS). A deferral is now the recipient's alone: the circuit is untouched, and
    the person is tried on their next channel at once rather than a worker waiting out
    minutes of greylisting. So is a full mailbox ("452 4.2.2" to the message: RFC 3463's
    mailbox status), which opened the circuit the same way."""
    people, greylisted = 40, 8
    pb = make_fanout_playbook(tmp_path / "pb", people, concurrency=2)
    sandbox.smtp.faults.update(**{fault: [f"person{i}@example.com" for i in range(greylisted)]})
    rt = runtime(tmp_path, sandbox)
    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"})
    elapsed = time.monotonic() - started
    assert outcome.exit_code == 0, outcome.verdict
    assert set(mail_to(sandbox)) == {f"person{i}@example.com"
                                     for i in range(greylisted, people)}
    assert not events(rt, "channel.circuit_open")
    deferred = events(rt, "delivery.failed", "team_email")
    assert len(deferred) == greylisted and said in deferred[0].payload["error"]
    assert len(sms_to(sandbox)) == people and elapsed < 10, f"{elapsed:.1f}s"


def test_a_mail_server_that_throttles_new_connections_still_gets_every_email(
        tmp_path: Path, sandbox: Any) -> None:
    """Gmail greets a sender going faster than it allows "421 4.7.0 Try again later,
    closing connection". Each refused greeting counted against the circuit: the first
    eight connections refused opened it, and no email of the update went out. It is a
    rate limit: the channel pauses (2 s, doubling while the server takes nothing, so a
    refusal that never lifts still fails over within about two minutes)."""
    people = 40
    pb = make_fanout_playbook(tmp_path / "pb", people, concurrency=4)
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: sandbox.smtp.faults.update(throttled_connections=8)))
    assert outcome.exit_code == 0, outcome.verdict
    assert len(mail_to(sandbox)) == people and sandbox.smtp.faults.throttled_connections == 0
    assert not events(rt, "channel.circuit_open") and not events(rt, "delivery.failed")


def test_a_mail_server_whose_throttle_never_lifts_fails_email_over_in_bounded_time(
        tmp_path: Path, sandbox: Any) -> None:
    """The other side of the pause: a server that refuses every greeting "421 4.7.0" is,
    for this update, down. Each pause doubles while nothing is taken, so the wait reaches
    the rate-limit ceiling and the channel fails over (in about two minutes with the
    default 120 s ceiling; 3 s here), never waiting out each delivery's deadline."""
    from incident_notify.flow import RetryPolicy

    people = 12
    pb = make_fanout_playbook(tmp_path / "pb", people, concurrency=4)
    rt = runtime(tmp_path, sandbox)
    rt.policy = RetryPolicy(max_rate_limit_wait_s=3.0)
    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=after_confirmation(
        lambda: sandbox.smtp.faults.update(throttled_connections=10**6)))
    elapsed = time.monotonic() - started
    assert outcome.exit_code == 0, outcome.verdict  # (the team heard by SMS)
    assert not mail_to(sandbox) and len(sms_to(sandbox)) == people
    [opened] = events(rt, "channel.circuit_open", "team_email")
    assert "rate limited until" in opened.payload["reason"] and elapsed < 20, elapsed
