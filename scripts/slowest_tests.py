"""Prints the slowest tests of one or more pytest JUnit XML files, slowest first.

    python scripts/slowest_tests.py 15 .test-artifacts/junit-*.xml

`make test` runs the suite in two pytest processes (the release matrix apart, so that its child
interpreters do not share the machine's memory with the in-process models and the suite's server);
this gives the slowest tests of both as one list.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.stderr.write(__doc__)
        return 2
    count, rows = int(argv[0]), []
    for path in argv[1:]:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as exc:
            sys.stderr.write(f"slowest_tests: {path}: {exc}\n")
            continue
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name', '?')}"
            rows.append((float(case.get("time") or 0.0), name))
    rows.sort(reverse=True)
    sys.stdout.write(f"slowest {min(count, len(rows))} of {len(rows)} tests (both pytest runs):\n")
    for seconds, name in rows[:count]:
        sys.stdout.write(f"{seconds:8.2f}s  {name}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
