"""The benchmarks' sandbox: `incident-notify sandbox` in its own process (so a figure
measures the tool, not the tool and the emulators sharing one GIL), steered through its
control API."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from typing import Any


class Sandbox:
    def __init__(self, env: dict[str, str]) -> None:
        self.server = subprocess.Popen([sys.executable, "-m", "incident_notify", "sandbox"],
                                       env=env, stdout=subprocess.PIPE, text=True)
        self.control, token = "", ""
        assert self.server.stdout is not None
        for line in self.server.stdout:
            if "INCIDENT_NOTIFY_SANDBOX_TOKEN=" in line:
                token = line.strip().split("=", 1)[1]
            if "INCIDENT_NOTIFY_SANDBOX_CONTROL=" in line:
                self.control = line.strip().split("=", 1)[1]
            if self.control and token:
                break
        self.auth = {"Authorization": f"Bearer {token}"}

    def faults(self, service: str, **faults: Any) -> None:
        req = urllib.request.Request(f"{self.control}/{service}/faults", method="POST",
                                     headers=self.auth, data=json.dumps(faults).encode())
        urllib.request.urlopen(req, timeout=5).read()

    def reset(self) -> None:
        """Forget what the emulators received, and their faults."""
        req = urllib.request.Request(f"{self.control}/reset", method="POST",
                                     headers=self.auth, data=b"{}")
        urllib.request.urlopen(req, timeout=5).read()

    def received(self, service: str) -> int:
        req = urllib.request.Request(f"{self.control}/{service}/received", headers=self.auth)
        with urllib.request.urlopen(req, timeout=60) as answer:
            return len(json.loads(answer.read())["received"])

    def stop(self) -> None:
        # SIGINT is ignored by a process started in the background: SIGTERM stops it too.
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(timeout=30)
