"""The audit log: tamper evidence, concurrency, torn tails, redaction, CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from incident_notify.audit import FIELDS, AuditLog, GroupCommitWriter
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
            "for i in range(300): log.append('delivery.sent', key=f'{sys.argv[2]}-{i}')")
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
    log.append("incident.updated", incident="INC-0")
    sidecars = list(log.path.parent.glob("audit.jsonl.torn-*"))
    assert len(sidecars) == 1 and sidecars[0].read_bytes() == torn
    recovered = [r for r in log.records() if r.event == "audit.torn_tail_recovered"]
    assert recovered and recovered[0].payload["bytes"] == len(torn)
    assert log.verify().ok


def test_redaction_with_a_keyed_hash(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "r.jsonl", redact_key=b"secret-key")
    record = audit.append("delivery.sent", recipient="carol@example.org",
                          payload={"error": "550 carol@example.org: mailbox unavailable"})
    assert record.recipient and record.recipient.startswith("hmac-sha256:")
    assert record.recipient in record.payload["error"]
    assert b"carol@example.org" not in audit.path.read_bytes()
    again = AuditLog(tmp_path / "r2.jsonl", redact_key=b"secret-key")
    assert again.append("delivery.sent", recipient="carol@example.org").recipient == \
        record.recipient


def test_group_commit_from_many_threads(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "g.jsonl")
    writer = GroupCommitWriter(audit)

    def work(n: int) -> None:
        for i in range(200):
            writer.append("delivery.attempt", key=f"{n}-{i}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    result = audit.verify()
    assert result.ok and result.records == 1600
    assert len({r.key for r in audit.records()}) == 1600


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


def test_cli_show_and_export(log: AuditLog, tmp_path: Path) -> None:
    doc = json_doc(run_cli("audit", "show", "--audit-log", str(log.path), "--incident",
                           "INC-1", "--json"))
    assert set(doc) == {"schema", "command", "ok", "exit_code", "data", "errors"}
    records = doc["data"]["records"]
    assert len(records) == 10 and {r["incident"] for r in records} == {"INC-1"}
    assert json_doc(run_cli("audit", "show", "--audit-log", str(log.path), "--status",
                            "failed", "--json"))["data"]["records"] == []
    out = tmp_path / "export.csv"
    proc = run_cli("audit", "export", "--audit-log", str(log.path), "--format", "csv",
                   "-o", str(out))
    assert proc.returncode == 0
    rows = list(csv.reader(out.open()))
    assert tuple(rows[0]) == FIELDS and len(rows) == 21
    assert json.loads(rows[1][FIELDS.index("payload")])["provider_id"] == "SM0"
    jsonl = run_cli("audit", "export", "--audit-log", str(log.path), "--format", "jsonl")
    assert len(jsonl.stdout.splitlines()) == 20
