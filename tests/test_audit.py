"""The audit log: tamper evidence, concurrency, torn tails, redaction, CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from incident_notify.audit import FIELDS, AuditEntry, AuditLog, GroupCommitWriter
from incident_notify.exit_codes import ExitCode
from incident_notify.incident import apply
from tests.conftest import ROOT, json_doc, run_cli


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    audit = AuditLog(tmp_path / "audit.jsonl", actor="tester@host")
    for i in range(20):
        audit.append("delivery.sent", incident=f"INC-{i % 2}", channel="sms",
                     recipient=f"+1202555{i:04d}", key=f"k{i}",
                     payload={"provider_id": f"SM{i}", "text": f"message number {i}"})
    return audit


def lines(audit: AuditLog) -> list[bytes]:
    return audit.path.read_bytes().splitlines(keepends=True)


def write(audit: AuditLog, content: list[bytes]) -> None:
    audit.path.write_bytes(b"".join(content))


def test_a_real_log_verifies(log: AuditLog) -> None:
    result = log.verify()
    assert result.ok and result.records == 20 and result.head
    assert [r.seq for r in log.records()] == list(range(1, 21))


@pytest.mark.parametrize("needle", [b"message number 9", b'"hash":"', b'"prev":"',
                                    b'"seq":10', b'"ts":"20', b'"actor":"'])
def test_changing_one_byte_fails_naming_the_line(log: AuditLog, needle: bytes) -> None:
    content = lines(log)
    line = bytearray(content[9])
    at = line.index(needle) + len(needle) - 1
    line[at] = ord("7") if line[at] != ord("7") else ord("8")
    content[9] = bytes(line)
    write(log, content)
    result = log.verify()
    assert not result.ok and result.first_bad_line == 10, result


def test_invalid_utf8_is_reported(log: AuditLog) -> None:
    content = lines(log)
    content[4] = content[4].replace(b"message", b"m\xffssage")
    write(log, content)
    result = log.verify()
    assert not result.ok and result.first_bad_line == 5


@pytest.mark.parametrize("index", [0, 7, 18])
def test_deleting_a_record_fails(log: AuditLog, index: int) -> None:
    content = lines(log)
    del content[index]
    write(log, content)
    result = log.verify()
    assert not result.ok and result.first_bad_line == index + 1


def test_deleting_the_last_record_is_caught_by_the_head(log: AuditLog) -> None:
    write(log, lines(log)[:-1])
    result = log.verify()
    assert not result.ok and "removed" in (result.problem or "")


def test_reordering_fails(log: AuditLog) -> None:
    content = lines(log)
    content[5], content[6] = content[6], content[5]
    write(log, content)
    result = log.verify()
    assert not result.ok and result.first_bad_line == 6


def test_two_processes_appending_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    code = ("import sys; from pathlib import Path; from incident_notify.audit import AuditLog;"
            "log = AuditLog(Path(sys.argv[1]), actor=sys.argv[2])\n"
            "for i in range(300): log.append('delivery.sent', key=f'{sys.argv[2]}-{i}',"
            " payload={'provider_id': f'SM{i}'})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), name], cwd=ROOT)
             for name in ("a", "b")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    log = AuditLog(path)
    result = log.verify()
    assert result.ok and result.records == 600
    assert [r.seq for r in log.records()] == list(range(1, 601))


def test_torn_tail_is_reported_then_preserved_and_recorded(log: AuditLog) -> None:
    torn = b'{"schema":1,"seq":21,"ts":"2026-11-22T0'
    with open(log.path, "ab") as f:
        f.write(torn)
    result = log.verify()
    assert not result.ok and result.torn_tail and result.first_bad_line == 21
    assert len(list(log.records())) == 20  # readers skip the incomplete line
    log.append("incident.updated", incident="INC-0",
               payload={"stage": "identified", "update_no": 2, "variables": {},
                        "message": ""})
    sidecars = list(log.path.parent.glob("audit.jsonl.torn-*"))
    assert len(sidecars) == 1 and sidecars[0].read_bytes() == torn
    recovered = [r for r in log.records() if r.event == "audit.torn_tail_recovered"]
    assert recovered and recovered[0].payload["bytes"] == len(torn)
    assert log.verify().ok


def test_redaction_with_a_keyed_hash(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "r.jsonl", redact_key=b"secret-key")
    record = audit.append("delivery.failed", recipient="carol@example.org",
                          payload={"error": "550 carol@example.org: mailbox unavailable"})
    assert record.recipient and record.recipient.startswith("hmac-sha256:")
    assert record.recipient in record.payload["error"]
    assert b"carol@example.org" not in audit.path.read_bytes()
    again = AuditLog(tmp_path / "r2.jsonl", redact_key=b"secret-key")
    assert again.append("delivery.failed", recipient="carol@example.org").recipient == \
        record.recipient


def test_records_after_a_commands_own_writes_or_none_when_another_wrote_between(
        tmp_path: Path) -> None:
    """After sending, a command folds only what was appended after its own writes onto
    the state it holds. That holds only if nobody else recorded anything of the incident
    between the fold it started from and its last write: any such record, even one
    written by another process (another AuditLog on the same file), gives None, and the
    caller folds the whole incident."""
    from incident_notify.incident import fold

    def scenario(foreign: bool) -> tuple[Any, Any]:
        path = tmp_path / f"after-{foreign}.jsonl"
        log, other = AuditLog(path), AuditLog(path)
        log.append("incident.declared", incident="INC-1",
                   payload={"stage": "investigating", "variables": {}, "message": "",
                            "playbook": "p.yaml", "update_no": 1})
        log.append("incident.declared", incident="INC-2",
                   payload={"stage": "investigating", "variables": {}, "message": "",
                            "playbook": "p.yaml", "update_no": 1})
        before = log.size()
        state = fold(log.records(incident="INC-1"), "INC-1")
        other.append("delivery.skipped", incident="INC-2", key="b",
                     payload={"reason": "another incident's record: no matter"})
        if foreign:
            other.append("delivery.skipped", incident="INC-1", key="x",
                         payload={"reason": "written by someone else meanwhile"})
        spans: list[tuple[int, int]] = []
        for rec in log.append_many([AuditEntry(
                "delivery.planned", incident="INC-1", channel="sms", recipient="+1555",
                key=f"k{i}", payload={"update_no": 1, "part": 1, "parts": 1})
                for i in range(3)], spans=spans):
            apply(state, rec)
        other.append("delivery.attempt", incident="INC-1", channel="sms", key="k0",
                     payload={"attempt": 1})
        log.append("delivery.sent", incident="INC-1", channel="sms", key="k0",
                   payload={"provider_id": "SM1"})
        return log.records_after("INC-1", before, spans), (log, state)

    tail, (log, state) = scenario(foreign=False)
    assert tail is not None
    records = list(tail)
    assert [r.event for r in records] == ["delivery.attempt", "delivery.sent"]
    for rec in records:
        apply(state, rec)
    assert state == fold(log.records(incident="INC-1"), "INC-1")
    tail, _ = scenario(foreign=True)
    assert tail is None, "a record of the incident written by another between was missed"


def test_group_commit_from_many_threads(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "g.jsonl")
    writer = GroupCommitWriter(audit)

    def work(n: int) -> None:
        for i in range(200):
            writer.append("delivery.attempt", key=f"{n}-{i}", payload={"attempt": 1})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    result = audit.verify()
    assert result.ok and result.records == 1600
    assert len({r.key for r in audit.records()}) == 1600


def test_ctrl_c_while_waiting_on_a_group_commit_strands_no_other_writer(
        tmp_path: Path) -> None:
    """A finished write wakes only its own writers and the first still queued, to lead the
    next one. When that first one is the main thread and Ctrl-C interrupts its wait, the
    turn passes on: the thread queued behind it still gets its record written (a stranded
    turn hung sending threads forever), and the interrupted entry is withdrawn unwritten.
    (On a loaded machine the main thread can be too late to notice the signal while it
    waits; such a run checks only that nobody is stranded, and the scenario runs again.)"""
    # Each run in a fresh interpreter, whose main thread runs it with Python's own Ctrl-C
    # handler: a test runner's worker may ignore SIGINT (a child inherits that) or run the
    # test in another thread (a signal's handler runs in the main thread only).
    outcomes: list[str] = []
    for run in range(5):
        done = subprocess.run(
            [sys.executable, "-c", "import signal, sys; from pathlib import Path; "
             "signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from tests.test_audit import _interrupt_a_waiting_main_thread as run; "
             "print(run(Path(sys.argv[1])))", str(tmp_path / f"g{run}.jsonl")],
            cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr
        outcomes.append(done.stdout.strip())
        if outcomes[-1] == "withdrawn":
            break
    assert outcomes[-1] == "withdrawn", outcomes


def _interrupt_a_waiting_main_thread(path: Path) -> str:
    """One run: "withdrawn" when SIGINT interrupted the main thread's wait and its entry
    was withdrawn, "late" when the main thread's entry was written first."""
    import signal
    import time

    release = threading.Event()

    class SlowDisk(AuditLog):  # a write that stalls until released (a slow disk)
        def append_many(self, entries):  # type: ignore[no-untyped-def]
            if entries[0].key == "first":
                release.wait(10)
            return super().append_many(entries)

    audit = SlowDisk(path)
    writer = GroupCommitWriter(audit)
    leader = threading.Thread(target=writer.append, args=("delivery.attempt",),
                              kwargs={"key": "first", "payload": {"attempt": 1}}, daemon=True)
    leader.start()
    while not writer._writing:
        time.sleep(0.005)
    behind = threading.Thread(target=writer.append, args=("delivery.attempt",),
                              kwargs={"key": "behind", "payload": {"attempt": 1}}, daemon=True)

    def interrupt_then_release() -> None:
        while not writer._pending:  # the main thread queues first, then `behind`
            time.sleep(0.005)
        behind.start()
        while len(writer._pending) < 2:
            time.sleep(0.005)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        # The slow write ends once the interrupted entry is withdrawn, or after 5 s.
        until = time.monotonic() + 5
        while len(writer._pending) > 1 and time.monotonic() < until:
            time.sleep(0.005)
        release.set()

    helper = threading.Thread(target=interrupt_then_release, daemon=True)
    helper.start()
    try:
        writer.append("delivery.attempt", key="main", payload={"attempt": 1})
    except KeyboardInterrupt:
        pass
    for thread in (helper, leader, behind):
        while True:
            try:
                thread.join(10)
                break
            except KeyboardInterrupt:  # (the signal, noticed late)
                pass
    assert not behind.is_alive(), "the thread queued behind the interrupted one was stranded"
    keys = [r.key for r in audit.records()]
    assert audit.verify().ok
    if "main" in keys:
        assert sorted(keys) == ["behind", "first", "main"]
        return "late"
    assert keys == ["first", "behind"]
    return "withdrawn"


