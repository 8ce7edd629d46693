"""validate / preview: CI's gate on playbooks. Every error names its line; no tracebacks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import PLAYBOOKS, ROOT, json_doc, run_cli

MINIMAL = textwrap.dedent("""\
    name: mini
    title: Minimal incident
    severity: sev2
    variables:
      site:
        example: LON-2
        max_length: 12
    channels:
      status_twitter:
        type: twitter
        sender: "@acme_status"
      team_sms:
        type: sms
        sender: "+15005550006"
        max_segments: 1
    audiences:
      public:
        kind: public
        channels: [status_twitter]
      team:
        kind: internal
        select: {groups: [oncall]}
        channels: [team_sms]
    stages:
      investigating:
        messages:
          twitter: "Investigating a problem at {{ site }}."
          sms: "Problem at {{ site }}."
      resolved:
        messages:
          twitter: "Resolved at {{ site }}."
          sms: "Resolved at {{ site }}."
    """)


def write(tmp_path: Path, text: str, name: str = "pb.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def validate(*paths: Path, json_out: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["validate", "--no-contacts", *map(str, paths)]
    if json_out:
        args.append("--json")
    return run_cli(*args)


def assert_clean_failure(proc: subprocess.CompletedProcess[str], code: int = 3) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_shipped_playbooks_pass_validate_with_contacts() -> None:
    proc = run_cli("validate", str(PLAYBOOKS), "--json")
    doc = json_doc(proc)
    assert proc.returncode == 0, json.dumps(doc["errors"], indent=1)
    names = {p["name"] for p in doc["data"]["playbooks"]}
    assert {"dc-power-failure", "twitter-unavailable", "security-incident",
            "scheduled-maintenance"} <= names
    for pb in doc["data"]["playbooks"]:
        assert pb["ok"] and pb["messages"], pb["path"]
        modes = {m["mode"] for m in pb["messages"]}
        assert modes == {"example", "worst"}


def test_minimal_playbook_passes(tmp_path: Path) -> None:
    proc = validate(write(tmp_path, MINIMAL))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout


def test_json_envelope_shape(tmp_path: Path) -> None:
    proc = validate(write(tmp_path, MINIMAL), json_out=True)
    doc = json_doc(proc)
    assert set(doc) == {"schema", "command", "ok", "exit_code", "data", "errors"}
    assert doc["schema"] == "incident-notify/v1"
    assert doc["command"] == "validate" and doc["ok"] is True and doc["exit_code"] == 0
    pb = doc["data"]["playbooks"][0]
    assert set(pb) == {"path", "name", "ok", "messages", "problems", "contacts"}
    row = pb["messages"][0]
    assert set(row) == {"stage", "audience", "channel", "channel_type", "mode", "measure",
                        "parts", "ok", "fallback_from"}


@pytest.mark.parametrize(
    ("old", "new", "line", "needle"),
    [
        # malformed YAML: unclosed flow sequence
        ("channels: [team_sms]\n", "channels: [team_sms\n", 24,
         "flow sequence that started at line 23"),
        # a wrong type
        ("max_length: 12", "max_length: twelve", 7, "max_length"),
        # an unknown key
        ("    sender: \"@acme_status\"\n", "    sender: \"@acme_status\"\n    colour: blue\n",
         12, "unknown option 'colour'"),
        # a missing template file
        ("sms: \"Problem at {{ site }}.\"", "sms: {template: nowhere/missing.j2}", 28,
         "nowhere/missing.j2"),
        # a Jinja syntax error
        ("twitter: \"Resolved at {{ site }}.\"", "twitter: \"Resolved at {{ site }.\"", 31,
         ""),
        # an undeclared variable
        ("sms: \"Resolved at {{ site }}.\"", "sms: \"Resolved at {{ sitee }}.\"", 32,
         "undeclared variable 'sitee'"),
        # an unknown top-level key
        ("severity: sev2\n", "severity: sev2\nowner: me\n", 4, "unknown key 'owner'"),
        # a duplicate key
        ("title: Minimal incident\n", "title: Minimal incident\ntitle: Again\n", 3,
         "duplicate key 'title'"),
        # an unknown channel type names the valid ones
        ("type: sms", "type: pager", 13, "valid channel types are"),
        # an endpoint: the operator's, never the playbook's (said once, without pydantic's
        # "Value error," or an empty option name)
        ("    sender: \"+15005550006\"\n",
         "    sender: \"+15005550006\"\n    host: 127.0.0.1\n    tls: none\n", 12,
         "channel 'team_sms': host, tls: endpoints are the operator's configuration"),
    ],
)
def test_each_error_names_its_line(tmp_path: Path, old: str, new: str, line: int,
                                   needle: str) -> None:
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new, 1))
    proc = validate(path)
    assert_clean_failure(proc)
    out = proc.stdout + proc.stderr
    assert f"{path}:{line}" in out, out
    assert needle in out
    assert "Value error" not in out and ": :" not in out
    if "endpoints" in needle:
        assert "INCIDENT_NOTIFY_TWILIO_API_BASE" in out  # where the endpoint does go


@pytest.mark.parametrize(("old", "new", "suggestion"), [
    ("    max_segments: 1\n", "    max_segment: 1\n", "max_segments"),
    ("    sender: \"+15005550006\"\n",
     "    sender: \"+15005550006\"\n    fallbak: [status_twitter]\n", "fallback"),
    ("severity: sev2\n", "severity: sev2\ntitel: Again\n", "title"),
    ("    max_length: 12\n", "    max_lenght: 12\n", "max_length"),
    ("    channels: [team_sms]\n", "    channels: [team_smss]\n", "team_sms"),
    ("    select: {groups: [oncall]}\n", "    selct: {groups: [oncall]}\n", "select"),
    ("  investigating:\n    messages:\n",
     "  investigating:\n    audiences: [tem]\n    messages:\n", "team"),
], ids=["option", "fallback", "top-level", "variable-key", "channel", "audience-key",
        "audience-name"])
def test_a_misspelt_name_in_a_playbook_is_answered_with_the_likely_one(
        tmp_path: Path, old: str, new: str, suggestion: str) -> None:
    """A routine typo said only that the name was unknown (and sometimes listed a dozen
    valid ones): the commander had to find the one meant."""
    assert old in MINIMAL
    proc = validate(write(tmp_path, MINIMAL.replace(old, new, 1)))
    assert_clean_failure(proc)
    assert f"did you mean {suggestion!r}?" in proc.stdout + proc.stderr, proc.stderr


def test_a_misspelt_stage_or_variable_on_the_command_line_is_answered_too() -> None:
    power = str(PLAYBOOKS / "dc-power-failure.yaml")
    stage = run_cli("preview", power, "--stage", "investigatng", "--set", "site=X",
                    "--set", "services=x", "--set", "status_url=https://status.acme.example")
    assert stage.returncode == 9 and "did you mean 'investigating'?" in stage.stderr
    variable = run_cli("preview", power, "--set", "site=X", "--set", "sevices=x",
                       "--set", "status_url=https://status.acme.example")
    assert variable.returncode == 3 and "did you mean 'services'?" in variable.stderr


def test_all_problems_of_a_file_are_reported(tmp_path: Path) -> None:
    text = MINIMAL.replace("type: sms", "type: pager").replace(
        "kind: internal", "kind: everyone").replace("severity: sev2", "severity: urgent")
    proc = validate(write(tmp_path, text), json_out=True)
    doc = json_doc(proc)
    assert proc.returncode == 3
    lines = sorted({e["line"] for e in doc["errors"]})
    assert len(lines) >= 2, doc["errors"]  # schema problems collected, not only the first


def test_secret_in_playbook_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace('    sender: "+15005550006"\n',
                           '    sender: "+15005550006"\n    auth_token: abc123\n')
    proc = validate(write(tmp_path, text))
    assert_clean_failure(proc)
    assert "looks like a secret" in proc.stdout + proc.stderr
    assert "abc123" not in proc.stdout + proc.stderr


def test_a_template_hiding_a_bidirectional_override_fails_with_its_line(tmp_path: Path) -> None:
    """A template whose text holds a right-to-left override (invisible in a review: the
    tweet would read otherwise than the playbook seems to say) or a stray control
    character is a problem of that message, not something to post."""
    text = MINIMAL.replace('twitter: "Investigating a problem at {{ site }}."',
                           'twitter: "Investigating a problem at \u202e{{ site }}."')
    proc = validate(write(tmp_path, text))
    assert_clean_failure(proc)
    out = proc.stdout + proc.stderr
    assert "the message holds an invisible character, U+202E (RIGHT-TO-LEFT OVERRIDE)" in out
    assert re.search(r"pb\.yaml:\d+", out)
    bell = MINIMAL.replace('twitter: "Investigating a problem at {{ site }}."',
                           'twitter: "Investigating a problem at {{ site }}.\\a"')
    assert validate(write(tmp_path, bell, "bell.yaml")).returncode == 3


def test_overlong_tweet_without_threads_fails(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'twitter: "Investigating a problem at {{ site }}."',
        'twitter: {text: "' + "word " * 70 + '{{ site }}", thread: false}')
    proc = validate(write(tmp_path, text))
    assert_clean_failure(proc)
    assert "over the limit of 280" in proc.stdout + proc.stderr


def test_overlong_tweet_becomes_a_thread(tmp_path: Path) -> None:
    text = MINIMAL.replace('twitter: "Investigating a problem at {{ site }}."',
                           'twitter: "' + "word " * 70 + '{{ site }}"')
    path = write(tmp_path, text)
    assert validate(path).returncode == 0
    proc = run_cli("preview", str(path), "--set", "site=LON-2", "--json")
    doc = json_doc(proc)
    tweet = next(m for m in doc["data"]["messages"] if m["channel"] == "status_twitter")
    assert len(tweet["parts"]) == 2
    assert all(p["length"] <= 280 and p["ok"] for p in tweet["parts"])
    assert tweet["parts"][0]["text"].endswith("1/2") and tweet["parts"][1]["text"].endswith("2/2")


def test_worst_case_sms_over_budget_fails_though_example_fits(tmp_path: Path) -> None:
    # 155 characters with the example (fits one segment); with site at max_length 12 the
    # rendered text grows past 160 and the 1-segment budget.
    filler = "x" * (155 - len("Problem at LON-2."))
    text = MINIMAL.replace('sms: "Problem at {{ site }}."',
                           f'sms: "Problem at {{{{ site }}}}.{filler}"')
    proc = validate(write(tmp_path, text), json_out=True)
    doc = json_doc(proc)
    assert proc.returncode == 3
    rows = doc["data"]["playbooks"][0]["messages"]
    example = [r for r in rows if r["channel"] == "team_sms" and r["mode"] == "example"
               and r["stage"] == "investigating"]
    assert example and example[0]["ok"]
    assert any("segments" in e["message"] for e in doc["errors"])


def test_sensitivity_guard_rejects_internal_stage_to_public(tmp_path: Path) -> None:
    text = MINIMAL.replace("  investigating:\n", "  investigating:\n    sensitivity: internal\n")
    path = write(tmp_path, text)
    proc = validate(path)
    assert_clean_failure(proc)
    out = proc.stdout + proc.stderr
    assert f"{path}:26" in out and "internal" in out and "public" in out


def test_shipped_playbook_broken_copy_names_line(tmp_path: Path) -> None:
    copy = tmp_path / "playbooks"
    shutil.copytree(PLAYBOOKS, copy)
    target = copy / "dc-power-failure.yaml"
    lines = target.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if "{{ services | capitalize }}" in line)
    lines[index] = lines[index].replace("{{ services | capitalize }}", "{{ servics }}")
    target.write_text("\n".join(lines) + "\n")
    proc = run_cli("validate", str(target))
    assert_clean_failure(proc)
    assert f"{target}:" in proc.stdout + proc.stderr
    assert "servics" in proc.stdout + proc.stderr


def test_a_playbook_copied_without_its_templates_says_where_they_were_looked_for(
        tmp_path: Path) -> None:
    """A commander copies the playbooks folder elsewhere. The error said "searched:
    (none)": neither where templates are looked for nor how to fix it."""
    copy = tmp_path / "ops" / "playbooks"
    shutil.copytree(PLAYBOOKS, copy)
    target = copy / "dc-power-failure.yaml"
    proc = run_cli("validate", str(target))
    assert_clean_failure(proc)
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "template file 'power/team.txt.j2' not found" in said
    assert (f"searched: {copy / 'templates'} (no such folder), "
            f"{tmp_path / 'ops' / 'templates'} (no such folder)") in said
    assert "INCIDENT_NOTIFY_TEMPLATES" in said
    shutil.copytree(ROOT / "templates", tmp_path / "ops" / "templates")
    assert run_cli("validate", str(target)).returncode == 0


