"""What must stop a send before anything leaves, what a free-text update must carry, and
`drill` on every shipped playbook with each provider out: exit 0 only when everyone was
reached, and the summary equal to what the emulators received."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from incident_notify.drill import run_drill
from incident_notify.errors import ContactsError, PlaybookError, StateError
from incident_notify.lifecycle import declare, reopen, resolve, update
from tests.conftest import (
    PLAYBOOKS,
    json_doc,
    make_fanout_playbook,
    run_cli,
    sandbox_runtime,
)


def runtime(tmp_path: Path, sandbox: Any) -> Any:
    return sandbox_runtime(tmp_path, sandbox)


def received_total(sandbox: Any) -> int:
    return sum(len(e.received) for e in sandbox.emulators.values())


# ------------------------------------------------------------------ drill
@pytest.mark.parametrize("playbook", sorted(p.name for p in PLAYBOOKS.glob("*.yaml")))
@pytest.mark.parametrize("outage", [None, "twitter", "twilio", "smtp"])
def test_drill_of_every_shipped_playbook_passes_with_any_one_provider_out(
        tmp_path: Path, playbook: str, outage: str | None) -> None:
    report = run_drill(PLAYBOOKS / playbook, {}, audit_log=tmp_path / "drill.jsonl",
                       outage=[outage] if outage else None)
    results = [s.outcome.result_dict() for s in report.steps]
    assert report.ok, [(s.stage, r and r["failures"]) for s, r in zip(report.steps, results,
                                                                     strict=True)]
    # The counts equal what the emulators received: every sent delivery arrived once.
    sent = sum(r["totals"]["sent"] for r in results if r)
    arrived = sum(len(p["received"]) for p in report.recipients) + len(report.public)
    assert sent == arrived
    assert all(r and r["people"]["not_reached"] == 0 for r in results)
    if outage == "twitter":
        assert report.public == []


def test_drill_cli_exit_code_is_the_first_failing_steps(tmp_path: Path) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 2)
    # The team on email only, and email without a fallback: nobody can be reached.
    pb.write_text(pb.read_text().replace("channels: [team_sms, team_email]",
                                         "channels: [team_email]"))
    proc = run_cli("drill", str(pb), "--outage", "smtp", "--json")
    doc = json_doc(proc)
    assert proc.returncode == 6 and doc["exit_code"] == 6 and not doc["data"]["ok"]
    failures = doc["data"]["steps"][0]["result"]["failures"]
    assert failures and failures[0]["tried"][0]["channel"] == "team_email"


# ------------------------------------------------------------------ refused before sending
def test_contacts_that_fail_to_load_stop_the_send(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    (tmp_path / "pb" / "people.csv").unlink()
    rt = runtime(tmp_path, sandbox)
    with pytest.raises(ContactsError) as info:
        declare(rt, pb, {"site": "LON-2"})
    assert any("people.csv" in str(p) for p in info.value.problems)
    assert received_total(sandbox) == 0
    assert list(rt.audit.records()) == []


def test_broken_contacts_cli_exit_4_nothing_sent(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    people = tmp_path / "pb" / "people.csv"
    people.write_text(people.read_text() + "p9,Broken,not-an-email,+1202,,sms,team,\n")
    sandbox.write_state()
    proc = run_cli("declare", str(pb), "--set", "site=LON-2", "--yes", "--sandbox",
                   env={"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "a.jsonl")})
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "people.csv:" in proc.stderr and "Traceback" not in proc.stderr
    assert received_total(sandbox) == 0


@pytest.mark.parametrize("breakage", ["missing", "invalid-row"])
def test_resuming_an_update_a_crash_left_unplanned_refuses_contacts_that_fail_to_load(
        tmp_path: Path, sandbox: Any, breakage: str) -> None:
    """A declare stopped after recording the incident and before its plan (the disk
    filled, a kill) leaves an update that `resume` plans. It planned from whatever the
    contacts were by then, unchecked: with the contacts file gone, "Everyone was reached:
    0 recipient(s)", exit 0, and nobody told; with a row broken, that person silently
    left out. Planning in resume refuses them as a declare does (exit 4, nothing sent),
    and once the file is fixed, resume reaches everyone once."""
    import resource
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT, mail_to, sms_to

    people = 200
    pb = make_fanout_playbook(tmp_path / "pb", people)
    csv = tmp_path / "pb" / "people.csv"
    good = csv.read_text()
    sandbox.write_state()
    audit = tmp_path / "audit.jsonl"
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(audit)}

    def room_for_the_declaration_only() -> None:  # (the plan of 200 people is ~80 kB)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    import os

    stopped = subprocess.run(
        [sys.executable, "-m", "incident_notify", "declare", str(pb), "--set", "site=LON-2",
         "--yes", "--sandbox"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        # (Under the limit, Python would leave a cut-short .pyc for the next import.)
        env={**os.environ, **env, "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=room_for_the_declaration_only)
    assert stopped.returncode == 8, stopped.stderr
    [incident] = json_doc(run_cli("status", "--json", env=env))["data"]["incidents"]
    assert incident["pending"] == 0 and received_total(sandbox) == 0  # (nothing planned)
    if breakage == "missing":
        csv.unlink()
    else:
        csv.write_text(good.replace("person7@example.com", "person7-example.com"))
    refused = run_cli("resume", incident["id"], "--yes", "--sandbox", env=env)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "nothing was sent" in refused.stderr and "people.csv" in refused.stderr
    assert received_total(sandbox) == 0
    csv.write_text(good)
    resumed = run_cli("resume", incident["id"], "--yes", "--sandbox", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert len(sms_to(sandbox)) == people and set(sms_to(sandbox).values()) == {1}
    assert len(mail_to(sandbox)) == people and set(mail_to(sandbox).values()) == {1}


def test_internal_audience_of_nobody_stops_the_send(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 3)
    text = pb.read_text().replace("select: {groups: [team]}", "select: {groups: [tema]}")
    pb.write_text(text)
    with pytest.raises(ContactsError) as info:
        declare(runtime(tmp_path, sandbox), pb, {"site": "LON-2"})
    assert "selects nobody" in str(info.value)
    assert received_total(sandbox) == 0


def test_a_customer_audience_of_nobody_stops_the_send_too(tmp_path: Path, sandbox: Any) -> None:
    """A customer audience whose tag no contact carries (a typo in a playbook change, or a
    contacts export that lost the column's values): the send went ahead and said
    "Everyone was reached: 6 recipient(s)", exit 0, with no customer told. Refused like an
    internal audience of nobody, naming the playbook line."""
    pb = PLAYBOOKS / "dc-power-failure.yaml"
    copy = tmp_path / "pb" / "power.yaml"
    shutil.copytree(PLAYBOOKS / "contacts", tmp_path / "pb" / "contacts")
    shutil.copytree(PLAYBOOKS.parent / "templates", tmp_path / "templates")
    copy.write_text(pb.read_text().replace("select: {tags: [customer]}",
                                           "select: {tags: [customerz]}"))
    sandbox.write_state()
    proc = run_cli("declare", str(copy), "--set", "site=LON-2", "--set", "services=compute",
                   "--set", "status_url=https://status.acme.example/i/1", "--yes", "--sandbox",
                   env={"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "a.jsonl")})
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert f"{copy}:" in proc.stderr and "'customers' selects nobody" in proc.stderr
    assert "Traceback" not in proc.stderr and received_total(sandbox) == 0


def test_a_contacts_folder_is_read_whatever_the_suffixes_case_and_one_of_nobody_stops_the_send(
        tmp_path: Path, sandbox: Any) -> None:
    """Contact sources may be folders. A spreadsheet's export saved in one as
    `Accounts.CSV` was skipped (only lower-case suffixes were read): its customers were
    never told and, with other customers told, the send said "Everyone was reached", exit
    0. A folder named that holds no contact file at all (the export not copied yet) was
    passed over just as silently, by `contacts check` (exit 0) as by a send."""
    pb = PLAYBOOKS / "dc-power-failure.yaml"
    root = tmp_path / "pb"
    shutil.copytree(PLAYBOOKS / "contacts", root / "contacts")
    shutil.copytree(PLAYBOOKS.parent / "templates", tmp_path / "templates")
    (root / "contacts" / "enterprise").mkdir()
    (root / "contacts" / "enterprise" / "Accounts.CSV").write_text(
        "id,name,email,channels,tags\n"
        "ent-1,Ent One,one@enterprise.example.org,email,customer\n"
        "ent-2,Ent Two,two@enterprise.example.org,email,customer\n")
    copy = root / "power.yaml"
    copy.write_text(pb.read_text().replace(
        "  - contacts/customers.csv\n",
        "  - contacts/customers.csv\n  - contacts/enterprise\n"))
    sandbox.write_state()
    args = ["--set", "site=LON-2", "--set", "services=compute",
            "--set", "status_url=https://status.acme.example/i/1", "--yes", "--sandbox"]
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "a.jsonl")}
    sent = run_cli("declare", str(copy), *args, env=env)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    mailed = {to for r in sandbox.emulators["smtp"].received for to in r["rcpt_tos"]}
    assert {"one@enterprise.example.org", "two@enterprise.example.org"} <= mailed

    sandbox.reset()
    (root / "contacts" / "partners").mkdir()
    (root / "contacts" / "partners" / "README.md").write_text("exports go here\n")
    copy.write_text(copy.read_text().replace(
        "  - contacts/enterprise\n", "  - contacts/enterprise\n  - contacts/partners\n"))
    refused = run_cli("declare", str(copy), *args, env=env)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "contacts/partners: is a directory holding no contact files" in refused.stderr
    assert "Traceback" not in refused.stderr and received_total(sandbox) == 0
    checked = run_cli("contacts", "check", str(copy))
    assert checked.returncode == 4 and "contacts/partners: is a directory" in checked.stdout

@pytest.mark.parametrize("value", ["", "   "])
def test_blank_variable_is_refused_like_a_missing_one(tmp_path: Path, value: str) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1)
    proc = run_cli("preview", str(pb), "--set", f"site={value}")
    assert proc.returncode == 3
    assert "required variable 'site' is empty" in proc.stderr


@pytest.mark.parametrize(("value", "named"), [
    ("LON\x1b[31m-2", "U+001B (ESCAPE) at character 4"),   # a terminal's colour code
    ("LON-2\r", "U+000D (CARRIAGE RETURN) at character 6"),  # a Windows line end
    ("LON\u202e2-", "U+202E (RIGHT-TO-LEFT OVERRIDE) at character 4"),  # shows reversed
])
def test_an_invisible_pasted_character_is_refused_before_anything_is_sent(
        tmp_path: Path, sandbox: Any, value: str, named: str) -> None:
    """A value or a --message pasted with a control character or a bidirectional override
    would go out as it is (an escape sequence in a tweet, text that reads backwards in
    the customers' SMS), though a preview shows nothing wrong."""
    pb = make_fanout_playbook(tmp_path / "pb", 2)
    sandbox.write_state()
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    proc = run_cli("declare", str(pb), "--set", f"site={value}", "--yes", "--sandbox", env=env)
    assert proc.returncode == 3 and named in proc.stderr, proc.stderr
    assert "variable 'site' holds an invisible character" in proc.stderr
    proc = run_cli("declare", str(pb), "--set", "site=LON-2", "--message", f"Power {value}",
                   "--yes", "--sandbox", env=env)
    assert proc.returncode == 2 and "--message holds an invisible character" in proc.stderr
    assert received_total(sandbox) == 0
    fine = run_cli("preview", str(pb), "--set", "site=LON-2", "--message",
                   "Generators on.\n\tStorage next; مركز البيانات")
    assert fine.returncode == 0, fine.stderr  # line breaks, tabs, right-to-left text: fine


def test_stray_variable_in_the_environment_is_an_error(tmp_path: Path) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1)
    proc = run_cli("preview", str(pb), "--set", "site=LON-2",
                   env={"INCIDENT_NOTIFY_VAR_STIE": "LON-2"})
    assert proc.returncode == 3 and "INCIDENT_NOTIFY_VAR_STIE" in proc.stderr


# ------------------------------------------------------------------ free text and duplicates
def test_message_right_after_declare_reaches_every_channel_without_duplicates(
        tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 2, twitter=True, subscribers=1)
    # Templates that ignore {{ message }} on SMS and Twitter.
    pb.write_text(pb.read_text().replace(" {{ message }}\"", "\""))
    rt = runtime(tmp_path, sandbox)
    first = declare(rt, pb, {"site": "LON-2"})
    assert first.exit_code == 0
    words = "Generators are on; storage is back."
    second = update(rt, first.incident_id, stage=None, sets={}, message=words)
    assert second.exit_code == 0, second.to_dict()["result"]
    tweets = [r for r in sandbox.twitter.received.all() if r["kind"] == "tweet"]
    assert len(tweets) == 2 and words in tweets[1]["text"]
    texts = [r["body"] for r in sandbox.twilio.received.all()]
    assert sum(words in t for t in texts) == 2, "the words reach every SMS recipient"
    mails = [r["raw"] for r in sandbox.smtp.received.all()]
    assert sum(words in m for m in mails) == 2


def test_identical_tweet_is_refused_before_sending(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=1)
    rt = runtime(tmp_path, sandbox)
    first = declare(rt, pb, {"site": "LON-2"})
    resolve(rt, first.incident_id, sets={})
    before = received_total(sandbox)
    with pytest.raises(StateError) as info:
        reopen(rt, first.incident_id, sets={})
    assert "identical" in info.value.message and "--message" in info.value.hint
    assert received_total(sandbox) == before
    again = reopen(rt, first.incident_id, sets={}, message="Power failed again at 14:02.")
    assert again.exit_code == 0


def test_empty_value_never_renders_a_blank(tmp_path: Path, sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1)
    from incident_notify.messages import collect_variables
    from incident_notify.playbook import load_playbook

    with pytest.raises(PlaybookError):
        collect_variables(load_playbook(pb), ["site="])