def test_cli_verify_ok_and_tampered(log: AuditLog) -> None:
    ok = run_cli("audit", "verify", "--audit-log", str(log.path))
    assert ok.returncode == 0 and "OK: 20 records" in ok.stdout
    content = lines(log)
    content[11] = content[11].replace(b"SM11", b"SM99")
    write(log, content)
    bad = run_cli("audit", "verify", "--audit-log", str(log.path))
    assert bad.returncode == 8
    assert f"TAMPERED: {log.path}:12:" in bad.stderr and "Traceback" not in bad.stderr
    doc = json_doc(run_cli("audit", "verify", "--audit-log", str(log.path), "--json"))
    assert doc["exit_code"] == 8 and doc["data"]["first_bad_line"] == 12


@pytest.mark.parametrize(("option", "typo", "code", "said"), [
    ("--channel", "smss", 9, "no record of channel 'smss'"),
    ("--status", "sentt", 2, "no delivery status 'sentt'"),
    ("--event", "delivery.sentt", 2, "no event starts with 'delivery.sentt'"),
])
def test_a_mistyped_filter_is_said_not_shown_as_nothing(
        log: AuditLog, option: str, typo: str, code: int, said: str) -> None:
    """`audit show --channel team_smss` printed an empty table, exit 0: as if nothing had
    gone out on the team's SMS. A filter that cannot match is now said, with the likely
    name; a filter that matches nothing now (a status no delivery has yet) still shows
    an empty table."""
    for command in ("show", "export"):
        typo_run = run_cli("audit", command, "--audit-log", str(log.path), option, typo)
        assert typo_run.returncode == code and said in typo_run.stderr, typo_run.stderr
        assert "did you mean" in typo_run.stderr and typo_run.stdout == ""
    empty = run_cli("audit", "show", "--audit-log", str(log.path), "--status", "failed")
    assert empty.returncode == 0 and empty.stderr == ""