def test_preview_shows_counts_per_channel() -> None:
    proc = run_cli("preview", str(PLAYBOOKS / "dc-power-failure.yaml"), "--stage",
                   "investigating", "--set", "site=LON-2", "--set", "services=compute",
                   "--set", "status_url=https://status.acme.example/i/1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "weighted" in out and "segments" in out and "GSM-7" in out
    assert "Subject: [Investigating] Power problem at LON-2" in out


def test_preview_missing_required_variable_is_an_error_before_rendering() -> None:
    proc = run_cli("preview", str(PLAYBOOKS / "dc-power-failure.yaml"), "--set", "site=X")
    assert_clean_failure(proc)
    out = proc.stdout + proc.stderr
    assert "required variable 'services'" in out and "--set services=" in out


def test_unknown_set_variable_is_refused() -> None:
    proc = run_cli("preview", str(PLAYBOOKS / "security-incident.yaml"), "--set", "codename=A",
                   "--set", "bridge=x", "--set", "codenme=B")
    assert_clean_failure(proc)
    assert "unknown variable 'codenme'" in proc.stdout + proc.stderr


def test_startup_does_not_import_heavy_modules() -> None:
    """--help, validate and preview never import a provider client (tweepy, twilio,
    requests, smtplib), msgspec (only long reads and `audit verify` use it) or the
    emulators."""
    code = textwrap.dedent(f"""
        import sys, io, contextlib
        from incident_notify.cli.main import run
        heavy = ("tweepy", "twilio", "requests", "smtplib", "msgspec",
                 "incident_notify.sandbox")
        for argv in (["--help"], ["validate", "--no-contacts", {str(PLAYBOOKS)!r}],
                     ["preview", {str(PLAYBOOKS / 'security-incident.yaml')!r},
                      "--set", "codename=BLUE", "--set", "bridge=https://x.example"]):
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    run(argv)
                except SystemExit as exc:
                    assert exc.code == 0, (argv, exc.code)
            loaded = [m for m in heavy if m in sys.modules]
            assert not loaded, (argv, loaded)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
