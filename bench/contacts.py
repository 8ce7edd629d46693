"""Benchmark: load a generated contacts CSV; print rows/s and peak memory.

Usage: python bench/contacts.py [--rows 100000]
Every row is fully validated (phonenumbers, email-validator, handle rules).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from incident_notify.contacts import iter_contacts, load_contacts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "contacts.csv"
        with open(path, "w") as out:
            out.write("id,name,email,phone,twitter,channels,groups,tags\n")
            for i in range(args.rows):
                area = 202 + (i // 10_000) % 7 * 100  # 202, 302, ... all valid US areas
                out.write(f"c{i},Person {i},person{i}@example.com,+1{area}555{i % 10_000:04d},"
                          f"@user{i % 10**9},sms;email,g{i % 10},customer\n")
        size_mb = path.stat().st_size / 1e6
        # Streaming pass: what a fan-out touches, one row at a time.
        started = time.perf_counter()
        problems: list = []
        count = sum(1 for _ in iter_contacts([path], problems=problems))
        stream_s = time.perf_counter() - started
        rss_stream = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # Full load into a ContactSet (what planning holds).
        started = time.perf_counter()
        cs = load_contacts([path])
        load_s = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"rows              {args.rows} ({size_mb:.1f} MB CSV), {count} valid, "
          f"{len(problems)} invalid")
    print(f"streaming pass    {stream_s:.2f} s  ({count / stream_s:,.0f} rows/s, cold "
          f"caches), peak RSS after it {rss_stream:.0f} MiB")
    print(f"load into memory  {load_s:.2f} s  ({len(cs.contacts) / load_s:,.0f} rows/s; "
          "normalisation caches warm)")
    print(f"peak RSS          {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
