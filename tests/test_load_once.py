"""One command loads the playbook, the contacts and each channel once, and passes them
down (issue 11): counted for declare, update, resolve and resume through the real path."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import incident_notify.contacts as contacts_module
import incident_notify.lifecycle as lifecycle
import incident_notify.resume as resume_module
from incident_notify.channels.base import Channel
from tests.conftest import make_fanout_playbook, sandbox_runtime


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    counts: Counter[str] = Counter()
    real_playbook, real_contacts = lifecycle.load_playbook, contacts_module.load_contacts
    real_init = Channel.__init__

    def load_playbook(path: Path) -> Any:
        counts["playbook"] += 1
        return real_playbook(path)

    def load_contacts(*args: Any, **kwargs: Any) -> Any:
        counts["contacts"] += 1
        return real_contacts(*args, **kwargs)

    def init(self: Channel, spec: Any, secrets: Any) -> None:
        counts[f"channel:{spec.name}"] += 1
        real_init(self, spec, secrets)

    from incident_notify.plan import Planner

    real_jobs = Planner._jobs

    def jobs(self: Planner) -> Any:
        counts["plan walks"] += 1
        return real_jobs(self)

    monkeypatch.setattr(Planner, "_jobs", jobs)
    monkeypatch.setattr(lifecycle, "load_playbook", load_playbook)
    monkeypatch.setattr(contacts_module, "load_contacts", load_contacts)
    monkeypatch.setattr(Channel, "__init__", init)
    return counts


def test_each_command_loads_and_builds_once(tmp_path: Path, sandbox: Any,
                                            counted: Counter[str]) -> None:
    pb = make_fanout_playbook(tmp_path / "pb", 3, twitter=True, subscribers=2)
    rt = sandbox_runtime(tmp_path, sandbox)
    channels = {"channel:status_twitter", "channel:team_sms", "channel:team_email"}

    def once(action: Any) -> None:
        counted.clear()
        outcome = action()
        assert outcome.exit_code == 0, outcome.to_dict()["result"]
        assert counted["playbook"] == 1 and counted["contacts"] == 1, counted
        # Planned once: the preflight's counts, the record and the sends are one plan.
        assert counted["plan walks"] == 1, counted
        assert {k for k in counted if k.startswith("channel:")} <= channels
        assert all(counted[k] == 1 for k in counted if k.startswith("channel:")), counted

    declared: list[Any] = []
    once(lambda: declared.append(lifecycle.declare(rt, pb, {"site": "LON-2"})) or declared[0])
    incident = declared[0].incident_id
    once(lambda: lifecycle.update(rt, incident, stage="identified", sets={}))
    once(lambda: lifecycle.resolve(rt, incident, sets={}))
    counted.clear()
    resumed = resume_module.resume(rt, incident)
    assert resumed.exit_code == 0 and counted["playbook"] == 1
    assert counted["plan walks"] == 0  # nothing left to plan: resume reads the record
