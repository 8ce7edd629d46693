"""Benchmark: load a generated contacts CSV; print rows/s and peak memory.

Usage: python bench/contacts.py [--rows 100000] [--repeat 3]

Every row is fully validated (phonenumbers rules, email-validator, handle rules). Each run
is a fresh Python process, so the figures include importing phonenumbers and
email-validator and compiling the patterns used: what a command that loads contacts pays.
Two phone columns are measured: all E.164 (what CRMs and Twilio use), and a mix read with
default region GB: E.164, formatted international (+1 (202) 555-0143, +44 20 7946 0958) and
UK national numbers with a trunk 0 (020 7946 0958, the slowest form the fast path takes).
Two ways of reading: streaming (iter_contacts, one
person at a time, as `contacts check` sums) and holding every contact (load_contacts, what
planning uses).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "id,name,email,phone,twitter,channels,groups,tags\n"


def phone(i: int, shape: str) -> str:
    area = 202 + (i // 10_000) % 7 * 100  # 202, 302, ... all valid US area codes
    line = f"{i % 10_000:04d}"
    if shape == "e164":
        return f"+1{area}555{line}"
    return (f"+1{area}555{line}", f"+1 ({area}) 555-{line}", f"+44 20 7946 {line}",
            f"020 7946 {line}")[i % 4]


REGIONS = {"e164": "US", "mixed": "GB"}


def write_csv(path: Path, rows: int, shape: str) -> None:
    with open(path, "w") as out:
        out.write(HEADER)
        for i in range(rows):
            out.write(f"c{i},Person {i},person{i}@example.com,{phone(i, shape)},"
                      f"@user{i % 10**9},sms;email,g{i % 10},customer\n")


def child(mode: str, path: str, region: str) -> None:
    """One measured run, in its own process: import, load, report."""
    import resource
    import time

    started = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from incident_notify.contacts import iter_contacts, load_contacts

    problems: list = []
    if mode == "stream":
        count = sum(1 for _ in iter_contacts([Path(path)], default_region=region,
                                             problems=problems))
    else:
        contacts = load_contacts([Path(path)], default_region=region)
        count, problems = len(contacts.contacts), contacts.problems
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "valid": count, "invalid": len(problems),
                      "rss_mib": rss}))


def measure(mode: str, path: Path, region: str, repeat: int) -> list[dict]:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), region],
                             check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out))
    return runs


def baseline_rss() -> float:
    """Peak RSS of a process that only imports what loading needs (no rows)."""
    code = (f"import resource, sys; sys.path.insert(0, {str(ROOT)!r}); "
            "import phonenumbers, email_validator, incident_notify.contacts; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], check=True,
                                capture_output=True, text=True).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "REGION"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    print(f"{args.rows:,} rows, best and median of {args.repeat} fresh processes each "
          f"(imports included); interpreter + imports alone: {baseline_rss():.0f} MiB")
    print(f"{'phones':8} {'read':7} {'best s':>7} {'median s':>9} {'rows/s':>9} "
          f"{'peak RSS':>9}  valid/invalid")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in ("e164", "mixed"):
            path = Path(tmp) / f"contacts-{shape}.csv"
            write_csv(path, args.rows, shape)
            for mode in ("stream", "hold"):
                runs = measure(mode, path, REGIONS[shape], args.repeat)
                best = min(r["seconds"] for r in runs)
                median = statistics.median(r["seconds"] for r in runs)
                rss = max(r["rss_mib"] for r in runs)
                print(f"{shape:8} {mode:7} {best:7.2f} {median:9.2f} "
                      f"{args.rows / best:9,.0f} {rss:6.0f} MiB  "
                      f"{runs[0]['valid']}/{runs[0]['invalid']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
