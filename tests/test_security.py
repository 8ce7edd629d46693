"""Security: each finding of the review reproduced, then shown refused or neutralised.
Hostile playbooks and templates, hostile inbound text, a local attacker on the log and on
the sandbox, and a working directory that would turn a real send into a rehearsal."""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PLAYBOOKS, json_doc, make_fanout_playbook, run_cli

ESC = "\x1b"
POWER_VARS = ["--set", "site=LON-2", "--set", "services=compute", "--set",
              "status_url=https://status.acme.example/i/1"]
HOSTILE = (f"{ESC}]8;;https://evil.example{ESC}\\click{ESC}]8;;{ESC}\\ "
           f"{ESC}]52;c;ZXZpbA=={ESC}\\ {ESC}[2J{ESC}[31mred \u202eevil [/x] :x:")


def no_escapes(text: str) -> None:
    assert ESC not in text and "\u202e" not in text and "\x07" not in text


# ------------------------------------------------------------------ bounded work
BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(ord('a') + i + 1)}: &{chr(ord('a') + i + 1)} "
       f"[{', '.join(['*' + chr(ord('a') + i)] * 9)}]" for i in range(8)]) + "\n"


@pytest.mark.parametrize("text, expected", [
    (BOMB, "aliases"),
    ("a: &a\n  b: *a\n", "recursive alias"),
    ("x: !!python/name:os.system\n", "not allowed"),
    ("y: !custom 1\n", "not allowed"),
    ("z: !!float x\n", "invalid value for float"),
    ("base: &b {k: 1}\nm:\n  <<: *b\n", "merge keys"),
    ("[" * 70 + "]" * 70 + "\n", "nested more than"),
])
def test_hostile_yaml_is_refused_at_its_line_quickly(tmp_path: Path, text: str,
                                                     expected: str) -> None:
    path = tmp_path / "pb.yaml"
    path.write_text(text)
    started = time.monotonic()
    proc = run_cli("validate", str(path), "--no-contacts")
    assert time.monotonic() - started < 10
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert expected in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind", ["fifo", "device", "loop", "directory"])
def test_only_regular_files_are_read(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "pb.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    elif kind == "loop":
        path.symlink_to(tmp_path / "loop.yaml")
        (tmp_path / "loop.yaml").symlink_to(path)
    else:
        path.mkdir()
        path = path / "."
    proc = run_cli("validate", str(path), "--no-contacts", timeout=20)
    assert proc.returncode in (3, 9), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_contacts_from_a_device_or_fifo_are_refused(tmp_path: Path) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1)
    os.mkfifo(tmp_path / "pb" / "fifo.csv")
    pb.write_text(pb.read_text().replace("contacts: [people.csv]",
                                         "contacts: [people.csv, /dev/zero, fifo.csv]"))
    proc = run_cli("validate", str(pb), timeout=20)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # validate: any problem is 3
    assert "/dev/zero: is a device, not a regular file" in proc.stdout
    assert "fifo.csv: is a FIFO, not a regular file" in proc.stdout


HOSTILE_TEMPLATES = [
    ("{{ 'x' * 10**10 }}", "would build"),
    ("{{ 'a' | center(10000000000) }}", "larger than"),
    ("{{ '{:>999999999}'.format(1) }}", "str.format"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
     "took longer"),
    ("{{ 9 ** 9 ** 9 }}", "too much work"),
    ("{{ 2 ** 1000 }}", "exponent"),
    ("{% include 'contacts/customers.csv' %}", "TemplateNotFound"),
    ("{% include '../playbooks/dc-power-failure.yaml' %}", "TemplateNotFound"),
]