def test_cli_show_and_export(log: AuditLog, tmp_path: Path) -> None:
    doc = json_doc(run_cli("audit", "show", "--audit-log", str(log.path), "--incident",
                           "INC-1", "--json"))
    assert set(doc) == {"schema", "command", "ok", "exit_code", "data", "errors"}
    records = doc["data"]["records"]
    assert len(records) == 10 and {r["incident"] for r in records} == {"INC-1"}
    assert json_doc(run_cli("audit", "show", "--audit-log", str(log.path), "--status",
                            "failed", "--json"))["data"]["records"] == []
    # A mistyped incident id is not an incident with nothing to show.
    for command in ("show", "export"):
        typo = run_cli("audit", command, "--audit-log", str(log.path), "--incident", "INC-7")
        assert typo.returncode == 9 and "no incident 'INC-7'" in typo.stderr, command
    out = tmp_path / "export.csv"
    proc = run_cli("audit", "export", "--audit-log", str(log.path), "--format", "csv",
                   "-o", str(out))
    assert proc.returncode == 0
    rows = list(csv.reader(out.open()))
    assert tuple(rows[0]) == FIELDS and len(rows) == 21
    assert json.loads(rows[1][FIELDS.index("payload")])["provider_id"] == "SM0"
    jsonl = run_cli("audit", "export", "--audit-log", str(log.path), "--format", "jsonl")
    assert len(jsonl.stdout.splitlines()) == 20


# ------------------------------------------------------------------ forging and redirecting
def forge(audit: AuditLog, event: str, payload: dict[str, object]) -> None:
    """What an attacker with write access to the log (not the head) can do: append a
    record with a correct seq, prev and recomputed hash."""
    from incident_notify.audit import canonical, record_hash

    last = json.loads(lines(audit)[-1])
    fields = {"schema": 1, "seq": last["seq"] + 1, "ts": last["ts"], "actor": "mallory@x",
              "incident": last["incident"], "event": event, "channel": None,
              "recipient": None, "key": None, "payload": payload, "prev": last["hash"]}
    fields["hash"] = record_hash(fields)
    with open(audit.path, "ab") as handle:
        handle.write(canonical(fields) + b"\n")


