"""The fan-out engine end to end: real tweepy / twilio / smtplib against the emulators."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from incident_notify.flow import RetryPolicy
from incident_notify.lifecycle import declare, update
from tests.conftest import (
    ROOT,
    json_doc,
    mail_to,
    make_fanout_playbook,
    run_cli,
    sandbox_runtime,
    sms_to,
)

FAST = RetryPolicy(max_attempts=6, base_delay_s=0.05, max_delay_s=0.5, deadline_s=30,
                   breaker_threshold=3, breaker_cooldown_s=60)


def runtime(tmp_path: Path, sandbox: Any, policy: RetryPolicy = FAST) -> Any:
    return sandbox_runtime(tmp_path, sandbox, policy)


def test_thousand_sms_and_thousand_emails_each_exactly_once(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1000)
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert outcome.exit_code == 0, outcome.to_dict()["result"]
    sms, mail = sms_to(sandbox), mail_to(sandbox)
    assert len(sms) == 1000 and set(sms.values()) == {1}
    assert len(mail) == 1000 and set(mail.values()) == {1}
    result = outcome.result
    assert result is not None
    assert result.counts["team_sms"]["sent"] == 1000
    assert result.counts["team_email"]["sent"] == 1000
    assert rt.audit.verify().ok


def test_rate_limit_429_reset_is_honoured(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 30)
    sandbox.twilio.faults.update(rate_limit=10, rate_window_s=1.0)
    rt = runtime(tmp_path, sandbox)
    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"})
    elapsed = time.monotonic() - started
    assert outcome.exit_code == 0, outcome.to_dict()["result"]
    sms = sms_to(sandbox)
    assert len(sms) == 30 and set(sms.values()) == {1}
    # 30 messages at 10 per 1-second window need at least two resets.
    assert elapsed >= 1.5
    retries = [r for r in rt.audit.records(event_prefix="delivery.attempt")
               if r.payload["attempt"] > 1]
    assert retries, "a 429 must lead to a later attempt"


def test_503s_are_retried_then_succeed(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 5)
    rt = runtime(tmp_path, sandbox)

    def trouble_starts_after_confirmation(_: Any) -> bool:
        sandbox.twilio.faults.update(fail_next=2)
        sandbox.smtp.faults.update(fail_next=2)
        return True

    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=trouble_starts_after_confirmation)
    assert outcome.exit_code == 0, outcome.to_dict()["result"]
    assert len(sms_to(sandbox)) == 5 and len(mail_to(sandbox)) == 5
    attempts = Counter(r.key for r in rt.audit.records(event_prefix="delivery.attempt"))
    assert max(attempts.values()) >= 2


def test_twitter_outage_fails_over_then_recovers(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 3, twitter=True, subscribers=4)
    rt = runtime(tmp_path, sandbox)
    first = declare(rt, pb, {"site": "LON-2"})
    assert first.exit_code == 0
    tweets = [r for r in sandbox.twitter.received.all() if r["kind"] == "tweet"]
    assert len(tweets) == 1
    subscriber_numbers = {f"+1415555{i:04d}" for i in range(4)}
    assert not subscriber_numbers & set(sms_to(sandbox))

    # Twitter goes down mid-incident: subscribers hear by SMS, with the notice.
    sandbox.twitter.faults.update(outage=True)
    second = update(rt, first.incident_id, stage="identified", sets={})
    assert second.exit_code == 0, second.to_dict()["result"]
    got = [r for r in sandbox.twilio.received.all() if r["to"] in subscriber_numbers]
    assert {r["to"] for r in got} == subscriber_numbers and len(got) == 4
    assert all("Twitter/X is down" in r["body"] for r in got)
    failovers = list(rt.audit.records(event_prefix="delivery.failover"))
    assert failovers and failovers[0].channel == "status_twitter"
    assert second.result is not None and second.result.failovers

    # Twitter is back: the next update goes to Twitter again, replying to the first tweet.
    sandbox.twitter.faults.update(outage=False)
    before = len(got)
    third = update(rt, first.incident_id, stage="monitoring", sets={})
    assert third.exit_code == 0
    tweets = [r for r in sandbox.twitter.received.all() if r["kind"] == "tweet"]
    assert len(tweets) == 2
    assert tweets[1]["in_reply_to_tweet_id"] == tweets[0]["id"]
    after = [r for r in sandbox.twilio.received.all() if r["to"] in subscriber_numbers]
    assert len(after) == before


def test_permanent_error_is_not_retried_and_reported(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    sandbox.twilio.faults.update(bad_recipients=["+12025550001"])
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"})
    attempts = Counter(r.key for r in rt.audit.records(event_prefix="delivery.attempt"))
    bad = [k for k in attempts if "/team_sms/p00001/" in k]
    assert bad and attempts[bad[0]] == 1
    # Internal member p00001 is still reached by email: everyone was reached (exit 0), and
    # the refused SMS is on record with Twilio's code.
    assert "person1@example.com" in mail_to(sandbox)
    assert outcome.exit_code == 0
    refused = [r for r in rt.audit.records(event_prefix="delivery.failover") if r.key == bad[0]]
    assert refused and refused[0].payload["code"] == "21211"


def test_recipient_reached_nowhere_is_a_partial_delivery(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    sandbox.twilio.faults.update(bad_recipients=["+12025550001"])
    sandbox.smtp.faults.update(bad_recipients=["person1@example.com"])
    rt = runtime(tmp_path, sandbox)
    outcome = declare(rt, pb, {"site": "LON-2"})
    assert outcome.exit_code == 5
    assert outcome.result is not None
    failed = {(f["channel"], f["recipient"]) for f in outcome.result.failures}
    assert ("team_email", "person1@example.com") in failed
    assert len(sms_to(sandbox)) == 2 and len(mail_to(sandbox)) == 2


@pytest.mark.slow
def test_sigkill_mid_fanout_then_resume_sends_each_exactly_once(tmp_path: Path,
                                                                 sandbox: Any) -> None:
    people = 600  # 1,200 deliveries; the 1,000-person run above proves the scale
    pb = make_fanout_playbook(tmp_path / "pb", people, rate=2000, concurrency=4)
    sandbox.twilio.faults.update(latency_ms=5)
    sandbox.smtp.faults.update(latency_ms=5)
    sandbox.write_state()  # subprocesses attach to this sandbox with --sandbox
    audit = tmp_path / "audit.jsonl"
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(audit)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "incident_notify", "declare", str(pb), "--set", "site=LON-2",
         "--yes", "--sandbox", "--json"],
        cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(sandbox.twilio.received) + len(sandbox.smtp.received) < 250:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    sent_before = len(sandbox.twilio.received) + len(sandbox.smtp.received)
    assert sent_before < 2 * people, "the kill must land mid fan-out"

    status = json_doc(run_cli("status", "--json", env=env))
    incident = status["data"]["incidents"][0]["id"]
    resumed = run_cli("resume", incident, "--yes", "--sandbox", "--json", env=env)
    doc = json_doc(resumed)
    in_doubt = {d["recipient"] for d in doc["data"]["in_doubt"]}
    sms, mail = sms_to(sandbox), mail_to(sandbox)
    # Nobody got anything twice. Every SMS in doubt at the kill was settled against
    # Twilio's records, so every number got exactly one; an email in doubt (SMTP keeps no
    # record to ask) is listed, never silently dropped or re-sent.
    assert set(sms.values()) <= {1} and set(mail.values()) <= {1}
    expected_sms = {f"+1202555{i:04d}" for i in range(people)}
    expected_mail = {f"person{i}@example.com" for i in range(people)}
    assert set(sms) == expected_sms
    assert expected_mail - set(mail) <= in_doubt
    assert len(in_doubt) <= 8, "at most the requests in flight at the kill are unknown"
    assert resumed.returncode in (0, 5), resumed.stderr
    assert run_cli("audit", "verify", env=env).returncode == 0


def _declaring(pb: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`declare --yes --sandbox` of `pb` in a process of its own, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "incident_notify", "declare", str(pb), "--set", "site=LON-2",
         "--yes", "--sandbox"], cwd=ROOT, env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell without job control starts background jobs with SIGINT ignored, and a
        # process that inherits an ignored SIGINT rightly keeps ignoring it: the commander
        # at a terminal has the default disposition, so the child gets it here too.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize(("redact", "stop"), [(False, "SIGINT"), (True, "SIGINT"),
                                              (False, "SIGTERM")])
def test_ctrl_c_stops_cleanly_then_resume_finishes(tmp_path: Path, sandbox: Any,
                                                   redact: bool, stop: str) -> None:
    """Ctrl-C, or SIGTERM (a runbook's timeout, a cancelled CI job, a service manager):
    the sending stops, what was in flight is recorded, the summary says so, exit 130;
    resume then reaches everyone exactly once."""
    pb = make_fanout_playbook(tmp_path / "pb", 200, rate=2000, concurrency=2)
    sandbox.twilio.faults.update(latency_ms=10)
    sandbox.smtp.faults.update(latency_ms=10)
    sandbox.write_state()
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    if redact:
        # Recipients are keyed hashes in the log; resume finds the addresses again.
        env.update(INCIDENT_NOTIFY_REDACT_RECIPIENTS="1",
                   INCIDENT_NOTIFY_AUDIT_REDACT_KEY="test-redaction-key")
    proc = _declaring(pb, env)
    deadline = time.monotonic() + 60
    while len(sandbox.twilio.received) + len(sandbox.smtp.received) < 80:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(getattr(signal, stop))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    assert "interrupted" in out and "resume" in out
    sent_at_stop = len(sandbox.twilio.received) + len(sandbox.smtp.received)
    assert sent_at_stop < 400
    incident = json_doc(run_cli("status", "--json", env=env))["data"]["incidents"][0]["id"]
    resumed = run_cli("resume", incident, "--yes", "--sandbox", "--json", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    sms, mail = sms_to(sandbox), mail_to(sandbox)
    assert len(sms) == 200 and set(sms.values()) == {1}
    assert len(mail) == 200 and set(mail.values()) == {1}
    assert run_cli("audit", "verify", env=env).returncode == 0
    log_text = (tmp_path / "audit.jsonl").read_text()
    assert ("+12025550001" in log_text) is not redact
    assert ("person1@example.com" in log_text) is not redact


def test_ctrl_c_twice_leaves_the_requests_in_flight_in_doubt_and_says_so(
        tmp_path: Path, sandbox: Any) -> None:
    """Ctrl-C waits for the requests in flight (each within its deadline) so that their
    outcome is recorded, and says so. A commander who presses it again does not want to
    wait: the second Ctrl-C used to change nothing but the end (the command still waited,
    then left without its summary, exit 130 and not a word). Now it stops waiting: the
    requests in flight stay in doubt on the record, the summary says so, resume settles."""
    pb = make_fanout_playbook(tmp_path / "pb", 40, rate=2000, concurrency=2)
    sandbox.twilio.faults.update(send_latency_ms=6000)
    sandbox.smtp.faults.update(send_latency_ms=6000)
    sandbox.write_state()
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    proc = _declaring(pb, env)
    deadline = time.monotonic() + 60
    log = tmp_path / "audit.jsonl"
    while not log.exists() or log.read_text().count('"delivery.attempt"') < 4:
        assert proc.poll() is None and time.monotonic() < deadline  # (4 in flight, 6 s each)
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - stopped < 4, "the answers (6 s away) were not waited for"
    assert proc.returncode == 130, out + err
    assert "stopping:" in err and "Ctrl-C again" in err and "Traceback" not in err
    assert "interrupted:" in out and "may have arrived" in out, out[-1500:]
    incident = json_doc(run_cli("status", "--json", env=env))["data"]["incidents"][0]
    assert incident["in_doubt"] >= 1, incident  # (those 6 s from an answer at the stop)
    sandbox.twilio.faults.update(send_latency_ms=0)
    sandbox.smtp.faults.update(send_latency_ms=0)
    resumed = run_cli("resume", incident["id"], "--yes", "--sandbox", "--json", env=env)
    assert resumed.returncode in (0, 5), resumed.stdout + resumed.stderr
    sms, mail = sms_to(sandbox), mail_to(sandbox)
    assert len(sms) == 40 and set(sms.values()) == {1}
    assert len(mail) == 40 and set(mail.values()) == {1}
    assert run_cli("audit", "verify", env=env).returncode == 0


def _to_another_thread(pid: int, signum: int) -> None:
    """Deliver `signum` to a thread of process `pid` other than its main one, as the kernel
    may for a signal sent to the process (tgkill: the thread chosen by hand)."""
    import ctypes
    import platform

    number = {"x86_64": 234, "aarch64": 131}.get(platform.machine())
    if number is None:
        pytest.skip("tgkill's number is not known for this machine")
    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert others, "the command runs threads (emulators, watchdogs) by then"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(number, pid, others[0], signum) == 0, ctypes.get_errno()


@pytest.mark.parametrize(("stop", "thread"), [("SIGINT", False), ("SIGTERM", False),
                                              ("SIGINT", True), ("SIGTERM", True)])
def test_a_command_stopped_before_its_summary_says_so(tmp_path: Path, stop: str,
                                                      thread: bool) -> None:
    """Typer turns an interrupt that leaves a command into a silent exit 130: Ctrl-C at the
    confirmation question, or SIGTERM while a big update is planned, ended without a word.
    Now it says nothing was sent. And the kernel may hand the signal to any thread: Python
    runs handlers in the main thread only, and one blocked reading the answer sat at the
    question, the interrupt unheard, until Enter."""
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    env = {**os.environ, "INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    proc, master = _at_a_terminal(["declare", str(pb), "--set", "site=LON-2", "--sandbox"],
                                  env)
    seen = bytearray()
    try:
        _read_until(master, proc, lambda: b"[y/N]" in seen, seen)
        if thread:
            time.sleep(0.3)  # (in its read by now)
            _to_another_thread(proc.pid, getattr(signal, stop))
        else:
            proc.send_signal(getattr(signal, stop))
        code = proc.wait(timeout=30)
        _drain(master, seen)
    finally:
        os.close(master)
    assert code == 130
    assert b"interrupted: nothing was sent." in seen, bytes(seen[-600:])
    assert not (tmp_path / "audit.jsonl").exists()


def test_a_command_stopped_before_its_summary_still_gives_its_json_document(
        tmp_path: Path) -> None:
    """Under --json a script reads one document from stdout: an interrupt at the question
    left it none."""
    import json

    pb = make_fanout_playbook(tmp_path / "pb", 3)
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    proc, master = _at_a_terminal(["declare", str(pb), "--set", "site=LON-2", "--sandbox",
                                   "--json"], env)
    seen = bytearray()
    try:
        _read_until(master, proc, lambda: b"[y/N]" in seen, seen)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        _drain(master, seen)
    finally:
        os.close(master)
    after = bytes(seen).decode().split("[y/N]", 1)[1].lstrip()
    doc, _ = json.JSONDecoder().raw_decode(after)
    assert (doc["ok"], doc["exit_code"], doc["command"]) == (False, 130, "declare"), doc
    assert doc["errors"][0]["message"] == "interrupted: nothing was sent."


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_the_sandbox_stops_whichever_thread_the_signal_reaches(stop: str) -> None:
    """`incident-notify sandbox` waited in signal.pause(), which a signal handed to one of
    its emulator threads does not end: Ctrl-C or a service manager's SIGTERM could leave
    it running."""
    proc = subprocess.Popen([sys.executable, "-m", "incident_notify", "sandbox"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "INCIDENT_NOTIFY_SANDBOX_CONTROL=" in line:
                break
        time.sleep(0.3)
        _to_another_thread(proc.pid, getattr(signal, stop))
        assert proc.wait(timeout=15) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _at_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """`incident-notify argv` in a session of its own whose controlling terminal is a new
    pseudo-terminal, as at a commander's SSH session; the terminal's other end is
    returned: closing it hangs the terminal up (the kernel sends SIGHUP)."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()

    def own_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "incident_notify", *argv], cwd=ROOT,
                            env={**os.environ, **env}, stdin=slave, stdout=slave,
                            stderr=slave, preexec_fn=own_terminal)
    os.close(slave)
    return proc, master