@pytest.mark.parametrize("template, expected", HOSTILE_TEMPLATES)
def test_hostile_templates_do_bounded_work_and_stay_in_their_room(
        tmp_path: Path, template: str, expected: str) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1)
    pb.write_text(pb.read_text().replace(
        '      sms: "[{{ incident.id }}] {{ incident.stage_title }} at {{ site }}. '
        '{{ message }}"', "      sms: " + json.dumps(template), 1))
    started = time.monotonic()
    proc = run_cli("validate", str(pb), "--no-contacts", timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert expected in proc.stdout + proc.stderr


def test_templates_never_follow_a_symlink_out_or_read_secrets(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    pb = make_fanout_playbook(root / "playbooks", 1)
    (root / "playbooks" / "secrets.env").write_text("TWILIO_AUTH_TOKEN=canary-secret\n")
    templates = root / "templates"
    templates.mkdir()
    (templates / "passwd.j2").symlink_to("/etc/passwd")
    (templates / "secret.j2").symlink_to(root / "playbooks" / "secrets.env")
    for name in ("passwd.j2", "secret.j2", "../playbooks/secrets.env", "secrets.env"):
        pb.write_text(pb.read_text().split("stages:")[0] + "stages:\n  investigating:\n"
                      "    messages:\n      sms: \"{% include '" + name + "' %}\"\n"
                      "      email: {subject: s, text: t}\n")
        proc = run_cli("preview", str(pb), "--set", "site=LON-2")
        assert proc.returncode == 3, (name, proc.stdout)
        assert "canary-secret" not in proc.stdout + proc.stderr
        assert "root:" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("pattern", ["(A+)+B", "(a|aa)*c", "(x*)*y"])
def test_patterns_that_can_backtrack_forever_are_refused(tmp_path: Path,
                                                         pattern: str) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1)
    pb.write_text(pb.read_text().replace("    max_length: 12\n",
                                         f"    max_length: 12\n    pattern: '{pattern}'\n"))
    proc = run_cli("validate", str(pb), "--no-contacts", timeout=20)
    assert proc.returncode == 3 and "repetition" in proc.stdout + proc.stderr


def test_huge_max_length_is_refused(tmp_path: Path) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1)
    pb.write_text(pb.read_text().replace("max_length: 12", "max_length: 100000000000"))
    proc = run_cli("validate", str(pb), "--no-contacts", timeout=20)
    assert proc.returncode == 3 and "max_length" in proc.stdout + proc.stderr


# ------------------------------------------------------------------ no silent rehearsal
def test_a_config_file_in_the_working_directory_cannot_turn_on_the_sandbox(
        tmp_path: Path) -> None:
    (tmp_path / "incident-notify.toml").write_text("sandbox = true\n")
    proc = run_cli("declare", str(PLAYBOOKS / "dc-power-failure.yaml"), *POWER_VARS,
                   "--dry-run", cwd=tmp_path)
    assert proc.returncode == 12 and "sandbox" in proc.stderr


def test_a_sandbox_run_is_marked_and_keeps_its_own_log(sandbox: Any, tmp_path: Path,
                                                       isolated_home: Path) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1)
    sandbox.write_state()
    proc = run_cli("declare", str(pb), "--set", "site=LON-2", "--yes", "--sandbox", "--json")
    doc = json_doc(proc)
    assert proc.returncode == 0 and doc["data"]["sandbox"] is True
    assert "SANDBOX" in proc.stderr
    state = isolated_home / ".local" / "state"
    logs = {p.name for p in state.rglob("*.jsonl")}
    assert "sandbox-audit.jsonl" in logs and "audit.jsonl" not in logs
    real = json_doc(run_cli("status", "--json"))["data"]["incidents"]
    assert real == []
    rehearsed = json_doc(run_cli("status", "--sandbox", "--json"))["data"]["incidents"]
    assert len(rehearsed) == 1


# ------------------------------------------------------------------ secrets files
@pytest.mark.parametrize("mode", [0o620, 0o640, 0o604, 0o660])
def test_a_secrets_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    secrets = tmp_path / "secrets.env"
    secrets.write_text("TWILIO_AUTH_TOKEN=x\n")
    secrets.chmod(mode)
    proc = run_cli("declare", str(PLAYBOOKS / "dc-power-failure.yaml"), *POWER_VARS,
                   "--dry-run", "--secrets", str(secrets))
    assert proc.returncode == 12 and "other users" in proc.stderr