def test_forged_appended_records_are_caught_by_the_head(log: AuditLog) -> None:
    forge(log, "incident.resolved", {"stage": "resolved", "update_no": 9, "variables": {},
                                     "message": "all good"})
    result = AuditLog(log.path).verify()
    assert not result.ok and "after the head" in (result.problem or "")


def test_deleted_log_with_its_head_kept_fails(log: AuditLog) -> None:
    log.close()
    log.path.unlink()
    result = AuditLog(log.path).verify()
    assert not result.ok and "missing" in (result.problem or "")


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"seq": "x", "hash": 1}'])
def test_missing_or_corrupt_head_fails(log: AuditLog, content: bytes) -> None:
    log.close()
    log.head_path.write_bytes(content)
    result = AuditLog(log.path).verify()
    assert not result.ok and "head" in (result.problem or "")


def test_expect_an_externally_kept_head(log: AuditLog) -> None:
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(log.path)}
    head = json_doc(run_cli("audit", "head", "--json", env=env))["data"]
    assert head["records"] == len(lines(log)) and len(head["head"]) == 64
    assert run_cli("audit", "verify", "--expect", head["head"], env=env).returncode == 0
    assert run_cli("audit", "verify", "--expect", head["head"][:12], env=env).returncode == 0
    log.append("optout.added", payload={"contact_id": "c1", "reason": "test"})
    moved = run_cli("audit", "verify", "--expect", head["head"], env=env)
    assert moved.returncode == 8 and "expected" in moved.stderr
    assert run_cli("audit", "verify", "--expect", "nothex", env=env).returncode == 2


def test_a_symlinked_log_or_head_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "a" / "audit.jsonl"
    target.parent.mkdir()
    target.symlink_to(victim)
    from incident_notify.errors import AuditError

    with pytest.raises(AuditError, match="symbolic link"):
        AuditLog(target).append("optout.added", payload={"contact_id": "c", "reason": "r"})
    real = tmp_path / "b" / "audit.jsonl"
    real.parent.mkdir()
    Path(str(real) + ".head").symlink_to(victim)
    AuditLog(real).append("optout.added", payload={"contact_id": "c", "reason": "r"})
    assert victim.read_text() == "precious\n"
    assert not AuditLog(real).verify().ok  # no head could be written: reported
    assert oct(real.stat().st_mode & 0o777) == "0o600"


def test_well_chained_malformed_payload_fails_verify_and_readers_refuse(
        log: AuditLog) -> None:
    # INC-1 is an open incident, so every reader below reads its records.
    log.append("incident.declared", incident="INC-1", payload={
        "playbook": "p.yaml", "stage": "investigating", "update_no": 1, "variables": {},
        "message": ""})
    forge(log, "message.rendered", {"digest": 5, "parts": "x"})
    log.close()
    result = AuditLog(log.path).verify()
    assert not result.ok and "malformed" in (result.problem or "")
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(log.path)}
    for args in (["status"], ["timeline", "INC-1"], ["resume", "INC-1", "--yes"]):
        proc = run_cli(*args, env=env)
        assert proc.returncode == 8, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and "malformed" in proc.stderr


