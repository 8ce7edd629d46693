"""Benchmark: how long the commander waits on the tool for the commands that send nothing.

Each command runs in a fresh process, several times; the best wall time is compared with
`python -c pass` and with `incident-notify --version` (issue 13's yardstick: validate and
preview within 2x --version). The last row, `bench/startup_floor.py`, is what a validate
costs that only imports this project's libraries, reads the playbooks and compiles their
templates: the floor under the tool's own figure.

    python bench/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POWER = ROOT / "playbooks" / "dc-power-failure.yaml"
VARS = ["--set", "site=LON-2", "--set", "services=compute", "--set",
        "status_url=https://status.acme.example/i/1"]


def best(cmd: list[str], repeat: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tool = [sys.executable, "-m", "incident_notify"]
    with tempfile.TemporaryDirectory() as tmp:
        # Bytecode as installed tools have it (this machine sets PYTHONDONTWRITEBYTECODE,
        # which recompiles the package in every process).
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
               "HOME": tmp, "XDG_STATE_HOME": f"{tmp}/state",
               "INCIDENT_NOTIFY_AUDIT_LOG": f"{tmp}/audit.jsonl", "NO_COLOR": "1"}
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "--version": [*tool, "--version"],
            "--help": [*tool, "--help"],
            "validate playbooks/": [*tool, "validate", "playbooks/"],
            "preview (one stage)": [*tool, "preview", str(POWER), *VARS],
            "status (empty log)": [*tool, "status"],
            "floor: validate": [sys.executable, str(ROOT / "bench" / "startup_floor.py"),
                                "validate", "playbooks/"],
        }
        figures = {name: best(cmd, args.repeat, env) for name, cmd in commands.items()}
    base, version = figures["python -c pass"], figures["--version"]
    print(f"{'command':<22} {'best s':>7} {'x python':>9} {'x --version':>12}")
    for name, seconds in figures.items():
        print(f"{name:<22} {seconds:7.3f} {seconds / base:9.1f} {seconds / version:12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