def test_a_secrets_file_cannot_redirect_the_providers(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.env"
    secrets.write_text("INCIDENT_NOTIFY_TWILIO_API_BASE=http://127.0.0.1:18777\n")
    secrets.chmod(0o600)
    proc = run_cli("declare", str(PLAYBOOKS / "dc-power-failure.yaml"), *POWER_VARS,
                   "--dry-run", "--secrets", str(secrets))
    assert proc.returncode == 12 and "endpoint, not a secret" in proc.stderr


# ------------------------------------------------------------------ inert outside text
def test_replies_and_contact_names_reach_the_terminal_inert(tmp_path: Path,
                                                            sandbox: Any) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=1)
    people = tmp_path / "pb" / "people.csv"
    people.write_text(people.read_text().replace("Person 0", HOSTILE.replace(",", " ")))
    sandbox.write_state()
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    listed = run_cli("contacts", "list", str(people))
    assert listed.returncode == 0, listed.stderr
    no_escapes(listed.stdout)
    assert "␛" in listed.stdout and "[/x]" in listed.stdout
    doc = json_doc(run_cli("declare", str(pb), "--set", "site=LON-2", "--yes", "--sandbox",
                           "--json", env=env))
    incident = doc["data"]["incident"]
    tweet = sandbox.twitter.received.all()[0]["id"]
    sandbox.twitter.add_reply(tweet, "mallory", HOSTILE)
    shown = run_cli("timeline", incident, "--replies", "--sandbox", env=env)
    assert shown.returncode == 0, shown.stderr
    no_escapes(shown.stdout)
    assert "click" in shown.stdout and ":x:" in shown.stdout


def test_preview_prints_exactly_what_is_sent(tmp_path: Path) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1)
    proc = run_cli("preview", str(pb), "--set", "site=:x:")
    assert proc.returncode == 0 and ":x:" in proc.stdout and "❌" not in proc.stdout


def test_error_text_with_markup_and_escapes_is_printed_inert(tmp_path: Path) -> None:
    path = tmp_path / f"[bold]x{ESC}[2J.yaml"
    path.write_text("name: [/x]\n")
    proc = run_cli("validate", str(path), "--no-contacts")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    no_escapes(proc.stdout + proc.stderr)


def test_csv_export_is_spreadsheet_safe_and_owner_only(tmp_path: Path) -> None:
    from incident_notify.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("delivery.failed", incident="INC-1", recipient="=cmd|' /C calc'!A0",
               key="k", payload={"error": "@SUM(1+1)"})
    out = tmp_path / "export.csv"
    proc = run_cli("audit", "export", "--format", "csv", "-o", str(out),
                   env={"INCIDENT_NOTIFY_AUDIT_LOG": str(log.path)})
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "'=cmd" in text and ",=cmd" not in text
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


# ------------------------------------------------------------------ the sandbox's controls
def test_the_sandbox_control_api_needs_its_token(sandbox: Any) -> None:
    url = sandbox.twitter.url + "/_sandbox/faults"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url, data=b'{"outage": true}',
                                                      method="POST"), timeout=5)
    assert info.value.code == 401 and not sandbox.twitter.faults.outage
    ok = urllib.request.Request(url, headers={"Authorization": f"Bearer {sandbox.token}"})
    with urllib.request.urlopen(ok, timeout=5) as resp:
        assert resp.status == 200


def test_channels_check_never_names_the_account(sandbox: Any) -> None:
    sandbox.write_state()
    proc = run_cli("channels", "check", str(PLAYBOOKS / "dc-power-failure.yaml"),
                   "--sandbox")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "authenticated" in proc.stdout and "authenticated as" not in proc.stdout


