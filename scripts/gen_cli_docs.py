"""Generate docs/cli.md from the commands' --help output; --check fails if it drifted.

Run: python scripts/gen_cli_docs.py          (rewrite docs/cli.md)
     python scripts/gen_cli_docs.py --check  (CI: exit 1 when docs/cli.md is stale)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "cli.md"
COMMANDS = [
    [], ["validate"], ["preview"], ["declare"], ["update"], ["resolve"], ["reopen"],
    ["resume"], ["status"], ["timeline"], ["drill"], ["channels", "check"], ["sandbox"],
    ["sandbox", "fault"], ["sandbox", "received"], ["sandbox", "reply"],
    ["sandbox", "delete-tweet"],
    ["audit", "verify"], ["audit", "show"], ["audit", "export"],
    ["contacts", "check"], ["contacts", "list"], ["contacts", "optout", "add"],
    ["contacts", "optout", "remove"], ["contacts", "optout", "list"], ["config", "show"],
]


def help_text(args: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.run([sys.executable, "-m", "incident_notify", *args, "--help"],
                          capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"--help failed for {' '.join(args)}: {proc.stderr}")
    return proc.stdout.rstrip() + "\n"


def render() -> str:
    out = ["# Command-line reference\n",
           "Generated from `--help` by `scripts/gen_cli_docs.py`; CI fails when it drifts.\n",
           "Exit codes: [exit-codes.md](exit-codes.md). JSON output: "
           "[json-output.md](json-output.md).\n"]
    for args in COMMANDS:
        title = " ".join(["incident-notify", *args])
        out.append(f"\n## `{title}`\n\n```text\n{help_text(args)}```\n")
    return "".join(out)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print("docs/cli.md is out of date: run python scripts/gen_cli_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