@pytest.mark.parametrize("planted", ["log", "head"])
def test_a_fifo_planted_as_the_log_or_head_never_hangs(tmp_path: Path, planted: str) -> None:
    import os

    path = tmp_path / "audit.jsonl"
    if planted == "log":
        os.mkfifo(path)
    else:
        AuditLog(path).append("optout.added", payload={"contact_id": "c", "reason": "r"})
        Path(str(path) + ".head").unlink()
        os.mkfifo(str(path) + ".head")
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(path)}
    for args in (["audit", "verify"], ["status"], ["audit", "show"]):
        proc = run_cli(*args, env=env, timeout=20)
        # A bad log stops every reader; a bad head fails only verify (readers do not use it).
        expected = 8 if planted == "log" or args[-1] == "verify" else 0
        assert proc.returncode == expected, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_event_prefilter_returns_exactly_what_parsing_would(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("incident.declared", incident="INC-1",
               payload={"stage": "s", "update_no": 1, "variables": {}, "message": "",
                        "playbook": "p.yaml"})
    # Look-alikes: the event's text inside a payload (a string, and a nested key).
    log.append("optout.added", incident="INC-1",
               payload={"contact_id": "c", "reason": '"event":"incident.declared"',
                        "nested": {"event": "incident.declared"}})
    log.append("delivery.failed", incident="INC-2", payload={"error": "incident.declared"})
    found = [r.event for r in log.records(event_prefix="incident.declared")]
    everything = [r.event for r in log.records() if r.event.startswith("incident.declared")]
    assert found == everything == ["incident.declared"]
    assert [r.incident for r in log.records(incident="INC-1")] == ["INC-1", "INC-1"]


def test_the_line_hash_is_the_record_hash(tmp_path: Path) -> None:
    """verify hashes the line's bytes without its hash member: the same digest the writer
    computed from the record, whatever the record holds (unicode, nulls, a nested "hash",
    an actor or channel that spells the member after the hash). The writer encodes each
    record once and puts the hash in: each line is still the canonical JSON of its
    record."""
    from incident_notify.audit import AuditEntry, AuditLog, _line_hash, canonical, record_hash

    log = AuditLog(tmp_path / "a.jsonl", actor='ops "x",\\"incident":"INC-9"')
    log.append_many([
        AuditEntry("delivery.failed", incident="INC-1", channel=',"incident":"x\\',
                   payload={"error": "e"}),
        AuditEntry("incident.declared", incident="INC-1", payload={
            "playbook": "p", "stage": "s", "update_no": 1, "variables": {"ü": "東京"},
            "message": 'quote " and ,"hash":"x'}),
        AuditEntry("delivery.sent", incident=None, channel=None, key="k",
                   payload={"provider_id": "x", "hash": "nested"}),
        AuditEntry("optout.added", payload={"contact_id": "a\nb"}),
    ])
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 4
    for line in lines:
        assert line == canonical(json.loads(line)) + b"\n"
        assert _line_hash(line) == record_hash(json.loads(line))
    assert json.loads(lines[0])["channel"] == ',"incident":"x\\'
    assert log.verify().ok
    assert _line_hash(lines[0].replace(b'"hash":"', b'"hasH":"')) is None


def test_incremental_verify_reads_only_what_was_appended(log: AuditLog) -> None:
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(log.path)}
    full = json_doc(run_cli("audit", "verify", "--json", env=env))["data"]
    assert full["ok"] and full["records"] == 20 and full["checked"] == 20
    for i in range(5):
        log.append("delivery.sent", incident="INC-9", key=f"n{i}", payload={"provider_id": "x"})
    quick = run_cli("audit", "verify", "--incremental", "--json", env=env)
    data = json_doc(quick)["data"]
    assert quick.returncode == 0 and data["records"] == 25 and data["checked"] == 5
    # Nothing new: nothing read past the checkpoint, still the whole count.
    again = json_doc(run_cli("audit", "verify", "--incremental", "--json", env=env))["data"]
    assert again["ok"] and again["records"] == 25 and again["checked"] == 0
    # A record appended after the checkpoint and then altered is caught.
    log.append("delivery.sent", incident="INC-9", key="late", payload={"provider_id": "y"})
    content = lines(log)
    content[-1] = content[-1].replace(b'"provider_id":"y"', b'"provider_id":"z"')
    write(log, content)
    bad = run_cli("audit", "verify", "--incremental", env=env)
    assert bad.returncode == ExitCode.AUDIT_INVALID and ":26:" in bad.stderr


def test_incremental_verify_notices_the_checkpoint_record_rewritten(log: AuditLog) -> None:
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(log.path)}
    assert run_cli("audit", "verify", env=env).returncode == 0
    content = lines(log)
    content[-1] = content[-1].replace(b"message number 19", b"message number 91")
    write(log, content)
    proc = run_cli("audit", "verify", "--incremental", env=env)
    assert proc.returncode == ExitCode.AUDIT_INVALID
    assert "not the verified head" in proc.stderr
    # Without a usable checkpoint the whole log is checked (and the change found).
    log.checkpoint_path.write_text("not json")
    proc = run_cli("audit", "verify", "--incremental", env=env)
    assert proc.returncode == ExitCode.AUDIT_INVALID and "hash mismatch" in proc.stderr


def test_reading_some_incidents_returns_exactly_theirs(tmp_path: Path) -> None:
    """The byte pre-filter that lets `status` fold only open incidents never takes a
    look-alike (a longer id, a nested "incident" in a payload, no incident) for one."""
    log = AuditLog(tmp_path / "a.jsonl")
    log.append("optout.added", payload={"incident": "INC-1", "contact_id": "c"})
    for inc in ("INC-1", "INC-10", "INC-2", 'INC-"3'):
        log.append("delivery.sent", incident=inc, key=inc, payload={"provider_id": "x",
                                                                     "note": "INC-1"})
    got = [r.incident for r in log.records(incidents={"INC-1", 'INC-"3'})]
    assert got == ["INC-1", 'INC-"3']
    assert [r.incident for r in log.records(incidents=set())] == []


# ------------------------------------------------------------------ the index beside the log
def _history(audit: AuditLog, incidents: int, seed: int, day: str = "20261126") -> list[str]:
    """Interleaved incidents (two at a time, like concurrent commanders), some resolved,
    some reopened, records without an incident between them."""
    import random

    rng = random.Random(seed)
    ids = [f"INC-{day}-{n:04d}" for n in range(1, incidents + 1)]
    life = {"stage": "investigating", "update_no": 1, "variables": {}, "message": ""}
    for inc in ids:
        audit.append("incident.declared", incident=inc, payload={**life, "playbook": "x"})
    for _ in range(incidents * 6):
        inc = rng.choice(ids)
        event = rng.choice(["delivery.sent", "delivery.failed", "incident.updated",
                            "incident.resolved", "incident.reopened", "channel.circuit_open"])
        payload = {**life} if event.startswith("incident.") else \
            {"provider_id": f"p{rng.random()}"}
        audit.append(event, incident=inc, channel="team_sms", payload=payload)
        if rng.random() < 0.1:  # no incident, but its id in the payload: a look-alike
            audit.append("optout.added", payload={"incident": inc})
    return ids