@pytest.mark.parametrize("pattern, refused", [
    ("(A+)+B", True), ("(a|a)*", True), ("(a|aa)*c", True), ("(x*)*y", True),
    ("(.*a){10}", True), ("([a-z]+ ?)+", True),
    ("[A-Z]+(-[A-Z]+)*", False), ("(?:[a-z]+\\.)+[a-z]{2,}", False), ("(foo|bar)+", False),
    ("INC-[0-9]{8}-[0-9]{4}", False), ("([a-z]+,)*[a-z]+", False), ("(ab)+", False),
])
def test_slow_pattern_refuses_ambiguous_nesting_only(pattern: str, refused: bool) -> None:
    import re

    from incident_notify.patterns import slow_pattern

    assert (slow_pattern(pattern) is not None) is refused
    if not refused:  # and what is accepted answers adversarial input at once
        rx = re.compile(pattern)
        started = time.monotonic()
        for value in ("a" * 28 + "!", "A" * 28 + "-" * 28 + "!", "-a" * 20 + "-!",
                      "aaaa." * 10 + "!", "ab" * 20 + "a!"):
            rx.fullmatch(value)
        assert time.monotonic() - started < 1.0


# ------------------------------------------------------------------ internal never public
def _security_playbook(tmp_path: Path) -> Path:
    """The shipped security playbook, copied, with a public Twitter channel added."""
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(PLAYBOOKS.parent / "templates", root / "templates")
    (root / "playbooks").mkdir(parents=True)
    shutil.copytree(PLAYBOOKS / "contacts", root / "playbooks" / "contacts")
    pb = root / "playbooks" / "sec.yaml"
    pb.write_text((PLAYBOOKS / "security-incident.yaml").read_text())
    return pb


def test_internal_stage_to_a_public_audience_is_refused_by_the_planner_too(
        tmp_path: Path, sandbox: Any) -> None:
    from incident_notify.config import Settings
    from incident_notify.errors import PlaybookError
    from incident_notify.lifecycle import declare
    from incident_notify.runtime import open_runtime

    pb = _security_playbook(tmp_path)
    text = pb.read_text().replace("channels:\n  sec_sms:", "channels:\n  news:\n"
                                  "    type: twitter\n    sender: \"@acme_status\"\n"
                                  "  sec_sms:", 1)
    text = text.replace("audiences:\n", "audiences:\n  world:\n    kind: public\n"
                        "    channels: [news]\n", 1)
    text = text.replace('      sms: "[{{ incident.id }}] Security incident',
                        '      twitter: "Security incident at Acme"\n'
                        '      sms: "[{{ incident.id }}] Security incident', 1)
    pb.write_text(text)
    assert run_cli("validate", str(pb)).returncode == 3
    rt = open_runtime(Settings(audit_log=tmp_path / "a.jsonl", sandbox=True),
                      sandbox=sandbox)
    with pytest.raises(PlaybookError, match="internal"):
        declare(rt, pb, {"codename": "BLUE-HERON", "bridge": "https://meet.acme.example/1"})
    assert sandbox.twitter.received.all() == []
    assert list(rt.audit.records()) == []


def test_internal_text_cannot_reach_the_public_through_a_fallback(tmp_path: Path) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=1)
    text = pb.read_text().replace(
        "variables:\n  site:\n", "variables:\n  bridge:\n    example: https://meet.x/1\n"
        "    sensitivity: internal\n  site:\n")
    # The team's SMS carries the bridge; Twitter falls back to that SMS channel.
    text = text.replace('"[{{ incident.id }}] {{ incident.stage_title }} at {{ site }}. '
                        '{{ message }}"', '"Join {{ bridge }}. {{ message }}"')
    pb.write_text(text)
    proc = run_cli("validate", str(pb), "--no-contacts")
    assert proc.returncode == 3, proc.stdout
    assert "as the fallback of 'status_twitter'" in proc.stdout
    assert "internal variable 'bridge'" in proc.stdout


def test_an_internal_template_included_in_a_tweet_is_refused(tmp_path: Path) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=1)
    (tmp_path / "pb" / "templates").mkdir()
    (tmp_path / "pb" / "templates" / "internal.txt.j2").write_text(
        "{# sensitivity: internal #}\nThe bridge is on the usual line.\n")
    pb.write_text(pb.read_text().replace(
        '      twitter: "{{ incident.stage_title }}: problem at {{ site }}. {{ message }}"',
        "      twitter: \"{% include 'internal.txt.j2' %}\"", 1))
    proc = run_cli("validate", str(pb), "--no-contacts")
    assert proc.returncode == 3 and "marked internal (included)" in proc.stdout


