"""The commander at a terminal (a real pty), documented --json shapes, documented exit codes."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path
from typing import Any

import pexpect
import pytest

from incident_notify.exit_codes import ExitCode
from tests.conftest import PLAYBOOKS, ROOT, json_doc, run_cli

POWER = PLAYBOOKS / "dc-power-failure.yaml"
VARS = ["--set", "site=LON-2", "--set", "services=compute", "--set",
        "status_url=https://status.acme.example/i/1"]
ENVELOPE = {"schema", "command", "ok", "exit_code", "data", "errors"}


@pytest.fixture
def attached(sandbox: Any, tmp_path: Path) -> dict[str, str]:
    sandbox.twitter.auto_users = True
    sandbox.write_state()
    return {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
            "INCIDENT_NOTIFY_OPTOUTS": str(tmp_path / "optouts.jsonl")}


def spawn(args: list[str], env: dict[str, str]) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "incident_notify", *args], cwd=str(ROOT),
                         env={**os.environ, **env, "COLUMNS": "160"}, encoding="utf-8",
                         timeout=120, dimensions=(50, 160))


def test_prompt_answered_no_sends_nothing(sandbox: Any, attached: dict[str, str]) -> None:
    child = spawn(["declare", str(POWER), *VARS, "--sandbox"], attached)
    child.expect(r"Send \d+ deliveries on \d+ channel\(s\)\? \[y/N\]")
    before = child.before
    assert "Audience per channel" in before and "status_twitter" in before
    child.sendline("n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == ExitCode.ABORTED
    assert len(sandbox.twilio.received) == 0 and len(sandbox.twitter.received) == 0
    assert len(sandbox.smtp.received) == 0


@pytest.mark.parametrize("no_color", [True, False])
def test_prompt_answered_yes_sends_and_shows_summary(sandbox: Any, attached: dict[str, str],
                                                     no_color: bool) -> None:
    env = dict(attached) if no_color else {**attached, "NO_COLOR": ""}
    child = spawn(["declare", str(POWER), *VARS, "--sandbox"], env)
    child.logfile_read = seen = io.StringIO()
    child.expect(r"\[y/N\]")
    child.sendline("y")
    child.expect("Everyone was reached")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # NO_COLOR in a terminal: plain text, no bold, no progress bars (no escape sequences);
    # without it the same terminal gets colour.
    assert ("\x1b[" in seen.getvalue()) is not no_color
    tweets = [r for r in sandbox.twitter.received.all() if r["kind"] == "tweet"]
    assert len(tweets) == 1 and len(sandbox.twilio.received) > 0


def _keys(obj: dict[str, Any], expected: set[str], where: str) -> None:
    assert set(obj) == expected, f"{where}: {sorted(obj)} != {sorted(expected)}"


def test_json_shapes_match_docs(sandbox: Any, attached: dict[str, str]) -> None:
    """Each command's --json output has exactly the fields docs/json-output.md lists."""
    def doc(*args: str) -> dict[str, Any]:
        proc = run_cli(*args, "--json", env=attached)
        d = json_doc(proc)
        _keys(d, ENVELOPE, args[0])
        assert d["schema"] == "incident-notify/v1" and d["exit_code"] == proc.returncode
        return d

    declared = doc("declare", str(POWER), *VARS, "--yes", "--sandbox")["data"]
    _keys(declared, {"incident", "stage", "update_no", "dry_run", "preflight", "result",
                     "in_doubt", "sandbox"}, "declare")
    assert declared["sandbox"] is True
    _keys(declared["preflight"], {"incident", "playbook", "stage", "update_no", "event",
                                  "messages", "deliveries_per_channel", "health", "skipped",
                                  "warnings", "invalid_contacts",
                                  "contact_source_problems", "settled", "endpoints"},
          "preflight")
    _keys(declared["result"], {"channels", "totals", "people", "failures", "failovers",
                               "interrupted", "fatal", "complete", "elapsed_s"}, "result")
    _keys(declared["result"]["people"], {"intended", "reached", "in_doubt", "not_reached"},
          "people")
    _keys(declared["preflight"]["messages"][0], {"audience", "channel", "channel_type",
                                                 "fallback_from", "subject", "parts", "html",
                                                 "ok", "summary"}, "message")
    incident = declared["incident"]
    status = doc("status", incident)["data"]["incidents"][0]
    _keys(status, {"id", "title", "playbook", "severity", "stage", "status", "declared_at",
                   "declared_by", "age", "last_event_at", "updates", "channels", "failovers",
                   "pending", "in_doubt", "last_tweet"}, "status")
    event = doc("timeline", incident)["data"]["events"][0]
    assert {"ts", "event", "seq", "actor", "what", "lines"} <= set(event)
    check = doc("channels", "check", str(POWER), "--sandbox")["data"]["channels"][0]
    _keys(check, {"playbook", "channel", "type", "required", "ok", "detail", "latency_ms"},
          "channels check")
    config = doc("config", "show")["data"]
    _keys(config, {"settings", "config_files", "credentials", "environment"}, "config show")
    resumed = doc("resume", incident, "--yes", "--sandbox")["data"]
    _keys(resumed, {"incident", "stage", "update_no", "dry_run", "preflight", "result",
                    "in_doubt", "sandbox"}, "resume")
    preview = doc("preview", str(POWER), *VARS)["data"]
    _keys(preview, {"playbook", "stage", "messages"}, "preview")