def _drain(master: int, seen: bytearray) -> None:
    """What a command that has ended wrote to its terminal and was not read yet."""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # (the other end is closed: all read)
            return
        if not chunk:
            return
        seen += chunk


def _read_until(master: int, proc: Any, done: Any, seen: bytearray) -> None:
    import select

    deadline = time.monotonic() + 60
    while not done():
        assert proc.poll() is None and time.monotonic() < deadline, bytes(seen[-2000:])
        if select.select([master], [], [], 0.01)[0]:
            try:
                seen += os.read(master, 65536)
            except OSError:
                break


@pytest.mark.parametrize("when", ["sending", "asking"])
def test_a_terminal_that_hangs_up_does_not_stop_a_confirmed_send(tmp_path: Path, sandbox: Any,
                                                                 when: str) -> None:
    """The commander's SSH session drops (SIGHUP) half-way through a fan-out they
    confirmed: the send goes on to the end, everyone exactly once, recorded complete,
    exit 0. Dropped while the question is still on the screen: nothing is sent."""
    pb = make_fanout_playbook(tmp_path / "pb", 200, rate=2000, concurrency=2)
    sandbox.twilio.faults.update(latency_ms=10)
    sandbox.smtp.faults.update(latency_ms=10)
    sandbox.write_state()
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    confirm = ["--yes"] if when == "sending" else []
    proc, master = _at_a_terminal(["declare", str(pb), "--set", "site=LON-2", "--sandbox",
                                   *confirm], env)
    seen = bytearray()
    try:
        if when == "sending":
            _read_until(master, proc, lambda: len(sandbox.twilio.received)
                        + len(sandbox.smtp.received) >= 80, seen)
        else:
            _read_until(master, proc, lambda: b"[y/N]" in seen, seen)
    finally:
        os.close(master)  # the terminal hangs up
    code = proc.wait(timeout=60)
    if when == "asking":
        assert code == 130
        assert not sandbox.twilio.received and not sandbox.smtp.received
        assert not (tmp_path / "audit.jsonl").exists()
        return
    assert code == 0
    sms, mail = sms_to(sandbox), mail_to(sandbox)
    assert len(sms) == 200 and set(sms.values()) == {1}
    assert len(mail) == 200 and set(mail.values()) == {1}
    status = json_doc(run_cli("status", "--json", env=env))["data"]["incidents"][0]
    assert "update.completed" in (tmp_path / "audit.jsonl").read_text()
    assert status["pending"] == 0 and status["in_doubt"] == 0, status
    assert run_cli("audit", "verify", env=env).returncode == 0


