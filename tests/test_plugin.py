"""A channel type from outside the package, registered through the entry-point group like
any plugin, taken through the whole tool: `validate` measures its limit, `declare` sends
through it over real HTTP, a person who prefers it is reached on it, and when it is down
its audience fails over to a built-in channel; every send is in the record."""

from __future__ import annotations

import json
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

# The plugin is installed from outside the package: only a new process finds it.
from tests.conftest import json_doc, run_process

PLUGIN = '''
"""A pager service: one POST per page, to the endpoint the operator configures."""
import json
import urllib.error
import urllib.request

from incident_notify.channels.base import (
    Channel, ChannelLimits, Health, PermanentChannelError, Receipt, TransientChannelError)


class PagerChannel(Channel):
    type_name = "pager"
    address = "phone"
    default_limits = ChannelLimits(length_rule="chars", max_length=160,
                                   rate_per_second=100.0, burst=10, concurrency=2)
    secret_names = ("PAGER_TOKEN",)
    api_base_env = "PAGER_API_BASE"

    def endpoint(self):
        return self.api_base("https://pager.example")

    def _request(self, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        return urllib.request.Request(
            self.endpoint() + path, data=data,
            headers={"Authorization": "Bearer " + self.secret("PAGER_TOKEN"),
                     "Content-Type": "application/json"})

    def send(self, delivery, attempt):
        request = self._request("/page", {"to": delivery.recipient,
                                          "text": delivery.message.text})
        attempt.begin()
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return Receipt(provider_id=json.load(answer)["id"])
        except urllib.error.HTTPError as exc:
            # (A careless plugin: its errors quote its token. The tool hides it.)
            said = f"{self.name}: pager {exc.code} for token {self.secret('PAGER_TOKEN')}"
            if exc.code >= 500:
                raise TransientChannelError(said, channel=self.name,
                                            code=str(exc.code)) from None
            raise PermanentChannelError(said, channel=self.name, code=str(exc.code),
                                        recipient_problem=True) from None

    def check(self):
        try:
            with urllib.request.urlopen(self._request("/health"), timeout=5):
                return Health(ok=True, detail="pager up, token "
                              + self.secret("PAGER_TOKEN"))
        except (urllib.error.URLError, OSError) as exc:
            return Health(ok=False, detail=f"pager unreachable ({type(exc).__name__})")
'''

PLAYBOOK = '''
name: paging
title: Paging test
severity: sev2
contacts: [people.csv]
variables:
  site: {example: LON-2, max_length: 12}
channels:
  pager:
    type: pager
    sender: "acme"
    fallback: [team_sms]
  team_sms:
    type: sms
    sender: "+15005550006"
  team_email:
    type: email
    sender: "Ops <ops@acme.example>"
audiences:
  team:
    kind: internal
    select: {groups: [team]}
    channels: [pager, team_email]
  customers:
    kind: customers
    select: {tags: [customer]}
    channels: [team_email, pager]
stages:
  investigating:
    messages:
      pager: "PAGE {{ incident.id }}: power at {{ site }}"
      sms: "[{{ incident.id }}] power at {{ site }}"
      email: {subject: "Power at {{ site }}", text: "Power problem at {{ site }}."}
  resolved:
    messages:
      pager: "RESOLVED {{ incident.id }}"
      sms: "[{{ incident.id }}] resolved"
      email: {subject: "Resolved", text: "Resolved."}
'''


class Pager:
    def __init__(self) -> None:
        self.pages: list[dict[str, Any]] = []
        self.down = False
        self.refuse = False
        pager = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer(503 if pager.down else 200, {"ok": not pager.down})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if pager.down:
                    self._answer(503, {"error": "down"})
                    return
                if pager.refuse:
                    self._answer(400, {"error": "no such pager"})
                    return
                assert self.headers["Authorization"] == "Bearer pager-token"
                pager.pages.append(body)
                self._answer(201, {"id": f"P{len(pager.pages)}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def installed(tmp_path: Path, sandbox: Any) -> Iterator[tuple[dict[str, str], Pager, Path]]:
    site = tmp_path / "site"
    (site / "pagerplug").mkdir(parents=True)
    (site / "pagerplug" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "pagerplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pagerplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[incident_notify.channels]\npager = pagerplug:PagerChannel\n")
    pb = tmp_path / "pb" / "paging.yaml"
    pb.parent.mkdir()
    pb.write_text(PLAYBOOK)
    (pb.parent / "people.csv").write_text(
        "id,name,email,phone,channels,groups,tags\n"
        "t1,Team One,t1@acme.example,+12025550101,,team,\n"
        "t2,Team Two,t2@acme.example,+12025550102,,team,\n"
        "c1,Customer One,c1@example.org,+14155550101,pager,,customer\n")
    pager = Pager()
    sandbox.write_state()
    env = {"PYTHONPATH": str(site), "PAGER_API_BASE": pager.url, "PAGER_TOKEN": "pager-token",
           "INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    try:
        yield env, pager, pb
    finally:
        pager.server.shutdown()


def _declare(pb: Path, env: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """`declare --json` of the paging playbook in its own process (the plugin installed
    through PYTHONPATH): the process and its JSON document."""
    declared = run_process("declare", str(pb), "--set", "site=LON-2", "--yes", "--sandbox",
                           "--json", env=env)
    return declared, json_doc(declared)


def test_a_plugin_channel_is_validated_planned_sent_and_recorded(
        installed: tuple[dict[str, str], Pager, Path], sandbox: Any) -> None:
    env, pager, pb = installed
    checked = run_process("validate", str(pb), "--json", env=env)
    doc = json_doc(checked)
    assert checked.returncode == 0, checked.stdout
    rows = [m for r in doc["data"]["playbooks"] for m in r["messages"]
            if m["channel"] == "pager"]
    assert rows and all("/160 chars" in m["measure"] for m in rows)

    declared, doc = _declare(pb, env)
    result = doc["data"]["result"]
    assert declared.returncode == 0, declared.stdout + declared.stderr
    # The team on the pager (and email); the customer who prefers the pager gets it there.
    assert sorted(p["to"] for p in pager.pages) == ["+12025550101", "+12025550102",
                                                    "+14155550101"]
    assert result["channels"]["pager"]["sent"] == 3
    assert result["people"] == {"intended": 3, "reached": 3, "in_doubt": 0,
                                "not_reached": 0}
    verified = run_process("audit", "verify", env=env)
    assert verified.returncode == 0


def test_when_the_plugin_is_down_its_audience_fails_over_to_a_builtin(
        installed: tuple[dict[str, str], Pager, Path], sandbox: Any) -> None:
    env, pager, pb = installed
    pager.down = True
    declared, doc = _declare(pb, env)
    assert declared.returncode == 0, declared.stdout + declared.stderr
    assert doc["data"]["preflight"]["health"]["pager"]["ok"] is False
    assert pager.pages == []
    texts = {r["to"]: r["body"] for r in sandbox.twilio.received.all()}
    assert {"+12025550101", "+12025550102"} <= set(texts)
    assert all("power at LON-2" in t for t in texts.values())


def test_a_plugin_quoting_its_token_shows_and_records_it_hidden(
        installed: tuple[dict[str, str], Pager, Path], sandbox: Any) -> None:
    env, pager, pb = installed
    pager.refuse = True
    declared, doc = _declare(pb, env)
    assert doc["data"]["preflight"]["health"]["pager"]["detail"] == "pager up, token (hidden)"
    log = Path(env["INCIDENT_NOTIFY_AUDIT_LOG"]).read_text()
    assert "pager 400 for token (hidden)" in log
    assert "pager-token" not in log + declared.stdout + declared.stderr
