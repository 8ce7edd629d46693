"""Shared fixtures: an isolated home for every test, the sandbox emulators, CLI runners."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = ROOT / "playbooks"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the real user's state, config or credentials."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    for name in list(os.environ):
        if name.startswith(("INCIDENT_NOTIFY_", "TWITTER_", "TWILIO_", "SMTP_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "160")
    # Child processes (the kill, Ctrl-C and pty tests) keep the compiled package between
    # runs, as an installed tool does; this machine's PYTHONDONTWRITEBYTECODE would have
    # every one of them compile it again.
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    return home


@pytest.fixture
def sandbox() -> Iterator[Any]:
    from incident_notify.sandbox import Sandbox

    sb = Sandbox().start()
    try:
        yield sb
    finally:
        sb.stop()


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


def sandbox_runtime(tmp_path: Path, sandbox: Any, policy: Any = None) -> Any:
    """A runtime that sends to `sandbox`, recording in tmp_path, with a retry policy."""
    from incident_notify.config import Settings
    from incident_notify.runtime import open_runtime

    settings = Settings(audit_log=tmp_path / "audit.jsonl", optouts=tmp_path / "optouts.jsonl",
                        sandbox=True)
    rt = open_runtime(settings, sandbox=sandbox)
    if policy is not None:
        rt.policy = policy
    return rt


def sms_to(sandbox: Any) -> Counter[str]:
    """How many SMS each number received."""
    return Counter(r["to"] for r in sandbox.twilio.received.all())


def mail_to(sandbox: Any) -> Counter[str]:
    """How many emails each address received."""
    return Counter(rcpt for r in sandbox.smtp.received.all() for rcpt in r["rcpt_tos"])


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None,
            cwd: Path | None = None, timeout: float = 300,
            merged: bool = False) -> subprocess.CompletedProcess[str]:
    """The real command line, run in this process through the same entry point the
    console script uses (`main.invoke`), with its own streams and environment variables:
    what a user or runbook sees on stdout and stderr, and the exit code. Tests where the
    process itself matters (signals, start-up imports, closed pipes) use `run_process`.
    `merged`: stderr interleaved into stdout, as a terminal shows them."""
    from incident_notify.cli.environment import Environment
    from incident_notify.cli.main import invoke

    stdout = io.StringIO()
    stderr = stdout if merged else io.StringIO()
    overrides = env or {}
    saved = {name: os.environ.get(name) for name in overrides}
    here = os.getcwd()
    os.environ.update(overrides)
    os.chdir(cwd or ROOT)
    try:
        # Anything written past the environment (click's --help) lands in the same place.
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = invoke(list(args), Environment(stdin=io.StringIO(input or ""),
                                                  stdout=stdout, stderr=stderr,
                                                  environ=os.environ))
    finally:
        os.chdir(here)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return subprocess.CompletedProcess(list(args), code, stdout.getvalue(),
                                       "" if merged else stderr.getvalue())


def run_process(*args: str, env: dict[str, str] | None = None, input: str | None = None,
                cwd: Path | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess: for what only a process shows (exit on a closed
    pipe, start-up imports, signals, the console script itself)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "incident_notify", *args],
                          capture_output=True, text=True, env=full_env, input=input,
                          cwd=cwd or ROOT, timeout=timeout, check=False)


def json_doc(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:  # pragma: no cover - shown on failure
        raise AssertionError(f"stdout is not one JSON document: {exc}\n{proc.stdout}\n"
                             f"stderr:\n{proc.stderr}") from None
    return doc


class UnreachablePort:
    """A local address whose connection requests are dropped, as a firewall or a route
    lost in an outage drops them: a listening socket whose queue is already full, so the
    kernel ignores every further SYN and the client's connect waits until it gives up."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        self.listener = socket.socket()
        self.listener.bind((host, port))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.queued = socket.create_connection((host, self.port), timeout=5)

    def __enter__(self) -> UnreachablePort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.queued.close()
        self.listener.close()


def make_fanout_playbook(directory: Path, people: int, *, twitter: bool = False,
                         subscribers: int = 0, rate: float = 1000.0, concurrency: int = 8,
                         fallback_notice: bool = True, timeout_s: float | None = None) -> Path:
    """A playbook + CSV of `people` team members, each told by SMS and email (internal),
    and optionally a public Twitter account that falls back to SMS for `subscribers`
    status subscribers (distinct people, phone numbers from +1 415 555 0000)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = ["id,name,email,phone,twitter,channels,groups,tags"]
    for i in range(people):
        # Past 10,000 people the area code moves on (202, 203, ...: all valid NANP codes).
        rows.append(f"p{i:05d},Person {i},person{i}@example.com,+1{202 + i // 10_000}555"
                    f"{i % 10_000:04d},,sms;email,team,")
    for i in range(subscribers):
        rows.append(f"s{i:05d},Subscriber {i},sub{i}@example.org,+1415555{i:04d},,"
                    f"sms;email,,status-subscriber")
    (directory / "people.csv").write_text("\n".join(rows) + "\n")
    limits = f"    rate_per_second: {rate}\n    burst: 100\n    concurrency: {concurrency}\n"
    if timeout_s is not None:
        limits += f"    timeout_s: {timeout_s}\n"
    twitter_channel = ("  status_twitter:\n    type: twitter\n    sender: \"@acme_status\"\n"
                       "    fallback: [team_sms, team_email]\n"
                       "    rate_per_second: 50\n    burst: 10\n") if twitter else ""
    public = ("  public:\n    kind: public\n    channels: [status_twitter]\n"
              "    fallback_select: {tags: [status-subscriber]}\n") if twitter else ""
    tweet = "      twitter: \"{{ incident.stage_title }}: problem at {{ site }}. {{ message }}\"\n"
    notice = ('failover_notice: "Twitter/X is down; this update comes to you directly."\n'
              if fallback_notice else "")
    stage_block = ""
    for stage in ("investigating", "identified", "monitoring", "resolved"):
        stage_block += (f"  {stage}:\n    messages:\n"
                        + (tweet if twitter else "")
                        + "      sms: \"[{{ incident.id }}] {{ incident.stage_title }} at "
                          "{{ site }}. {{ message }}\"\n"
                        + "      email:\n        subject: \"[{{ incident.id }}] "
                          "{{ incident.stage_title }} at {{ site }}\"\n"
                        + "        text: \"Stage {{ stage }} at {{ site }}. {{ message }}\"\n")
    text = (
        "name: fanout\ntitle: Fan-out test\nseverity: sev1\ncontacts: [people.csv]\n"
        + notice
        + "variables:\n  site:\n    example: LON-2\n    max_length: 12\n"
        + "channels:\n" + twitter_channel
        + "  team_sms:\n    type: sms\n    sender: \"+15005550006\"\n" + limits
        + "  team_email:\n    type: email\n    sender: \"Ops <ops@acme.example>\"\n"
        + limits
        + "audiences:\n" + public
        + "  team:\n    kind: internal\n    select: {groups: [team]}\n"
        + "    channels: [team_sms, team_email]\n"
        + "stages:\n" + stage_block
    )
    path = directory / "fanout.yaml"
    path.write_text(text)
    return path


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """One worker more than cores: many tests wait on emulators, sockets and bounded
    timeouts, and a third worker fills those waits on the 2-core machine (77 s instead of
    110 s for the suite; a fourth only adds contention)."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1) + 1


_LONG_FIRST = ("test_fanout.py", "test_faults.py", "test_refusals.py", "test_commander.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long end-to-end modules first: with work stealing, the short tests then fill
    the gaps, instead of a long test starting last and holding up the end of the run."""
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