def test_endless_rate_limiting_gives_up_at_the_deadline(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 2)
    rt = runtime(tmp_path, sandbox, RetryPolicy(max_attempts=3, base_delay_s=0.05,
                                                max_delay_s=0.1, deadline_s=3.0))

    def rate_limit_everything(_: Any) -> bool:
        sandbox.twilio.faults.update(rate_limit=0, rate_window_s=1.0)
        return True

    started = time.monotonic()
    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=rate_limit_everything)
    assert time.monotonic() - started < 15
    assert outcome.result is not None
    assert outcome.result.counts["team_sms"]["failed"] == 2  # no fallback for team_sms
    assert len(mail_to(sandbox)) == 2


def test_concurrent_update_is_refused_not_merged(tmp_path: Path, sandbox: Any) -> None:
    """Another commander's update lands while this one is at the prompt: nothing is sent
    twice under one update number; the late one is refused with a clear error."""
    from incident_notify.errors import StateError

    pb = make_fanout_playbook(tmp_path / "pb", 3)
    rt = runtime(tmp_path, sandbox)
    first = declare(rt, pb, {"site": "LON-2"})

    def other_commander_goes_first(_: Any) -> bool:
        update(rt, first.incident_id, stage="monitoring", sets={})
        return True

    before = len(sandbox.twilio.received)
    with pytest.raises(StateError) as info:
        update(rt, first.incident_id, stage="identified", sets={},
               confirm=other_commander_goes_first)
    assert "updated by someone else" in info.value.message
    assert len(sandbox.twilio.received) == before + 3  # only the other commander's update
    updates = [r for r in rt.audit.records(event_prefix="incident.updated")]
    assert [r.payload["stage"] for r in updates] == ["monitoring"]


