"""Benchmark: what a long audit log costs the commands that read it.

Builds a log of N records (incidents of ~50 records each, the shape real updates write; the
last few stay open, as in a year of history), then times, each in a fresh process, `status`,
`declare --dry-run` and `timeline` of one incident, next to the same commands on a log that
holds only what they show (the open incidents and that one incident: the "empty" history),
and `audit verify` (MB/s, full and incremental). Issue 13's targets: commands within 1.5x
of the empty history; verify >= 50 MB/s.

    python bench/auditlog.py [--records 1000000] [--open 3]
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
sys.path.insert(0, str(ROOT))


def build(path: Path, records: int, open_incidents: int = 3) -> list[str]:
    """A log of `records` records in incidents of ~50 (declare, rendered, planned,
    attempts, outcomes, resolve; the last `open_incidents` are not resolved); returns the
    incident ids."""
    from incident_notify.audit import AuditEntry, AuditLog

    log = AuditLog(path)
    ids: list[str] = []
    written, n = 0, 0
    while written < records:
        n += 1
        inc = f"INC-20250101-{n:04d}" if n < 10000 else f"INC-2025{n // 10000:04d}-{n % 10000:04d}"
        ids.append(inc)
        batch = [AuditEntry("incident.declared", incident=inc, payload={
            "playbook": "/x.yaml", "stage": "investigating", "update_no": 1,
            "variables": {"site": "LON-2"}, "message": ""})]
        batch.append(AuditEntry("message.rendered", incident=inc, channel="team_sms", payload={
            "digest": "d" * 64, "update_no": 1, "parts": ["Power loss at LON-2."],
            "subject": None, "html": None}))
        for i in range(12):
            key = f"{inc}/1/team_sms/p{i}/1"
            batch.append(AuditEntry("delivery.planned", incident=inc, channel="team_sms",
                                    recipient=f"+1202555{i:04d}", key=key, payload={
                                        "update_no": 1, "part": 1, "parts": 1,
                                        "digest": "d" * 64, "contact_id": f"p{i}"}))
            batch.append(AuditEntry("delivery.attempt", incident=inc, channel="team_sms",
                                    recipient=f"+1202555{i:04d}", key=key,
                                    payload={"attempt": 1}))
            batch.append(AuditEntry("delivery.sent", incident=inc, channel="team_sms",
                                    recipient=f"+1202555{i:04d}", key=key,
                                    payload={"provider_id": f"SM{i:032d}"}))
        batch.append(AuditEntry("update.completed", incident=inc, payload={"update_no": 1}))
        if written + len(batch) + 50 * open_incidents < records:  # the last few stay open
            batch.append(AuditEntry("incident.resolved", incident=inc, payload={
                "stage": "resolved", "update_no": 2, "variables": {}, "message": ""}))
        log.append_many(batch)
        written += len(batch)
    return ids


def timed(args: list[str], env: dict[str, str], repeat: int = 3) -> tuple[float, float]:
    """(first, best) wall time of `repeat` fresh runs."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "incident_notify", *args], cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - started)
    return times[0], min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--open", type=int, default=3, help="incidents left open")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty, big = Path(tmp) / "empty.jsonl", Path(tmp) / "big.jsonl"
        started = time.perf_counter()
        ids = build(big, args.records, args.open)
        size = big.stat().st_size
        print(f"built {args.records:,} records ({size / 1e6:.0f} MB, {len(ids):,} incidents, "
              f"{args.open} open) in {time.perf_counter() - started:.1f}s")
        from incident_notify.audit import AuditEntry, AuditLog

        shown = {ids[len(ids) // 2], *ids[len(ids) - args.open:]}
        AuditLog(empty).append_many([
            AuditEntry(r.event, incident=r.incident, channel=r.channel, recipient=r.recipient,
                       key=r.key, payload=r.payload)
            for r in AuditLog(big).records(incidents=shown)])
        Path(f"{big}.index").unlink()  # the first timed command builds it
        base = {**os.environ, "HOME": tmp, "XDG_STATE_HOME": f"{tmp}/state", "NO_COLOR": "1"}
        pb = str(ROOT / "playbooks" / "dc-power-failure.yaml")
        sets = ["--set", "site=LON-2", "--set", "services=compute", "--set",
                "status_url=https://status.acme.example/i/1"]
        commands = {
            "status": ["status"],
            "timeline (one incident)": ["timeline", ids[len(ids) // 2]],
            "declare --dry-run": ["declare", pb, *sets, "--dry-run", "--sandbox"],
        }
        print(f"{'command':26} {'empty s':>8} {'big s':>8} {'ratio':>6} {'first':>6}  (empty: "
              "only the incidents shown; best of 3; 'first': the first big run)")
        for name, argv in commands.items():
            _, e = timed(argv, {**base, "INCIDENT_NOTIFY_AUDIT_LOG": str(empty)})
            first, b = timed(argv, {**base, "INCIDENT_NOTIFY_AUDIT_LOG": str(big)})
            print(f"{name:26} {e:8.2f} {b:8.2f} {b / e:6.2f} {first:6.2f}")
        log = AuditLog(big)
        started = time.perf_counter()
        result = log.verify(workers=None)
        took = time.perf_counter() - started
        print(f"audit verify (in-process): {took:.2f}s, {size / 1e6 / took:.1f} MB/s, "
              f"ok={result.ok}")
        assert result.checkpoint is not None
        build_more = AuditLog(big)
        build_more.append_many([AuditEntry("delivery.sent", incident="INC-NEW", key=f"k{i}",
                                           payload={"provider_id": f"SM{i}"})
                                for i in range(1000)])
        started = time.perf_counter()
        again = log.verify(since=result.checkpoint)
        took = time.perf_counter() - started
        print(f"audit verify --incremental after 1,000 more records: {took * 1000:.0f} ms, "
              f"checked {again.checked}, ok={again.ok}")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
