"""Benchmark: `compare_email.sh`'s incident-notify half against its own SMTP sink, next to
bare smtplib on the same sink (the floor no client goes under).

`../shared/bench/compare_email.sh` sends N emails through apprise and through a `declare`
process to `../shared/bench/smtp_sink.py` (aiosmtpd, LAT ms per message). The script
writes the server into its playbook, which the endpoint rule refuses (servers come from
the operator's environment: docs/security.md), so its incident-notify half exits 3. This
runs the same sink, contacts and playbook, with the server in INCIDENT_NOTIFY_SMTP_URL;
with `--apprise`, first the script's own apprise command on the same sink; then the same
messages through bare smtplib with the same 8 connections.

    A=/tmp/apprise-venv; python3 -m venv $A && $A/bin/pip install -q apprise aiosmtpd
    python bench/email_sink.py [--emails 1000] [--latency-ms 20] [--concurrency 8] \
        [--apprise $A/bin/apprise]

Needs aiosmtpd (the sink's server) and the shared folder next to the checkout.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SINK = ROOT.parent / "shared" / "bench" / "smtp_sink.py"
PLAYBOOK = """name: bench-email
title: Bench
severity: sev2
contacts: [contacts/c.csv]
channels:
  mail:
    type: email
    sender: "Status <status@acme.test>"
    rate_per_second: 1000
    burst: 1000
    concurrency: {concurrency}
audiences:
  customers:
    kind: customers
    select: {{tags: [customer]}}
    channels: [mail]
stages:
  investigating:
    title: Investigating
    messages:
      email:
        subject: "Power problem"
        text: "We are investigating."
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sink(port: int, latency_ms: float, count: Path) -> subprocess.Popen[bytes]:
    sink = subprocess.Popen([sys.executable, str(SINK), str(port), str(latency_ms),
                             str(count)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return sink
        except OSError:
            time.sleep(0.05)
    sink.kill()
    raise SystemExit("the sink did not start")


def apprise(command: str, port: int, emails: int) -> float:
    """compare_email.sh's apprise half, as the script runs it."""
    to = ",".join(f"user{i}@example.org" for i in range(emails))
    started = time.perf_counter()
    subprocess.run([command, "-t", "Power problem", "-b", "We are investigating.",
                    f"mailto://127.0.0.1:{port}?from=status@acme.test&to={to}&mode=insecure"
                    "&user=&pass="], capture_output=True, check=False)
    return time.perf_counter() - started


def bare(port: int, emails: int, concurrency: int) -> float:
    def work(share: range) -> None:
        with smtplib.SMTP("127.0.0.1", port) as server:
            for i in share:
                to = f"user{i}@example.org"
                server.sendmail("status@acme.test", [to], (
                    f"From: status@acme.test\r\nTo: {to}\r\nSubject: Power problem\r\n\r\n"
                    "We are investigating.\r\n").encode())

    threads = [threading.Thread(target=work, args=(range(k, emails, concurrency),))
               for k in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--apprise", help="apprise's command, to run it on the same sink first")
    args = parser.parse_args()
    if not SINK.exists():
        print(f"no sink at {SINK}", file=sys.stderr)
        return 2
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        print("the sink needs aiosmtpd (pip install aiosmtpd)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pb" / "contacts").mkdir(parents=True)
        (root / "pb" / "contacts" / "c.csv").write_text(
            "id,name,email,channels,tags\n" + "".join(
                f"c{i},User {i},user{i}@example.org,email,customer\n"
                for i in range(args.emails)))
        (root / "pb" / "p.yaml").write_text(PLAYBOOK.format(concurrency=args.concurrency))
        port = free_port()
        sink = start_sink(port, args.latency_ms, root / "count")
        try:
            theirs, their_count = None, 0
            if args.apprise:
                theirs = apprise(args.apprise, port, args.emails)
                their_count = int((root / "count").read_text() or 0)
            env = {**os.environ, "XDG_DATA_HOME": f"{tmp}/data",
                   "XDG_STATE_HOME": f"{tmp}/state", "XDG_CONFIG_HOME": f"{tmp}/config",
                   "INCIDENT_NOTIFY_SMTP_URL": f"smtp://127.0.0.1:{port}",
                   "INCIDENT_NOTIFY_SMTP_TLS": "none"}
            for name in ("SMTP_USERNAME", "SMTP_PASSWORD"):
                env.pop(name, None)
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "incident_notify", "declare", str(root / "pb/p.yaml"),
                 "--yes", "--json", "--audit-log", str(root / "audit.jsonl")],
                env=env, capture_output=True, text=True, check=False)
            tool = time.perf_counter() - started
            tool_count = int((root / "count").read_text() or 0) - their_count
            floor = bare(port, args.emails, args.concurrency)
        finally:
            sink.terminate()
            sink.wait(timeout=10)
    import json

    summary = json.loads(proc.stdout)["data"]["result"] if proc.stdout else {}
    bound = args.emails * args.latency_ms / 1000 / args.concurrency
    def ratio(seconds: float) -> str:
        return f", {seconds / bound:.2f}x the bound" if bound else ""

    print(f"emails            {args.emails}, {args.latency_ms:.0f} ms per message at the "
          f"sink, concurrency {args.concurrency}")
    fan_out = summary.get("elapsed_s", float("nan"))
    print(f"incident-notify   {tool:.2f} s for {tool_count} emails (exit {proc.returncode})"
          f"{ratio(tool)}; its fan-out {fan_out:.2f} s")
    print(f"bare smtplib      {floor:.2f} s (the same messages and connections, no planning, "
          f"no record){ratio(floor)}")
    print(f"ratio             the process is {tool / floor:.2f}x bare smtplib")
    if theirs is not None:
        print(f"apprise           {theirs:.2f} s for {their_count} emails{ratio(theirs)}: "
              f"incident-notify is {theirs / tool:.2f}x faster")
    return 0 if proc.returncode == 0 and tool_count == args.emails else 1


if __name__ == "__main__":
    raise SystemExit(main())