def test_health_is_checked_again_after_a_slow_confirmation(
        tmp_path: Path, sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import incident_notify.lifecycle as lifecycle

    monkeypatch.setattr(lifecycle, "HEALTH_MAX_AGE_S", 0.0)
    pb = make_fanout_playbook(tmp_path / "pb", 2, twitter=True, subscribers=2)
    rt = runtime(tmp_path, sandbox)

    def twitter_dies_while_the_commander_reads(_: Any) -> bool:
        sandbox.twitter.faults.update(outage=True)
        return True

    outcome = declare(rt, pb, {"site": "LON-2"}, confirm=twitter_dies_while_the_commander_reads)
    assert outcome.exit_code == 0
    attempts = [r for r in rt.audit.records(event_prefix="delivery.attempt")
                if r.channel == "status_twitter"]
    assert attempts == []  # known down before sending: failed over without trying
    assert {"+14155550000", "+14155550001"} <= set(sms_to(sandbox))


def test_redacted_log_keeps_no_address_even_of_people_not_reached(
        tmp_path: Path, sandbox: Any) -> None:
    from incident_notify.config import Settings
    from incident_notify.runtime import open_runtime

    pb = make_fanout_playbook(tmp_path / "pb", 3)
    sandbox.twilio.faults.update(bad_recipients=["+12025550001"])
    sandbox.smtp.faults.update(bad_recipients=["person1@example.com"])
    settings = Settings(audit_log=tmp_path / "audit.jsonl", optouts=tmp_path / "o.jsonl",
                        sandbox=True, redact_recipients=True)
    import os

    os.environ["INCIDENT_NOTIFY_AUDIT_REDACT_KEY"] = "k"
    try:
        rt = open_runtime(settings, sandbox=sandbox)
        outcome = declare(rt, pb, {"site": "LON-2"})
    finally:
        del os.environ["INCIDENT_NOTIFY_AUDIT_REDACT_KEY"]
    assert outcome.exit_code == 5
    text = (tmp_path / "audit.jsonl").read_text()
    assert "+12025550001" not in text and "person1@example.com" not in text
    assert "p00001" in text  # the person is named by contact id


def test_audit_log_that_cannot_grow_stops_the_fan_out_with_nothing_sent_unrecorded(
        tmp_path: Path, sandbox: Any) -> None:
    """The disk fills mid fan-out (a real write limit: RLIMIT_FSIZE, so writes past it fail
    with EFBIG). The record is the point of the tool: sending stops with exit 8 and a
    clear message, every message a provider received has its durable attempt record, the
    log still ends at a whole record (a write that did not fit is taken back, never left
    torn), and `resume`, with room again, reaches everyone else once."""
    import resource

    people = 150
    pb = make_fanout_playbook(tmp_path / "pb", people, rate=2000, concurrency=4)
    sandbox.twilio.faults.update(latency_ms=5)
    sandbox.smtp.faults.update(latency_ms=5)
    sandbox.write_state()
    audit = tmp_path / "audit.jsonl"
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(audit)}
    limit = 300_000  # the plan fits (~110 kB); the attempts and outcomes do not

    def full_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "incident_notify", "declare", str(pb), "--set", "site=LON-2",
         "--yes", "--sandbox"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        # (Under the limit, Python would leave a cut-short .pyc for the next import.)
        env={**os.environ, **env, "PYTHONDONTWRITEBYTECODE": "1"}, preexec_fn=full_disk)
    assert proc.returncode == 8, (proc.returncode, proc.stderr[-2000:])
    out = proc.stdout + proc.stderr
    assert "stopped: audit log write failed" in out and "Traceback" not in out, out[-2000:]
    assert "make room for the audit log" in out and "incident-notify resume INC-" in out
    received = set(sms_to(sandbox)) | set(mail_to(sandbox))
    assert 0 < len(received) < 2 * people, "the disk must fill mid fan-out"
    # The write that did not fit took its partial bytes back: the log ends at a whole
    # record and verifies, rather than reading as torn until the next append.
    assert audit.read_bytes().endswith(b"\n")
    verified = run_cli("audit", "verify", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    from incident_notify.audit import AuditLog

    attempted = {r.recipient for r in AuditLog(audit).records(event_prefix="delivery.attempt")}
    assert received <= attempted, "a message went out with no durable attempt record"

    status = json_doc(run_cli("status", "--json", env=env))
    incident = status["data"]["incidents"][0]["id"]
    resumed = run_cli("resume", incident, "--yes", "--sandbox", "--json", env=env)
    assert resumed.returncode in (0, 5), resumed.stderr
    in_doubt = {d["recipient"] for d in json_doc(resumed)["data"]["in_doubt"]}
    sms, mail = sms_to(sandbox), mail_to(sandbox)
    assert set(sms.values()) <= {1} and set(mail.values()) <= {1}
    assert set(sms) == {f"+1202555{i:04d}" for i in range(people)}
    assert {f"person{i}@example.com" for i in range(people)} - set(mail) <= in_doubt
    assert run_cli("audit", "verify", env=env).returncode == 0
    assert not list(tmp_path.glob("audit.jsonl.torn-*")), "no torn tail to recover"