def _through_both(audit: AuditLog, **filters: object) -> tuple[list[str], list[str]]:
    audit.use_index = True
    indexed = [r.hash for r in audit.records(**filters)]  # type: ignore[arg-type]
    audit.use_index = False
    scanned = [r.hash for r in audit.records(**filters)]  # type: ignore[arg-type]
    audit.use_index = True
    return indexed, scanned


def test_reading_through_the_index_gives_exactly_what_reading_the_log_gives(
        tmp_path: Path) -> None:
    from incident_notify.incident import list_incidents

    audit = AuditLog(tmp_path / "audit.jsonl")
    ids = _history(audit, 12, seed=5)
    for inc in ids[:4]:
        indexed, scanned = _through_both(audit, incident=inc)
        assert indexed == scanned and indexed
    indexed, scanned = _through_both(audit, incidents=set(ids[3:9]))
    assert indexed == scanned and len(indexed) > 20
    assert _through_both(audit, incident="INC-20261126-0999") == ([], [])
    folded = list_incidents(AuditLog(tmp_path / "audit.jsonl").records())
    lifecycle = audit.incident_ids()
    assert set(lifecycle) == set(folded)
    for inc, state in folded.items():
        assert (lifecycle[inc] == "incident.resolved") == (state.status == "resolved")
    open_now = {i for i, s in folded.items() if s.updates and s.status != "resolved"}
    assert AuditLog(tmp_path / "audit.jsonl").open_incidents() == open_now  # from the file
    assert audit.open_incidents() == open_now and 0 < len(open_now) < len(ids)
    assert sorted(audit.declared_ids()) == ids
    assert (tmp_path / "audit.jsonl.index").exists()


@pytest.mark.parametrize("damage", ["missing", "garbage", "stale", "truncated", "replaced",
                                    "wrong-runs", "garbled-entry"])
def test_an_index_that_does_not_match_the_log_is_never_believed(
        tmp_path: Path, damage: str) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    ids = _history(audit, 8, seed=7)
    audit.index()  # saved beside the log
    index_file = tmp_path / "audit.jsonl.index"
    assert index_file.exists()
    if damage == "missing":
        index_file.unlink()
    elif damage == "garbage":
        index_file.write_bytes(b"{not json")
    elif damage == "stale":
        _history(audit, 3, seed=8)  # more records after the index was saved
    elif damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2].rsplit(b"\n", 1)[0] + b"\n")
    elif damage == "replaced":
        path.unlink()
        (tmp_path / "audit.jsonl.head").unlink(missing_ok=True)
        _history(AuditLog(path), 10, seed=9, day="20261127")  # another, longer log
    elif damage == "wrong-runs":
        doc = json.loads(index_file.read_bytes())
        ea, eb = doc["incidents"][ids[0]], doc["incidents"][ids[1]]
        doc["incidents"][ids[0]], doc["incidents"][ids[1]] = ea[:3] + eb[3:], eb[:3] + ea[3:]
        index_file.write_text(json.dumps(doc))
    elif damage == "garbled-entry":
        doc = json.loads(index_file.read_bytes())
        doc["incidents"][ids[0]] = "z9:12-x"
        doc["incidents"][ids[1]] = [1, 2]
        index_file.write_text(json.dumps(doc))
    from incident_notify.incident import list_incidents

    folded = list_incidents(AuditLog(path).records())
    fresh = AuditLog(path)  # a new command: it reads the index file
    assert set(fresh.incident_ids()) == set(folded), damage
    assert AuditLog(path).open_incidents() == {  # (what `status` asks first)
        i for i, s in folded.items() if s.updates and s.status != "resolved"}, damage
    assert sorted(AuditLog(path).declared_ids()) == \
        sorted(i for i, s in folded.items() if s.declared_at), damage
    for inc in [*ids[:3], "INC-20261127-0001"]:
        indexed, scanned = _through_both(fresh, incident=inc)
        assert indexed == scanned, damage


