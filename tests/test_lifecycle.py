"""A commander's incident through the real CLI: declare, updates, resolve, status, timeline."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import PLAYBOOKS, ROOT, json_doc, make_fanout_playbook, run_cli

POWER = PLAYBOOKS / "dc-power-failure.yaml"
POWER_VARS = ["--set", "site=LON-2", "--set", "services=compute, block storage",
              "--set", "status_url=https://status.acme.example/i/4321"]


@pytest.fixture
def attached(sandbox: Any, tmp_path: Path) -> dict[str, str]:
    """A sandbox that CLI subprocesses attach to with --sandbox, and their environment."""
    from incident_notify.contacts import load_contacts

    for person in load_contacts([PLAYBOOKS / "contacts"]).contacts.values():
        if person.twitter:
            sandbox.twitter.add_user(person.twitter.lstrip("@"))
    sandbox.write_state()
    return {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
            "INCIDENT_NOTIFY_OPTOUTS": str(tmp_path / "optouts.jsonl")}


def cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = run_cli(*args, "--json", env=env)
    doc = json_doc(proc)
    assert proc.returncode == doc["exit_code"]
    return doc


def test_full_incident_declare_two_updates_resolve(sandbox: Any,
                                                   attached: dict[str, str]) -> None:
    doc = cli(attached, "declare", str(POWER), *POWER_VARS, "--yes", "--sandbox")
    assert doc["exit_code"] == 0, doc
    incident = doc["data"]["incident"]
    assert incident.startswith("INC-") and len(incident.split("-")[-1]) == 4

    doc = cli(attached, "update", incident, "--stage", "identified", "--set", "eta=45 minutes",
              "--yes", "--sandbox")
    assert doc["exit_code"] == 0, doc
    doc = cli(attached, "update", incident, "--message", "Generators are carrying the load.",
              "--yes", "--sandbox")
    assert doc["exit_code"] == 0, doc
    doc = cli(attached, "resolve", incident, "--yes", "--sandbox")
    assert doc["exit_code"] == 0, doc
    assert doc["data"]["stage"] == "resolved"

    # One tweet thread: each update replies to the previous tweet.
    tweets = [r for r in sandbox.twitter.received.all() if r["kind"] == "tweet"]
    assert len(tweets) >= 4
    assert tweets[0]["in_reply_to_tweet_id"] is None
    for previous, current in itertools.pairwise(tweets):
        assert current["in_reply_to_tweet_id"] == previous["id"]
    assert any("Generators are carrying the load." in t["text"] for t in tweets)

    # Emails of one person thread by References.
    mails = [r for r in sandbox.smtp.received.all() if "oncall" in " ".join(r["rcpt_tos"])
             or r["rcpt_tos"]]
    by_rcpt: dict[str, list[dict[str, Any]]] = {}
    for m in mails:
        by_rcpt.setdefault(m["rcpt_tos"][0], []).append(m)
    threaded = [ms for ms in by_rcpt.values() if len(ms) >= 2]
    assert threaded
    first, second = threaded[0][0], threaded[0][1]
    assert first["message_id"] in (second["references"] or "")

    status = cli(attached, "status", incident)["data"]["incidents"][0]
    assert status["stage"] == "resolved" and status["status"] == "resolved"
    assert status["updates"] == 4
    sent_sms = sum(c.get("sent", 0) for ch, c in status["channels"].items() if "sms" in ch)
    assert sent_sms == len(sandbox.twilio.received)

    timeline = cli(attached, "timeline", incident)["data"]["events"]
    whats = [e["what"] for e in timeline]
    assert whats[0].startswith("declared at stage investigating")
    assert any(w.startswith("resolved at stage resolved") for w in whats)
    said = [e for e in timeline if e["event"] == "message.rendered"
            and e["channel"] == "status_twitter"]
    assert len(said) == 4

    # A resolved incident refuses updates until reopened.
    proc = run_cli("update", incident, "--message", "late", "--yes", "--sandbox", env=attached)
    assert proc.returncode == 10 and "reopen" in proc.stderr


def test_invalid_transition_is_refused(sandbox: Any, attached: dict[str, str]) -> None:
    pb = PLAYBOOKS / "scheduled-maintenance.yaml"
    sets = ["--set", "window=2026-12-05 02:00-04:00 UTC", "--set", "scope=object storage",
            "--set", "status_url=https://status.acme.example/m/77"]
    doc = cli(attached, "declare", str(pb), *sets, "--yes", "--sandbox")
    incident = doc["data"]["incident"]
    cli(attached, "update", incident, "--stage", "extended", "--yes", "--sandbox")
    proc = run_cli("update", incident, "--stage", "in_progress", "--yes", "--sandbox",
                   env=attached)
    assert proc.returncode == 10
    assert "allowed next: resolved" in proc.stderr


def test_two_commanders_declaring_at_once_get_distinct_ids(tmp_path: Path, sandbox: Any,
                                                          attached: dict[str, str]) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 5)
    procs = [subprocess.Popen([sys.executable, "-m", "incident_notify", "declare", str(pb),
                               "--set", "site=LON-2", "--yes", "--sandbox", "--json"],
                              cwd=ROOT, env={**os.environ, **attached},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    ids = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        ids.add(json_doc(subprocess.CompletedProcess([], 0, out, err))["data"]["incident"])
    assert len(ids) == 3
    assert run_cli("audit", "verify", env=attached).returncode == 0


def test_no_tty_and_no_yes_refuses_and_sends_nothing(sandbox: Any,
                                                     attached: dict[str, str]) -> None:
    proc = run_cli("declare", str(POWER), *POWER_VARS, "--sandbox", env=attached)
    assert proc.returncode == 11
    assert "--yes" in proc.stderr and "Traceback" not in proc.stderr
    assert len(sandbox.twilio.received) == 0 and len(sandbox.twitter.received) == 0
    assert run_cli("status", "--json", env=attached).returncode == 0
    assert json_doc(run_cli("status", "--json", env=attached))["data"]["incidents"] == []


def test_dry_run_records_and_sends_nothing(sandbox: Any, attached: dict[str, str]) -> None:
    doc = cli(attached, "declare", str(POWER), *POWER_VARS, "--dry-run", "--sandbox")
    assert doc["exit_code"] == 0 and doc["data"]["dry_run"] is True
    pre = doc["data"]["preflight"]
    assert pre["deliveries_per_channel"]["status_twitter"] == 1
    assert pre["deliveries_per_channel"]["team_sms"] >= 1
    assert all(h["ok"] for h in pre["health"].values())
    assert len(sandbox.twilio.received) == 0
    assert not Path(attached["INCIDENT_NOTIFY_AUDIT_LOG"]).exists() or \
        Path(attached["INCIDENT_NOTIFY_AUDIT_LOG"]).read_text() == ""


def test_preflight_shows_unhealthy_channel(sandbox: Any, attached: dict[str, str]) -> None:
    sandbox.twitter.faults.update(outage=True)
    proc = run_cli("declare", str(POWER), *POWER_VARS, "--dry-run", "--sandbox", env=attached)
    assert proc.returncode == 0
    assert "status_twitter is unhealthy and will fail over to customer_sms" in proc.stderr


def test_cli_runner_status_empty(attached: dict[str, str], monkeypatch: Any) -> None:
    from incident_notify.cli.main import _register, app

    _register()
    for key, value in attached.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0
    assert "No open incidents." in result.output


def test_variables_from_environment(sandbox: Any, attached: dict[str, str]) -> None:
    env = {**attached, "INCIDENT_NOTIFY_VAR_SITE": "FRA-1",
           "INCIDENT_NOTIFY_VAR_SERVICES": "compute",
           "INCIDENT_NOTIFY_VAR_STATUS_URL": "https://status.acme.example/i/9"}
    doc = cli(env, "declare", str(POWER), "--dry-run", "--sandbox")
    tweet = next(m for m in doc["data"]["preflight"]["messages"]
                 if m["channel"] == "status_twitter")
    assert "FRA-1" in tweet["parts"][0]["text"]


def test_replies_to_the_public_thread_reach_the_timeline(sandbox: Any,
                                                        attached: dict[str, str]) -> None:
    doc = cli(attached, "declare", str(POWER), *POWER_VARS, "--yes", "--sandbox")
    incident = doc["data"]["incident"]
    cli(attached, "update", incident, "--stage", "identified", "--yes", "--sandbox")
    tweets = [r for r in sandbox.twitter.received.all() if r["kind"] == "tweet"]
    sandbox.twitter.add_reply(tweets[1]["id"], "carol_ops", "Is block storage affected too?")
    sandbox.twitter.add_reply(tweets[0]["id"], "dev_p", "Our VMs in LON-2 are down.")
    for _ in range(2):  # fetching twice records each reply once
        events = cli(attached, "timeline", incident, "--replies", "--sandbox")["data"]["events"]
    replies = [e for e in events if e["event"] == "reply.received"]
    assert sorted(e["what"] for e in replies) == [
        "reply on status_twitter from @carol_ops", "reply on status_twitter from @dev_p"]
    assert any("Is block storage affected too?" in e["lines"] for e in replies)
    assert run_cli("audit", "verify", env=attached).returncode == 0


@pytest.mark.parametrize("twilio_back", [True, False])
def test_retry_not_reached_after_an_outage_tells_each_person_once_on_their_first_channel(
        sandbox: Any, attached: dict[str, str], twilio_back: bool) -> None:
    """Twilio and the mail server were both down for the first update: the tweet and the
    DMs went out, and everyone who hears by SMS or email was not reached (their first
    channel failed over to the next, which was down too). Once both are back, `resume
    --retry-not-reached` tells each of them once, on their first channel again (the
    fallback a failover planned is planned again only if that channel fails again);
    the incident team, told on every channel, gets both; nobody reached hears twice.
    With only the mail server back, the SMS fail over to email again, planned anew."""
    from collections import Counter

    from incident_notify.contacts import load_contacts

    sandbox.twilio.faults.update(outage=True)
    sandbox.smtp.faults.update(outage=True)
    first = cli(attached, "declare", str(POWER), *POWER_VARS, "--yes", "--sandbox")
    assert first["exit_code"] == 5, first
    dms = [m for m in sandbox.twitter.received.all() if m["kind"] == "dm"]
    assert dms and not sandbox.twilio.received.all() and not sandbox.smtp.received.all()
    sandbox.twilio.faults.update(outage=not twilio_back)
    sandbox.smtp.faults.update(outage=False)
    incident = first["data"]["incident"]
    dry = cli(attached, "resume", incident, "--retry-not-reached", "--dry-run", "--sandbox")
    assert dry["exit_code"] == 0 and not sandbox.twilio.received.all()
    retried = cli(attached, "resume", incident, "--retry-not-reached", "--yes", "--sandbox")
    assert retried["exit_code"] == 0, retried
    people = retried["data"]["result"]["people"]
    assert people["not_reached"] == 0 and people["reached"] == people["intended"]

    heard: Counter[str] = Counter()
    contacts = load_contacts([PLAYBOOKS / "contacts"]).contacts.values()
    by_phone = {c.phone: c.id for c in contacts if c.phone}
    by_mail = {c.email.lower(): c.id for c in contacts if c.email}
    by_handle = {c.twitter.lstrip("@").lower(): c.id for c in contacts if c.twitter}
    for m in sandbox.twilio.received.all():
        heard[by_phone[m["to"]]] += 1
    for m in sandbox.smtp.received.all():
        for rcpt in m["rcpt_tos"]:
            heard[by_mail[rcpt.lower()]] += 1
    for m in sandbox.twitter.received.all():
        if m["kind"] == "dm":
            heard[by_handle[m["username"].lower()]] += 1
    team = {c.id for c in contacts if {"oncall", "sre"} & set(c.groups)}
    for who, n in heard.items():
        assert n == (2 if who in team and twilio_back else 1), (who, n)
    assert len(heard) == people["intended"] - 1  # (and the public, by the tweet)
    assert bool(sandbox.twilio.received.all()) is twilio_back
    assert len([m for m in sandbox.twitter.received.all() if m["kind"] == "tweet"]) == 1
