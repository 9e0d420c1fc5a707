"""style.md principle 12: no test may use a relative tolerance looser than 1e-2."""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PATTERN = re.compile(r"\brtol\s*=\s*([0-9][0-9.eE+-]*)")


def test_no_loose_relative_tolerance():
    loose = []
    for path in TESTS.rglob("*.py"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for m in PATTERN.finditer(line):
                if float(m.group(1)) > 1e-2:
                    loose.append(f"{path.relative_to(TESTS)}:{lineno}: rtol={m.group(1)}")
    assert not loose, "tolerances looser than rtol=1e-2: " + "; ".join(loose)


def test_the_scan_finds_tolerances():
    # guard against a pattern that silently matches nothing
    hits = sum(len(PATTERN.findall(p.read_text())) for p in TESTS.rglob("*.py"))
    assert hits >= 10