def test_errors_in_json_mode_are_one_document() -> None:
    proc = run_cli("preview", str(POWER), "--json")
    d = json_doc(proc)
    assert proc.returncode == ExitCode.INVALID_PLAYBOOK
    assert d["ok"] is False and d["data"] is None
    assert {"file", "line", "column", "message", "hint"} <= set(d["errors"][0])


def test_exit_codes_doc_lists_every_code() -> None:
    text = (ROOT / "docs" / "exit-codes.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| `(\w+)` \|", text, re.M))
    assert {int(k): v for k, v in rows.items()} == {c.value: c.name for c in ExitCode}


def test_unknown_incident_is_not_found_without_traceback(attached: dict[str, str]) -> None:
    proc = run_cli("update", "INC-20000101-0001", "--message", "x", "--yes", env=attached)
    assert proc.returncode == ExitCode.NOT_FOUND
    assert "Traceback" not in proc.stderr and "no incident" in proc.stderr


@pytest.mark.parametrize("command", [["declare", "--sandbox"], ["preview"], ["drill"],
                                     ["channels", "check", "--sandbox"]])
def test_a_playbook_path_with_a_typo_is_not_found_as_documented(
        tmp_path: Path, attached: dict[str, str], command: list[str]) -> None:
    """exit-codes.md says 9 for a playbook that does not exist; a typo in its path gave 3,
    as if the playbook were invalid, so a runbook could not tell the two apart."""
    missing = tmp_path / "dc-power-falure.yaml"
    proc = run_cli(*command, str(missing), env=attached)
    assert proc.returncode == ExitCode.NOT_FOUND, proc.stdout + proc.stderr
    assert f"{missing}: no such playbook file" in proc.stderr and "Traceback" not in proc.stderr
    listed = run_cli("validate", str(missing))  # (a lint lists it with the other problems)
    assert listed.returncode == ExitCode.INVALID_PLAYBOOK and "file not found" in listed.stdout


def test_resume_with_a_mistyped_playbook_says_so(tmp_path: Path,
                                                 attached: dict[str, str]) -> None:
    """`resume --playbook` with a typo said the incident's playbook "is not there any
    more" and told the commander to pass --playbook, which they had just done."""
    doc = json_doc(run_cli("declare", str(POWER), "--set", "site=LON-2", "--set",
                           "services=compute", "--set", "status_url=https://s.example/1",
                           "--yes", "--sandbox", "--json", env=attached))
    missing = tmp_path / "moved" / "dc-power-failure.yaml"
    proc = run_cli("resume", doc["data"]["incident"], "--playbook", str(missing), "--sandbox",
                   env=attached)
    assert proc.returncode == ExitCode.NOT_FOUND, proc.stderr
    assert f"{missing}: no such playbook file" in proc.stderr
    assert "not there any more" not in proc.stderr