def test_a_saved_index_spares_the_next_command_the_scan(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from incident_notify import audit_index

    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    _history(audit, 40, seed=11)
    total = len(lines(audit))
    AuditLog(path).index()  # the first reader builds and saves it
    audit.append("incident.updated", incident="INC-20261126-0001", payload={
        "stage": "identified", "update_no": 9, "variables": {}, "message": ""})
    scanned: list[int] = []
    original = audit_index.AuditIndex.add_line

    def counting(self: audit_index.AuditIndex, start: int, raw: bytes) -> None:
        scanned.append(start)
        original(self, start, raw)

    monkeypatch.setattr(audit_index.AuditIndex, "add_line", counting)
    fresh = AuditLog(path)
    records = list(fresh.records(incident="INC-20261126-0001"))
    assert records[-1].payload["update_no"] == 9
    assert len(scanned) == 1, f"{len(scanned)} of {total + 1} lines scanned"


def test_the_fast_payload_check_agrees_with_the_exact_one(tmp_path: Path) -> None:
    """record_problem's one-expression path answers exactly as the member-by-member loop on
    records with members of the wrong type, missing, or of a subclass, for every event."""
    import random

    from incident_notify.audit_schema import EVENTS, PAYLOAD_SCHEMA, _exact_problem, record_problem

    class Str(str):
        pass

    rng = random.Random(42)
    values = [None, "x", Str("y"), 1, True, 1.5, [], ["a"], [1], {}, {"a": "b"}, {"a": 1}]
    checked = problems = 0
    for _ in range(6000):
        event = rng.choice([*EVENTS, "made.up"])
        payload = {k: ("s" if kind != "int" and str in kind else
                       1 if kind == "int" else [] if list in kind else {})
                   for k, kind in PAYLOAD_SCHEMA.get(event, {}).items()}
        data = {"schema": 1, "seq": 1, "ts": "t", "actor": "a", "incident": "INC-1",
                "event": event, "channel": None, "recipient": None, "key": None,
                "payload": payload, "prev": "0", "hash": "0"}
        for _ in range(rng.randint(0, 2)):
            target = data if rng.random() < 0.4 or not payload else payload
            key = rng.choice(list(target))
            if rng.random() < 0.2:
                del target[key]
            else:
                target[key] = rng.choice(values)
        try:
            got = record_problem(data)
        except (AttributeError, TypeError, KeyError):
            got = "raised"
        try:
            exact = _exact_problem(data)
        except (AttributeError, TypeError, KeyError):
            exact = "raised"
        assert got == exact, data
        checked += 1
        problems += exact is not None
    assert problems > 1000 and checked - problems > 1000


def test_verifying_in_parallel_stretches_gives_the_one_pass_answer(tmp_path: Path) -> None:
    """The log checked in stretches by worker processes, then linked, answers exactly as
    one pass does (ok, records, first bad line, problem, head, checkpoint) for damage
    anywhere, at the cuts between stretches included."""
    import multiprocessing
    import random
    from concurrent.futures import ProcessPoolExecutor

    from incident_notify.audit_verify import scan_parallel

    pool = ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn"))
    path = tmp_path / "audit.jsonl"
    _history(AuditLog(path), 30, seed=3)
    pristine = path.read_bytes()
    lines_ = pristine.splitlines(keepends=True)
    n = len(lines_)
    with path.open("rb") as handle:
        scan = scan_parallel(path, handle, len(pristine), 3, pool)
    assert scan is not None and scan.passed == n and scan.problem is None  # really parallel
    rng = random.Random(8)
    damages: list[bytes] = []
    for at in [1, n // 3, n // 3 + 1, n // 2, 2 * n // 3, n - 2, *rng.sample(range(n - 1), 6)]:
        flipped = bytearray(lines_[at])
        flipped[rng.randrange(len(flipped) - 1)] ^= 0x01
        damages += [
            b"".join([*lines_[:at], bytes(flipped), *lines_[at + 1:]]),        # a bit flipped
            b"".join(lines_[:at] + lines_[at + 1:]),                           # a line gone
            b"".join([*lines_[:at], lines_[at + 1], lines_[at], *lines_[at + 2:]]),  # swapped
            b"".join([*lines_[:at], lines_[at], *lines_[at:]]),                # duplicated
            b"".join([*lines_[:at], lines_[at].replace(b":", b": ", 1), *lines_[at + 1:]]),
        ]
    damages.append(pristine[:-40])  # a torn last line
    differ = 0
    for content in damages:
        path.write_bytes(content)
        one = AuditLog(path).verify(workers=1)
        many = AuditLog(path).verify(workers=3, pool=pool)
        assert many.to_dict() == one.to_dict(), (one, many)
        assert many.checkpoint == one.checkpoint
        differ += not one.ok
    pool.shutdown()
    assert differ == len(damages)


def test_the_fast_json_writes_every_string_and_integer_as_the_standard_library() -> None:
    """`verify` lets msgspec say a block of lines is canonical. That holds only if it writes
    every character (all code points but surrogates, one by one: a string is written
    character by character) and integers exactly as `json.dumps` does."""
    from incident_notify.audit_verify import _ENCODER

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    assert _ENCODER.encode(chars) == \
        json.dumps(chars, separators=(",", ":"), ensure_ascii=False).encode()
    ints = [0, -1, 7, 2**31, -2**31, 2**53 + 1, 2**63 - 1, -2**63, 2**64 - 1, 10**20]
    assert _ENCODER.encode(ints) == json.dumps(ints, separators=(",", ":")).encode()
    nested = {"b": [True, False, None, {"é": "x", "a": []}], "a": {}, "ä": 1, "Z": "\u2028"}
    assert _ENCODER.encode(nested) == \
        json.dumps(nested, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


FLOATS = [0.1, 0.25, 123.0, -0.0, 1e16, 1e-06, 1e22, 5e-324, 1.7976931348623157e+308,
          0.0001, 1.2345678901234568e+17]


def _respellings(line: bytes) -> list[bytes]:
    """Other spellings of the same values in `line` (one at a time): what the standard
    library would not write, some of it what a faster JSON library would."""
    import msgspec

    swaps: list[tuple[bytes, bytes]] = []
    for value in FLOATS:
        ours = repr(value).encode()
        for other in {msgspec.json.encode(value), ours.replace(b"e+", b"e"),
                      ours.replace(b"e", b"E"), ours + b"0" if b"." in ours else ours + b".0",
                      f"{value:f}".encode(), f"{value:.20g}".encode()}:
            if other != ours:
                swaps.append((b":" + ours + b",", b":" + other + b","))
    swaps += [(b"\\u001f", b"\\u001F"), (b"\\u001f", b"\x1f"), ("é".encode(), b"\\u00e9"),
              (b"/", b"\\/"), ("\u2028".encode(), b"\\u2028"), (b":10,", b":10.0,"),
              (b":10,", b":1e1,"), (b":100000000000000000000,", b":1e20,"),
              (b'"n":10,', b'"n":10,"n":10,'), (b":true", b":1")]
    out = []
    for old, new in swaps:
        at = line.find(old)
        if at >= 0:
            out.append(line[:at] + new + line[at + len(old):])
    return out


def test_verify_with_the_fast_json_answers_as_with_the_standard_library(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log whose records hold floats passes (on msgspec's path where it writes the float
    as `repr` does); every other spelling of the same values, the line's hash
    made to match, is refused with the same words as when only the standard library
    checks (a float msgspec writes differently, an escape in capitals, an escaped slash,
    a duplicated member...)."""
    from incident_notify import audit_verify
    from incident_notify.audit import _line_hash

    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    for value in FLOATS:
        audit.append("delivery.sent", incident="INC-1", channel="team_sms", payload={
            "provider_id": "a/b é \x1f \u2028", "elapsed_s": value, "n": 10,
            "big": 100000000000000000000, "flag": True})
    pristine = path.read_bytes()
    lines_ = pristine.splitlines(keepends=True)
    for line, value in zip(lines_, FLOATS, strict=True):  # msgspec's path where it writes alike
        fast = audit_verify._ENCODER.encode(audit_verify._DECODER.decode(line)) == line[:-1]
        assert fast == (audit_verify._ENCODER.encode(value) == repr(value).encode()), line

    respelled = 0
    for at in range(len(lines_)):
        for line in _respellings(lines_[at]):
            rehashed = line.replace(json.loads(lines_[at])["hash"].encode(),
                                    _line_hash(line).encode())  # type: ignore[union-attr]
            path.write_bytes(b"".join([*lines_[:at], rehashed]))  # the last line respelled
            fast = AuditLog(path).verify(workers=1).to_dict()
            with monkeypatch.context() as m:
                m.setattr(audit_verify, "_FAST_JSON", False)
                slow = AuditLog(path).verify(workers=1).to_dict()
            assert fast == slow, line
            assert not fast["ok"], (line, fast)  # (a raw control character is not JSON)
            respelled += "canonical" in fast["problem"]
    assert respelled > 10 * len(FLOATS)
    path.write_bytes(pristine)
    assert AuditLog(path).verify(workers=1).ok


def test_readers_fast_parse_gives_what_json_loads_gives() -> None:
    """Readers switch to msgspec after their first lines: for every line it must give the
    values `json.loads` gives (floats read by `float`, numbers of any size, escapes,
    duplicate members, what only `json.loads` accepts), or fail where it fails."""
    import random

    from incident_notify.audit import _fast_parser

    parse = _fast_parser()
    rng = random.Random(5)
    texts = [b'{"a":1,"a":2}', b'{"x":NaN}', b'{"x":-Infinity}', b'{"s":"\\ud800"}',
             b'{"s":"\\u00e9\\n\\/\\"","t":"\xc3\xa9"}', b'[1e400,-0.0,1E5,0.1e-7]',
             b'{"n":' + b"9" * 4400 + b"}", b'{"bad":"\xff"}', b'{"x":1} trailing',
             b"[" * 3000 + b"]" * 3000, b'{"big":123456789012345678901234567890}']
    for _ in range(3000):
        mantissa = f"{rng.randrange(10**rng.randint(1, 20))}"
        exponent = rng.choice(["", f"e{rng.randint(-330, 310)}", f"E+{rng.randint(0, 30)}"])
        point = rng.choice(["", f".{rng.randrange(10**rng.randint(1, 17))}"])
        texts.append(f'{{"f":{rng.choice(["", "-"])}{mantissa}{point}{exponent}}}'.encode())
    for text in texts:
        try:
            want: object = repr(json.loads(text))
        except (ValueError, RecursionError) as exc:
            want = type(exc)
        try:
            got: object = repr(parse(text))
        except (ValueError, RecursionError) as exc:
            got = type(exc)
        assert got == want, text[:80]