# ------------------------------------------------------------------ accounts
def test_an_account_decides_endpoint_and_credentials(tmp_path: Path, sandbox: Any,
                                                     isolated_home: Path) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 2)
    pb.write_text(pb.read_text().replace('sender: "Ops <ops@acme.example>"\n',
                                         'sender: "Ops <ops@acme.example>"\n'
                                         '    account: eu\n'))
    config = isolated_home / ".config" / "incident-notify"
    config.mkdir(parents=True)
    (config / "incident-notify.toml").write_text(
        f'[accounts.eu]\nsmtp_url = "smtp://127.0.0.1:{sandbox.smtp.port}"\n'
        'credentials_prefix = "EU_"\n')
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "a.jsonl"),
           "EU_SMTP_USERNAME": "sandbox", "EU_SMTP_PASSWORD": "sandbox-password",
           "SMTP_USERNAME": "someone-else", "SMTP_PASSWORD": "wrong",
           "TWILIO_ACCOUNT_SID": "AC" + "5a4db0c" * 4 + "5a4d",
           "TWILIO_AUTH_TOKEN": "sandbox-auth-token",
           "INCIDENT_NOTIFY_TWILIO_API_BASE": sandbox.twilio.url}
    proc = run_cli("declare", str(pb), "--set", "site=LON-2", "--yes", "--json", env=env)
    doc = json_doc(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert doc["data"]["preflight"]["endpoints"]["team_email"] == \
        f"smtp://127.0.0.1:{sandbox.smtp.port}"
    assert len(sandbox.smtp.received) == 2
    missing = run_cli("declare", str(pb.with_name("x.yaml")), env=env)
    assert missing.returncode in (3, 9)


def test_debug_keeps_the_documented_exit_code(tmp_path: Path) -> None:
    path = tmp_path / "pb.yaml"
    path.write_text("name: [unclosed\n")
    proc = run_cli("--debug", "preview", str(path))
    assert proc.returncode == 3 and "Traceback" in proc.stderr


def test_verify_json_lists_the_problem(tmp_path: Path) -> None:
    from incident_notify.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("optout.added", payload={"contact_id": "c", "reason": "r"})
    log.close()
    log.path.write_bytes(log.path.read_bytes().replace(b'"c"', b'"d"'))
    proc = run_cli("audit", "verify", "--json",
                   env={"INCIDENT_NOTIFY_AUDIT_LOG": str(log.path)})
    doc = json_doc(proc)
    assert proc.returncode == 8 and doc["errors"] and doc["errors"][0]["line"] == 1


def test_preview_and_dry_run_show_the_same_sensitivity_refusal(tmp_path: Path) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 1, twitter=True, subscribers=1)
    pb.write_text(pb.read_text().replace("  investigating:\n",
                                         "  investigating:\n    sensitivity: internal\n", 1))
    previewed = run_cli("preview", str(pb), "--set", "site=LON-2")
    dry = run_cli("declare", str(pb), "--set", "site=LON-2", "--dry-run", "--sandbox")
    for proc in (previewed, dry):
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "internal content would reach public" in proc.stderr


def test_the_sandbox_state_is_owner_only_and_never_read_half_written(tmp_path: Path,
                                                                     sandbox: Any) -> None:
    """The state file a running sandbox leaves for `--sandbox` holds its control token.
    It was written in place and made owner-only afterwards: a command starting meanwhile
    read half of it, found no sandbox, and sent its drill to a private one instead of the
    one the commander was watching."""
    import threading

    target = tmp_path / "sandbox.json"
    sandbox.write_state(target)
    done, torn, reads = threading.Event(), [0], [0]

    def read() -> None:
        while not done.is_set():
            try:
                json.loads(target.read_text())
            except ValueError:
                torn[0] += 1
            reads[0] += 1

    reader = threading.Thread(target=read)
    reader.start()
    old = os.umask(0o022)
    try:
        for _ in range(1500):
            sandbox.write_state(target)
    finally:
        os.umask(old)
        done.set()
        reader.join()
    assert reads[0] > 100 and torn[0] == 0, (torn[0], reads[0])
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("sandbox.json.*"))  # no leftover being written