def test_config_file_and_sources(tmp_path: Path) -> None:
    (tmp_path / "incident-notify.toml").write_text('audit_log = "logs/audit.jsonl"\n'
                                                   'default_region = "GB"\n')
    proc = run_cli("config", "show", "--json", cwd=tmp_path)
    d = json_doc(proc)["data"]["settings"]
    assert d["default_region"] == {"value": "GB", "source": str(tmp_path /
                                                                "incident-notify.toml")}
    assert d["audit_log"]["effective"] == str(tmp_path / "logs" / "audit.jsonl")
    (tmp_path / "incident-notify.toml").write_text("colour = 1\n")
    bad = run_cli("config", "show", cwd=tmp_path)
    assert bad.returncode == ExitCode.CONFIG and "unknown setting 'colour'" in bad.stderr


def test_ctrl_d_at_the_prompt_is_a_no(sandbox: Any, attached: dict[str, str]) -> None:
    child = spawn(["declare", str(POWER), *VARS, "--sandbox"], attached)
    child.expect(r"\[y/N\]")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == ExitCode.ABORTED
    assert "Traceback" not in (child.before or "")
    assert len(sandbox.twilio.received) == 0


def test_resume_asks_like_every_sending_command(sandbox: Any, attached: dict[str, str]) -> None:
    declared = json_doc(run_cli("declare", str(POWER), *VARS, "--yes", "--sandbox", "--json",
                                env=attached))
    incident = declared["data"]["incident"]
    dry = run_cli("resume", incident, "--dry-run", "--sandbox", "--json", env=attached)
    assert dry.returncode == 0 and json_doc(dry)["data"]["dry_run"] is True
    refused = run_cli("resume", incident, "--sandbox", env=attached)
    # Nothing to settle or send: no question needed, and everyone was reached.
    assert refused.returncode == 0, refused.stderr


@pytest.mark.parametrize("args, code", [
    (["audit", "show", "--limit", "-1"], ExitCode.USAGE),
    (["audit", "export", "-o", "/tmp"], ExitCode.CONFIG),
    (["audit", "export", "-o", "/nonexistent-folder/x.csv"], ExitCode.CONFIG),
    (["timeline", "INC-20990101-0001", "--replies"], ExitCode.NOT_FOUND),
])
def test_routine_mistakes_have_their_documented_code(tmp_path: Path, args: list[str],
                                                     code: ExitCode) -> None:
    env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    proc = run_cli(*args, env=env)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "this is a bug" not in proc.stderr


@pytest.mark.parametrize("args", [["validate", str(PLAYBOOKS)], ["status"],
                                  ["audit", "show"], ["--help"]])
