"""Benchmark: wall time of a fan-out against the emulators with added latency.

Prints the measured time next to the ideal bound and their ratio:

    ideal = max(deliveries_per_channel x latency / concurrency,
                deliveries_per_channel / rate)        (channels run in parallel)

Usage: python bench/fanout.py [--deliveries 10000] [--latency-ms 50] [--concurrency 16]
Every delivery goes through the real path: planner, dispatcher, audit log (group commit,
fsync), real twilio / smtplib clients over loopback HTTP / SMTP to an emulator process.

It then sends the same number of messages through bare clients (requests posting to the
Twilio emulator, smtplib to the SMTP one; the same threads per channel, no planning, no
record): the pace of the providers as these emulators give it on this machine, which no
tool reaches. Its ratio to the bound is the floor of the tool's.
"""

from __future__ import annotations

import argparse
import os
import resource
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._sandbox import Sandbox
from incident_notify.config import Settings
from incident_notify.lifecycle import declare
from incident_notify.runtime import open_runtime
from tests.conftest import make_fanout_playbook


def bare_clients(env: dict[str, str], per_channel: int, concurrency: int) -> float:
    """Seconds to send `per_channel` SMS and as many emails through bare clients, each
    channel with `concurrency` threads, both channels at once."""
    import urllib.parse

    import requests

    sid, token = env["TWILIO_ACCOUNT_SID"], env["TWILIO_AUTH_TOKEN"]
    url = f"{env['INCIDENT_NOTIFY_TWILIO_API_BASE']}/2010-04-01/Accounts/{sid}/Messages.json"
    smtp = urllib.parse.urlparse(env["INCIDENT_NOTIFY_SMTP_URL"])
    failures: list[str] = []

    def sms(share: range) -> None:
        session = requests.Session()
        session.auth = (sid, token)
        for i in share:
            answer = session.post(url, data={"To": f"+1202555{i % 10_000:04d}",
                                             "From": "+15005550006", "Body": f"bare {i}"})
            if answer.status_code >= 300:
                failures.append(f"sms {answer.status_code}")

    def email(share: range) -> None:
        with smtplib.SMTP(smtp.hostname or "127.0.0.1", smtp.port or 25) as server:
            server.login(env["SMTP_USERNAME"], env["SMTP_PASSWORD"])
            for i in share:  # (the leanest message: bytes made by hand)
                to = f"person{i}@example.com"
                server.sendmail("ops@acme.example", [to], (
                    f"From: ops@acme.example\r\nTo: {to}\r\nSubject: bare\r\n\r\n"
                    f"bare {i}\r\n").encode())

    threads = [threading.Thread(target=work, args=(range(n, per_channel, concurrency),))
               for work in (sms, email) for n in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    assert not failures, failures[:3]
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=10_000,
                        help="total deliveries (half SMS, half email)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=16, help="per channel")
    parser.add_argument("--rate", type=float, default=5000.0, help="per channel, per second")
    args = parser.parse_args()

    people = args.deliveries // 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pb = make_fanout_playbook(root / "pb", people, rate=args.rate,
                                  concurrency=args.concurrency)
        # The emulators run in their own process (`incident-notify sandbox`), so the
        # figure measures the tool, not the tool and the emulators sharing one GIL.
        env = {**os.environ, "HOME": str(root / "home"), "XDG_STATE_HOME": str(root / "st")}
        sandbox = Sandbox(env)
        try:
            for service in ("twilio", "smtp"):
                sandbox.faults(service, latency_ms=args.latency_ms)
            os.environ.update({"HOME": env["HOME"], "XDG_STATE_HOME": env["XDG_STATE_HOME"]})
            from incident_notify.sandbox import RemoteSandbox

            remote = RemoteSandbox.find()
            assert remote is not None, "the sandbox process did not start"
            rt = open_runtime(Settings(audit_log=root / "audit.jsonl",
                                       optouts=root / "optouts.jsonl", sandbox=True),
                              sandbox=remote)
            started = time.perf_counter()
            outcome = declare(rt, pb, {"site": "LON-2"})
            wall = time.perf_counter() - started
            received = sandbox.received("twilio") + sandbox.received("smtp")
            # (After the tool's run, so that its own imports are in its figure.)
            sandbox.reset()
            for service in ("twilio", "smtp"):
                sandbox.faults(service, latency_ms=args.latency_ms)
            bare = bare_clients(remote.env(), people, args.concurrency)
        finally:
            sandbox.stop()
        assert outcome.verdict is not None and outcome.result is not None
        result = outcome.result
        sent = outcome.verdict.total("sent")
        per_channel = people
        latency = args.latency_ms / 1000
        ideal = max(per_channel * latency / args.concurrency, per_channel / args.rate)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        log_mb = (root / "audit.jsonl").stat().st_size / 1e6
    print(f"deliveries        {args.deliveries} ({people} SMS + {people} email)")
    print(f"sent / received   {sent} / {received}   exit code {int(outcome.exit_code)}")
    print(f"latency added     {args.latency_ms:.0f} ms per request, concurrency "
          f"{args.concurrency} per channel")
    print(f"wall time         {wall:.2f} s (includes planning, health checks, audit fsyncs)")
    print(f"fan-out only      {result.elapsed_s:.2f} s (dispatch; the rest is planning and "
          "writing 10,000+ planned records)")
    print(f"ideal bound       {ideal:.2f} s")
    print(f"bare clients      {bare:.2f} s = {bare / ideal:.2f}x the bound (the same "
          "messages, threads and emulators, no planning, no record: the floor)")
    print(f"ratio             {wall / ideal:.2f}x the ideal (fan-out only: "
          f"{result.elapsed_s / ideal:.2f}x); {wall / bare:.2f}x the bare clients "
          f"(fan-out only: {result.elapsed_s / bare:.2f}x)")
    print(f"throughput        {sent / wall:.0f} deliveries/s")
    print(f"peak RSS          {rss_mb:.0f} MiB; audit log {log_mb:.1f} MB")
    return 0 if sent == args.deliveries else 1


if __name__ == "__main__":
    raise SystemExit(main())