def test_output_to_a_closed_pipe_ends_quietly(tmp_path: Path, args: list[str]) -> None:
    import subprocess

    env = {**os.environ, "INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    proc = subprocess.Popen([sys.executable, "-m", "incident_notify", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and err == "", err


def test_at_80_columns_no_id_number_or_address_is_split(sandbox: Any,
                                                        attached: dict[str, str]) -> None:
    declared = json_doc(run_cli("declare", str(POWER), *VARS, "--yes", "--sandbox", "--json",
                                env=attached))
    incident = declared["data"]["incident"]
    narrow = {**attached, "COLUMNS": "80"}
    status = run_cli("status", env=narrow)
    assert incident in status.stdout and "…" not in status.stdout
    sent = declared["data"]["result"]["totals"]["sent"]
    assert re.search(rf"\bsent\s+{sent}\b", status.stdout) or f"| {sent} " in status.stdout
    shown = run_cli("audit", "show", "--limit", "40", env=narrow)
    addresses = {r["rcpt_tos"][0] for r in sandbox.smtp.received.all()}
    visible = [a for a in addresses if a in shown.stdout]
    assert visible, shown.stdout
    ids = {r["message_id"] for r in sandbox.smtp.received.all()}
    assert any(i in shown.stdout for i in ids), "a long Message-ID stays whole"
    assert "\x1b" not in status.stdout + shown.stdout  # NO_COLOR, not a terminal


def test_timeline_replies_without_credentials_is_a_config_error(
        sandbox: Any, attached: dict[str, str]) -> None:
    declared = json_doc(run_cli("declare", str(POWER), *VARS, "--yes", "--sandbox", "--json",
                                env=attached))
    proc = run_cli("timeline", declared["data"]["incident"], "--replies", env=attached)
    assert proc.returncode == ExitCode.CONFIG, proc.stdout + proc.stderr
    assert "TWITTER_API_KEY" in proc.stderr and "Traceback" not in proc.stderr


def test_a_closed_pipe_keeps_the_commands_own_exit_code(tmp_path: Path) -> None:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "incident_notify", "validate",
                             str(tmp_path / "missing.yaml")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 3 and "Traceback" not in err


@pytest.mark.parametrize("outage", [False, True])
def test_a_send_whose_reader_went_away_still_sends_and_keeps_its_exit_code(
        sandbox: Any, attached: dict[str, str], outage: bool) -> None:
    """A runbook's `declare ... --yes 2>&1 | logger` whose logger died: the closed pipe
    used to end the command at its first line on stderr, with exit 0, nobody told."""
    import subprocess

    if outage:
        for service in (sandbox.twitter, sandbox.twilio, sandbox.smtp):
            service.faults.update(outage=True)
    proc = subprocess.Popen([sys.executable, "-m", "incident_notify", "declare", str(POWER),
                             *VARS, "--yes", "--sandbox"], cwd=ROOT,
                            env={**os.environ, **attached}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    proc.stdout.close()
    code = proc.wait(timeout=120)
    incident = json_doc(run_cli("status", "--sandbox", "--json", env=attached))
    [state] = incident["data"]["incidents"]
    sent = sum(counts.get("sent", 0) for counts in state["channels"].values())
    if outage:
        assert code not in (ExitCode.OK, ExitCode.ERROR) and sent == 0, (code, state)
        return
    assert code == ExitCode.OK
    received = len(sandbox.twilio.received) + len(sandbox.smtp.received) \
        + len(sandbox.twitter.received)
    assert sent == received > 30 and state["pending"] == state["in_doubt"] == 0


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_results_to_a_full_disk_are_an_error_but_never_stop_a_confirmed_send(
        sandbox: Any, attached: dict[str, str]) -> None:
    """stdout on a full disk (/dev/full: every write fails with ENOSPC). An export or a
    listing whose results are lost used to exit 0; a runbook's `declare --yes > log` was
    refused with nothing sent. Now the results are an error (12), and a confirmed send goes
    on, its exit code saying who was reached."""
    import subprocess

    def to_full_disk(*args: str) -> tuple[int, str]:
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-m", "incident_notify", *args], cwd=ROOT,
                                  env={**os.environ, **attached}, stdout=full,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.returncode, proc.stderr

    for site, json in (("LON-2", []), ("LON-3", ["--json"])):  # (two tweets: two texts)
        code, err = to_full_disk("declare", str(POWER), *VARS, "--set", f"site={site}",
                                 "--yes", "--sandbox", *json)
        assert code == ExitCode.OK, err
        assert "the output could not be written" in err and "the send went on" in err
    received = len(sandbox.twilio.received) + len(sandbox.smtp.received) \
        + len(sandbox.twitter.received)
    assert received > 60  # both declarations, everyone
    for args in (["audit", "export", "--sandbox"], ["status", "--sandbox"],
                 ["validate", str(PLAYBOOKS)], ["validate", str(PLAYBOOKS), "--json"]):
        code, err = to_full_disk(*args)
        assert code == ExitCode.CONFIG, (args, err)
        if "--json" not in args:
            assert "cannot write the output (stdout): No space left on device" in err


def test_failover_notes_and_warnings_go_to_stderr(sandbox: Any,
                                                  attached: dict[str, str]) -> None:
    sandbox.twitter.faults.update(outage=True)
    proc = run_cli("declare", str(POWER), *VARS, "--yes", "--sandbox", env=attached)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "failover:" in proc.stderr and "failover:" not in proc.stdout
    assert "is unhealthy" in proc.stderr and "is unhealthy" not in proc.stdout
    assert "Everyone was reached" in proc.stdout


def test_every_command_takes_json() -> None:
    """The guide tells scripts to add --json to any command: every command accepts it."""
    import typer.main

    from incident_notify.cli.main import _register, app

    _register()

    def leaves(command: Any, path: list[str]) -> Any:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from leaves(sub, [*path, name])
        else:
            yield " ".join(path), {o for p in command.params for o in getattr(p, "opts", [])}

    commands = leaves(typer.main.get_command(app), [])
    missing = [name for name, opts in commands if "--json" not in opts]
    assert not missing, missing


def test_audit_commands_read_the_rehearsal_log_and_export_reports_in_json(
        sandbox: Any, tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    declared = run_cli("declare", str(POWER), *VARS, "--yes", "--sandbox", "--json", env=env)
    assert declared.returncode == 0, declared.stderr
    real = run_cli("audit", "head", "--json", env=env)
    rehearsal = run_cli("audit", "head", "--sandbox", "--json", env=env)
    assert json_doc(real)["data"]["records"] == 0
    assert json_doc(rehearsal)["data"]["records"] > 0
    assert json_doc(rehearsal)["data"]["path"].endswith("sandbox-audit.jsonl")
    assert run_cli("audit", "verify", "--sandbox", env=env).returncode == 0
    out = tmp_path / "export.jsonl"
    exported = json_doc(run_cli("audit", "export", "--sandbox", "-o", str(out), "--json",
                                env=env))
    assert exported["data"] == {"path": str(out), "format": "jsonl",
                                "records": len(out.read_text().splitlines())}
    assert exported["data"]["records"] == json_doc(rehearsal)["data"]["records"]
    to_stdout = run_cli("audit", "export", "--json", env=env)
    assert to_stdout.returncode == ExitCode.USAGE
    assert "-o FILE" in json_doc(to_stdout)["errors"][0]["message"]


def test_status_counts_failed_over_deliveries_as_the_summary_does(
        sandbox: Any, attached: dict[str, str]) -> None:
    """With Twilio down, the team's SMS fail over to the email they already get (no new
    message) and the customers' to email: status counted only the failovers that moved
    someone (9), where the send's summary said 14 deliveries failed over."""
    sandbox.twilio.faults.update(outage=True)
    declared = json_doc(run_cli("declare", str(POWER), *VARS, "--yes", "--sandbox", "--json",
                                env=attached))
    failed_over = declared["data"]["result"]["totals"]["failed_over"]
    assert failed_over == sum(n for ch, n in (
        (c, counts.get("failed_over", 0))
        for c, counts in declared["data"]["result"]["channels"].items()) if "sms" in ch)
    shown = run_cli("status", "--sandbox", env={**attached, "COLUMNS": "160"})
    header, row = [line for line in shown.stdout.splitlines() if line.startswith("| ")][:2]
    cells = dict(zip([h.strip() for h in header.strip("|").split("|")],
                     [c.strip() for c in row.strip("|").split("|")], strict=True))
    assert cells["failed over"] == str(failed_over), shown.stdout
